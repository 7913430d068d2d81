"""`dltemplate runs`: the table of run directories — rows, statuses, the config keys that differ,
--sort, --csv, --group-seeds, a running run (its lock held by another process), damaged files
and bad input."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import shutil
import statistics
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import QUICK_DIGITS, REPO

from dltemplate.cli import main
from dltemplate.tasks.classification import ClassificationTask
from dltemplate.tools.runs_table import format_table, list_runs, read_run

DEMO = REPO / "configs" / "digits_mlp.yaml"
LRS, SEEDS = (0.001, 0.003), (1, 2)
LAST = "Vanilla_last_ckpt.pth"


@contextlib.contextmanager
def failing_forward(mp: pytest.MonkeyPatch, at: int, exc: type[BaseException]) -> Iterator[None]:
    """The ``at``-th training forward (1-based, from now on) raises ``exc``."""
    original = ClassificationTask.forward
    calls = [0]

    def forward(self, model, batch):
        if model.training:
            calls[0] += 1
            if calls[0] == at:
                raise exc("injected")
        return original(self, model, batch)

    with mp.context() as m:
        m.setattr(ClassificationTask, "forward", forward)
        yield


def one_run(out: Path) -> Path:
    (run,) = [p.parent for p in out.glob("*/config_*.json")]
    return run


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """``grid/lr<lr>_s<seed>/<run>`` (2 lrs x 2 seeds, finished) and ``extra/``: a run stopped
    by Ctrl-C in its second epoch, one failed before any checkpoint, and copies of a finished
    run with a damaged checkpoint, a garbled config and a garbled metrics.csv."""
    from dltemplate.engine import rundir

    root = tmp_path_factory.mktemp("runs_table")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rundir, "plot_curves", lambda *a, **k: None)  # no curves: seconds saved

        def train(out: Path, *overrides: str) -> int:
            return main(["train", str(DEMO), f"experiment.output_dir={out}", *QUICK_DIGITS,
                         *overrides])  # fmt: skip

        for lr in LRS:
            for seed in SEEDS:
                out = root / "grid" / f"lr{lr}_s{seed}"
                assert train(out, f"optimizer.lr={lr}", f"experiment.seed={seed}") == 0
        with failing_forward(mp, 13 + 4, KeyboardInterrupt):  # 13 steps an epoch
            assert train(root / "extra" / "stopped", "trainer.epochs=2") == 130
        with failing_forward(mp, 3, RuntimeError):
            assert train(root / "extra" / "failed", "trainer.save_on_exception=false") == 1
    finished = one_run(root / "grid" / "lr0.001_s1")
    for name in ("damaged", "badconfig", "badmetrics"):
        shutil.copytree(finished, root / "extra" / name / finished.name)
    ckpt = one_run(root / "extra" / "damaged") / LAST
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    next(iter(state["model"].values())).add_(1.0)  # a weight changed, the digest kept
    torch.save(state, ckpt)
    config = next(one_run(root / "extra" / "badconfig").glob("config_*.json"))
    config.write_text('{"experiment": {"name": ')
    (one_run(root / "extra" / "badmetrics") / "metrics.csv").write_text("a,b\n1,2\n")
    log = logging.getLogger("dltemplate")
    for handler in list(log.handlers):  # the train.log that in-process runs left open
        log.removeHandler(handler)
        handler.close()
    yield root


def cli(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["runs", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def csv_rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def metrics_seconds(run: Path) -> float:
    with open(run / "metrics.csv", newline="") as fh:
        return sum(float(r["seconds"]) for r in csv.DictReader(fh))


# == the rows ===================================================================================
def test_one_row_per_run_with_its_numbers_and_the_keys_that_differ(base, capsys):
    rows = list_runs([base / "grid"])
    assert [r["run"] for r in rows] == [
        f"lr{lr}_s{seed}/{one_run(base / 'grid' / f'lr{lr}_s{seed}').name}"
        for lr in LRS
        for seed in SEEDS
    ]
    assert list(rows[0]) == [
        "run", "status", "epochs", "best_epoch", "val/accuracy", "test/accuracy", "test/loss",
        "duration", "experiment.seed", "optimizer.lr", "note", "path", "duration_source",
    ]  # fmt: skip
    for row, (lr, seed) in zip(rows, [(lr, s) for lr in LRS for s in SEEDS]):
        run = Path(row["path"])
        test = json.loads((run / "test_metrics.json").read_text())
        assert row["status"] == "finished" and row["note"] is None
        assert (row["epochs"], row["best_epoch"]) == (1, 1)
        assert (row["optimizer.lr"], row["experiment.seed"]) == (lr, seed)
        assert row["test/accuracy"] == test["accuracy"] and row["test/loss"] == test["loss"]
        with open(run / "metrics.csv", newline="") as fh:
            (epoch,) = list(csv.DictReader(fh))
        assert row["val/accuracy"] == pytest.approx(float(epoch["val/accuracy"]), abs=1e-12)
        assert row["duration"] == pytest.approx(metrics_seconds(run))
        assert row["duration_source"] == "metrics.csv"

    code, out, err = cli(capsys, base / "grid")
    assert code == 0 and err == ""
    header, *lines = out.splitlines()
    assert header.split() == [
        "run", "status", "epochs", "best_epoch", "val/accuracy", "test/accuracy", "test/loss",
        "duration", "experiment.seed", "optimizer.lr", "note",
    ]  # fmt: skip
    assert len(lines) == 4 and all(" finished " in line for line in lines)
    assert f"{rows[0]['test/accuracy']:.4f}" in lines[0] and "0.003" in lines[2]
    assert out == format_table(rows) + "\n"


def test_a_single_run_directory_and_several_dirs(base, capsys):
    run = one_run(base / "grid" / "lr0.003_s2")
    (row,) = list_runs([run])
    assert row["run"] == run.name and row["status"] == "finished"
    assert "optimizer.lr" not in row  # one run: nothing differs
    rows = list_runs([base / "grid" / "lr0.001_s1", run, base / "grid"])  # the same run twice
    assert len(rows) == 4  # each run once
    assert rows[0]["run"] == str(one_run(base / "grid" / "lr0.001_s1"))  # several: DIR/...
    assert rows[1]["run"] == str(run)  # a DIR that is itself the run: named as given


def test_runs_are_found_six_levels_deep_not_in_hidden_folders(base, tmp_path):
    run = one_run(base / "grid" / "lr0.001_s1")
    shutil.copytree(run, tmp_path / "a" / "b" / "c" / "d" / "e" / run.name)  # 6 levels down
    shutil.copytree(run, tmp_path / "a" / "b" / "c" / "d" / "e" / "f" / run.name)  # 7
    shutil.copytree(run, tmp_path / "a" / ".hidden" / run.name)
    (row,) = list_runs([tmp_path])
    assert row["run"] == f"a/b/c/d/e/{run.name}" and row["status"] == "finished"


def test_a_run_deleted_while_the_table_is_read_is_left_out(base, tmp_path, monkeypatch):
    from dltemplate.tools import runs_table

    for name in ("a", "b"):
        shutil.copytree(one_run(base / "grid" / "lr0.001_s1"), tmp_path / name / "run")
    read = runs_table.read_run

    def read_after_deleting_b(run_dir):
        shutil.rmtree(tmp_path / "b", ignore_errors=True)  # rm -r while the table reads
        return read(run_dir)

    monkeypatch.setattr(runs_table, "read_run", read_after_deleting_b)
    (row,) = list_runs([tmp_path])
    assert row["run"] == "a/run" and row["status"] == "finished"
    assert read(tmp_path / "b")["status"] == "damaged"  # read_run itself never raises


def test_small_metrics_keep_four_significant_digits_in_the_table():
    """A regression's val/mae of 8e-5 printed as 0.0001 for every run (.4f)."""
    rows = [
        {"run": "a", "val/mae": 8.1234e-05, "test/loss": 0.5, "duration": 3.0, "note": None},
        {"run": "b", "val/mae": 7.9e-05, "test/loss": 2.5e7, "duration": 3.0, "note": None},
    ]
    a, b = format_table(rows).splitlines()[1:]
    assert a.split()[1:3] == ["8.123e-05", "0.5000"]
    assert b.split()[1:3] == ["7.9e-05", "2.5e+07"]


def test_config_floats_a_sampler_drew_keep_six_significant_digits_in_the_table():
    rows = [
        {"run": "a", "optimizer.lr": 0.003538453590906551, "model.args.hidden": [32]},
        {"run": "b", "optimizer.lr": 0.0001, "model.args.hidden": [64]},
    ]
    a, b = format_table(rows).splitlines()[1:]
    assert a.split()[1:] == ["0.00353845", "[32]"]
    assert b.split()[1:] == ["0.0001", "[64]"]


# == sorting and CSV ============================================================================
def test_sort_ascending_descending_and_csv(base, capsys):
    code, out, err = cli(capsys, base / "grid", "--sort=-test/accuracy", "--csv")
    assert code == 0 and err == ""
    rows = csv_rows(out)
    assert len(rows) == 4
    accuracies = [float(r["test/accuracy"]) for r in rows]
    assert accuracies == sorted(accuracies, reverse=True)
    assert {r["status"] for r in rows} == {"finished"}
    assert all(Path(r["path"]).is_dir() and r["duration_source"] == "metrics.csv" for r in rows)
    assert all(float(r["duration"]) > 0 and r["note"] == "" for r in rows)

    code, out, _ = cli(capsys, base / "grid", "--sort", "test/loss")
    losses = [float(line.split()[6]) for line in out.splitlines()[1:]]
    assert code == 0 and losses == sorted(losses)
    rows = list_runs([base / "grid"], sort="-optimizer.lr")
    assert [r["optimizer.lr"] for r in rows] == [0.003, 0.003, 0.001, 0.001]
    assert [r["experiment.seed"] for r in rows] == [1, 2, 1, 2]  # ties keep the order by run


# == grouping seeds =============================================================================
def test_group_seeds_means_and_stds(base, capsys):
    singles = list_runs([base / "grid"])
    code, out, err = cli(capsys, base / "grid", "--group-seeds", "--csv")
    assert code == 0 and err == ""
    rows = csv_rows(out)
    assert [r["n"] for r in rows] == ["2", "2"]
    assert [json.loads(r["experiment.seed"]) for r in rows] == [[1, 2], [1, 2]]
    assert [float(r["optimizer.lr"]) for r in rows] == [0.001, 0.003]
    assert rows[0]["run"] == singles[0]["run"] + " +1"
    for row, lr in zip(rows, LRS):
        mine = [s for s in singles if s["optimizer.lr"] == lr]
        for column in ("test/accuracy", "val/accuracy", "duration"):
            values = [s[column] for s in mine]
            assert float(row[column]) == pytest.approx(statistics.fmean(values))
            assert float(row[column + "_std"]) == pytest.approx(statistics.stdev(values))
        assert row["status"] == "finished" and row["epochs"] == "1.0"

    code, out, _ = cli(capsys, base / "grid", "--group-seeds", "--sort=-test/accuracy")
    header, *lines = out.splitlines()
    assert header.split()[:3] == ["run", "n", "status"] and len(lines) == 2
    assert all(" ± " in line for line in lines)
    tests = [float(line.split(" ± ")[3].split()[-1]) for line in lines]  # test/accuracy means
    assert tests == sorted(tests, reverse=True)


# == statuses from the files ====================================================================
def test_statuses_stopped_failed_and_damaged(base, capsys):
    code, out, err = cli(capsys, base / "extra", "--csv")
    assert code == 0 and err == ""
    rows = {r["run"].split("/")[0]: r for r in csv_rows(out)}
    assert set(rows) == {"badconfig", "badmetrics", "damaged", "failed", "stopped"}

    stopped = rows["stopped"]  # Ctrl-C in epoch 2: an interrupt checkpoint newer than the last
    assert stopped["status"] == "stopped" and stopped["epochs"] == "1"
    assert "stopped by SIGINT" in stopped["note"] and stopped["test/accuracy"] == ""
    assert stopped["best_epoch"] == "1" and float(stopped["val/accuracy"]) > 0

    failed = rows["failed"]  # an exception before the first checkpoint, none written
    assert failed["status"] == "failed" and failed["epochs"] == "0"
    assert "no checkpoint" in failed["note"] and "RuntimeError at epoch 1" in failed["note"]
    assert failed["duration_source"] == "train.log" and float(failed["duration"]) >= 0

    damaged = rows["damaged"]
    assert damaged["status"] == "damaged"
    assert damaged["note"].startswith(f"{LAST}: the checkpoint is damaged")
    assert float(damaged["test/accuracy"]) > 0 and damaged["epochs"] == "1"  # from the files

    assert rows["badconfig"]["status"] == "damaged"
    assert (
        rows["badconfig"]["note"].startswith("config_")
        and "not readable" in rows["badconfig"]["note"]
    )
    assert rows["badconfig"]["val/accuracy"] != ""  # the monitor from the checkpoint's config
    assert rows["badmetrics"]["status"] == "damaged"
    assert "metrics.csv: not a metrics table" in rows["badmetrics"]["note"]

    # the keys that differ between these runs include the ones set on the command line
    assert {"trainer.epochs", "trainer.save_on_exception"} <= set(csv_rows(out)[0])
    code, out, _ = cli(capsys, base / "extra")
    assert code == 0 and "Traceback" not in out
    assert read_run(one_run(base / "extra" / "stopped"))["status"] == "stopped"


def test_a_run_whose_lock_another_process_holds_is_running(base, capsys):
    run = one_run(base / "grid" / "lr0.003_s1")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from dltemplate.engine.rundir import RunLock; "
         "RunLock(sys.argv[1]).acquire(); print('held', flush=True); sys.stdin.read()", str(run)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        row = read_run(run)
        assert row["status"] == "running"
        assert row["notes"] == [row["notes"][0]]
        assert row["notes"][0].startswith(f"being written by pid {holder.pid} on ")
        code, out, _ = cli(capsys, base / "grid", "--csv")
        statuses = {r["run"].split("/")[0]: r["status"] for r in csv_rows(out)}
        assert statuses["lr0.003_s1"] == "running"
        assert [s for k, s in statuses.items() if k != "lr0.003_s1"] == ["finished"] * 3
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert read_run(run)["status"] == "finished"  # the lock went with its process


# == bad input ==================================================================================
def test_bad_input_is_one_line_and_status_2(base, tmp_path, capsys):
    (tmp_path / "empty" / "deeper").mkdir(parents=True)
    (tmp_path / "file.txt").write_text("x")
    cases = {
        tmp_path / "missing": "no such folder",
        tmp_path / "empty": "no run directory",
        tmp_path / "file.txt": "not a folder",
    }
    for target, said in cases.items():
        code, out, err = cli(capsys, target)
        assert code == 2 and out == "" and said in err and len(err.strip().splitlines()) == 1
    code, out, err = cli(capsys, base / "grid", "--sort", "tset/accuracy")
    assert code == 2 and "did you mean 'test/accuracy'" in err
    code, out, err = cli(capsys, base / "grid", base / "nope")  # one bad DIR of two
    assert code == 2 and "nope: no such folder" in err
