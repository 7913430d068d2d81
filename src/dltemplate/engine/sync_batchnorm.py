"""Batch normalisation synchronised across processes, on any device the gloo backend serves.

Under DistributedDataParallel each process's BatchNorm normalises with its own batch statistics,
so N processes with batch B/N do not equal one process with batch B. ``nn.SyncBatchNorm`` fixes
that on GPUs only; :class:`GlooSyncBatchNorm` does the same with plain, differentiable
all-reduces, so CPU training with the gloo backend gets whole-batch statistics too.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.nn.functional import all_reduce as differentiable_all_reduce

__all__ = ["GlooSyncBatchNorm", "convert_sync_batchnorm"]


def _all_reduce_sum(tensor: torch.Tensor, group: Any) -> torch.Tensor:
    """Sum ``tensor`` over ``group``, with a backward pass that sums the gradients likewise."""
    with warnings.catch_warnings():
        # torch's only autograd-aware all-reduce warns "deprecated" on every call: pure noise.
        warnings.filterwarnings(
            "ignore", message=".*all_reduce is deprecated", category=FutureWarning
        )
        return differentiable_all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)


class GlooSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over inputs ``(N, C, ...)`` whose training statistics span every process.

    In training mode inside an initialised process group of more than one process, the
    per-channel count, sum and sum of squared deviations are all-reduced (differentiably, so
    gradients flow between processes as if one process had seen the whole batch), and the
    running statistics are updated with the global mean and unbiased global variance. Processes
    may hold batches of different sizes, even empty ones. Otherwise (no process group, a single
    process, or eval mode) it is exactly ``nn.BatchNorm``.

    The parameters and buffers are those of ``nn.BatchNorm*d``, so state dicts are interchangeable.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
    ) -> None:
        """Same arguments as ``nn.BatchNorm*d``; ``process_group`` defaults to the whole world."""
        # ``bias`` is passed only when it matters: torch before 2.12 has no such argument.
        no_bias = {"bias": False} if affine and not bias else {}
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, **no_bias
        )
        self.process_group = process_group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (N, C, ...), got {input.dim()}D input")

    def _world_size(self) -> int:
        """How many processes share the statistics (1 when there is no process group)."""
        if not (dist.is_available() and dist.is_initialized()):
            return 1
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        return dist.get_world_size(group)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Normalise ``input`` with whole-batch statistics gathered from every process."""
        if not self.training or self._world_size() <= 1:
            # Eval mode (like nn.SyncBatchNorm) and lone processes are plain F.batch_norm.
            return super().forward(input)
        self._check_input_dim(input)
        if input.size(1) != self.num_features:
            raise ValueError(f"expected {self.num_features} channels, got {input.size(1)}")

        group = self.process_group if self.process_group is not None else dist.group.WORLD
        mean, var, count = self._global_stats(input, group)
        if count <= 1:
            # Same refusal as F.batch_norm: one value per channel has no variance.
            raise ValueError(
                f"Expected more than 1 value per channel when training, got {int(count)} "
                "values over all processes"
            )
        if self.track_running_stats:
            self._update_running_stats(mean, var, count)

        shape = [1, -1] + [1] * (input.dim() - 2)
        # The statistics are in float64 (float32 on MPS); the output keeps the input's dtype.
        invstd = torch.rsqrt(var + self.eps).to(input.dtype)
        out = (input - mean.to(input.dtype).view(shape)) * invstd.view(shape)
        if self.weight is not None:
            out = out * self.weight.to(input.dtype).view(shape)
        if self.bias is not None:
            out = out + self.bias.to(input.dtype).view(shape)
        return out

    def _global_stats(
        self, input: torch.Tensor, group: Any
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Global per-channel mean and biased variance, and the global count per channel."""
        # Per-channel vectors in float64 keep cross-process sums and counts exact (MPS lacks it).
        stat_dtype = torch.float32 if input.device.type == "mps" else torch.float64
        dims = [0] + list(range(2, input.dim()))
        local_count = input.numel() // max(input.size(1), 1)

        # Pass 1: count and sum give the mean.
        local_sum = input.sum(dim=dims).to(stat_dtype)
        count_col = local_sum.new_full((1,), float(local_count))
        reduced = _all_reduce_sum(torch.cat([count_col, local_sum]), group)
        count = float(reduced[0].item())
        mean = reduced[1:] / max(count, 1.0)

        # Pass 2: squared deviations from the global mean avoid E[x^2] - E[x]^2 cancellation.
        shape = [1, -1] + [1] * (input.dim() - 2)
        centred = input - mean.to(input.dtype).view(shape)
        local_sq = centred.square().sum(dim=dims).to(stat_dtype)
        var = _all_reduce_sum(local_sq, group) / max(count, 1.0)
        return mean, var, count

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: float) -> None:
        """Move the running statistics as ``nn.BatchNorm`` does, with the global count."""
        assert self.running_mean is not None and self.running_var is not None
        if self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        if self.momentum is None:
            # Cumulative moving average, as nn.BatchNorm does when momentum is None.
            factor = 1.0 / float(self.num_batches_tracked)
        else:
            factor = self.momentum
        unbiased = var * (count / (count - 1.0))
        self.running_mean.mul_(1.0 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
        self.running_var.mul_(1.0 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)


def convert_sync_batchnorm(
    model: nn.Module, device: torch.device, process_group: Any | None = None
) -> nn.Module:
    """Make every BatchNorm in ``model`` use statistics from all processes.

    On CUDA this is ``nn.SyncBatchNorm.convert_sync_batchnorm``; elsewhere each
    ``BatchNorm1d/2d/3d`` becomes a :class:`GlooSyncBatchNorm` sharing the original parameters
    and buffers, with the same ``training`` mode, so ``state_dict()`` keys and values are unchanged.
    """
    if torch.device(device).type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group)
    return _convert(model, process_group)


def _convert(module: nn.Module, process_group: Any | None) -> nn.Module:
    """Recursive worker of :func:`convert_sync_batchnorm` for non-CUDA devices."""
    output = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(
        module, GlooSyncBatchNorm | nn.SyncBatchNorm
    ):
        output = GlooSyncBatchNorm(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            process_group,
            bias=module.bias is not None,
        )
        if module.affine:
            # Share the Parameter objects, so requires_grad and optimiser references carry over.
            with torch.no_grad():
                output.weight = module.weight
                output.bias = module.bias
        output.running_mean = module.running_mean
        output.running_var = module.running_var
        output.num_batches_tracked = module.num_batches_tracked
        output.training = module.training
        if hasattr(module, "qconfig"):
            output.qconfig = module.qconfig
    for name, child in module.named_children():
        output.add_module(name, _convert(child, process_group))
    return output
