"""``max_time``: stop gracefully after a wall-clock budget, with a resumable checkpoint."""

from __future__ import annotations

import math
import time

from dltemplate.callbacks.base import Callback, Loop
from dltemplate.registry import CALLBACKS


@CALLBACKS.register("max_time")
class MaxTime(Callback):
    """Stops the run once ``hours`` + ``minutes`` + ``seconds`` of wall-clock time have passed
    since this process started training: at the next step boundary, with the interrupt
    checkpoint, exactly as SIGTERM would (``dltemplate resume RUN`` goes on, with a new budget).

    Meant for clusters whose jobs have a time limit: set it a little under the limit.
    """

    def __init__(self, hours: float = 0.0, minutes: float = 0.0, seconds: float = 0.0) -> None:
        for name, value in (("hours", hours), ("minutes", minutes), ("seconds", seconds)):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name}={value}: must be a finite number >= 0")
        self.budget = hours * 3600 + minutes * 60 + seconds
        if self.budget <= 0:
            raise ValueError("give a positive hours, minutes or seconds")
        self.started = time.monotonic()

    @property
    def state_key(self) -> str:
        """``MaxTime{seconds=...}``."""
        return self.key_with(seconds=self.budget)

    def on_fit_start(self, trainer: Loop) -> None:
        """The budget counts from here."""
        self.started = time.monotonic()

    def on_after_optimizer_step(self, trainer: Loop) -> None:
        """Ask the run to stop once the budget is spent (the clock is read once a step)."""
        if time.monotonic() - self.started >= self.budget:
            trainer.request_stop("max_time")
