"""The ``mlflow`` callback: one MLflow run per dltemplate run (resumes included), read back with
MLflow's own client; without MLflow installed, naming it is a one-line configuration error."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import QUICK_DIGITS, REPO

from dltemplate.tasks.classification import ClassificationTask

# Under pytest -n, this file's tests share one worker: its module fixtures (trained runs)
# are built once, not once per worker.
pytestmark = pytest.mark.xdist_group("test_mlflow")

DEMO = REPO / "configs" / "digits_mlp.yaml"
SPE = 13  # optimizer steps per epoch with QUICK_DIGITS (388 training samples, batch 32)
TRACKED = ["callbacks=[{name: mlflow}]", "trainer.log_every_n_steps=5"]
EVERY = "{every_n_epochs: 1}"  # the checkpoint callback keeps every epoch's checkpoint


def test_the_package_works_without_mlflow_imported():
    code = (
        "import sys, dltemplate, dltemplate.callbacks, dltemplate.cli\n"
        "from dltemplate.registry import CALLBACKS\n"
        "assert 'mlflow' in CALLBACKS and 'mlflow' not in sys.modules, sorted(sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_naming_it_without_mlflow_is_one_line_exit_2(cli, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` raises ImportError
    out = tmp_path / "out"
    assert cli("train", DEMO, f"experiment.output_dir={out}", *QUICK_DIGITS, *TRACKED) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "mlflow" in err and "pip install" in err and "dltemplate[mlflow]" in err, err
    assert not out.exists() or not any(out.iterdir())  # stopped before any work


def test_params_are_the_flattened_config_cut_to_mlflows_limit():
    from dltemplate.callbacks.mlflow import flat_params

    config = {
        "optimizer": {"lr": 0.001, "args": {"momentum": 0.9}},
        "trainer": {"clip_grad_norm": None, "compile": False, "resume": "runs/x"},
        "model": {"args": {"hidden": list(range(3000))}},
        "callbacks": [{"name": "ema", "args": {}}],
        "_meta": {"python": "3.11"},
    }
    params = flat_params(config)
    assert params["optimizer.lr"] == "0.001" and params["optimizer.args"] == '{"momentum": 0.9}'
    assert params["trainer.clip_grad_norm"] == "null" and params["trainer.compile"] == "false"
    assert params["callbacks"] == '[{"name": "ema", "args": {}}]'
    assert len(params["model.args"]) == 6000 and params["model.args"].endswith("...")
    assert "trainer.resume" not in params and not any(k.startswith("_") for k in params)


# == with MLflow (the tests above need none) ====================================================
needs_mlflow = pytest.mark.skipif(
    importlib.util.find_spec("mlflow") is None,
    reason="mlflow is not installed (pip install -e '.[mlflow]')",
)


def MlflowClient(uri: str):  # noqa: N802  (MLflow's class, imported only where it is there)
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


@pytest.fixture(scope="session")  # not module: see tests/test_segmentation.py's carvana
def empty_store(tmp_path_factory) -> Path:
    """An MLflow SQLite store made once (its tables take seconds to create), copied per test."""
    db = tmp_path_factory.mktemp("mlflow_store") / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def out(tmp_path, empty_store, monkeypatch) -> Path:
    """An output folder holding a fresh copy of the empty store as its default ``mlflow.db``;
    afterwards, the train.log that in-process runs leave the logger writing to is closed."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DLTEMPLATE_MLFLOW_PARENT", raising=False)
    folder = tmp_path / "out"
    folder.mkdir()
    shutil.copy(empty_store, folder / "mlflow.db")
    yield folder
    log = logging.getLogger("dltemplate")
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()


def run_dirs(out: Path) -> list[Path]:
    """The run directories under ``out`` (not the store's hidden ``.mlartifacts``)."""
    return sorted(p for p in out.iterdir() if p.is_dir() and not p.name.startswith("."))


def only_run(out: Path):
    """The store's one run (there must be exactly one) and a client of the store."""
    client = MlflowClient(f"sqlite:///{(out / 'mlflow.db').absolute()}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    (run,) = client.search_runs(experiments)
    return client, run


def steps(client, run, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run.info.run_id, key))


@contextlib.contextmanager
def interrupted_after(monkeypatch, steps_done: int) -> Iterator[None]:
    """Ctrl-C (KeyboardInterrupt) in the forward of the step after ``steps_done`` optimizer
    steps of this process."""
    original, calls = ClassificationTask.forward, [0]

    def forward(self, model, batch):
        if model.training:
            calls[0] += 1
            if calls[0] == steps_done + 1:
                raise KeyboardInterrupt
        return original(self, model, batch)

    with monkeypatch.context() as m:
        m.setattr(ClassificationTask, "forward", forward)
        yield


@needs_mlflow
def test_a_run_is_logged_once_with_params_metrics_tags_and_artifacts(cli, out):
    args = [f"experiment.output_dir={out}", *QUICK_DIGITS, *TRACKED, "trainer.epochs=3"]
    assert cli("train", DEMO, *args) == 0
    (run_dir,) = run_dirs(out)
    client, run = only_run(out)

    assert run.info.status == "FINISHED" and run.info.run_name == run_dir.name
    assert client.get_experiment(run.info.experiment_id).name == "DigitsMLP"
    params = run.data.params
    assert params["optimizer.lr"] == "0.001" and params["trainer.epochs"] == "3"
    assert params["model.args"] == '{"hidden": [32]}' and "trainer.resume" not in params
    for key in ("val/accuracy", "train/loss", "lr"):
        assert steps(client, run, key) == [1, 2, 3], key
    assert steps(client, run, "train/loss_step") == list(range(5, 3 * SPE + 1, 5))
    assert steps(client, run, "test/accuracy") == [3]
    tags = run.data.tags
    assert tags["dltemplate.status"] == "finished"
    assert tags["dltemplate.torch"] and tags["dltemplate.python"] and tags["dltemplate.version"]
    assert tags["dltemplate.run_dir"] == str(run_dir.absolute())
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    saved_config = f"config_DigitsMLP_{run_dir.name[: len('YYYYmmdd_HHMMSS')]}.json"
    assert {saved_config, "curves.png", "metrics.csv"} <= artifacts
    # Beside the store, not in the working directory, and hidden: a run's files copied there
    # are not taken for one more run directory (dltemplate runs, sweeps).
    assert (out / ".mlartifacts").is_dir() and not (out / "mlartifacts").exists()


@needs_mlflow
@pytest.mark.usefixtures("fast_and_tidy")
def test_stopped_and_resumed_is_one_run_with_each_epoch_once(cli, out, monkeypatch):
    args = [f"experiment.output_dir={out}", *QUICK_DIGITS, "trainer.log_every_n_steps=5"]
    args += ["trainer.epochs=3", f"callbacks=[mlflow, {{name: checkpoint, args: {EVERY}}}]"]
    with interrupted_after(monkeypatch, 20):  # part-way through epoch 2
        assert cli("train", DEMO, *args) == 130
    (run_dir,) = run_dirs(out)
    client, run = only_run(out)
    assert run.info.status == "KILLED" and run.data.tags["dltemplate.status"] == "stopped"
    assert run.data.tags["dltemplate.stopped_by"] == "SIGINT"
    assert steps(client, run, "val/accuracy") == [1]
    assert steps(client, run, "train/loss_step") == [5, 10, 15, 20]

    with interrupted_after(monkeypatch, 10):  # resumed at step 20, stopped at 30 (epoch 3)
        assert cli("resume", run_dir) == 130
    client, again = only_run(out)
    assert again.info.run_id == run.info.run_id and again.info.status == "KILLED"
    assert steps(client, again, "val/accuracy") == [1, 2]
    # Resumed from an older checkpoint (epoch 1, step 13), epoch 2 and steps 14-30 are trained
    # again, but what the store holds of them already is not logged twice.
    assert cli("resume", run_dir / "Vanilla_epoch001_ckpt.pth") == 0
    client, done = only_run(out)
    assert done.info.run_id == run.info.run_id and done.info.status == "FINISHED"
    assert done.data.tags["dltemplate.status"] == "finished"
    for key in ("val/accuracy", "train/loss", "lr"):
        assert steps(client, done, key) == [1, 2, 3], key
    assert steps(client, done, "train/loss_step") == list(range(5, 3 * SPE + 1, 5))
    assert steps(client, done, "test/accuracy") == [3]


@needs_mlflow
def test_a_sweep_trial_runs_under_its_parent(cli, out, monkeypatch):
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.create_experiment("sweep")
    parent = client.create_run(experiment, run_name="the sweep").info.run_id
    monkeypatch.setenv("DLTEMPLATE_MLFLOW_PARENT", parent)
    args = [
        f"experiment.output_dir={out}",
        *QUICK_DIGITS,
        *TRACKED,
        "trainer.limit_train_batches=2",
    ]
    assert cli("train", DEMO, *args, "trainer.test_after_fit=false") == 0
    (child,) = client.search_runs(
        [experiment], filter_string=f"tags.mlflow.parentRunId = '{parent}'"
    )
    assert child.info.status == "FINISHED" and child.info.run_id != parent

    monkeypatch.setenv("DLTEMPLATE_MLFLOW_PARENT", "0" * 32)  # no such run: before training
    assert cli("train", DEMO, *args) == 2


def tracked_sweep(folder: Path, mlflow_args: str) -> Path:
    """A sweep file over the demo whose base tracks with ``callbacks=[{name: mlflow, args:
    <mlflow_args>}]``."""
    import yaml

    spec = {
        "name": "s",
        "base": str(DEMO),
        "overrides": [*QUICK_DIGITS, f"callbacks=[{{name: mlflow, args: {mlflow_args}}}]"],
        "trials": 1,
        "output_dir": str(folder / "sweeps"),
        "params": {"optimizer.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}},
    }
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@needs_mlflow
def test_a_sweeps_parent_run_is_in_the_store_and_experiment_its_callback_names(out, tmp_path):
    """The trials log where the callback's args say: the parent must be there too (it was in
    <sweep>/mlflow.db, and every trial failed: its parent was no run of its store)."""
    from dltemplate.sweeps.runner import Sweep

    uri = f"sqlite:///{out / 'mlflow.db'}"
    sweep = Sweep.open(tracked_sweep(tmp_path, f"{{tracking_uri: '{uri}', experiment: team}}"))
    env = sweep.tracker_env()
    assert env["MLFLOW_TRACKING_URI"] == uri
    parent = MlflowClient(uri).get_run(env["DLTEMPLATE_MLFLOW_PARENT"])
    assert MlflowClient(uri).get_experiment(parent.info.experiment_id).name == "team"


@needs_mlflow
def test_a_tracked_sweep_whose_experiment_is_deleted_is_one_line_exit_2(cli, out, tmp_path, capsys):
    uri = f"sqlite:///{out / 'mlflow.db'}"
    client = MlflowClient(uri)
    client.delete_experiment(client.create_experiment("DigitsMLP"))
    assert cli("sweep", tracked_sweep(tmp_path, f"{{tracking_uri: '{uri}'}}")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "experiment 'DigitsMLP' is deleted in" in err[0], err
