"""Segmentation networks: UNet (Ronneberger et al. 2015) and UNet++ (Zhou et al. 2018).

Both take images (N, C, H, W) and return per-pixel logits (N, num_classes, H, W) of the same
height and width, for any H and W of at least ``2**depth`` pixels: the encoder's max pooling
rounds odd sizes down, and every upsampled map is zero-padded back to its skip connection's size.

Width at level ``i`` (0 = full resolution, ``depth`` = bottleneck) is ``base_width * 2**i``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dltemplate.errors import ConfigError
from dltemplate.registry import MODELS


class DoubleConv(nn.Sequential):
    """(conv3x3 - BatchNorm - ReLU) twice; keeps the spatial size."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


def pad_to(x: torch.Tensor, size: torch.Size | tuple[int, int]) -> torch.Tensor:
    """Zero-pad ``x`` (N, C, h, w) at the bottom/right (and top/left) to height, width ``size``."""
    dh = size[0] - x.shape[-2]
    dw = size[1] - x.shape[-1]
    if dh == 0 and dw == 0:
        return x
    return F.pad(x, [dw // 2, dw - dw // 2, dh // 2, dh - dh // 2])


class Up(nn.Module):
    """Double the resolution and map ``in_channels`` to ``out_channels``, then pad to a size.

    ``bilinear=True``: bilinear upsampling followed by a 1x1 convolution; otherwise a learned
    2x2 transposed convolution with stride 2 (the paper's "up-conv").
    """

    def __init__(self, in_channels: int, out_channels: int, bilinear: bool = True) -> None:
        super().__init__()
        if bilinear:
            self.up: nn.Module = nn.Sequential(
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                nn.Conv2d(in_channels, out_channels, 1),
            )
        else:
            self.up = nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2)

    def forward(self, x: torch.Tensor, size: torch.Size | tuple[int, int]) -> torch.Tensor:
        """Upsampled ``x``, padded to height, width ``size`` (that of the skip connection)."""
        return pad_to(self.up(x), size)


def check_size(height: int, width: int, depth: int) -> None:
    """Raise a :class:`ConfigError` when an image is too small for ``depth`` poolings."""
    need = 2**depth
    if min(height, width) < need:
        raise ConfigError(
            f"input {height}x{width} is too small for model depth {depth} "
            f"(needs at least {need} pixels per side): raise data.args.scale or "
            f"data.args.size, or lower model.args.depth"
        )


def _check_args(input_shape: tuple[int, ...], num_classes: int, base_width: int, depth: int):
    if len(input_shape) != 3:
        raise ConfigError(f"input_shape must be (channels, height, width), got {input_shape}")
    if depth < 1:
        raise ConfigError(f"model.args.depth must be at least 1, got {depth}")
    if base_width < 1 or num_classes < 1:
        raise ConfigError(
            f"model.args.base_width and num_classes must be positive, got {base_width}, "
            f"{num_classes}"
        )
    check_size(int(input_shape[1]), int(input_shape[2]), depth)


@MODELS.register("UNet")
class UNet(nn.Module):
    """Encoder of ``depth`` poolings, symmetric decoder with skip concatenation, 1x1 head."""

    def __init__(
        self,
        input_shape: tuple[int, ...] = (3, 160, 240),
        num_classes: int = 1,
        base_width: int = 32,
        depth: int = 4,
        bilinear: bool = True,
    ) -> None:
        super().__init__()
        _check_args(tuple(input_shape), num_classes, base_width, depth)
        self.depth = depth
        widths = [base_width * 2**i for i in range(depth + 1)]
        self.pool = nn.MaxPool2d(2)
        self.down = nn.ModuleList([DoubleConv(int(input_shape[0]), widths[0])])
        self.down.extend(DoubleConv(widths[i - 1], widths[i]) for i in range(1, depth + 1))
        # up[i] goes from level i+1 to level i; applied from the bottom (i = depth-1) up.
        self.up = nn.ModuleList(Up(widths[i + 1], widths[i], bilinear) for i in range(depth))
        self.up_conv = nn.ModuleList(DoubleConv(2 * widths[i], widths[i]) for i in range(depth))
        self.head = nn.Conv2d(widths[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape (N, num_classes, H, W)."""
        check_size(x.shape[-2], x.shape[-1], self.depth)
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else self.pool(x))
            skips.append(x)
        x = skips.pop()  # the bottleneck
        for i in reversed(range(self.depth)):
            skip = skips[i]
            x = self.up_conv[i](torch.cat([skip, self.up[i](x, skip.shape[-2:])], dim=1))
        return self.head(x)


@MODELS.register("UNet++")
@MODELS.register("UNetPlusPlus")
@MODELS.register("NestedUNet")  # the name some UNet++ code uses
class UNetPlusPlus(nn.Module):
    """UNet with nested dense skip pathways.

    Node ``X[i, j]`` sits at level ``i`` (resolution ``1 / 2**i``) and column ``j``. Column 0
    is the encoder; every other node is a :class:`DoubleConv` of the concatenation of all earlier
    nodes of its level ``X[i, 0..j-1]`` and the upsampled node below it ``X[i+1, j-1]``.

    With ``deep_supervision`` a 1x1 head sits on each of ``X[0, 1] .. X[0, depth]``: in training
    mode the model returns the list of their logits (one loss per head), in eval mode their
    average. Without it, the single head on ``X[0, depth]`` is returned in both modes.
    :meth:`heads` always returns the list.
    """

    def __init__(
        self,
        input_shape: tuple[int, ...] = (3, 160, 240),
        num_classes: int = 1,
        base_width: int = 32,
        depth: int = 4,
        bilinear: bool = True,
        deep_supervision: bool = False,
    ) -> None:
        super().__init__()
        _check_args(tuple(input_shape), num_classes, base_width, depth)
        self.depth = depth
        self.deep_supervision = deep_supervision
        widths = [base_width * 2**i for i in range(depth + 1)]
        self.pool = nn.MaxPool2d(2)
        self.nodes = nn.ModuleDict()  # "i_j" -> DoubleConv computing X[i, j]
        self.ups = nn.ModuleDict()  # "i_j" -> Up from X[i+1, j-1] to level i, for j >= 1
        for i in range(depth + 1):
            in_channels = int(input_shape[0]) if i == 0 else widths[i - 1]
            self.nodes[f"{i}_0"] = DoubleConv(in_channels, widths[i])
        for j in range(1, depth + 1):
            for i in range(depth + 1 - j):
                self.ups[f"{i}_{j}"] = Up(widths[i + 1], widths[i], bilinear)
                self.nodes[f"{i}_{j}"] = DoubleConv((j + 1) * widths[i], widths[i])
        n_heads = depth if deep_supervision else 1
        self.head_convs = nn.ModuleList(
            nn.Conv2d(widths[0], num_classes, 1) for _ in range(n_heads)
        )

    def heads(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Head logits: on ``X[0, 1..depth]`` if deep-supervised, else on ``X[0, depth]``."""
        check_size(x.shape[-2], x.shape[-1], self.depth)
        grid: dict[tuple[int, int], torch.Tensor] = {}
        for i in range(self.depth + 1):
            grid[i, 0] = self.nodes[f"{i}_0"](x if i == 0 else self.pool(grid[i - 1, 0]))
        for j in range(1, self.depth + 1):
            for i in range(self.depth + 1 - j):
                size = grid[i, 0].shape[-2:]
                below = self.ups[f"{i}_{j}"](grid[i + 1, j - 1], size)
                same_level = [grid[i, k] for k in range(j)]
                grid[i, j] = self.nodes[f"{i}_{j}"](torch.cat([*same_level, below], dim=1))
        top = [grid[0, j] for j in range(1, self.depth + 1)]
        if not self.deep_supervision:
            top = top[-1:]
        return [head(node) for head, node in zip(self.head_convs, top)]

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """Logits (N, num_classes, H, W); a list of them when deep-supervised and training."""
        outs = self.heads(x)
        if len(outs) == 1:
            return outs[0]
        if self.training:
            return outs
        return torch.stack(outs).mean(dim=0)
