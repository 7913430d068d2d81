"""In-memory datasets and their splits; what a batch is.

Small datasets live in memory as tensors (uint8 where the data is uint8) and are batched by
indexing, so the model, not the input pipeline, sets the speed. A dataset is one class with
``describe()`` (shapes and class names, without loading) and ``load()`` (the tensors).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from dltemplate.errors import ConfigError, DataError, short_repr

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
        if positions.device != self.source_inputs.device:  # a split kept on the GPU
            positions = positions.to(self.source_inputs.device)
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


def splits_to(data: DataSplits, device: torch.device) -> DataSplits:
    """``data`` with its in-memory splits' tensors on ``device`` (a source shared by several
    splits is copied once, and the splits stay views of it)."""
    moved: dict[int, torch.Tensor] = {}

    def to(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        if id(t) not in moved:
            moved[id(t)] = t.to(device)
        return moved[id(t)]

    def split_to(s: TensorSplit) -> TensorSplit:
        inputs, targets = to(s.source_inputs), to(s.source_targets)
        return TensorSplit(inputs, targets, s.groups, s.names, to(s.index))  # type: ignore[arg-type]

    return DataSplits(
        split_to(data.train), split_to(data.val), split_to(data.test), data.info, data.notes
    )


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


def check_same_classes(train: list[str], test: list[str], label: str) -> None:
    """DataError naming both class lists (and what only one of them has) when the test
    split's classes are not the training set's, in the same order: labels would mean other
    classes. ``label`` starts the message."""
    if list(train) == list(test):
        return
    only_train = sorted(set(train) - set(test))
    only_test = sorted(set(test) - set(train))
    what = (
        f"only in training {short_repr(only_train)}, only in test {short_repr(only_test)}"
        if only_train or only_test
        else "the same names, in another order or repeated (a label would mean another class)"
    )
    raise DataError(
        f"{label}: the test split's classes differ from the training set's: {what}; "
        f"training {short_repr(list(train))}, test {short_repr(list(test))}"
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
