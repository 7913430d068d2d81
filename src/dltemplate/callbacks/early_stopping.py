"""``early_stopping``: end training when the monitored metric stops improving."""

from __future__ import annotations

import logging
import math
from typing import Any

from dltemplate.callbacks.base import Callback, Loop
from dltemplate.config import Config
from dltemplate.engine.early_stopping import EarlyStopping
from dltemplate.registry import CALLBACKS

log = logging.getLogger("dltemplate")


@CALLBACKS.register("early_stopping")
class EarlyStoppingCallback(Callback):
    """Ends training (then the final test runs) after ``patience`` epochs in a row without
    improvement of ``trainer.monitor`` (by more than ``trainer.early_stopping_min_delta``).
    ``patience`` defaults to ``trainer.early_stopping_patience``; None never stops.

    It keeps its own best score and count of epochs without improvement (saved in every
    checkpoint). A run it ended stays ended on ``resume`` unless a larger patience would not
    have ended it: then training goes on.
    """

    def __init__(self, patience: int | None = None) -> None:
        if patience is not None and patience < 1:
            raise ValueError(f"patience={patience}: must be at least 1")
        self.patience = patience
        self.tracker = EarlyStopping()

    def setup(self, cfg: Config, model: Any) -> None:
        """Take the config's patience unless given one, and the monitor's direction."""
        if self.patience is None:
            self.patience = cfg.trainer.early_stopping_patience
        self.tracker = EarlyStopping(
            cfg.trainer.monitor_mode, self.patience, cfg.trainer.early_stopping_min_delta
        )

    def on_epoch_end(self, trainer: Loop, row: dict[str, float]) -> None:
        """Count the epoch; end training when patience has run out."""
        monitor = trainer.cfg.trainer.monitor
        self.tracker.update(row.get(monitor, math.nan))
        if self.stop_holds():
            reason = (
                f"{monitor} did not improve for {self.tracker.bad_epochs} epochs; a larger "
                "trainer.early_stopping_patience continues it"
            )
            log.info("early stopping: %s did not improve for %d epochs", monitor, self.patience)
            trainer.end_training(self, reason)

    def stop_holds(self) -> bool:
        """Whether the epochs without improvement have reached the patience."""
        return self.tracker.should_stop

    def state_dict(self) -> dict[str, Any]:
        """The best score and the epochs since it."""
        return self.tracker.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.tracker.load_state_dict(state)
