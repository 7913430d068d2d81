"""``metrics_table``: ``metrics.csv`` (one row per epoch) and ``curves.png``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from dltemplate.callbacks.base import Callback, Loop
from dltemplate.config import Config
from dltemplate.engine import rundir
from dltemplate.registry import CALLBACKS


@CALLBACKS.register("metrics_table")
class MetricsTableCallback(Callback):
    """On rank 0, appends each epoch's row (epoch, lr, seconds, ``train/*``, ``val/*``) to
    ``<run>/metrics.csv``; a resumed run first drops the rows of epochs it will run again.

    With ``curves``, ``<run>/curves.png`` is redrawn in a background thread after the first
    epoch, then after an epoch when ``curves_every_s`` seconds have passed since the last
    drawing, and when the run ends or stops: a drawing costs a few tenths of a second of CPU,
    which short epochs would otherwise pay every time.
    """

    def __init__(self, curves: bool = True, curves_every_s: float = 30.0) -> None:
        if curves_every_s < 0:
            raise ValueError(f"curves_every_s={curves_every_s}: must be 0 or more")
        self.curves = curves
        self.curves_every_s = curves_every_s
        self.table: rundir.MetricsTable | None = None
        self.drawn_at: float | None = None  # when the last drawing started
        self.drawn_rows = 0  # rows in the last drawing
        # (trainer.monitor, its mode, early_stopping_min_delta): the best epoch, as the run keeps it
        self.monitor: tuple[str, str, float] | None = None

    def setup(self, cfg: Config, model: Any) -> None:
        """A resumed run's table must be readable: checked before anything is written."""
        tc = cfg.trainer
        self.monitor = (tc.monitor, tc.monitor_mode, tc.early_stopping_min_delta)
        resume = cfg.trainer.resume
        if resume:
            run_dir = Path(resume) if Path(resume).is_dir() else Path(resume).parent
            if (run_dir / "metrics.csv").exists():
                rundir.MetricsTable.read(run_dir / "metrics.csv")

    def on_fit_start(self, trainer: Loop) -> None:
        """Open the table; keep only the rows of epochs already complete."""
        if not trainer.dist.is_main or trainer.run_dir is None:
            return
        path = trainer.run_dir / "metrics.csv"
        existed = path.exists()
        self.table = rundir.MetricsTable(path)
        if existed:
            self.table.truncate(trainer.state.epoch + 1)

    def on_epoch_end(self, trainer: Loop, row: dict[str, float]) -> None:
        """Append the row; redraw the curves if they are due."""
        if self.table is None:
            return
        self.table.append(row)
        due = self.drawn_at is None or time.monotonic() - self.drawn_at >= self.curves_every_s
        if due:
            self.draw(trainer)

    def draw(self, trainer: Loop) -> None:
        """Start redrawing ``curves.png`` from the table (when there is something new)."""
        if self.curves and self.table is not None and len(self.table.rows) != self.drawn_rows:
            monitor, mode, min_delta = self.monitor or (None, "max", 0.0)
            self.table.plot(trainer.run_dir / "curves.png", monitor, mode, min_delta)
            self.drawn_at, self.drawn_rows = time.monotonic(), len(self.table.rows)

    def on_fit_end(self, trainer: Loop) -> None:
        """Draw the final curves and wait for them."""
        self.draw(trainer)
        self.wait()

    def on_exception(self, trainer: Loop, exc: BaseException) -> None:
        """Draw what the table holds, and wait."""
        self.draw(trainer)
        self.wait()

    def wait(self) -> None:
        """Wait for the curves being drawn, if any."""
        if self.table is not None:
            self.table.wait()
