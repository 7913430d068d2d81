"""``sweep_trial``: a trial of a sweep reports its objective to the study each epoch, and stops
when the study's pruner says so. Added by the composition root to a run that ``dltemplate
sweep`` started (the environment variable :data:`~dltemplate.sweeps.study.TRIAL_ENV`
describes the trial); never configured by hand, and absent from the trial's saved config, so
``eval`` and ``resume`` of a trial run it as any run."""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

from dltemplate.callbacks.base import Callback, Loop
from dltemplate.engine import distributed as D
from dltemplate.errors import ConfigError, did_you_mean
from dltemplate.sweeps.study import TRIAL_ENV, make_pruner, open_storage

log = logging.getLogger("dltemplate")


class SweepTrial(Callback):
    """Reports ``objective`` (a metrics.csv column) to trial ``trial_id`` of ``study`` in
    ``storage`` after every epoch; when the study's pruner prunes the trial, training ends at
    that epoch boundary (then the run tests and finishes as usual) and the run records why."""

    def __init__(
        self,
        storage: str,
        study: str,
        trial_id: int,
        objective: str,
        pruner: str = "none",
        pruner_args: dict[str, Any] | None = None,
    ) -> None:
        self.storage, self.study_name, self.trial_id = storage, study, trial_id
        self.objective, self.pruner, self.pruner_args = objective, pruner, pruner_args or {}
        self._trial: Any = None

    @classmethod
    def from_env(cls) -> SweepTrial | None:
        """The trial this process runs, if ``dltemplate sweep`` started it."""
        described = os.environ.get(TRIAL_ENV)
        return cls(**json.loads(described)) if described else None

    def _connect(self) -> Any:
        import optuna  # only in a sweep's trials

        study = optuna.load_study(
            study_name=self.study_name,
            storage=open_storage(self.storage),
            pruner=make_pruner(self.pruner, self.pruner_args),
        )
        return optuna.trial.Trial(study, self.trial_id)

    def on_epoch_end(self, trainer: Loop, row: dict[str, float]) -> None:
        """Report the epoch's objective; end training if the pruner prunes the trial. An
        objective the row lacks (a misspelt column) is a ConfigError at the first epoch, not a
        trial trained to its end for no result."""
        if self.objective not in row:
            columns = [key for key in row if key != "epoch"]
            raise ConfigError(
                f"sweep objective={self.objective!r}: not a metrics.csv column"
                f"{did_you_mean(self.objective, columns)} (columns: {', '.join(columns)})"
            )
        value, epoch = row.get(self.objective), int(row["epoch"])
        prune = False
        if trainer.dist.is_main and value is not None and math.isfinite(value):
            if self._trial is None:
                self._trial = self._connect()
            self._trial.report(float(value), epoch)
            prune = self.pruner != "none" and self._trial.should_prune()
        if D.broadcast_object(prune):  # rank 0 decides; every rank stops at the same epoch
            reason = f"pruned by the {self.pruner} pruner at epoch {epoch}"
            log.info("sweep: trial %s %s (%s %s)", self.trial_id, reason, self.objective, value)
            trainer.end_training(self, reason)
