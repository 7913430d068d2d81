"""``metrics_table``: ``metrics.csv`` (one row per epoch) and ``curves.png``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dltemplate.callbacks.base import Callback
from dltemplate.engine import rundir
from dltemplate.registry import CALLBACKS

if TYPE_CHECKING:
    from dltemplate.engine.trainer import TrainerBase


@CALLBACKS.register("metrics_table")
class MetricsTableCallback(Callback):
    """On rank 0, appends each epoch's row (epoch, lr, seconds, ``train/*``, ``val/*``) to
    ``<run>/metrics.csv`` and, with ``curves``, redraws ``<run>/curves.png`` in a background
    thread. A resumed run first drops the rows of epochs it will run again."""

    def __init__(self, curves: bool = True) -> None:
        self.curves = curves
        self.table: rundir.MetricsTable | None = None

    def on_fit_start(self, trainer: TrainerBase) -> None:
        """Open the table; keep only the rows of epochs already complete."""
        if not trainer.dist.is_main or trainer.run_dir is None:
            return
        path = trainer.run_dir / "metrics.csv"
        existed = path.exists()
        self.table = rundir.MetricsTable(path)
        if existed:
            self.table.truncate(trainer.epoch + 1)

    def on_epoch_end(self, trainer: TrainerBase, row: dict[str, float]) -> None:
        """Append the row; start redrawing the curves."""
        if self.table is not None:
            self.table.append(row)
            if self.curves:
                self.table.plot(trainer.run_dir / "curves.png")

    def on_fit_end(self, trainer: TrainerBase) -> None:
        """Let the last drawing finish."""
        self.wait()

    def on_exception(self, trainer: TrainerBase, exc: BaseException) -> None:
        """Let a drawing in progress finish."""
        self.wait()

    def wait(self) -> None:
        """Wait for the curves being drawn, if any."""
        if self.table is not None:
            self.table.wait()
