"""Best-score tracking and early stopping on a monitored metric."""

from __future__ import annotations

from typing import Any

from dltemplate.engine.loop_state import improves


class EarlyStopping:
    """Tracks the best value of a metric and says when ``patience`` epochs brought no gain.

    An epoch improves when it beats the best by more than ``min_delta`` (lower for ``min``,
    higher for ``max``). ``patience=None`` only tracks the best, never stops.
    """

    def __init__(self, mode: str = "max", patience: int | None = None, min_delta: float = 0.0):
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', not {mode!r}")
        self.mode = mode
        self.patience = patience
        self.min_delta = abs(min_delta)
        self.best: float | None = None
        self.bad_epochs = 0

    def improves(self, score: float) -> bool:
        """Whether ``score`` beats the best so far by more than ``min_delta``."""
        return improves(score, self.best, self.mode, self.min_delta)

    def update(self, score: float) -> bool:
        """Record one epoch's score; return whether it is the new best."""
        if self.improves(score):
            self.best, self.bad_epochs = score, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        """Whether training should stop now."""
        return self.patience is not None and self.bad_epochs >= self.patience

    def state_dict(self) -> dict[str, Any]:
        """Plain-type state for the checkpoint."""
        return {"best": self.best, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.best, self.bad_epochs = state["best"], state["bad_epochs"]
