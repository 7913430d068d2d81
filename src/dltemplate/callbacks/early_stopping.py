"""``early_stopping``: end training when the monitored metric stops improving."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from dltemplate.callbacks.base import Callback
from dltemplate.registry import CALLBACKS

if TYPE_CHECKING:
    from dltemplate.engine.trainer import TrainerBase

log = logging.getLogger("dltemplate")


@CALLBACKS.register("early_stopping")
class EarlyStoppingCallback(Callback):
    """Ends training (then the final test runs) after ``patience`` epochs in a row without
    improvement of ``trainer.monitor`` (by more than ``trainer.early_stopping_min_delta``).
    ``patience`` defaults to ``trainer.early_stopping_patience``; None never stops.

    The trainer tracks the best score and the epochs since (saved in every checkpoint); this
    callback only decides, so it holds no state of its own.
    """

    def __init__(self, patience: int | None = None) -> None:
        if patience is not None and patience < 1:
            raise ValueError(f"patience={patience}: must be at least 1")
        self.patience = patience

    def setup(self, trainer: TrainerBase) -> None:
        """Take the config's patience unless given one."""
        if self.patience is None:
            self.patience = trainer.cfg.trainer.early_stopping_patience

    def stops(self, trainer: TrainerBase) -> bool:
        """Whether the epochs without improvement have reached the patience."""
        return self.patience is not None and trainer.best.bad_epochs >= self.patience

    def on_epoch_end(self, trainer: TrainerBase, row: dict[str, float]) -> None:
        """Stop training after this epoch when patience has run out."""
        if self.stops(trainer):
            trainer.should_stop = True
            log.info(
                "early stopping: %s did not improve for %d epochs",
                trainer.cfg.trainer.monitor,
                trainer.best.bad_epochs,
            )
