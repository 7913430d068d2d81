"""Losses, registered by name in :data:`dltemplate.registry.LOSSES`."""

import torch
from torch import nn

from dltemplate.registry import LOSSES


@LOSSES.register("cross_entropy")
class CrossEntropyLoss(nn.CrossEntropyLoss):
    """torch's cross entropy, whose arguments are checked when it is built (torch checks
    ``label_smoothing`` and ``reduction`` only at the first batch, mid-run)."""

    def __init__(
        self,
        weight: torch.Tensor | None = None,
        size_average: bool | None = None,
        ignore_index: int = -100,
        reduce: bool | None = None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
    ) -> None:
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing={label_smoothing}: must be in [0, 1]")
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction={reduction!r}: must be mean, sum or none")
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)


LOSSES.register("nll")(nn.NLLLoss)
LOSSES.register("bce_with_logits")(nn.BCEWithLogitsLoss)
LOSSES.register("mse")(nn.MSELoss)

from dltemplate.losses import segmentation  # noqa: E402, F401  (registers dice, bce, bce_dice)
