"""``grad_norm``: the global gradient norm, to TensorBoard and the log."""

from __future__ import annotations

import logging

import torch

from dltemplate.callbacks.base import Callback, Loop
from dltemplate.registry import CALLBACKS

log = logging.getLogger("dltemplate")


@CALLBACKS.register("grad_norm")
class GradNorm(Callback):
    """Every ``every`` optimizer steps, the L2 norm of all gradients together (after unscaling,
    before clipping) as ``train/grad_norm`` in TensorBoard and a log line."""

    def __init__(self, every: int = 50, norm_type: float = 2.0) -> None:
        if every < 1:
            raise ValueError(f"every={every}: must be at least 1")
        self.every = every
        self.norm_type = norm_type
        self.last: float | None = None  # the latest value, for tests and other callbacks

    @property
    def state_key(self) -> str:
        """``GradNorm{every=..., norm_type=...}``."""
        return self.key_with(every=self.every, norm_type=self.norm_type)

    def on_before_optimizer_step(self, trainer: Loop) -> None:
        """Measure on the steps it is due (the step about to be taken is global_step + 1)."""
        step = trainer.state.global_step + 1
        if step % self.every:
            return
        grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
        if not grads:
            return
        norms = torch.stack([torch.linalg.vector_norm(g, self.norm_type) for g in grads])
        self.last = float(torch.linalg.vector_norm(norms, self.norm_type))
        if trainer.writer is not None:
            trainer.writer.add_scalar("train/grad_norm", self.last, step)
        log.info("step %d: gradient norm %.4g", step, self.last)
