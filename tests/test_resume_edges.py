"""Edges of resuming: train longer, finished runs, `resume last`, damaged checkpoints, non-finite
losses, a dead writer's temp files and the signal that stopped a run."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import REPO, load_ckpt, metric_rows, run_dirs

from dltemplate.tasks.classification import ClassificationTask

DEMO = REPO / "configs" / "digits_mlp.yaml"
SMALL = ["data.train_val_sample_rate=0.3", "model.args.hidden=[32]"]
SPE = 13  # optimizer steps per epoch with SMALL (388 training samples, batch 32)
LAST, BEST = "Vanilla_last_ckpt.pth", "Vanilla_best_ckpt.pth"
INTERRUPT = "Vanilla_interrupt_ckpt.pth"


pytestmark = pytest.mark.usefixtures("fast_and_tidy")


def train(cli, out: Path, *overrides: str) -> int:
    return cli("train", DEMO, f"experiment.output_dir={out}", *SMALL, *overrides)


rows, ckpt = metric_rows, load_ckpt


def max_diff(a: Path, b: Path) -> float:
    wa, wb = ckpt(a)["model"], ckpt(b)["model"]
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def snapshot(run: Path, pattern: str = "**/*") -> dict[str, tuple[bytes, int]]:
    """Every file under ``run`` matching ``pattern``: its bytes and its mtime (ns)."""
    return {
        str(p.relative_to(run)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(run.glob(pattern))
        if p.is_file()
    }


@contextlib.contextmanager
def forward_patched(monkeypatch, hook) -> Iterator[None]:
    """ClassificationTask.forward calls ``hook(n, outputs)`` on the n-th training forward (1-based,
    counted in this process) and returns what it returns; undone on leaving."""
    original = ClassificationTask.forward
    calls = [0]

    def forward(self, model, batch):
        if model.training:
            calls[0] += 1
            return hook(calls[0], lambda: original(self, model, batch))
        return original(self, model, batch)

    with monkeypatch.context() as m:
        m.setattr(ClassificationTask, "forward", forward)
        yield


def interrupted_after(monkeypatch, steps: int):
    """Ctrl-C (KeyboardInterrupt) in the forward of the step after ``steps`` optimizer steps."""

    def hook(n, run_forward):
        if n == steps + 1:
            raise KeyboardInterrupt
        return run_forward()

    return forward_patched(monkeypatch, hook)


def flip_middle(path: Path, length: int = 4096) -> None:
    data = bytearray(path.read_bytes())
    assert len(data) > 2 * length, f"{path} is too small to damage its middle"
    start = len(data) // 2 - length // 2
    for i in range(start, start + length):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def dead_pid(start: int = 999_999) -> int:
    pid = start
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid += 1


# == 1. train longer ============================================================================
@pytest.mark.parametrize("scheduler", ["cosine", "step", "onecycle"])
def test_train_longer_stretches_the_schedule_without_raising_the_lr(
    cli, tmp_path, capsys, scheduler
):
    out = tmp_path / "out"
    assert train(cli, out, f"scheduler.name={scheduler}", "trainer.epochs=3") == 0
    (run,) = run_dirs(out)
    assert ckpt(run / LAST)["global_step"] == 3 * SPE

    assert cli("resume", run, "trainer.epochs=6") == 0
    assert run_dirs(out) == [run]
    table = rows(run)
    assert [int(r["epoch"]) for r in table] == [1, 2, 3, 4, 5, 6]
    lrs = [float(r["lr"]) for r in table]
    assert all(math.isfinite(x) and x >= 0 for x in lrs)
    at_switch = lrs[2]
    if scheduler in ("cosine", "step"):  # per epoch: the logged lr is the epoch's lr
        assert all(b <= a for a, b in zip(lrs[2:], lrs[3:])), lrs
    else:  # per step: never back above the lr the old schedule had reached
        assert max(lrs[3:]) <= at_switch, lrs
    # The old schedule had run out: the new epochs hold its final value (no restart).
    assert lrs[3] == pytest.approx(lrs[4]) and lrs[4] == pytest.approx(lrs[5])
    last = ckpt(run / LAST)
    assert (last["epoch"], last["global_step"], last["finished"]) == (6, 6 * SPE, True)

    log = (run / "train.log").read_text()
    # The schedule had ended: the log says so (a warning), not that anything was stretched.
    assert "WARNING training longer: the learning-rate schedule had already ended" in log
    assert "keep its final learning rate" in log and "stretched over" not in log
    assert ("scheduler.args.eta_min=0" in log) == (scheduler == "cosine")
    assert "config changed on resume" in log and "trainer.epochs: 3 -> 6" in log
    (cfg_file,) = run.glob("config_*.json")
    assert json.loads(cfg_file.read_text())["trainer"]["epochs"] == 6

    # A plain resume now reads epochs=6 from the saved config: finished, nothing changes.
    before = snapshot(run)
    capsys.readouterr()
    assert cli("resume", run) == 0
    assert f"run {run} is finished (epoch 6" in capsys.readouterr().err
    assert snapshot(run) == before


def test_a_stretched_run_stopped_and_resumed_matches_one_never_stopped(cli, tmp_path, monkeypatch):
    """Train longer from an interrupt mid-schedule (the schedule is really stretched), then
    interrupt the stretched part too: the resumed result equals the uninterrupted stretch."""
    common = ["scheduler.name=onecycle", "trainer.epochs=3"]
    first_stop = SPE + 5  # in epoch 2 of 3, past one-cycle's warm-up: annealing
    runs = {}
    for name in ("straight", "stopped"):
        out = tmp_path / name
        with interrupted_after(monkeypatch, first_stop):
            assert train(cli, out, *common) == 130
        (run,) = run_dirs(out)
        assert ckpt(run / INTERRUPT)["global_step"] == first_stop
        runs[name] = run

    straight, stopped = runs["straight"], runs["stopped"]
    assert cli("resume", straight, "trainer.epochs=6") == 0
    second_stop = 4 * SPE + 3  # in epoch 5, inside the stretched schedule
    with interrupted_after(monkeypatch, second_stop - first_stop):
        assert cli("resume", stopped, "trainer.epochs=6") == 130
    assert ckpt(stopped / INTERRUPT)["global_step"] == second_stop
    assert cli("resume", stopped) == 0  # the saved config already says 6 epochs

    for run in (straight, stopped):
        assert [int(r["epoch"]) for r in rows(run)] == [1, 2, 3, 4, 5, 6]
        last = ckpt(run / LAST)
        assert (last["epoch"], last["global_step"], last["finished"]) == (6, 6 * SPE, True)
        assert "stretched over steps 18-78" in (run / "train.log").read_text()
    lrs = [float(r["lr"]) for r in rows(straight)]
    assert all(b <= a for a, b in zip(lrs[1:], lrs[2:])), lrs  # annealing on, never back up
    # ... and it ends where the old one-cycle (39 scheduler steps) ended.
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    old = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=3 * SPE)
    for _ in range(3 * SPE):
        opt.step()
        old.step()
    assert lrs[-1] == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9)
    assert [float(r["lr"]) for r in rows(stopped)] == pytest.approx(lrs, rel=1e-9, abs=0)
    assert max_diff(straight / LAST, stopped / LAST) <= 1e-6


# == 2. a finished run ==========================================================================
def test_resuming_a_finished_run_changes_nothing(cli, tmp_path, capsys):
    out = tmp_path / "out"
    assert train(cli, out, "trainer.epochs=2") == 0
    (run,) = run_dirs(out)
    before = snapshot(run)
    expected = {"train.log", "metrics.csv", "test_metrics.json", LAST, BEST}
    assert expected <= before.keys()
    assert ckpt(run / LAST)["finished"] is True

    for args in ((run,), ("last", "--output-dir", out)):
        capsys.readouterr()
        assert cli("resume", *args) == 0
        assert f"run {run} is finished (epoch 2, step {2 * SPE}" in capsys.readouterr().err
        assert snapshot(run) == before  # same files, same bytes, same mtimes
        assert run_dirs(out) == [run]


def test_a_resume_refuses_to_change_what_the_checkpoint_restores(cli, tmp_path, capsys):
    """The optimizer, scheduler and best score come back from the checkpoint: another
    optimizer.name crashed mid-run and left the run's saved config naming it (no resume worked
    after), another lr or scheduler was logged and saved as changed but never used, another
    monitor compared its scores with the saved best of the old one. Refused instead, naming
    the key, before anything is written; optimizer.fused follows the checkpoint."""
    out = tmp_path / "out"
    assert train(cli, out, "trainer.epochs=1", "scheduler.name=none") == 0
    (run,) = run_dirs(out)
    before = snapshot(run)
    refused = {
        "optimizer.name=sgd": "optimizer.name='sgd': a resume continues the run's optimizer",
        "optimizer.lr=0.1": "optimizer.lr=0.1: a resume continues the run's optimizer as the "
        "checkpoint saved it (optimizer.lr=0.001)",
        "scheduler.name=step": "scheduler.name='step': a resume continues the run's scheduler",
        "scheduler.args.gamma=0.5": "scheduler.args={'gamma': 0.5}",
        # the best score and early stopping's count are of the saved monitor: a loss compared
        # with the best accuracy
        "trainer.monitor=val/loss": "trainer.monitor='val/loss': a resume continues the run's "
        "best score (of trainer.monitor) as the checkpoint saved it "
        "(trainer.monitor='val/accuracy')",
        "trainer.monitor_mode=min": "trainer.monitor_mode='min'",
    }
    for override, said in refused.items():
        capsys.readouterr()
        assert cli("resume", run, "trainer.epochs=2", override) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and said in err, err
        assert snapshot(run) == before
    assert cli("train", DEMO, *SMALL, "trainer.epochs=2", f"trainer.resume={run}") == 2
    assert "scheduler.name='cosine': a resume continues" in capsys.readouterr().err  # the demo's
    assert snapshot(run) == before

    # a checkpoint of a version whose config lacked a key (weight_decay, say) still resumes
    from dltemplate.engine.checkpoint import load_checkpoint, save_checkpoint

    last = next(run.glob("*_last_ckpt.pth"))
    state = load_checkpoint(last)
    del state["config"]["optimizer"]["weight_decay"]
    save_checkpoint(last, state)
    assert cli("resume", run, "trainer.epochs=2", "optimizer.fused=false") == 0
    assert [float(row["lr"]) for row in rows(run)] == [0.001, 0.001]


def test_a_resume_keeps_where_the_run_is_in_its_saved_config(cli, tmp_path):
    """experiment.output_dir and run_name given to a resume were recorded in the saved config
    though the run stays in its directory (its saved config then named a place it is not)."""
    out = tmp_path / "out"
    assert train(cli, out, "trainer.epochs=1") == 0
    (run,) = run_dirs(out)
    (saved,) = run.glob("config_*.json")
    before = json.loads(saved.read_text())["experiment"]
    elsewhere = tmp_path / "elsewhere"
    overrides = [f"experiment.output_dir={elsewhere}", "experiment.run_name=other"]
    assert cli("resume", run, "trainer.epochs=2", *overrides) == 0
    after = json.loads(saved.read_text())
    assert after["experiment"]["output_dir"] == before["output_dir"] == str(out)
    assert after["experiment"]["run_name"] == before["run_name"]
    assert after["trainer"]["epochs"] == 2  # what a resume does change is recorded
    assert not elsewhere.exists() and len(rows(run)) == 2


def test_resume_of_a_folder_that_is_no_run_directory_writes_nothing_into_it(cli, tmp_path, capsys):
    """trainer.resume naming a folder without checkpoints started a run in it, whatever it was:
    the output directory (a slip for the run inside it) got checkpoints, train.log and
    summary/ beside its runs. Only a run directory (its config saved) stopped before its first
    checkpoint starts over in place."""
    out = tmp_path / "out"
    assert train(cli, out, "trainer.epochs=1") == 0
    (run,) = run_dirs(out)
    empty = tmp_path / "empty"
    empty.mkdir()
    for folder in (out, empty):
        before = sorted(p.name for p in folder.iterdir())
        capsys.readouterr()
        assert train(cli, out, "trainer.epochs=1", f"trainer.resume={folder}") == 2
        err = capsys.readouterr().err.strip()
        said = "no config_*.json in this directory (is it a run directory?)"
        assert err == f"dltemplate: error: {folder}: {said}"
        assert sorted(p.name for p in folder.iterdir()) == before

    for checkpoint in run.glob("*_ckpt.pth"):  # as if killed before its first checkpoint
        checkpoint.unlink()
    assert train(cli, out, "trainer.epochs=1", f"trainer.resume={run}") == 0
    assert "had no checkpoint yet: started over" in (run / "train.log").read_text()
    assert (run / LAST).exists() and run_dirs(out) == [run]


def test_training_shorter_than_the_epochs_done_is_refused(cli, tmp_path, monkeypatch, capsys):
    """A run stopped in epoch 2 resumed with trainer.epochs=1 trained nothing, marked its
    epoch-1 checkpoint finished at the interrupt's step and deleted the interrupt checkpoint:
    the steps of epoch 2 were lost and a later train-longer refused the run for good. Refused,
    nothing written; ending after the epoch begun still works, and so does training on."""
    out = tmp_path / "out"
    with interrupted_after(monkeypatch, SPE + 5):
        assert train(cli, out, "trainer.epochs=3") == 130
    (run,) = run_dirs(out)
    before = snapshot(run)
    capsys.readouterr()
    assert cli("resume", run, "trainer.epochs=1") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.endswith(
        "trainer.epochs=1: the run has trained 1 epoch(s) and part of the next, so it cannot "
        "end after epoch 1; give trainer.epochs=2 or more (training shorter ends a run at an "
        "epoch it has not reached)"
    )
    assert snapshot(run) == before

    assert cli("resume", run, "trainer.epochs=2") == 0  # ends after the epoch it had begun
    assert "this resume reads batches" not in (run / "train.log").read_text()  # the same ones
    assert [row["epoch"] for row in rows(run)] == ["1", "2"]
    assert not (run / INTERRUPT).exists() and ckpt(run / LAST)["global_step"] == 2 * SPE
    assert cli("resume", run, "trainer.epochs=3") == 0  # and trains on from there
    assert [row["epoch"] for row in rows(run)] == ["1", "2", "3"]


def test_a_stop_mid_epoch_resumed_with_other_batches_says_it_is_not_exact(
    cli, tmp_path, monkeypatch
):
    """The position in an epoch is counted in batches: resumed with another data.batch_size,
    an epoch stopped after 5 batches of 32 went on after 5 batches of 16 (80 samples, not
    160), training samples twice, and the log said only that the config changed."""
    out = tmp_path / "out"
    with interrupted_after(monkeypatch, SPE + 5):
        assert train(cli, out, "trainer.epochs=2", "trainer.test_after_fit=false") == 130
    (run,) = run_dirs(out)
    assert cli("resume", run, "data.batch_size=16") == 0
    assert (
        "stopped epoch 2 after 5 batch(es) of 32 samples; this resume reads batches of 16, so "
        "the epoch goes on after 80 samples, not 160" in (run / "train.log").read_text()
    )  # the same batches say nothing: test_training_shorter_than_the_epochs_done_is_refused


# == 3. resume last goes by the timestamp =======================================================
def test_resume_last_picks_the_newest_run_not_the_last_written(cli, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    with interrupted_after(monkeypatch, SPE + 5):
        assert train(cli, out, "trainer.epochs=2") == 130
    assert train(cli, out, "trainer.epochs=2") == 0
    first, second = run_dirs(out)
    assert (first / INTERRUPT).exists() and ckpt(second / LAST)["finished"] is True

    assert cli("eval", first) == 0  # writes into the first run: now the most recently modified
    assert (first / "eval_test_best.json").exists()
    assert first.stat().st_mtime_ns >= second.stat().st_mtime_ns
    first_before, second_before = snapshot(first), snapshot(second)

    capsys.readouterr()
    assert cli("resume", "last", "--output-dir", out) == 0
    err = capsys.readouterr().err
    assert f"run {second} is finished" in err and f"{first} " not in err
    first_ckpts = {k: v for k, v in first_before.items() if k.endswith("_ckpt.pth")}
    assert first_ckpts.keys() == {BEST, LAST, INTERRUPT}
    assert snapshot(first, "*_ckpt.pth") == first_ckpts  # the interrupted run was not resumed
    assert snapshot(first) == first_before and snapshot(second) == second_before
    assert run_dirs(out) == [first, second]


# == 4. a damaged checkpoint ====================================================================
def test_a_damaged_checkpoint_is_refused_by_eval_and_skipped_by_resume(
    cli, tmp_path, monkeypatch, capsys
):
    assert train(cli, tmp_path / "full", "trainer.epochs=2") == 0
    (full,) = run_dirs(tmp_path / "full")
    assert ckpt(full / LAST)["global_step"] == 2 * SPE

    out = tmp_path / "stopped"
    with interrupted_after(monkeypatch, SPE + 5):
        assert train(cli, out, "trainer.epochs=2") == 130
    (run,) = run_dirs(out)
    interrupt, last = run / INTERRUPT, run / LAST
    assert ckpt(interrupt)["global_step"] == SPE + 5
    flip_middle(interrupt)

    capsys.readouterr()
    assert cli("eval", interrupt) == 2
    err = capsys.readouterr().err
    assert str(interrupt) in err and "damaged" in err
    assert not (run / "eval_test_interrupt.json").exists()

    assert cli("resume", run) == 0
    log = (run / "train.log").read_text()
    assert f"skipping damaged checkpoint {interrupt}" in log
    assert f"resuming from the newest intact checkpoint: {last}" in log
    assert f"resumed from {last} at epoch 2, step {SPE}" in log
    assert [int(r["epoch"]) for r in rows(run)] == [1, 2]
    assert ckpt(last)["global_step"] == 2 * SPE
    assert max_diff(last, full / LAST) <= 1e-6

    damaged = sorted(run.glob("*_ckpt.pth"))
    assert {p.name for p in damaged} == {BEST, LAST}  # the stale interrupt one: removed at finish
    for path in damaged:
        if path != interrupt:
            flip_middle(path)
    before = snapshot(run)
    capsys.readouterr()
    assert cli("resume", run) == 2
    err = capsys.readouterr().err
    assert "no intact checkpoint" in err
    for path in damaged:
        assert path.name in err
    assert snapshot(run) == before


# == 5. a non-finite loss =======================================================================
def nan_at(monkeypatch, step: int, run_parent: Path, seen: dict):
    """The training loss is NaN at optimizer step ``step``; the checkpoints on disk at that
    moment are recorded in ``seen``."""

    def hook(n, run_forward):
        outputs = run_forward()
        if n == step:
            (run,) = run_dirs(run_parent)
            seen.update(snapshot(run, "*_ckpt.pth"))
            return outputs * float("nan")
        return outputs

    return forward_patched(monkeypatch, hook)


@pytest.mark.parametrize("every", [5, 50])  # checked mid-epoch, or only at the epoch's end
def test_a_nan_loss_stops_the_run_before_any_checkpoint_is_overwritten(
    cli, tmp_path, monkeypatch, capsys, every
):
    out, seen, bad = tmp_path / "out", {}, SPE + 3
    with nan_at(monkeypatch, bad, out, seen):
        code = train(cli, out, "trainer.epochs=3", f"trainer.log_every_n_steps={every}")
    assert code == 1
    err = capsys.readouterr().err
    assert f"at step {bad} (epoch 2)" in err and "nan" in err
    (run,) = run_dirs(out)
    assert seen.keys() == {BEST, LAST}
    assert snapshot(run, "*_ckpt.pth") == seen  # not overwritten: same bytes, same mtimes
    assert ckpt(run / LAST)["epoch"] == 1
    assert not (run / INTERRUPT).exists()
    assert "no interrupt checkpoint written" in (run / "train.log").read_text()
    assert [int(r["epoch"]) for r in rows(run)] == [1]


def test_stop_on_nan_false_trains_on_but_never_saves_non_finite_weights(
    cli, tmp_path, monkeypatch, capsys
):
    """``stop_on_nan=false`` does not stop at the NaN loss; the NaN it put into the weights is
    caught before the epoch's checkpoint: nothing non-finite is ever written."""
    out, seen = tmp_path / "out", {}
    with nan_at(monkeypatch, SPE + 3, out, seen):
        code = train(cli, out, "trainer.epochs=3", "trainer.stop_on_nan=false")
    assert code == 1
    assert "the weights are not finite at epoch 2" in capsys.readouterr().err
    (run,) = run_dirs(out)
    assert [int(r["epoch"]) for r in rows(run)] == [1, 2]  # it trained on to the epoch's end
    assert snapshot(run, "*_ckpt.pth") == seen  # the checkpoints of epoch 1, untouched
    assert not (run / INTERRUPT).exists()


# == 6. a dead writer's temp file ===============================================================
def test_resume_removes_the_temp_file_of_a_dead_writer(cli, tmp_path, monkeypatch):
    out = tmp_path / "out"
    with interrupted_after(monkeypatch, SPE + 5):
        assert train(cli, out, "trainer.epochs=2") == 130
    (run,) = run_dirs(out)
    stale = run / f".{LAST}.{dead_pid()}.tmp"
    stale.write_bytes(b"half a checkpoint")
    alive = run / f".{BEST}.{os.getppid()}.tmp"  # a live process (not this one) may be writing
    alive.write_bytes(b"being written")

    assert cli("resume", run) == 0
    assert not stale.exists()
    assert alive.exists()
    assert ckpt(run / LAST)["epoch"] == 2


# == 7. the log names the signal ================================================================
@pytest.mark.slow  # two processes trained into their 2nd epoch (~11 s)
def test_the_log_names_the_signal_that_stopped_the_run(cli, tmp_path):
    """SIGTERM and SIGINT to `python -m dltemplate train` (both at once, to save time)."""
    spe = 41  # the full training pool: 1293 samples, batch 32
    signals = (signal.SIGTERM, signal.SIGINT)
    procs, tails = {}, {}
    for sig in signals:
        procs[sig] = subprocess.Popen(
            [sys.executable, "-m", "dltemplate", "train", str(DEMO), "trainer.epochs=1000",
             "model.args.hidden=[32]", "trainer.log_every_n_steps=1",
             f"experiment.output_dir={tmp_path / sig.name}"],
            stderr=subprocess.PIPE, text=True, cwd=tmp_path,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip

    def stop(sig: signal.Signals) -> None:
        proc = procs[sig]
        for line in proc.stderr:  # wait until epoch 2 is under way
            if "epoch 2/1000 [" in line:
                break
        proc.send_signal(sig)
        tails[sig] = proc.communicate(timeout=60)[1]

    threads = [threading.Thread(target=stop, args=(sig,)) for sig in signals]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
    for sig in signals:
        assert procs[sig].returncode == 130, tails.get(sig)
        assert f"interrupted by {sig.name}" in tails[sig]
        said = tails[sig].find(f"dltemplate: {sig.name}: stopping after this step")
        assert 0 <= said < tails[sig].index("checkpoint saved to"), tails[sig]  # said first
        (run,) = run_dirs(tmp_path / sig.name)
        state = ckpt(run / INTERRUPT)
        assert state["global_step"] == state["epoch"] * spe + state["batch_in_epoch"]
        assert spe <= state["global_step"] < 3 * spe, "the signal came late (a slow machine?)"
        log = (run / "train.log").read_text()
        where = f"at epoch {state['epoch'] + 1}, step {state['global_step']}"
        assert f"stopped by {sig.name} {where}; checkpoint saved to {run / INTERRUPT}" in log

    (run,) = run_dirs(tmp_path / "SIGTERM")
    assert cli("resume", run, "trainer.epochs=3") == 0
    last = ckpt(run / LAST)
    assert (last["epoch"], last["global_step"], last["finished"]) == (3, 3 * spe, True)
    assert [int(r["epoch"]) for r in rows(run)] == [1, 2, 3]
