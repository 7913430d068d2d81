"""``mlflow``: the run in an MLflow tracking store (an extra: ``pip install -e ".[mlflow]"``).

MLflow itself is imported only when the callback is built: ``import dltemplate`` and runs
without it work where MLflow is not installed.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dltemplate.callbacks.base import Callback, Loop
from dltemplate.config import Config, config_to_dict
from dltemplate.errors import ConfigError
from dltemplate.registry import CALLBACKS

log = logging.getLogger("dltemplate")

PARENT_ENV = "DLTEMPLATE_MLFLOW_PARENT"  # a sweep's parent run, when no parent_run_id is given
INSTALL = "pip install 'dltemplate[mlflow]' (or pip install 'mlflow>=2.10')"
MAX_PARAM = 6000  # MLflow's longest param value (2.10 and later)
MAX_TAG = 5000  # MLflow's longest tag value is 5000 or more, by version
PARAMS_PER_CALL = 100  # MLflow's most params in one log_batch
SKIPPED_PARAMS = ("trainer.resume",)  # what changes between a run and its resumes
STATUS_TAG = "dltemplate.status"  # running | stopped | failed | finished


def flat_params(config: dict[str, Any]) -> dict[str, str]:
    """``section.key`` -> the value as text (strings and numbers as they are; None, booleans,
    lists and mappings as JSON), cut to MLflow's longest param value; a list section
    (``callbacks``) is one param."""
    flat: dict[str, Any] = {}
    for section, values in config.items():
        if section.startswith("_"):
            continue
        if isinstance(values, dict):
            flat.update({f"{section}.{key}": value for key, value in values.items()})
        else:
            flat[section] = values
    params = {}
    for key, value in flat.items():
        if key in SKIPPED_PARAMS:
            continue
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            text = str(value)
        params[key] = text if len(text) <= MAX_PARAM else text[: MAX_PARAM - 3] + "..."
    return params


def _short(text: str, limit: int = MAX_TAG) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


@CALLBACKS.register("mlflow")
class MLflow(Callback):
    """On rank 0, one MLflow run per dltemplate run, resumes included:

    - params: the config flattened (``optimizer.lr``...), at the start;
    - metrics: the ``metrics.csv`` row of every epoch (``train/loss``, ``val/accuracy``, ``lr``,
      ``seconds``; step = epoch), ``train/loss_step`` and ``train/lr`` whenever the trainer reads
      the loss (every ``trainer.log_every_n_steps`` optimizer steps; step = optimizer step), the
      test metrics as ``test/...`` at the end (step = the last epoch);
    - tags: versions (python, torch, dltemplate), the git commit, the run directory, and
      ``dltemplate.status``; ``mlflow.parentRunId`` under a sweep's parent run;
    - artifacts at the end: the config JSON, ``metrics.csv``, ``curves.png``,
      ``test_metrics.json``, and with ``log_checkpoints`` the best and last checkpoints.

    The store is ``tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else the SQLite file
    ``<experiment.output_dir>/mlflow.db`` (artifacts beside it in ``.mlartifacts/``: hidden, so
    that the copies of a run's files there are not taken for a run directory). The MLflow
    run id is this callback's saved state: a resumed run goes on in the same MLflow run, and
    what the stopped one had logged already (an epoch redone from an older checkpoint) is not
    logged twice. A stopped run is ``KILLED`` until it resumes, a failed one ``FAILED``, a
    complete one ``FINISHED``. A logging call that fails mid-run is a warning, never a stop.
    """

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment: str | None = None,
        run_name: str | None = None,
        parent_run_id: str | None = None,
        log_checkpoints: bool = False,
    ) -> None:
        try:
            import mlflow  # noqa: F401  (slow, ~2 s: only when the callback is used)
            from mlflow.tracking import MlflowClient
        except ImportError as exc:
            raise ConfigError(
                f"callback 'mlflow' needs the mlflow package, which cannot be imported "
                f"({exc}): {INSTALL}"
            ) from None
        for name, value in (("tracking_uri", tracking_uri), ("experiment", experiment),
                            ("run_name", run_name), ("parent_run_id", parent_run_id)):  # fmt: skip
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"{name}={value!r}: must be a non-empty string or null")
        if not isinstance(log_checkpoints, bool):
            raise ValueError(f"log_checkpoints={log_checkpoints!r}: must be true or false")
        self._client_class = MlflowClient
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.run_name = run_name
        self.parent_run_id = parent_run_id
        self.log_checkpoints = log_checkpoints
        self.run_id: str | None = None  # the state: the MLflow run this dltemplate run logs to
        self.client: Any = None  # an MlflowClient on rank 0 once the run is open, else None
        self.logged: dict[str, int] = {}  # metric -> the highest step the store holds of it
        self.params: dict[str, str] = {}
        self.failures = 0

    # -- the events ------------------------------------------------------------------------------
    def setup(self, cfg: Config, model: nn.Module) -> None:
        """Take the defaults: the store in ``experiment.output_dir``, the experiment's name,
        the parent from ``$DLTEMPLATE_MLFLOW_PARENT``."""
        if self.tracking_uri is None:
            self.tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or None
        self._default_store = self.tracking_uri is None
        if self.tracking_uri is None:
            db = Path(cfg.experiment.output_dir).absolute() / "mlflow.db"
            self.tracking_uri = f"sqlite:///{db}"
        self._artifacts = Path(cfg.experiment.output_dir).absolute() / ".mlartifacts"
        if self.parent_run_id is None:
            self.parent_run_id = os.environ.get(PARENT_ENV) or None
        self.experiment_name = self.experiment or cfg.experiment.name
        self.params = flat_params(config_to_dict(cfg))

    def on_fit_start(self, trainer: Loop) -> None:
        """Open the MLflow run: a new one, or (resuming) the one the checkpoint names."""
        if not trainer.dist.is_main or trainer.run_dir is None:
            return
        try:
            client = self._client_class(tracking_uri=self.tracking_uri)
            run = self._reopen(client) if self.run_id is not None else None
            if run is None:
                run = self._create(client, trainer.run_dir)
                self.logged = {}
            self.run_id, self.client = run.info.run_id, client
            self._log_params(run)
        except ConfigError:
            raise
        except Exception as exc:  # the store cannot be reached or refuses: before any work
            raise ConfigError(
                f"callback 'mlflow': tracking store {self.tracking_uri}: "
                f"{_short(str(exc).splitlines()[0] if str(exc) else type(exc).__name__, 300)}"
            ) from exc
        log.info(
            "mlflow: run %s in %s (view: mlflow ui --backend-store-uri %s)",
            self.run_id,
            self.tracking_uri,
            self.tracking_uri,
        )

    def on_after_optimizer_step(self, trainer: Loop) -> None:
        """The step loss and learning rate, on the steps the trainer read the loss."""
        loss = trainer.state.logged_loss
        if loss is None or self.client is None:
            return
        step = trainer.state.global_step
        self._log_metrics({"train/loss_step": loss, "train/lr": trainer.lr}, step)

    def on_epoch_end(self, trainer: Loop, row: dict[str, float]) -> None:
        """The epoch's metrics.csv row, by epoch."""
        if self.client is None:
            return
        values = {k: v for k, v in row.items() if k != "epoch"}
        self._log_metrics(values, int(row["epoch"]))

    def on_test_end(self, trainer: Loop, metrics: dict[str, float]) -> None:
        """The test metrics, at the last epoch."""
        if self.client is not None:
            values = {f"test/{k}": v for k, v in metrics.items()}
            self._log_metrics(values, trainer.state.epoch)

    def on_fit_end(self, trainer: Loop) -> None:
        """The artifacts, then the run is FINISHED."""
        if self.client is None:
            return
        run_dir = trainer.run_dir
        files = sorted(run_dir.glob("config_*.json"))
        files += [run_dir / name for name in ("metrics.csv", "curves.png", "test_metrics.json")]
        for path in files:
            if path.is_file():
                self._safely(self.client.log_artifact, self.run_id, str(path))
        if self.log_checkpoints:
            for kind in ("best", "last"):
                path = trainer.run_state.path(kind)
                if path.is_file():
                    self._safely(self.client.log_artifact, self.run_id, str(path), "checkpoints")
        self._end("FINISHED", "finished")

    def on_exception(self, trainer: Loop, exc: BaseException) -> None:
        """Mark the run: KILLED (a signal, Ctrl-C, ``max_time``: ``resume`` goes on) or
        FAILED (an error)."""
        if self.client is None:
            return
        from dltemplate.engine.run_state import stop_cause

        self._safely(self.client.set_tag, self.run_id, "dltemplate.stopped_by",
                     _short(stop_cause(exc)))  # fmt: skip
        if isinstance(exc, KeyboardInterrupt):  # RunStopped (signals, request_stop) included
            self._end("KILLED", "stopped")
        else:
            self._end("FAILED", "failed")

    def state_dict(self) -> dict[str, Any]:
        """The MLflow run's id, once there is one."""
        return {"run_id": self.run_id} if self.run_id is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        run_id = state.get("run_id")
        self.run_id = str(run_id) if run_id else None

    # -- helpers ---------------------------------------------------------------------------------
    def _create(self, client: Any, run_dir: Path) -> Any:
        """A new MLflow run, in the parent's experiment when there is a parent and no
        ``experiment`` argument, else in ``experiment`` (made if missing)."""
        tags = self._version_tags(run_dir)
        tags.update({STATUS_TAG: "running", "dltemplate.run_dir": str(run_dir.absolute())})
        experiment_id = None
        if self.parent_run_id is not None:
            parent = self._find_run(client, self.parent_run_id)
            if parent is None:
                where = "parent_run_id" if PARENT_ENV not in os.environ else f"${PARENT_ENV}"
                raise ConfigError(
                    f"callback 'mlflow': {where}={self.parent_run_id}: no such run in "
                    f"{self.tracking_uri}"
                )
            tags["mlflow.parentRunId"] = self.parent_run_id
            if self.experiment is None:
                experiment_id = parent.info.experiment_id
        if experiment_id is None:
            experiment_id = self._experiment_id(client)
        return client.create_run(experiment_id, run_name=self.run_name or run_dir.name, tags=tags)

    def _reopen(self, client: Any) -> Any:
        """The saved MLflow run, RUNNING again, and what it holds already (the highest step of
        each metric); None (a new run is made) when the store has no such run."""
        run = self._find_run(client, self.run_id)
        if run is None or run.info.lifecycle_stage == "deleted":
            log.warning(
                "mlflow: run %s (from the checkpoint) is not in %s: logging to a new run",
                self.run_id,
                self.tracking_uri,
            )
            return None
        client.update_run(self.run_id, status="RUNNING")
        client.set_tag(self.run_id, STATUS_TAG, "running")
        self.logged = {}
        for key in run.data.metrics:
            history = client.get_metric_history(self.run_id, key)
            self.logged[key] = max((m.step for m in history), default=-1)
        return run

    @staticmethod
    def _find_run(client: Any, run_id: str) -> Any:
        from mlflow.exceptions import MlflowException

        try:
            return client.get_run(run_id)
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                return None
            raise

    def _experiment_id(self, client: Any) -> str:
        """The id of the experiment named ``experiment_name``, made if missing (its artifacts
        beside the default store, not in the working directory)."""
        from mlflow.exceptions import MlflowException

        name = self.experiment_name
        found = client.get_experiment_by_name(name)
        if found is None:
            where = self._artifacts.as_uri() if self._default_store else None
            try:
                return client.create_experiment(name, artifact_location=where)
            except MlflowException as exc:  # made meanwhile by another run (a sweep's trials)
                found = client.get_experiment_by_name(name)
                if found is None:
                    raise exc from None
        if found.lifecycle_stage == "deleted":
            raise ConfigError(
                f"callback 'mlflow': experiment '{name}' is deleted in {self.tracking_uri}: "
                "restore it (mlflow experiments restore) or give another args.experiment"
            )
        return found.experiment_id

    @staticmethod
    def _version_tags(run_dir: Path) -> dict[str, str]:
        """What produced the run, as the run directory's config JSON records it (``_meta``)."""
        from dltemplate.engine.rundir import git_commit, package_version, read_saved_config

        try:
            meta = read_saved_config(run_dir)[1]
        except Exception:  # no config saved (or unreadable): the versions of this process
            meta = {}
        versions = {
            "python": meta.get("python") or platform.python_version(),
            "torch": meta.get("torch") or torch.__version__,
            "version": meta.get("dltemplate") or package_version(),
        }
        tags = {f"dltemplate.{k}": str(v) for k, v in versions.items()}
        commit = meta.get("git_commit") if meta else git_commit()
        if commit:
            tags["mlflow.source.git.commit"] = tags["dltemplate.git_commit"] = str(commit)
        tags["mlflow.source.name"] = "dltemplate"
        try:
            tags["mlflow.user"] = getpass.getuser()
        except Exception:  # no user name to be had (a container without one)
            pass
        return tags

    def _log_params(self, run: Any) -> None:
        """The params the run lacks. MLflow's params never change: a resume that changes the
        config (train longer) records the new value as the tag ``dltemplate.param.<key>``."""
        from mlflow.entities import Param, RunTag

        held = run.data.params
        new = [Param(k, v) for k, v in self.params.items() if k not in held]
        changed = [RunTag(f"dltemplate.param.{k}", v) for k, v in self.params.items()
                   if k in held and held[k] != v]  # fmt: skip
        for i in range(0, len(new), PARAMS_PER_CALL):
            self.client.log_batch(self.run_id, params=new[i : i + PARAMS_PER_CALL])
        if changed:
            self.client.log_batch(self.run_id, tags=changed)

    def _log_metrics(self, values: dict[str, Any], step: int) -> None:
        """One call for ``values`` at ``step``, leaving out what the store holds already."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = []
        for key, value in values.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if step > self.logged.get(key, -1):
                metrics.append(Metric(key, float(value), now, step))
        if not metrics:
            return
        if self._safely(self.client.log_batch, self.run_id, metrics=metrics):
            for metric in metrics:
                self.logged[metric.key] = step

    def _end(self, status: str, said: str) -> None:
        self._safely(self.client.set_tag, self.run_id, STATUS_TAG, said)
        self._safely(self.client.set_terminated, self.run_id, status)
        if self.failures:
            log.warning("mlflow: %d logging call(s) failed in this session", self.failures)
        self.client = None

    def _safely(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> bool:
        """``call(*args, **kwargs)``; a failure is a warning (the first one) and False: a
        tracker never stops a training run part-way."""
        try:
            call(*args, **kwargs)
        except Exception as exc:
            self.failures += 1
            if self.failures == 1:
                log.warning(
                    "mlflow: %s failed (%s: %s); training goes on, later failures are counted",
                    getattr(call, "__name__", "a call"),
                    type(exc).__name__,
                    _short(str(exc), 300),
                )
            return False
        return True


__all__ = ["MLflow", "flat_params"]
