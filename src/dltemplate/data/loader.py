"""The loader that batches a split by index: the same planned batches for a split in memory
(gathered by indexing) and for a map-style dataset (read through DataLoader workers)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from dltemplate.data.base import EVAL_EPOCH, Batch, TensorSplit
from dltemplate.data.samples import DEFAULT_TIMEOUT, SampleReader
from dltemplate.errors import ConfigError


@dataclass
class ReadOptions:
    """How a loader reads a split of a map-style dataset (``data.num_workers`` ...); a split in
    memory is gathered by indexing and ignores them."""

    num_workers: int = 0
    pin_memory: bool = False
    persistent_workers: bool = True
    prefetch_factor: int = 2
    transforms: list[Callable[[Any, Any], tuple[Any, Any]]] = field(default_factory=list)
    timeout: float | None = DEFAULT_TIMEOUT  # seconds one sample may take; None: no limit


class IndexLoader:
    """Iterates over a split in planned batches: a :class:`TensorSplit` is gathered by
    indexing, in this process; a :class:`~dltemplate.data.samples.SampleSplit` is read sample
    by sample through a DataLoader (``read``: workers, transforms), the same batches.

    Training (``training=True``): every process draws the same permutation from ``seed`` and
    the epoch (or keeps the stored order when ``shuffle=False``), cuts it into *global* batches
    of ``batch_size * world_size`` and takes its own slice, so global batches are identical on
    1 or N processes. Evaluation (``training=False``): each process takes a contiguous shard
    without padding, so every sample is counted exactly once.
    """

    def __init__(
        self,
        split: Any,  # TensorSplit or SampleSplit
        batch_size: int,
        *,
        training: bool,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        limit_batches: int | None = None,
        read: ReadOptions | None = None,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"data.batch_size={batch_size}: must be at least 1")
        self.split = split
        self.batch_size = batch_size
        self.training = training
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.limit_batches = limit_batches
        self.epoch = 0
        self.skip_batches = 0  # set when resuming part-way through an epoch
        self.reader: Any = None  # a SampleReader, for a split of a map-style dataset
        if not isinstance(split, TensorSplit):
            opts = read or ReadOptions()
            self.reader = SampleReader(
                split,  # type: ignore[arg-type]
                opts.transforms,
                seed=seed,
                rank=rank,
                num_workers=opts.num_workers,
                pin_memory=opts.pin_memory,
                persistent_workers=opts.persistent_workers,
                prefetch_factor=opts.prefetch_factor,
                timeout=opts.timeout,
            )

    def set_epoch(self, epoch: int) -> None:
        """Choose the permutation of this epoch (as DistributedSampler.set_epoch does)."""
        self.epoch = epoch

    def full_length(self) -> int:
        """Batches in a whole epoch, before ``limit_batches``."""
        n = len(self.split)
        if self.training:
            step = self.batch_size * self.world_size
            full = math.ceil(n / step)
            # A last global batch too small to give every process a sample is dropped.
            return full - 1 if full and n - (full - 1) * step < self.world_size else full
        return math.ceil(math.ceil(n / self.world_size) / self.batch_size)

    def __len__(self) -> int:
        full = self.full_length()
        return full if self.limit_batches is None else min(full, self.limit_batches)

    def global_batch_sizes(self) -> list[int]:
        """Samples in each training batch of an epoch, over all processes (the last may be
        short); gradient accumulation weighs micro-batches by them."""
        step = self.batch_size * self.world_size
        n = len(self.split)
        return [min(step, n - i * step) for i in range(len(self))]

    def _batches(self) -> Iterator[tuple[torch.Tensor, int]]:
        n = len(self.split)
        if self.training:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)
            step = self.batch_size * self.world_size
            for start in range(0, n, step):
                glob = order[start : start + step]
                if len(glob) < self.world_size:  # too few to give every process a sample
                    break
                # Even shares, so a short last batch still gives every process samples.
                share = torch.tensor_split(glob, self.world_size)[self.rank]
                yield share, len(glob)
        else:
            shard = torch.tensor_split(torch.arange(n), self.world_size)[self.rank]
            for start in range(0, len(shard), self.batch_size):
                yield shard[start : start + self.batch_size], 0

    def __iter__(self) -> Iterator[Batch]:
        if self.reader is not None:
            planned = [
                batch
                for i, batch in zip(range(len(self)), self._batches())
                if i >= self.skip_batches
            ]
            epoch = self.epoch if self.training else EVAL_EPOCH
            yield from self.reader.read(planned, epoch)
            self.skip_batches = 0
            return
        for i, (idx, global_size) in enumerate(self._batches()):
            if i >= len(self):
                break
            if i < self.skip_batches:
                continue
            inputs, targets = self.split.gather(idx)
            yield Batch(inputs, targets, global_size or len(idx))
        self.skip_batches = 0

    def close(self) -> None:
        """Shut down the worker processes of a map-style split (if any)."""
        if self.reader is not None:
            self.reader.close()
