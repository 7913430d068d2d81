"""Binary segmentation metrics from logits (N, 1, H, W) and 0/1 masks, averaged over images.

A pixel is predicted foreground when its logit exceeds ``threshold`` (0.0 = probability 0.5).
Each image gets a score and the result is the mean over images; an image whose prediction and
mask are both empty scores 1. A list of logits (deep-supervision heads) is averaged first.
"""

from __future__ import annotations

import torch

from dltemplate.metrics.base import Metric
from dltemplate.metrics.overlap import dice_from_sums, iou_from_sums
from dltemplate.models.heads import Outputs, merged_prediction
from dltemplate.registry import METRICS


class _OverlapMetric(Metric):
    """Mean over images of a score of (|P and T|, |P|, |T|); state: score sum, image count."""

    name = ""

    def __init__(self, threshold: float = 0.0) -> None:
        self.threshold = threshold
        self.reset()

    def reset(self) -> None:
        """Zero the sum and the count."""
        self.total = torch.zeros((), dtype=torch.float64)
        self.count = torch.zeros((), dtype=torch.float64)

    @staticmethod
    def _score(inter: torch.Tensor, pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def update(self, outputs: Outputs, targets: torch.Tensor) -> None:
        """Add the scores of the batch's images (several heads: of their mean)."""
        outputs = merged_prediction(outputs)
        if targets.dim() == outputs.dim() - 1 and outputs.shape[1] == 1:
            targets = targets.unsqueeze(1)
        p = (outputs > self.threshold).flatten(1)
        t = (targets != 0).flatten(1)
        inter = (p & t).sum(1, dtype=torch.float64)
        scores = self._score(inter, p.sum(1, dtype=torch.float64), t.sum(1, dtype=torch.float64))
        self.total = self.total.to(outputs.device) + scores.sum()
        self.count = self.count.to(outputs.device) + p.shape[0]

    def state(self) -> list[torch.Tensor]:
        """Sum of per-image scores and number of images."""
        return [self.total, self.count]

    def compute(self) -> dict[str, float]:
        """``{name: mean score over images}`` (0.0 before any image)."""
        if float(self.count) == 0:
            return {self.name: 0.0}
        return {self.name: float(self.total / self.count)}


@METRICS.register("dice")
class Dice(_OverlapMetric):
    """Dice coefficient ``2 |P and T| / (|P| + |T|)``, mean over images."""

    name = "dice"

    @staticmethod
    def _score(inter: torch.Tensor, pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
        return dice_from_sums(inter, pred, true)


@METRICS.register("iou")
class IoU(_OverlapMetric):
    """Intersection over union (Jaccard index) ``|P and T| / |P or T|``, mean over images."""

    name = "iou"

    @staticmethod
    def _score(inter: torch.Tensor, pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
        return iou_from_sums(inter, pred, true)
