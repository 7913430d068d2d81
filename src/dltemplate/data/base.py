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

import torch

from dltemplate.errors import ConfigError


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


@dataclass
class TensorSplit:
    """One split held in memory: ``inputs[i]`` is sample i, ``targets[i]`` its label.

    ``groups[i]`` (optional) names the group of sample i, e.g. the car of a photo: splits then
    keep every group whole, so no group falls into two of train, validation and test.
    ``names[i]`` (optional) names sample i, e.g. its file: ``eval`` shows it beside the
    sample's prediction.
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    groups: list[str] | None = None
    names: list[str] | None = None

    def __post_init__(self) -> None:
        if len(self.inputs) != len(self.targets):
            raise ValueError(f"{len(self.inputs)} inputs but {len(self.targets)} targets")
        if self.groups is not None and len(self.groups) != len(self.inputs):
            raise ValueError(f"{len(self.inputs)} inputs but {len(self.groups)} group names")
        if self.names is not None and len(self.names) != len(self.inputs):
            raise ValueError(f"{len(self.inputs)} inputs but {len(self.names)} sample names")

    def __len__(self) -> int:
        return len(self.inputs)

    def subset(self, index: torch.Tensor) -> TensorSplit:
        """The samples at ``index``, in that order."""
        picked = index.tolist()
        groups = None if self.groups is None else [self.groups[i] for i in picked]
        names = None if self.names is None else [self.names[i] for i in picked]
        return TensorSplit(self.inputs[index], self.targets[index], groups, names)


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
    in which case a test split is carved out of the pool by seed).
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


class IndexLoader:
    """Iterates over a :class:`TensorSplit` in batches made by indexing, with no workers.

    Training (``training=True``): every process draws the same permutation from ``seed`` and
    the epoch (or keeps the stored order when ``shuffle=False``), cuts it into *global* batches
    of ``batch_size * world_size`` and takes its own slice, so global batches are identical on
    1 or N processes. Evaluation (``training=False``): each process takes a contiguous shard
    without padding, so every sample is counted exactly once.
    """

    def __init__(
        self,
        split: TensorSplit,
        batch_size: int,
        *,
        training: bool,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        limit_batches: int | None = None,
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
        for i, (idx, global_size) in enumerate(self._batches()):
            if i >= len(self):
                break
            if i < self.skip_batches:
                continue
            yield Batch(self.split.inputs[idx], self.split.targets[idx], global_size or len(idx))
        self.skip_batches = 0
