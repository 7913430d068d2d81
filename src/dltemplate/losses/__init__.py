"""Losses, registered by name in :data:`dltemplate.registry.LOSSES`."""

from torch import nn

from dltemplate.registry import LOSSES

LOSSES.register("cross_entropy")(nn.CrossEntropyLoss)
LOSSES.register("nll")(nn.NLLLoss)
LOSSES.register("bce_with_logits")(nn.BCEWithLogitsLoss)
LOSSES.register("mse")(nn.MSELoss)

from dltemplate.losses import segmentation  # noqa: E402, F401  (registers dice, bce, bce_dice)
