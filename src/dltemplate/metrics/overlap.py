"""Overlap scores of binary masks, written once: the dice coefficient (hard or soft) and IoU.

The dice loss (soft, on probabilities, with ``smooth``), the dice metric and the per-image dice
of evaluation reports (hard, on 0/1 masks) all call :func:`dice_coefficient` or
:func:`dice_from_sums`.
"""

from __future__ import annotations

import torch


def safe_ratio(num: torch.Tensor, den: torch.Tensor, empty: float = 1.0) -> torch.Tensor:
    """``num / den`` element-wise, and ``empty`` where ``den`` is 0."""
    # The inner where keeps 0/0 out of the graph: its NaN would poison gradients.
    return torch.where(den > 0, num / torch.where(den > 0, den, 1), empty)


def dice_from_sums(
    inter: torch.Tensor,
    pred_sum: torch.Tensor,
    target_sum: torch.Tensor,
    smooth: float = 0.0,
    empty: float = 1.0,
) -> torch.Tensor:
    """``(2 inter + smooth) / (pred_sum + target_sum + smooth)``; ``empty`` where the
    denominator is 0 (prediction and target both empty, with ``smooth = 0``)."""
    return safe_ratio(2 * inter + smooth, pred_sum + target_sum + smooth, empty)


def iou_from_sums(
    inter: torch.Tensor, pred_sum: torch.Tensor, target_sum: torch.Tensor, empty: float = 1.0
) -> torch.Tensor:
    """``inter / (pred_sum + target_sum - inter)``; ``empty`` where the union is empty."""
    return safe_ratio(inter, pred_sum + target_sum - inter, empty)


def dice_coefficient(
    pred: torch.Tensor,
    target: torch.Tensor,
    smooth: float = 0.0,
    empty: float = 1.0,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Dice of each sample of ``pred`` and ``target`` (``[N, ...]``, flattened per sample).

    Hard dice for bool masks, soft dice for probabilities; the sums are taken in ``dtype``
    (default: the inputs'), so pass ``torch.float64`` to count the pixels of bool masks.
    Returns ``[N]``.
    """
    p, t = pred.flatten(1), target.flatten(1)
    inter = (p * t).sum(1, dtype=dtype)
    return dice_from_sums(inter, p.sum(1, dtype=dtype), t.sum(1, dtype=dtype), smooth, empty)
