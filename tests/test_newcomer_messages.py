"""What a newcomer meets (issue 19): a command line that answers without loading torch, and
messages that say what happened (not a file, an override, a stop, a schedule that had ended)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import QUICK_DIGITS, REPO, run_dirs
from stop_injection import install

from dltemplate.cli import format_config
from dltemplate.config import load_config
from dltemplate.engine.runlog import rerun_command

DEMO = REPO / "configs" / "digits_mlp.yaml"

pytestmark = pytest.mark.usefixtures("fast_and_tidy")


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    """stderr of a command that failed with a usage error: one line, no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err.strip()


def fake_run(folder: Path, *overrides: str) -> Path:
    """A run directory holding only its saved config (what compare-configs reads)."""
    folder.mkdir(parents=True)
    raw = yaml.safe_load(format_config(load_config(DEMO, list(overrides))))
    (folder / f"config_DigitsMLP_{folder.name}.json").write_text(json.dumps(raw))
    return folder


# == the command line without torch ============================================================
# A tiny runner: the command's exit status and whether torch was imported by the end.
RUNNER = (
    "import sys\n"
    "from dltemplate.cli import main\n"
    "try:\n    rc = main(sys.argv[1:])\nexcept SystemExit as exc:\n    rc = exc.code\n"
    "print('RESULT', rc, 'torch' in sys.modules)\n"
)


@pytest.mark.parametrize(
    "args, status",
    [
        (["--help"], 0),
        (["train", "--help"], 0),
        (["eval", "--help"], 0),
        (["compare-configs", "--help"], 0),
        (["config", str(DEMO), "trainer.epochs=3"], 0),
        (["compare-configs", str(DEMO), str(REPO / "configs" / "fashion_mnist_mlp.yaml")], 0),
        (["compare-configs", "RUN", str(DEMO)], 0),
        (["train"], 2),  # argument errors
        (["bogus"], 2),
        (["train", str(DEMO), "--epochs", "3"], 2),
        (["train", str(DEMO), "trainer.epoch=3"], 2),  # a config error, before anything runs
    ],
)
def test_help_config_and_argument_errors_do_not_import_torch(tmp_path, args, status):
    run = fake_run(tmp_path / "20250101_000000")
    args = [str(run) if a == "RUN" else a for a in args]
    done = subprocess.run(
        [sys.executable, "-c", RUNNER, *args], capture_output=True, text=True, timeout=120
    )
    assert done.stdout.strip().splitlines()[-1] == f"RESULT {status} False", done.stderr


def test_a_reader_that_goes_away_ends_the_command_quietly_with_status_141():
    """``dltemplate config ... | head -0``: no "Broken pipe" error line, the status of a process
    that SIGPIPE ended (as other Unix tools give)."""
    command = [sys.executable, "-m", "dltemplate", "config", str(DEMO)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # before the command has started writing
    error = process.stderr.read().decode()
    assert process.wait(timeout=120) == 141 and error == ""


def test_a_reader_that_leaves_part_way_through_a_long_table_ends_it_quietly(tmp_path):
    """``dltemplate runs DIR | head -1`` on more runs than a pipe holds (64 KiB)."""
    first = fake_run(tmp_path / "runs" / "20240101_000000_digits_mlp")
    raw = first.joinpath(f"config_DigitsMLP_{first.name}.json").read_text()
    for i in range(1, 700):
        folder = tmp_path / "runs" / f"20240101_{i:06d}_digits_mlp_with_a_longer_name_{i}"
        folder.mkdir()
        (folder / f"config_DigitsMLP_{folder.name}.json").write_text(raw)
    command = [sys.executable, "-m", "dltemplate", "runs", str(tmp_path / "runs")]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout.readline()  # the header, then the reader goes away
    process.stdout.close()
    error = process.stderr.read().decode()
    assert process.wait(timeout=120) == 141 and error == ""


# == compare-configs takes run directories =====================================================
def test_compare_configs_takes_run_directories(cli, tmp_path, capsys):
    a = fake_run(tmp_path / "20250101_000000")
    b = fake_run(tmp_path / "20250101_000001", "optimizer.lr=0.01", "trainer.epochs=3")
    assert cli("compare-configs", a, b) == 0
    out = capsys.readouterr().out
    assert "optimizer.lr" in out and "0.001  ->  0.01" in out and "trainer.epochs" in out
    assert cli("compare-configs", a, DEMO) == 0  # a run directory against a YAML file
    assert "no differences" in capsys.readouterr().out
    assert cli("compare-configs", tmp_path / "missing", DEMO) == 2
    assert "missing" in one_line_error(capsys)
    assert cli("compare-configs", tmp_path, DEMO) == 2  # a folder that is not a run
    assert "no config_*.json" in one_line_error(capsys)


# == messages that mislead ======================================================================
def test_a_yaml_file_given_to_eval_is_said_not_to_be_a_checkpoint(cli, capsys):
    assert cli("eval", DEMO) == 2
    err = one_line_error(capsys)
    assert f"{DEMO} is not a dltemplate checkpoint: a text file (a YAML config?" in err
    assert "Python objects" not in err


@pytest.mark.parametrize(
    "override, said",
    [
        ("model.args.hidden=[128", '"model.args.hidden=[128, 64]"'),  # unbalanced
        ("model.args.hidden=[128,", "quote the whole override"),  # the shell split [128, 64]
        ("loss.args={label_smoothing: 0.1", '"loss.args={a: 1, b: 2}"'),
        ("experiment.name=a b: c: d", "text with spaces and colons needs YAML quotes"),
    ],
)
def test_an_override_that_is_not_yaml_is_refused_with_a_quoting_hint(cli, capsys, override, said):
    assert cli("config", DEMO, override) == 2
    err = one_line_error(capsys)
    assert err.startswith(f"dltemplate: error: override '{override}': not valid YAML (")
    assert said in err


def test_a_plain_word_override_is_still_text(cli, capsys):
    assert cli("config", DEMO, "experiment.name=@home") == 0
    assert yaml.safe_load(capsys.readouterr().out)["experiment"]["name"] == "@home"


def test_a_typo_in_an_override_key_is_blamed_on_the_override(cli, capsys):
    assert cli("train", DEMO, "trainer.epoch=3") == 2
    err = one_line_error(capsys)
    assert err == (
        "dltemplate: error: override 'trainer.epoch=3': unknown key 'trainer.epoch' "
        "(did you mean 'trainer.epochs'?)"
    )
    assert cli("config", DEMO, "traner.epochs=3") == 2
    err = one_line_error(capsys)
    assert "override 'traner.epochs=3'" in err and "did you mean 'trainer'" in err
    assert str(DEMO) not in err


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished one-epoch run of the demo (copy it before changing it)."""
    from dltemplate.cli import main

    out = tmp_path_factory.mktemp("messages") / "out"
    assert main(["train", str(DEMO), *QUICK_DIGITS, f"experiment.output_dir={out}"]) == 0
    (run,) = run_dirs(out)
    return run


@pytest.mark.parametrize(
    "table, said",
    [
        ("epoch,lr\n1,0.1,7,8\n", "row 1 has 4 fields, the header 2"),
        ("epoch,lr,val/loss\n1,0.1\n", "row 1 has 2 fields, the header 3"),
        ("epoch,lr\n1,fast\n", "row 1: lr='fast' is not a number"),
        ("epoch,lr\n,0.1\n", "row 1: the epoch is missing"),
    ],
)
def test_a_garbled_metrics_table_is_one_line_naming_it(
    cli, capsys, tmp_path, digits_run, table, said
):
    run = tmp_path / digits_run.name
    shutil.copytree(digits_run, run)
    (run / "metrics.csv").write_text(table)
    assert cli("resume", run, "trainer.epochs=2") == 2
    err = one_line_error(capsys)
    assert f"{run / 'metrics.csv'}: not a metrics table written by dltemplate ({said})" in err
    assert cli("runs", run) == 0  # the table of runs notes it on the run's row
    assert f"metrics.csv: not a metrics table ({said})" in capsys.readouterr().out


def test_no_eval_hint_without_a_checkpoint(cli, tmp_path):
    out = tmp_path / "out"
    assert cli("train", DEMO, *QUICK_DIGITS, f"experiment.output_dir={out}",
               "trainer.fast_dev_run=1") == 0  # fmt: skip
    (run,) = run_dirs(out)
    log = (run / "train.log").read_text()
    assert "no checkpoint written (trainer.fast_dev_run)" in log
    assert "evaluate with" not in log


def test_the_eval_hint_carries_trust_code_when_the_run_needs_it(cli, tmp_path, capsys):
    out = tmp_path / "out"
    # experiment.imports names code to import: a run directory runs it only when trusted
    assert cli("train", DEMO, *QUICK_DIGITS, f"experiment.output_dir={out}",
               "experiment.imports=[json]") == 0  # fmt: skip
    (run,) = run_dirs(out)
    hint = (run / "train.log").read_text().split("evaluate with: ")[1].splitlines()[0]
    assert hint == f"dltemplate eval {run} --trust-code"
    capsys.readouterr()
    assert cli(*shlex.split(hint)[1:], "--limit-batches", "1") == 0  # the hint works as said


def test_a_stop_during_the_final_test_says_so(cli, tmp_path, capsys):
    out = tmp_path / "out"
    undo = install("final_test", "sigint", 1)
    try:
        status = cli("train", DEMO, *QUICK_DIGITS, "trainer.epochs=2",
                     f"experiment.output_dir={out}", "experiment.imports=[json]")  # fmt: skip
    finally:
        undo()
    assert status == 130
    (run,) = run_dirs(out)
    log = (run / "train.log").read_text()
    assert "run stopped by SIGINT during the final test, step" in log
    assert "at epoch 3" not in log
    assert f"dltemplate resume {run} --trust-code" in log  # the resume hint needs it too
    capsys.readouterr()
    assert cli("runs", run, "--csv") == 0  # the table of runs quotes the line
    assert "run stopped by SIGINT during the final test, step" in capsys.readouterr().out


def warning_in_log(run: Path, start: str) -> str:
    """The one line of ``run``'s train.log that starts (after its time) with ``start``; it must
    be a WARNING."""
    (line,) = [x for x in (run / "train.log").read_text().splitlines() if f" {start}" in x]
    assert f" WARNING {start}" in line, line
    return line


def test_training_longer_on_an_ended_cosine_schedule_warns_naming_eta_min(
    cli, tmp_path, digits_run
):
    run = tmp_path / digits_run.name
    shutil.copytree(digits_run, run)
    assert cli("resume", run, "trainer.epochs=2") == 0
    said = warning_in_log(run, "training longer:")
    assert "had already ended (scheduler step 1 of 1)" in said
    assert "final learning rate 0 (scheduler.args.eta_min=0)" in said
    assert "train a new run with the larger trainer.epochs" in said
    assert "stretched" not in (run / "train.log").read_text()


def test_training_shorter_warns_that_the_schedule_is_cut(cli, tmp_path):
    out = tmp_path / "out"
    undo = install("validation", "sigint", 1)  # stop in epoch 2 of 4
    try:
        assert cli("train", DEMO, *QUICK_DIGITS, "trainer.epochs=4",
                   f"experiment.output_dir={out}") == 130  # fmt: skip
    finally:
        undo()
    (run,) = run_dirs(out)
    assert cli("resume", run, "trainer.epochs=3") == 0
    said = warning_in_log(run, "training shorter:")
    assert "ends at scheduler step 3 of the 4" in said and "cut where it stands" in said


# == torchrun ===================================================================================
@pytest.mark.parametrize(
    "argv, env, command",
    [
        (["/x/dltemplate/__main__.py", "train", "a b.yaml"], {},
         "python -m dltemplate train 'a b.yaml'"),
        (["/venv/bin/dltemplate", "train", "c.yaml", "m.args.h=[1, 2]"], {},
         "/venv/bin/dltemplate train c.yaml 'm.args.h=[1, 2]'"),
        (["/x/dltemplate/__main__.py", "train", "c.yaml"],
         {"TORCHELASTIC_RUN_ID": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"},
         "torchrun --nproc_per_node 2 -m dltemplate train c.yaml"),
        (["/x/dltemplate/__main__.py", "resume", "r"],
         {"TORCHELASTIC_RUN_ID": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4",
          "TORCHELASTIC_MAX_RESTARTS": "3"},
         "torchrun --nnodes 2 --nproc_per_node 4 --max_restarts 3 -m dltemplate resume r"),
        (["trainer_vanilla.py", "--epochs", "2"], {}, "python trainer_vanilla.py --epochs 2"),
    ],
)  # fmt: skip
def test_the_logged_command_runs_the_run_again(argv, env, command):
    assert rerun_command(argv, env) == command


def test_a_config_error_under_torchrun_is_one_line_exit_2_and_torchruns_root_cause(tmp_path):
    """Each process exits 2; rank 0 alone prints the line; every process puts it in the error
    file torchrun reads, so torchrun's failure report names it instead of a link."""
    args = [sys.executable, "-m", "dltemplate", "train", str(DEMO), "trainer.epoch=3"]
    for rank in (0, 1):
        error_file = tmp_path / f"error_{rank}.json"
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "TORCHELASTIC_RUN_ID": "x", "TORCHELASTIC_ERROR_FILE": str(error_file)}  # fmt: skip
        done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 2
        line = "dltemplate: error: override 'trainer.epoch=3': unknown key 'trainer.epoch'"
        assert done.stderr.startswith(line) if rank == 0 else done.stderr == ""
        assert json.loads(error_file.read_text())["message"].startswith(line)


@pytest.mark.slow
def test_a_config_error_under_real_torchrun(tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    done = subprocess.run(
        [str(torchrun), "--nproc_per_node", "2", "-m", "dltemplate", "train", str(DEMO),
         "trainer.epoch=3"], capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode != 0
    said = "dltemplate: error: override 'trainer.epoch=3': unknown key 'trainer.epoch'"
    assert done.stderr.count(said) >= 2  # rank 0's line, and torchrun's root cause
    assert "To enable traceback see" not in done.stderr


# == the seed's scripts =========================================================================
@pytest.mark.parametrize("script", ["trainer_vanilla.py", "trainer_seg_on_carvana.py"])
def test_the_seed_training_scripts_help_says_what_each_flag_sets(script):
    done = subprocess.run(
        [sys.executable, str(REPO / script), "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split("options:", 1)[1].split())  # unwrapped, past usage
    for flag, key in [
        ("--proj_name PROJ_NAME", "experiment.name"),
        ("--model_type MODEL_TYPE", "model.name"),
        ("--data_type DATA_TYPE", "data.name"),
        ("--output_dir OUTPUT_DIR", "experiment.output_dir"),
        ("--data_dir DATA_DIR", "data.root"),
        ("--epochs EPOCHS", "trainer.epochs"),
        ("--batch_size BATCH_SIZE", "data.batch_size"),
        ("--lr LR", "optimizer.lr"),
    ]:
        after = text.split(flag, 1)[1]
        assert after.lstrip().split(" --", 1)[0].find(f"({key})") >= 0, (flag, after[:120])
    assert "(experiment.gpu_devices)" in text
