"""Issue #16: sweeps. A sweep file checked like a config, trials as ordinary run directories,
failed trials recorded and passed over, pruning, results, and a sweep killed with trials in
flight continued: exactly the asked-for trials, each one run directory, the killed ones
resumed (not restarted)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from conftest import REPO, descendants, load_ckpt, metric_rows

from dltemplate.sweeps.runner import trial_run_dir

DEMO = REPO / "configs" / "digits_mlp.yaml"
TESTS = Path(__file__).parent
FAST = ["data.train_val_sample_rate=0.3", "model.args.hidden=[16]", "trainer.progress_bar=off",
        "trainer.epochs=2", "trainer.test_after_fit=false"]  # fmt: skip


def sweep_file(folder: Path, **changes: object) -> Path:
    spec = {
        "name": "s",
        "base": str(DEMO),
        "overrides": FAST,
        "trials": 4,
        "jobs": 2,
        "sampler": "random",
        "seed": 0,
        "output_dir": str(folder / "sweeps"),
        "params": {
            "optimizer.lr": {"type": "float", "low": 1e-3, "high": 1e-1, "log": True},
            "model.args.hidden": {"type": "categorical", "choices": [[8], [16]]},
        },
    }
    spec.update(changes)
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def sweep(folder: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run([sys.executable, "-m", "dltemplate", "sweep", *args], cwd=folder,
                          env=env, capture_output=True, text=True, timeout=timeout)  # fmt: skip


def trials_csv(folder: Path) -> list[dict[str, str]]:
    with open(folder / "trials.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def best_of(run: Path, column: str = "val/accuracy") -> float:
    return max(float(r[column]) for r in metric_rows(run))


# == checked like a config ========================================================================
def one(key: str, **spec: object) -> dict[str, object]:
    """A sweep change: search ``key`` as ``spec`` says."""
    return {"params": {key: spec}}


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"trails": 3}, "unknown sweep key 'trails' (did you mean 'trials'?)"),
        (one("optimizer.lr", type="float", low=1, high=0.1), "low=1.0 must be below high=0.1"),
        (one("optimizer.lr", type="float", low=0, high=1, log=True), "log=true needs low > 0"),
        (one("optimizer.lrr", type="float", low=0.1, high=1), "params.optimizer.lrr"),
        (one("data.batch_size", type="categorical", choices=[0, 8]), "data.batch_size=0"),
        (one("x", type="float", low=0.1, high=1), "params.x: not a config key"),
        ({"sampler": "grid"}, "the grid sampler needs 'choices' or a 'step'"),
        ({"objective": "val/loss"}, "objective='val/loss' is not the base's trainer.monitor"),
        ({"pruner_args": {"n_startup": 1}, "pruner": "median"}, "pruner_args"),
    ],
)
def test_a_bad_sweep_file_is_one_line_exit_2_before_anything_runs(tmp_path, capsys, change, words):
    from dltemplate.cli import main

    path = sweep_file(tmp_path, **change)
    assert main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
    assert not (tmp_path / "sweeps").exists()


def test_a_tracked_sweep_without_mlflow_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    from dltemplate.cli import main

    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow: an ImportError
    path = sweep_file(tmp_path, overrides=[*FAST, "callbacks=[mlflow]"])
    assert main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "callback 'mlflow' needs the mlflow package" in err[0], err
    assert not (tmp_path / "sweeps").exists()


# == a sweep, its trials, its results =============================================================
@pytest.mark.slow  # 6 processes; the default suite runs a 2-trial sweep
def test_a_sweep_runs_its_trials_as_ordinary_runs_and_writes_its_results(tmp_path):
    done = sweep(tmp_path, str(sweep_file(tmp_path)))
    assert done.returncode == 0, done.stderr[-3000:]
    folder = tmp_path / "sweeps" / "s"
    rows = trials_csv(folder)
    assert [int(r["number"]) for r in rows] == [0, 1, 2, 3]
    assert {r["state"] for r in rows} == {"complete"}
    for row in rows:
        run = Path(row["run_dir"])
        assert run == trial_run_dir(folder / "trials" / f"{int(row['number']):04d}")
        assert float(row["val/accuracy"]) == best_of(run)  # trials.csv agrees with the runs
        (saved,) = run.glob("config_*.json")
        assert f"{float(row['optimizer.lr'])!r}"[:8] in saved.read_text()  # params: overrides
    best = max(rows, key=lambda r: float(r["val/accuracy"]))
    assert "sweep s done: 4 complete" in done.stderr
    assert (folder / "history.png").read_bytes()[:4] == b"\x89PNG"
    # best.yaml is a runnable config that reproduces the best trial
    out = tmp_path / "again"
    again = subprocess.run([sys.executable, "-m", "dltemplate", "train", str(folder / "best.yaml"),
                            f"experiment.output_dir={out}"], cwd=tmp_path, capture_output=True,
                           text=True, timeout=300)  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    (rerun,) = [p for p in out.iterdir() if p.is_dir()]
    assert best_of(rerun) == float(best["val/accuracy"])
    # eval and compare-configs work on a trial as on any run
    from dltemplate.cli import main

    assert main(["eval", best["run_dir"]]) == 0
    a, b = (next(Path(r["run_dir"]).glob("config_*.json")) for r in rows[:2])
    assert main(["compare-configs", str(a), str(b)]) == 0


def test_a_failing_trial_is_recorded_with_its_reason_and_the_sweep_goes_on(tmp_path):
    grid = {"optimizer.lr": {"type": "categorical", "choices": [1e-2, 1e30]}}
    done = sweep(tmp_path, str(sweep_file(tmp_path, params=grid, sampler="grid", trials=2)))
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {float(r["optimizer.lr"]): r for r in trials_csv(tmp_path / "sweeps" / "s")}
    assert rows[1e-2]["state"] == "complete"
    assert rows[1e30]["state"] == "fail"
    assert (
        "the training loss is nan" in rows[1e30]["reason"] or "not finite" in rows[1e30]["reason"]
    )
    assert "background thread" not in done.stderr  # the grid's last trial is told quietly
    failed = trial_run_dir(
        tmp_path / "sweeps" / "s" / "trials" / f"{int(rows[1e30]['number']):04d}"
    )
    assert failed is not None and rows[1e30]["run_dir"] == str(failed)  # where to read why


def trial_command(path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The command line the sweep ``path`` starts its first trial with (not run: the trial
    says it was stopped, and stays in the study to resume)."""
    from dltemplate.sweeps import runner

    started = []

    class Stopped:
        def __init__(self, command: list[str], **kwargs: object) -> None:
            started.append(command)

        def wait(self) -> int:
            return 130

    monkeypatch.setattr(runner, "available_cores", lambda: 8)
    monkeypatch.setattr(runner.subprocess, "Popen", Stopped)
    coordinator = runner.Sweep.open(path)
    coordinator.connect()
    job = coordinator._next_job()
    try:
        coordinator._run_job(job, 0)
    finally:
        job.lock.release()
    return started[0]


def test_a_sweep_shares_the_cores_out_unless_the_config_says_how_many(tmp_path, monkeypatch):
    shared = trial_command(sweep_file(tmp_path, jobs=2), monkeypatch)
    assert "experiment.threads=4" in shared  # 8 cores, 2 at once
    mine = tmp_path / "mine"
    mine.mkdir()
    path = sweep_file(mine, jobs=2, overrides=[*FAST, "experiment.threads=1"])
    told = [a for a in trial_command(path, monkeypatch) if a.startswith("experiment.threads=")]
    assert told == ["experiment.threads=1"]  # the user's, not replaced after it


def test_a_trials_value_is_its_runs_best_epoch_as_the_runs_table_shows_it(tmp_path):
    """With early_stopping_min_delta, the run keeps epoch 1 as its best (epoch 2 beats it by
    less than the delta): the trial's value is that epoch's, not the column's maximum."""
    from dltemplate.sweeps.runner import trial_outcome
    from dltemplate.tools.runs_table import read_run

    trainer = {"monitor": "val/accuracy", "monitor_mode": "max", "early_stopping_min_delta": 0.1}
    (tmp_path / "config_x_1.json").write_text(json.dumps({"trainer": trainer}))
    (tmp_path / "metrics.csv").write_text(
        "epoch,val/loss,val/accuracy\n1,0.9,0.5\n2,0.7,0.55\n3,0.8,0.45\n"
    )
    assert trial_outcome(tmp_path, "val/accuracy", "maximize") == (0.5, False)
    assert read_run(tmp_path)["best"] == 0.5
    assert trial_outcome(tmp_path, "val/loss", "minimize") == (0.7, False)  # not the monitor


def test_a_sweep_continued_with_another_study_is_refused_before_it_reuses_trial_folders(
    tmp_path, capsys
):
    """trials/0000 holds a run; a study without that trial (another --storage) would ask a new
    trial 0 and record the old run's result under its new params."""
    from dltemplate.cli import main

    first_draws(sweep_file(tmp_path), 1)
    folder = tmp_path / "sweeps" / "s"
    run = folder / "trials" / "0000" / "20261205_000000_digits_mlp"
    run.mkdir()
    (run / "config_DigitsMLP_20261205_000000.json").write_text("{}")
    other = f"sqlite:///{tmp_path / 'other.db'}"
    assert main(["sweep", str(folder), "--storage", other]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trials/0000 holds a run, but the study in" in err[0], err
    assert not (folder / "storage.txt").exists()  # a plain continue keeps the sweep's own study
    (folder / "study.journal").unlink()
    assert main(["sweep", str(folder)]) == 2  # the journal removed: the same


def test_the_pictures_are_drawn_without_optunas_warnings(tmp_path, recwarn):
    """A sweep's end printed Optuna's ExperimentalWarning (and "too few trials" ones), with the
    source lines that raised them, for every picture."""
    import optuna

    from dltemplate.sweeps import report

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: t.suggest_float("optimizer.lr", 0.1, 1.0), n_trials=2)
    done = report.pictures(SimpleNamespace(folder=tmp_path, study=study))
    assert done["history.png"] == str(tmp_path / "history.png")
    assert [str(w.message)[:80] for w in recwarn] == []


def test_a_misspelt_objective_stops_a_trial_at_its_first_epoch(tmp_path):
    """The sweep file cannot know the task's metrics; a trial trained every epoch and then
    failed with 'no val/acuracy in its metrics.csv' (each trial of the sweep alike)."""
    from dltemplate.callbacks.sweep_trial import SweepTrial
    from dltemplate.errors import ConfigError

    trial = SweepTrial(f"journal:{tmp_path / 'j'}", "s", 0, objective="val/acuracy")
    row = {"epoch": 1.0, "lr": 0.1, "train/loss": 2.0, "val/loss": 2.1, "val/accuracy": 0.5}
    with pytest.raises(ConfigError, match=r"val/acuracy.*did you mean 'val/accuracy'"):
        trial.on_epoch_end(SimpleNamespace(), row)


@pytest.mark.parametrize("direction", ["maximize", "minimize"])
def test_of_equal_trials_the_first_is_the_best_as_the_summary_lists_it(direction):
    """Minimising, best.yaml took the last of equal trials while the summary listed the first."""
    import optuna

    from dltemplate.sweeps import report

    study = optuna.create_study(direction=direction)
    values = iter([1.0, 0.5, 0.5] if direction == "minimize" else [0.5, 1.0, 1.0])
    study.optimize(lambda t: t.suggest_float("x", 0, 1) * 0 + next(values), n_trials=3)
    assert report.best_trial(SimpleNamespace(study=study, direction=direction)).number == 1


def test_a_sweep_whose_base_config_changed_is_not_continued(tmp_path, capsys):
    """A base edited between two continues mixed trials of two configs in one study (and
    best.yaml, built from the new base, would not reproduce an older best trial)."""
    from dltemplate.cli import main
    from dltemplate.sweeps.runner import Sweep

    base = tmp_path / "base.yaml"
    base.write_text(f"base: {DEMO}\n")
    path = sweep_file(tmp_path, base=str(base))
    Sweep.open(path)  # started: the base it shares is kept
    folder = tmp_path / "sweeps" / "s"
    where = "data: {root: ./Elsewhere}\nexperiment: {threads: 1}\noptimizer: {lr: 0.5}\n"
    base.write_text(f"base: {DEMO}\n{where}")
    Sweep.open(folder)  # where and how (data.root, threads), or a searched key: no change
    base.write_text(f"base: {DEMO}\ndata: {{batch_size: 16}}\n")
    for target in (folder, path):
        assert main(["sweep", str(target)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "changed since sweep 's' started" in err[0], err
        assert "data.batch_size: 32 -> 16" in err[0], err


# == what a sampler draws =========================================================================
def first_draws(path: Path, count: int) -> list[dict[str, object]]:
    """The params of the next ``count`` trials a coordinator of the sweep ``path`` asks (each
    told at once, no run started)."""
    from dltemplate.sweeps.runner import Sweep

    coordinator = Sweep.open(path)
    coordinator.connect()
    drawn = []
    for _ in range(count):
        job = coordinator._next_job()
        if job is None:
            break
        job.lock.release()
        coordinator.study.tell(job.number, 0.5)
        drawn.append(job.params)
    return drawn


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_a_continued_sweep_draws_new_values_and_the_same_sweep_the_same(tmp_path, sampler):
    """Each coordinator builds its sampler anew (a continued sweep, each worker of a job array):
    seeded once, it drew trial 0's values again as its first trial."""
    path = sweep_file(tmp_path, sampler=sampler, trials=4)
    first = first_draws(path, 2)
    folder = tmp_path / "sweeps" / "s"
    continued = first_draws(folder, 2)  # what `dltemplate sweep SWEEP_DIR` asks next
    lrs = [d["optimizer.lr"] for d in first + continued]
    assert len(set(lrs)) == 4, lrs
    again = tmp_path / "again"
    again.mkdir()
    replay = sweep_file(again, sampler=sampler, trials=4)
    assert first_draws(replay, 4) == first + continued  # a seeded sweep draws as it did


def test_a_grid_smaller_than_trials_runs_each_point_once_and_ends(tmp_path):
    grid = {"optimizer.lr": {"type": "categorical", "choices": [1e-2, 1e-3]},
            "data.batch_size": {"type": "int", "low": 16, "high": 32, "step": 16}}  # fmt: skip
    path = sweep_file(tmp_path, params=grid, sampler="grid", trials=6)
    drawn = first_draws(path, 6)  # no RuntimeError from Optuna's stop() once the grid is done
    points = {(d["optimizer.lr"], d["data.batch_size"]) for d in drawn}
    assert len(drawn) == 4 and points == {(a, b) for a in (1e-2, 1e-3) for b in (16, 32)}
    assert first_draws(tmp_path / "sweeps" / "s", 6) == []  # continued: nothing left to try


@pytest.mark.slow  # a 2-trial sweep of 4 epochs
def test_a_trial_the_pruner_stops_is_marked_pruned_and_its_run_says_why(tmp_path):
    """lr 0 never learns: after a trial that does, the median pruner stops it at epoch 2."""
    grid = {"optimizer.lr": {"type": "categorical", "choices": [3e-2, 0.0]}}
    path = sweep_file(tmp_path, params=grid, sampler="grid", seed=1, trials=2, jobs=1,
                      pruner="median", pruner_args={"n_startup_trials": 1, "n_warmup_steps": 2},
                      overrides=[*FAST, "trainer.epochs=4"])  # fmt: skip
    done = sweep(tmp_path, str(path))
    assert done.returncode == 0, done.stderr[-3000:]
    rows = trials_csv(tmp_path / "sweeps" / "s")
    by_lr = {float(r["optimizer.lr"]): r for r in rows}
    assert int(by_lr[0.0]["number"]) == 1  # seed 1: the grid tries lr 3e-2 first (seed 0 does not)
    assert by_lr[3e-2]["state"] == "complete" and by_lr[0.0]["state"] == "pruned"
    run = trial_run_dir(tmp_path / "sweeps" / "s" / "trials" / f"{int(by_lr[0.0]['number']):04d}")
    last = load_ckpt(next(run.glob("*_last_ckpt.pth")))
    assert (
        last["stopped_by"] == "SweepTrial" and "pruned by the median pruner" in last["stop_reason"]
    )
    assert len(metric_rows(run)) == 2  # stopped at the epoch boundary where it was pruned


# == killed with trials in flight, continued ======================================================
@pytest.mark.slow  # a campaign: ~10 processes
def test_a_sweep_killed_with_trials_in_flight_continues_exactly(tmp_path):
    slow = "callbacks=[{name: 'slow_epochs:SlowEpochs', args: {seconds: 1.0}}]"
    path = sweep_file(tmp_path, trials=3, overrides=[*FAST, "trainer.epochs=4", slow])
    folder = tmp_path / "sweeps" / "s"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.Popen([sys.executable, "-m", "dltemplate", "sweep", str(path)], cwd=tmp_path,
                            env=env, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while True:  # both first trials have written their first epoch's checkpoint
            lasts = list(folder.glob("trials/*/*/*_last_ckpt.pth"))
            if len(lasts) >= 2:
                break
            assert time.monotonic() < deadline and proc.poll() is None, "the sweep never got going"
            time.sleep(0.2)
        for pid in [*descendants(proc.pid), proc.pid]:  # SIGKILL: nothing gets to clean up
            os.kill(pid, signal.SIGKILL)
    finally:
        proc.wait()
    killed = {p.parent.parent.name for p in lasts}
    done = sweep(tmp_path, str(folder))
    assert done.returncode == 0, done.stderr[-3000:]
    rows = trials_csv(folder)
    assert [int(r["number"]) for r in rows] == [0, 1, 2]  # exactly the trials asked for
    for row in rows:
        trial = folder / "trials" / f"{int(row['number']):04d}"
        runs = [p for p in trial.iterdir() if p.is_dir()]
        assert len(runs) == 1, runs  # one run directory each: resumed, not restarted
        assert row["state"] == "complete" and float(row["val/accuracy"]) == best_of(runs[0])
        assert [int(r["epoch"]) for r in metric_rows(runs[0])] == [1, 2, 3, 4]
        resumed = "resumed from" in (runs[0] / "train.log").read_text()
        assert resumed == (trial.name in killed), trial


@pytest.mark.slow  # a campaign: ~10 processes
def test_a_tracked_sweep_nests_each_trial_under_one_parent_run(tmp_path):
    mlflow = pytest.importorskip("mlflow")
    path = sweep_file(tmp_path, trials=2, overrides=[*FAST, "callbacks=[mlflow]"])
    done = sweep(tmp_path, str(path))
    assert done.returncode == 0, done.stderr[-3000:]
    folder = tmp_path / "sweeps" / "s"
    client = mlflow.tracking.MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parent = (folder / "mlflow_parent.txt").read_text().strip()
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent]
    assert len(runs) == 3 and len(children) == 2  # the sweep's run and one per trial
    assert {r.info.status for r in runs} == {"FINISHED"}


def test_a_stepped_float_grid_has_the_values_as_written():
    from dltemplate.sweeps.spec import ParamSpec

    grid = ParamSpec(type="float", low=0.1, high=0.5, step=0.1).grid()
    assert grid == [0.1, 0.2, 0.3, 0.4, 0.5]  # not 0.30000000000000004
    assert ParamSpec(type="float", low=1e-4, high=3e-4, step=1e-4).grid() == [1e-4, 2e-4, 3e-4]
    assert ParamSpec(type="int", low=2, high=8, step=3).grid() == [2, 5, 8]


def test_a_trials_seconds_are_its_runs_epochs_not_the_time_the_sweep_was_stopped(tmp_path):
    """trials.csv's seconds ran from when a trial was asked to when it was told: a sweep
    stopped overnight and continued gave its trial hours. Now its run's epochs' seconds."""
    import optuna

    from dltemplate.sweeps import report
    from dltemplate.sweeps.spec import ParamSpec

    run = tmp_path / "run"
    run.mkdir()
    table = "epoch,lr,seconds,val/accuracy\n1,0.1,1.5,0.5\n2,0.1,2.0,0.6\n"
    (run / "metrics.csv").write_text(table)
    study = optuna.create_study(direction="maximize")
    for run_dir in (str(run), ""):  # the second: no run (it failed before starting one)
        trial = study.ask()
        trial.suggest_float("optimizer.lr", 1e-3, 1e-1)
        trial.set_user_attr("run_dir", run_dir)
        study.tell(trial, 0.6)

    class Sweep:
        spec = type("Spec", (), {"params": {"optimizer.lr": ParamSpec(type="float")}})()
        objective = "val/accuracy"

    Sweep.study = study
    with_run, without = report.rows(Sweep())
    assert with_run["seconds"] == 3.5
    assert without["seconds"] is not None and 0 <= without["seconds"] < 3.5  # asked to told


def test_a_signal_once_the_trials_are_over_neither_stops_nor_kills_the_sweep(tmp_path, monkeypatch):
    """A cluster's notice that comes as the sweep writes its results (its trials all over): the
    sweep's handler lets it pass. It had given the handlers back first, so the notice's default
    action killed the sweep mid-write (SLURM: the job FAILED), or it stopped and requeued."""
    from dltemplate.sweeps import report, runner

    monkeypatch.setattr(runner.Sweep, "_work", lambda self, slot: None)  # the trials are over
    written = []

    def write(sweep: object) -> None:
        os.kill(os.getpid(), signal.SIGUSR1)  # handled at the next instruction, in this thread
        written.append(True)

    monkeypatch.setattr(report, "write", write)
    monkeypatch.setattr(report, "summary", lambda sweep: None)
    reached: list[bool] = []

    def mine(signum: int, frame: object) -> None:
        reached.append(True)

    previous = signal.signal(signal.SIGUSR1, mine)
    try:
        path = sweep_file(tmp_path, trials=1, jobs=1)
        runner.run_sweep(path)  # no RunStopped
        assert written == [True] and reached == []  # the sweep's handler had it, and let it be
        assert signal.getsignal(signal.SIGUSR1) is mine  # given back after
        # Ctrl-C is the user's again once the trials are over: it interrupts the writing
        monkeypatch.setattr(report, "write", lambda sweep: os.kill(os.getpid(), signal.SIGINT))
        with pytest.raises(KeyboardInterrupt):
            runner.run_sweep(path)
    finally:
        signal.signal(signal.SIGUSR1, previous)
