"""In-memory datasets, their splits, and a loader that batches by index.

Small datasets live in memory as tensors (uint8 where the data is uint8) and are batched by
indexing, so the model, not the input pipeline, sets the speed. A dataset is one class with
``describe()`` (shapes and class names, without loading) and ``load()`` (the tensors).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from dltemplate.errors import ConfigError

EVAL_EPOCH = -1  # the epoch in the per-sample seeds of evaluation (see data.samples)


@dataclass
class DataInfo:
    """What a model and a task need to know about a dataset, known before loading it."""

    input_shape: tuple[int, ...]  # one sample, e.g. (1, 28, 28)
    num_classes: int
    class_names: list[str]
    mean: tuple[float, ...] = (0.5,)  # per channel, on the [0, 1] scale
    std: tuple[float, ...] = (0.5,)


@functools.lru_cache(maxsize=16)
def _stats(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, device=device).view(1, -1, 1, 1)


def channel_stats(info: DataInfo, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, std)`` of ``info`` as ``(1, C, 1, 1)`` tensors on ``device``, made once, not
    per batch."""
    return _stats(tuple(info.mean), device), _stats(tuple(info.std), device)


class TensorSplit:
    """One split held in memory (or memory-mapped): sample i is ``inputs[i]`` with label
    ``targets[i]``.

    ``groups[i]`` (optional) names the group of sample i, e.g. the car of a photo: splits then
    keep every group whole, so no group falls into two of train, validation and test.
    ``names[i]`` (optional) names sample i, e.g. its file: ``eval`` shows it beside the
    sample's prediction.

    A split made by :meth:`subset` is a *view*: it keeps the full tensors it was cut from and
    an ``index`` into them, so that splitting a memory-mapped cache copies nothing (the pages
    stay shared by every process of a node). :meth:`gather` reads a batch through it;
    :attr:`inputs` and :attr:`targets` give the split's own samples (a copy for a view).
    """

    def __init__(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        groups: list[str] | None = None,
        names: list[str] | None = None,
        index: torch.Tensor | None = None,
    ) -> None:
        if len(inputs) != len(targets):
            raise ValueError(f"{len(inputs)} inputs but {len(targets)} targets")
        self.source_inputs, self.source_targets = inputs, targets
        self.index = index  # None: every sample of the sources, in order
        n = len(self)
        if groups is not None and len(groups) != n:
            raise ValueError(f"{n} inputs but {len(groups)} group names")
        if names is not None and len(names) != n:
            raise ValueError(f"{n} inputs but {len(names)} sample names")
        self.groups, self.names = groups, names

    def __len__(self) -> int:
        return len(self.source_inputs) if self.index is None else len(self.index)

    @property
    def inputs(self) -> torch.Tensor:
        """The split's inputs, in order (a copy when the split is a view)."""
        return self.source_inputs if self.index is None else self.source_inputs[self.index]

    @property
    def targets(self) -> torch.Tensor:
        """The split's targets, in order (a copy when the split is a view)."""
        return self.source_targets if self.index is None else self.source_targets[self.index]

    def gather(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets of the samples at ``positions`` (a batch: a copy)."""
        rows = positions if self.index is None else self.index[positions]
        return self.source_inputs[rows], self.source_targets[rows]

    def subset(self, index: torch.Tensor) -> TensorSplit:
        """The samples at ``index``, in that order: a view, no sample is copied."""
        picked = index.tolist()
        groups = None if self.groups is None else [self.groups[i] for i in picked]
        names = None if self.names is None else [self.names[i] for i in picked]
        rows = index if self.index is None else self.index[index]
        return TensorSplit(self.source_inputs, self.source_targets, groups, names, rows)


def concat_splits(parts: list[Any]) -> Any:
    """One split of the samples of ``parts`` in order (views of the same source stay a view;
    in-memory splits of different sources are copied together)."""
    first = parts[0]
    groups = None if any(p.groups is None for p in parts) else [g for p in parts for g in p.groups]
    names = None if any(p.names is None for p in parts) else [n for p in parts for n in p.names]
    if hasattr(first, "concat"):  # another kind of split knows how to join its own kind
        return first.concat(parts, groups, names)
    if all(
        p.source_inputs is first.source_inputs and p.source_targets is first.source_targets
        for p in parts
    ):
        rows = [torch.arange(len(p)) if p.index is None else p.index for p in parts]
        return TensorSplit(
            first.source_inputs, first.source_targets, groups, names, torch.cat(rows)
        )
    inputs = torch.cat([p.inputs for p in parts])
    return TensorSplit(inputs, torch.cat([p.targets for p in parts]), groups, names)


@dataclass
class DataSplits:
    """Train, validation and test splits of one dataset, with its info."""

    train: TensorSplit
    val: TensorSplit
    test: TensorSplit
    info: DataInfo
    notes: list[str] = field(default_factory=list)  # what the split did, for the log

    def group_record(self) -> dict[str, list[str]] | None:
        """The groups of each split (saved in the run directory), or None without groups."""
        if self.train.groups is None:
            return None
        return {
            name: sorted(set(getattr(self, name).groups or [])) for name in ("train", "val", "test")
        }


class InMemoryDataset:
    """Base class of datasets that load whole into memory.

    Subclasses set ``info`` (or override :meth:`describe`) and implement :meth:`load`,
    which returns the training pool and the dataset's own test split (``None`` if it has none,
    in which case a test split is carved out of the pool by seed). A split is a
    :class:`TensorSplit` (tensors in memory or mapped) or, for data read sample by sample, a
    :class:`~dltemplate.data.samples.SampleSplit` (as image_folder's and Carvana's
    ``mode: files`` return).
    """

    info: DataInfo

    def __init__(self, root: str = "", download: bool = True) -> None:
        self.root = root
        self.download = download

    def describe(self) -> DataInfo:
        """Shapes and class names, without loading the data."""
        return self.info

    def load(self) -> tuple[TensorSplit, TensorSplit | None]:
        """Return ``(train_pool, test_split_or_None)``."""
        raise NotImplementedError


READ_MODES = ("cache", "files")


def check_mode(mode: Any, label: str) -> None:
    """A dataset's ``mode`` argument: ``cache`` (decode once into a mapped cache) or ``files``
    (decode every sample when it is read, in the loader's workers)."""
    if mode not in READ_MODES:
        raise ConfigError(
            f"{label}: mode={mode!r}: must be 'cache' (decode once into a mapped cache) or "
            "'files' (decode every epoch, in data.num_workers workers)"
        )


def _take(n: int, rate: float, key: str) -> int:
    if not 0.0 < rate <= 1.0:
        raise ConfigError(f"{key}={rate}: must be in (0, 1]")
    return max(1, round(n * rate))


def make_splits(
    dataset: InMemoryDataset,
    *,
    seed: int,
    val_fraction: float,
    test_fraction: float,
    train_val_sample_rate: float,
    test_sample_rate: float,
) -> DataSplits:
    """Load ``dataset`` and split it deterministically by ``seed``.

    The test split is the dataset's own when it has one; otherwise ``test_fraction`` of the pool
    is set aside first. ``train_val_sample_rate`` then sub-samples the rest, which is divided
    into train and validation (disjoint); ``test_sample_rate`` sub-samples the test split.
    """
    pool, test = dataset.load()
    gen = torch.Generator().manual_seed(seed)
    notes = []
    if test is None:
        test, pool = _divide(pool, gen, _take, test_fraction, "data.test_fraction")
        notes.append(f"no official test split: {len(test)} samples set aside by seed {seed}")
    rate = train_val_sample_rate
    pool, _ = _divide(pool, gen, _take, rate, "data.train_val_sample_rate")
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction={val_fraction}: must be in [0, 1)")
    val, train = _divide(pool, gen, lambda n, f, k: round(n * f), val_fraction, "")
    test, _ = _divide(test, gen, _take, test_sample_rate, "data.test_sample_rate")
    if pool.groups is not None:
        notes.append(
            f"split by group: {len(set(train.groups or []))} train, "
            f"{len(set(val.groups or []))} val, {len(set(test.groups or []))} test"
        )
    return DataSplits(train, val, test, dataset.describe(), notes)


def _divide(
    split: TensorSplit,
    gen: torch.Generator,
    count: Callable[[int, float, str], int],
    fraction: float,
    key: str,
) -> tuple[TensorSplit, TensorSplit]:
    """Draw ``count(units, fraction, key)`` random units (samples, or whole groups) from
    ``split``; return ``(drawn, rest)``, each in the split's order."""
    if split.groups is None:
        ids = torch.arange(len(split))
    else:
        names = {g: i for i, g in enumerate(sorted(set(split.groups)))}
        ids = torch.tensor([names[g] for g in split.groups], dtype=torch.long)
    units = ids.unique()
    chosen = units[torch.randperm(len(units), generator=gen)[: count(len(units), fraction, key)]]
    drawn = torch.isin(ids, chosen)
    return split.subset(drawn.nonzero().squeeze(1)), split.subset((~drawn).nonzero().squeeze(1))


@dataclass
class Batch:
    """A batch as the loader gives it: ``global_size`` counts its samples over all processes."""

    inputs: torch.Tensor
    targets: torch.Tensor
    global_size: int


@dataclass
class ReadOptions:
    """How a loader reads a split of a map-style dataset (``data.num_workers`` ...); a split in
    memory is gathered by indexing and ignores them."""

    num_workers: int = 0
    pin_memory: bool = False
    persistent_workers: bool = True
    prefetch_factor: int = 2
    transforms: list[Callable[[Any, Any], tuple[Any, Any]]] = field(default_factory=list)


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
            from dltemplate.data.samples import SampleReader  # it builds on this module

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
