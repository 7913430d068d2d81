"""Mixed precision: the autocast context and the gradient scaler, chosen by ``precision``."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from dltemplate.errors import ConfigError


class Precision:
    """``32`` (full), ``bf16`` (autocast, any device that supports it) or ``fp16`` (CUDA only,
    with a gradient scaler so that small gradients do not underflow)."""

    def __init__(self, precision: str, device: torch.device) -> None:
        if precision == "fp16" and device.type != "cuda":
            raise ConfigError(
                f"trainer.precision=fp16 needs a CUDA device (this run uses {device}); "
                "use bf16 or 32"
            )
        self.precision = precision
        self.device = device
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        enabled = precision == "fp16"
        self.scaler = torch.amp.GradScaler(device.type, enabled=enabled)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """Context in which the forward pass and loss run."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate ``loss`` (scaled when fp16)."""
        self.scaler.scale(loss).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Bring gradients back to their true scale before clipping."""
        self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """Optimizer step (skipped by the scaler when fp16 gradients overflowed)."""
        self.scaler.step(optimizer)
        self.scaler.update()
