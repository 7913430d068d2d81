"""Names and where things go: readable run names, `resume last` where the configs write, eval
reports named by checkpoint, no stale interrupt checkpoint, outputs kept under the run."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest
import yaml
from conftest import QUICK_DIGITS, REPO, run_dirs

from dltemplate import seed_args
from dltemplate.config import load_config
from dltemplate.config.loader import default_run_name
from dltemplate.engine.checkpoint import checkpoint_kind
from dltemplate.engine.rundir import latest_run_dir, new_run_dir, run_dir_time
from dltemplate.errors import UsageError
from dltemplate.tasks.classification import ClassificationTask
from dltemplate.tools.runs_table import list_runs

DEMO = REPO / "configs" / "digits_mlp.yaml"
STAMP = r"\d{8}_\d{6}"

pytestmark = pytest.mark.usefixtures("fast_and_tidy")


# == run names ===================================================================================
def test_a_default_run_name_is_the_config_and_the_overrides_short_and_folder_safe():
    name = default_run_name(
        "configs/digits_mlp.yaml",
        ["optimizer.lr=0.0031622776601683794", "model.args.hidden=[128, 64]",
         "experiment.output_dir=/tmp/x", "data.root=/data", "trainer.resume=last",
         "loss.args={label_smoothing: 0.1}", "data.augment=true"],
    )  # fmt: skip
    assert name == "digits_mlp_lr=0.003162_hidden=128,64_loss=label_smoothing=0.1_augment=true"
    short = default_run_name(
        "digits_mlp.yaml", ["loss.args={label_smoothing: 0.1}", "data.augment=true"]
    )
    assert short == "digits_mlp_loss=label_smoothing=0.1_augment=true"
    assert default_run_name("a.yaml", ["experiment.name=a b/c"]) == "a_experiment=a-b-c"
    assert default_run_name(None, []) is None
    # where and how a run computes is not what it is: no name from these
    unnamed = ["experiment.threads=1", "experiment.device=cpu", "experiment.gpu_devices=[0]",
               "data.num_workers=2", "trainer.progress_bar=off"]  # fmt: skip
    assert default_run_name("digits_mlp.yaml", unnamed) == "digits_mlp"
    many = default_run_name("digits_mlp.yaml", [f"model.args.w{i}={i}" for i in range(30)])
    assert len(many) <= 80 and many.startswith("digits_mlp_w0=0_w1=1")
    assert many.endswith("_w11=11_+18")  # 12 of the 30 shown, and how many are not


def test_runs_are_named_after_their_config_and_overrides_everywhere(cli, tmp_path, capsys):
    out = tmp_path / "out"
    common = [DEMO, f"experiment.output_dir={out}", *QUICK_DIGITS]
    assert cli("train", *common, "optimizer.lr=0.01") == 0
    time.sleep(1.1)  # another second: directories of other names order by their timestamps
    assert cli("train", *common, "experiment.run_name=baseline") == 0
    first, second = run_dirs(out)
    expected = "digits_mlp_train_val_sample_rate=0.3_hidden=32_epochs=1_lr=0.01"
    assert re.fullmatch(f"{STAMP}_{expected}", first.name), first.name
    assert re.fullmatch(f"{STAMP}_baseline", second.name), second.name
    saved = json.loads(next(first.glob("config_*.json")).read_text())
    assert saved["experiment"]["run_name"] == expected
    assert f"run {first.name} started" in (first / "train.log").read_text()

    rows = list_runs([out])
    assert [r["run"] for r in rows] == [first.name, second.name]
    assert "experiment.run_name" not in rows[0]  # the run column names it already
    assert "optimizer.lr" in rows[0]
    assert latest_run_dir(out) == second


def test_a_run_name_that_cannot_name_a_folder_is_refused(cli, tmp_path, capsys):
    for bad in ["a/b", ".hidden", "x" * 101, "with space"]:
        assert (
            cli("train", DEMO, f"experiment.output_dir={tmp_path}", f"experiment.run_name={bad}")
            == 2
        )
        err = capsys.readouterr().err.strip()
        assert (
            len(err.splitlines()) == 1 and "experiment.run_name=" in err and "names the run" in err
        )
    assert not any(tmp_path.iterdir())


def test_config_prints_no_derived_run_name_so_the_printed_file_names_its_own_runs(
    cli, tmp_path, capsys
):
    """`dltemplate config X.yaml > mine.yaml`: runs of mine.yaml are named after mine.yaml and
    their overrides, not frozen to X's name."""
    capsys.readouterr()
    assert cli("config", DEMO, "trainer.epochs=1") == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["experiment"]["run_name"] is None
    mine = tmp_path / "mine.yaml"
    mine.write_text(yaml.safe_dump(printed))
    assert load_config(mine, ["optimizer.lr=0.1"]).experiment.run_name == "mine_lr=0.1"


def test_runs_started_in_the_same_second_get_numbers_and_stay_in_order(tmp_path, monkeypatch):
    import datetime
    import types

    from dltemplate.engine import rundir

    class Frozen(datetime.datetime):
        """The same second for every run directory made."""

        @classmethod
        def now(cls, tz=None):
            return cls(2024, 1, 1, 12, 0, 0)

    monkeypatch.setattr(rundir, "datetime", types.SimpleNamespace(datetime=Frozen))
    a = new_run_dir(tmp_path, "lr=0.1")
    b = new_run_dir(tmp_path, "lr=0.1")
    for run in (a, b):
        (run / "config_x.json").write_text("{}")
    assert a.name == "20240101_120000_lr=0.1" and b.name == f"{a.name}_1"
    assert run_dir_time(b.name) == (Frozen(2024, 1, 1, 12, 0, 0), 1)
    assert latest_run_dir(tmp_path) == b and sorted([b, a]) == [a, b]


def test_the_latest_of_runs_started_in_one_second_is_the_last_started_whatever_its_name(
    tmp_path,
):
    """``_1`` of one name is no later than a run of another name started after it."""
    stamp = "20240101_120000"
    for i, name in enumerate([f"{stamp}_x", f"{stamp}_x_1", f"{stamp}_y", f"{stamp}_5"]):
        (tmp_path / name).mkdir()
        config = tmp_path / name / "config_x.json"
        config.write_text("{}")
        os.utime(config, (1_700_000_000 + i, 1_700_000_000 + i))
        assert latest_run_dir(tmp_path).name == name


def test_the_latest_run_is_found_across_config_folders_and_by_time_without_stamps(tmp_path):
    """`resume last` looks in ./Results/<config>/<run>: the newest stamp of all the folders;
    folders named without a timestamp: the newest modified."""

    def run(path: Path, when: int) -> Path:
        path.mkdir(parents=True)
        config = path / "config_x.json"
        config.write_text("{}")
        os.utime(config, (when, when))
        os.utime(path, (when, when))
        return path

    results = tmp_path / "Results"
    run(results / "a" / "20240102_000000_a", 1)
    newest = run(results / "b" / "20240103_000000_b", 2)
    run(results / "b" / "20240101_000000_b", 3)  # written last, started first
    assert latest_run_dir(results, depth=2) == newest
    with pytest.raises(UsageError, match="no run directory"):
        latest_run_dir(results, depth=1)  # runs are two levels down
    plain = tmp_path / "plain"
    run(plain / "first", 10)
    second = run(plain / "second", 20)
    run(plain / "an_old_one", 5)
    assert latest_run_dir(plain) == second


# == resume last =================================================================================
def test_resume_last_finds_the_shipped_configs_runs_without_output_dir(cli, tmp_path, capsys):
    """`cli` runs in tmp_path: the demo config writes to ./Results/digits_mlp/<run>."""
    assert cli("resume", "last") == 2
    err = capsys.readouterr().err
    assert "no run directory in ./Results and the folders in it" in err and "--output-dir" in err

    assert cli("train", DEMO, *QUICK_DIGITS) == 0
    (run,) = run_dirs(tmp_path / "Results" / "digits_mlp")
    assert cli("resume", "last", "trainer.epochs=2") == 0
    assert run_dirs(tmp_path / "Results" / "digits_mlp") == [run]
    assert "resumed from" in (run / "train.log").read_text()
    capsys.readouterr()
    assert cli("resume", "last", "--config", DEMO) == 0  # where that config writes
    assert f"{run.name} is finished" in capsys.readouterr().err


# == eval reports, interrupt checkpoints ========================================================
def test_checkpoint_kind_names_the_report():
    assert checkpoint_kind("run/Vanilla_best_ckpt.pth") == "best"
    assert checkpoint_kind("run/My_Net_last_ckpt.pth") == "last"
    assert checkpoint_kind("Vanilla_interrupt_ckpt.pth") == "interrupt"
    assert checkpoint_kind("UNet_best_epoch007_ckpt.pth") == "best_epoch007"
    assert checkpoint_kind("UNet_epoch010_ckpt.pth") == "epoch010"
    assert checkpoint_kind("weights v2.pth") == "weights-v2"


def test_eval_reports_of_two_checkpoints_do_not_overwrite_each_other(cli, tmp_path, capsys):
    assert cli("train", DEMO, f"experiment.output_dir={tmp_path}", *QUICK_DIGITS) == 0
    (run,) = run_dirs(tmp_path)
    assert cli("eval", run) == 0
    assert cli("eval", run / "Vanilla_last_ckpt.pth", "--split", "val") == 0
    assert cli("eval", run / "Vanilla_last_ckpt.pth") == 0
    best = json.loads((run / "eval_test_best.json").read_text())
    last = json.loads((run / "eval_test_last.json").read_text())
    assert best["checkpoint"].endswith("Vanilla_best_ckpt.pth")
    assert last["checkpoint"].endswith("Vanilla_last_ckpt.pth")
    assert json.loads((run / "eval_val_last.json").read_text())["split"] == "val"
    assert f"report written to {run / 'eval_test_last.json'}" in capsys.readouterr().out


def test_a_finished_run_keeps_no_interrupt_checkpoint_of_an_earlier_stop(
    cli, tmp_path, monkeypatch
):
    original, calls = ClassificationTask.forward, [0]

    def forward(self, model, batch):  # Ctrl-C in the 5th training step
        if model.training:
            calls[0] += 1
            if calls[0] == 5:
                raise KeyboardInterrupt
        return original(self, model, batch)

    with monkeypatch.context() as m:
        m.setattr(ClassificationTask, "forward", forward)
        assert cli("train", DEMO, f"experiment.output_dir={tmp_path}", *QUICK_DIGITS) == 130
    (run,) = run_dirs(tmp_path)
    interrupt = run / "Vanilla_interrupt_ckpt.pth"
    assert interrupt.exists()
    assert cli("resume", run) == 0
    assert not interrupt.exists()
    log = (run / "train.log").read_text()
    assert "removed Vanilla_interrupt_ckpt.pth: the run went on past that stop" in log
    (row,) = list_runs([run])
    assert row["status"] == "finished"


# == outputs under the output directory ==========================================================
def test_the_seed_train_command_keeps_runs_out_of_the_data_folder(monkeypatch, tmp_path, capsys):
    """The seed's Carvana command said --output_dir Dataset/Carvana/ (inside --data_dir)."""
    seen: list[list[str]] = []
    monkeypatch.setattr(seed_args, "main", lambda argv, exiting=False: seen.append(argv) or 0)
    monkeypatch.chdir(tmp_path)
    config = REPO / "configs" / "unet_carvana.yaml"
    argv = ["--proj_name", "SegOnCarvana", "--output_dir", "Dataset/Carvana/",
            "--data_dir", "./Dataset/Carvana/"]  # fmt: skip
    assert seed_args.seed_train_main(argv, config) == 0
    assert "experiment.output_dir=./Results/SegOnCarvana" in seen[0]
    assert "inside --data_dir" in capsys.readouterr().err
    argv[3] = "./Results/Seg"  # elsewhere: as given
    assert seed_args.seed_train_main(argv, config) == 0
    assert "experiment.output_dir=./Results/Seg" in seen[1]


def test_readme_commands_write_under_results_and_gitignore_covers_the_rest():
    readme = (REPO / "README.md").read_text()
    assert "--out masks/" not in readme and "--save_path ./test_viz/" not in readme
    assert "--output_dir Dataset/Carvana/ --gpu_devices" not in readme
    ignored = (REPO / ".gitignore").read_text().split()
    assert {"Results/", "masks/", "test_viz/", "predictions/"} <= set(ignored)


def test_default_report_path_is_beside_the_checkpoint():
    from dltemplate.cli import default_report_path

    ckpt = Path("Results/x/run/UNet_best_ckpt.pth")
    assert default_report_path(ckpt, "val") == ckpt.parent / "eval_val_best.json"
