"""Binary segmentation losses on logits (N, 1, H, W) and 0/1 masks (uint8, bool or float).

Every loss also accepts a list of logits (the heads of a deep-supervised model such as UNet++)
and returns the mean of the per-head losses (:func:`dltemplate.models.heads.mean_over_heads`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dltemplate.errors import ConfigError
from dltemplate.metrics.overlap import dice_coefficient
from dltemplate.models.heads import Outputs, mean_over_heads
from dltemplate.registry import LOSSES


def _float_targets(targets: torch.Tensor, logits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``targets`` as ``dtype``, with a missing channel axis added for (N, H, W) masks."""
    if targets.dim() == logits.dim() - 1 and logits.shape[1] == 1:
        targets = targets.unsqueeze(1)
    return targets.to(dtype)


def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    # Sums over a whole image overflow or lose precision in float16/bfloat16: use float32 then.
    return torch.promote_types(logits.dtype, torch.float32)


def soft_dice_loss(
    logits: torch.Tensor, targets: torch.Tensor, smooth: float = 1.0
) -> torch.Tensor:
    """``1 - mean over images of (2 sum(p t) + smooth) / (sum(p) + sum(t) + smooth)``.

    ``p = sigmoid(logits)``; the sums run over channels, height and width of each image. With
    ``smooth > 0`` an empty mask and an empty prediction give a finite loss and gradient.
    """
    dtype = _compute_dtype(logits)
    p = torch.sigmoid(logits.to(dtype))
    t = _float_targets(targets, logits, dtype)
    return 1 - dice_coefficient(p, t, smooth).mean()


def _check_smooth(smooth: float) -> None:
    if not smooth > 0:
        raise ConfigError(f"loss.args.smooth must be positive, got {smooth}")


@LOSSES.register("dice")
class DiceLoss(nn.Module):
    """Soft Dice loss (:func:`soft_dice_loss`)."""

    def __init__(self, smooth: float = 1.0) -> None:
        super().__init__()
        _check_smooth(smooth)
        self.smooth = smooth

    def forward(self, outputs: Outputs, targets: torch.Tensor) -> torch.Tensor:
        """The loss, averaged over images (and over heads for a list)."""
        return mean_over_heads(outputs, lambda o: soft_dice_loss(o, targets, self.smooth))


@LOSSES.register("bce")
class BCELoss(nn.Module):
    """Binary cross-entropy with logits against 0/1 masks, averaged over pixels.

    ``pos_weight`` (optional) multiplies the loss of foreground pixels, as in
    :func:`torch.nn.functional.binary_cross_entropy_with_logits`.
    """

    def __init__(self, pos_weight: float | None = None) -> None:
        super().__init__()
        if pos_weight is not None and not pos_weight > 0:
            raise ConfigError(f"loss.args.pos_weight must be positive, got {pos_weight}")
        self.pos_weight = pos_weight

    def _single(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(logits)
        pos_weight = None
        if self.pos_weight is not None:
            pos_weight = torch.tensor(self.pos_weight, dtype=dtype, device=logits.device)
        return F.binary_cross_entropy_with_logits(
            logits.to(dtype), _float_targets(targets, logits, dtype), pos_weight=pos_weight
        )

    def forward(self, outputs: Outputs, targets: torch.Tensor) -> torch.Tensor:
        """The loss, averaged over pixels (and over heads for a list)."""
        return mean_over_heads(outputs, lambda o: self._single(o, targets))


@LOSSES.register("bce_dice")
class BCEDiceLoss(nn.Module):
    """``bce_weight * BCE + (1 - bce_weight) * soft Dice``."""

    def __init__(self, bce_weight: float = 0.5, smooth: float = 1.0) -> None:
        super().__init__()
        if not 0.0 <= bce_weight <= 1.0:
            raise ConfigError(f"loss.args.bce_weight must be in [0, 1], got {bce_weight}")
        _check_smooth(smooth)
        self.bce_weight = bce_weight
        self.smooth = smooth
        self.bce = BCELoss()

    def _single(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        bce = self.bce._single(logits, targets)
        dice = soft_dice_loss(logits, targets, self.smooth)
        return self.bce_weight * bce + (1 - self.bce_weight) * dice

    def forward(self, outputs: Outputs, targets: torch.Tensor) -> torch.Tensor:
        """The weighted sum (averaged over heads for a list)."""
        return mean_over_heads(outputs, lambda o: self._single(o, targets))
