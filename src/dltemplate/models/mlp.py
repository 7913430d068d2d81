"""The seed's MLP classifier ("Vanilla"): flatten -> 512 -> 512 -> classes."""

from __future__ import annotations

import math

import torch
from torch import nn

from dltemplate.registry import MODELS


@MODELS.register("Vanilla")
@MODELS.register("mlp")
class MLP(nn.Module):
    """A multilayer perceptron on flattened inputs (784-512-512-10 on Fashion-MNIST)."""

    def __init__(
        self,
        input_shape: tuple[int, ...] = (1, 28, 28),
        num_classes: int = 10,
        hidden: list[int] | tuple[int, ...] = (512, 512),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:  # torch drops nothing for a negative rate, silently
            raise ValueError(f"dropout={dropout}: must be in [0, 1)")
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits of shape (N, num_classes)."""
        return self.net(x)
