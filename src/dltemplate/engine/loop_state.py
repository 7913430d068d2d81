"""Where a run is: the counters the loop moves, the best score so far, and who ended training.

The loop alone moves a :class:`LoopState`; callbacks read it (``trainer.state``); the run's
saved state (:mod:`dltemplate.engine.run_state`) saves and restores the part that outlives a
process (:meth:`LoopState.state_dict`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


def improves(score: float, best: float | None, mode: str, min_delta: float) -> bool:
    """Whether ``score`` beats ``best`` by more than ``min_delta`` (lower for ``min``, higher
    for ``max``); a first score improves unless it is NaN."""
    if best is None:
        return not math.isnan(score)
    if mode == "min":
        return score < best - abs(min_delta)
    return score > best + abs(min_delta)


@dataclass
class BestScore:
    """The best value of ``trainer.monitor`` so far, and the epoch (1-based) that reached it."""

    mode: str = "max"  # min | max
    min_delta: float = 0.0  # an epoch must beat the best by more than this
    score: float | None = None
    epoch: int | None = None

    def update(self, score: float, epoch: int) -> bool:
        """Record ``epoch``'s score; return whether it is the new best."""
        if not improves(score, self.score, self.mode, self.min_delta):
            return False
        self.score, self.epoch = score, epoch
        return True


@dataclass
class LoopState:
    """What the loop has reached. Read it; only the loop changes it."""

    epochs: int  # epochs this run trains for
    epoch: int = 0  # epochs completed
    global_step: int = 0  # optimizer steps taken
    batch_in_epoch: int = 0  # micro-batches of the current epoch done, as of the last step
    phase: str = "train"  # train | val | test
    best: BestScore = field(default_factory=BestScore)
    improved: bool = False  # in on_epoch_end: the epoch just ended is the best so far
    logged_loss: float | None = None  # from the step that read the loss until the next batch
    stopped_by: str | None = None  # the state_key of the callback that ended training
    stop_reason: str | None = None  # why it did, in its words
    torn: str | None = None  # set while an optimizer step or an epoch's end is half done

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of it (plain types)."""
        return {
            "epoch": self.epoch,
            "global_step": self.global_step,
            "batch_in_epoch": self.batch_in_epoch,
            "best_score": self.best.score,
            "best_epoch": self.best.epoch,
            "stopped_by": self.stopped_by,
            "stop_reason": self.stop_reason,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (the keys are checked by the caller)."""
        self.epoch, self.global_step = int(state["epoch"]), int(state["global_step"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
        self.best.score, self.best.epoch = state["best_score"], state["best_epoch"]
        self.stopped_by, self.stop_reason = state["stopped_by"], state["stop_reason"]

    @property
    def training_ended(self) -> bool:
        """Whether a callback ended training (the final test comes next)."""
        return self.stopped_by is not None
