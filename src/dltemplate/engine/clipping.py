"""Gradient clipping, by global norm and by element value."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def clip_gradients(params: Iterable[nn.Parameter], norm: float | None, value: float | None) -> None:
    """Clip gradients (already unscaled) to ± ``value`` each, then to a global ``norm``."""
    params = list(params)
    if value is not None:
        torch.nn.utils.clip_grad_value_(params, value)
    if norm is not None:
        torch.nn.utils.clip_grad_norm_(params, norm)
