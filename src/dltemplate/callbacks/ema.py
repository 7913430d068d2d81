"""``ema``: an exponential moving average of the weights, used for evaluation if asked."""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn

from dltemplate.callbacks.base import Callback, Loop
from dltemplate.config import Config
from dltemplate.registry import CALLBACKS

log = logging.getLogger("dltemplate")


@CALLBACKS.register("ema")
class EMA(Callback):
    """After every optimizer step, ``average = decay * average + (1 - decay) * weights`` for
    every parameter (buffers such as BatchNorm statistics are copied), starting from the
    initial weights. With ``for_eval`` (default), validation, the final test and the best
    checkpoints use the average; ``last`` and interrupt checkpoints keep the trained weights,
    and the average travels in the callback's state, so a resumed run continues it exactly.
    """

    def __init__(self, decay: float = 0.999, for_eval: bool = True) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay={decay}: must be in [0, 1)")
        self.decay = decay
        self.for_eval = for_eval
        self.average: torch.nn.Module | None = None

    def setup(self, cfg: Config, model: nn.Module) -> None:
        """Copy the freshly built model: the average starts from the initial weights."""
        self.average = copy.deepcopy(model).requires_grad_(False).eval()

    def on_fit_start(self, trainer: Loop) -> None:
        """Have validation, the test and the best checkpoints use the average (``for_eval``)."""
        if self.for_eval:
            trainer.evaluate_with(self.average)

    @torch.no_grad()
    def on_after_optimizer_step(self, trainer: Loop) -> None:
        """Move the average towards the new weights (one fused update per step)."""
        model = trainer.unwrapped_model
        averaged = [p for p in self.average.parameters()]
        current = [p.detach() for p in model.parameters()]
        torch._foreach_mul_(averaged, self.decay)
        torch._foreach_add_(averaged, current, alpha=1.0 - self.decay)
        for mine, theirs in zip(self.average.buffers(), model.buffers()):
            mine.copy_(theirs)

    @property
    def state_key(self) -> str:
        """``EMA{decay=...}``: two averages of other decays may run side by side."""
        return self.key_with(decay=self.decay)

    def state_dict(self) -> dict[str, Any]:
        """The averaged weights and buffers."""
        return {"average": {k: v.detach().cpu() for k, v in self.average.state_dict().items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the average."""
        self.average.load_state_dict(state["average"])
