"""Datasets read sample by sample: any map-style ``torch.utils.data.Dataset``, through workers.

Where :class:`~dltemplate.data.base.TensorSplit` holds a split's tensors (in memory or mapped)
and batches by indexing, a :class:`SampleSplit` holds a map-style dataset and the indices of
its samples: each batch is read by calling ``dataset[i]`` for its samples, in
``data.num_workers`` DataLoader worker processes (or in the training process with 0), with the
per-sample transforms of ``data.train_transform`` or ``data.eval_transform``.

The batches are the same as on the in-memory path, because the same plan
(:class:`~dltemplate.data.loader.IndexLoader`) chooses them: the same global batches on 1 or N
processes, every evaluation sample counted once, a resumed epoch starting at its next batch.

**Randomness is per sample, not per worker.** Before reading sample ``i`` in epoch ``e``, the
reader seeds torch's, NumPy's and Python's global generators from ``(experiment.seed, e, i)``
(:func:`sample_seed`). So a sample's random augmentation depends on nothing else: not on the
worker that reads it, the number of workers or processes, or whether the run was stopped and
resumed. A resumed epoch needs only the epoch and its next batch, both already in the
checkpoint: there is no worker RNG state to save (torchdata's ``StatefulDataLoader`` saves the
sampler and each worker's state instead, which then holds only for the same worker count). In
the training process (``num_workers=0``) the generators are restored after each sample, so the
training's own random numbers (dropout, ``data.augment``) are untouched. Workers are also
seeded at start, from the seed, rank, worker and epoch, for code that draws outside a sample.

**Errors name the sample.** An exception while reading or transforming a sample, in a worker
or not, becomes one :class:`~dltemplate.errors.DataError` naming the dataset index (and the
sample's name, when the dataset has ``names``); samples of different shapes in one batch name
both indices; a worker that dies names the batch it was reading.
"""

from __future__ import annotations

import logging
import random
import signal
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info
from torch.utils.data._utils.collate import default_collate

from dltemplate.data.base import Batch, DataInfo
from dltemplate.errors import DataError

log = logging.getLogger("dltemplate")

_MASK64 = (1 << 64) - 1
# Keys of the samples' input and target when a dataset returns dicts.
INPUT_KEYS = ("input", "inputs", "image", "x")
TARGET_KEYS = ("target", "targets", "label", "mask", "y")

Transform = Callable[[Any, Any], tuple[Any, Any]]


def _mix(*values: int) -> int:
    """A 64-bit hash of integers (SplitMix64 steps), the same on every platform and run."""
    x = 0x9E3779B97F4A7C15
    for v in values:
        x = (x ^ (v & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _MASK64
        x ^= x >> 31
    return x


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of dataset sample ``index`` in ``epoch`` (:data:`EVAL_EPOCH` for evaluation)."""
    return _mix(seed, epoch, index) >> 1  # < 2**63, as torch.manual_seed wants


def seed_globals(seed: int) -> None:
    """Seed torch's CPU generator, NumPy's and Python's global generators from ``seed``."""
    torch.default_generator.manual_seed(seed)
    np.random.seed(seed % (1 << 32))
    random.seed(seed)


class SampleSplit:
    """One split of a map-style dataset: sample ``i`` of the split is ``dataset[indices[i]]``.

    ``groups`` and ``names`` (optional, one per sample of the split) are as in
    :class:`~dltemplate.data.base.TensorSplit`. ``label`` names the dataset in messages.
    """

    def __init__(
        self,
        dataset: Dataset,
        indices: torch.Tensor | None = None,
        groups: list[str] | None = None,
        names: list[str] | None = None,
        label: str = "dataset",
    ) -> None:
        self.dataset = dataset
        self.indices = torch.arange(len(dataset)) if indices is None else indices  # type: ignore[arg-type]
        n = len(self.indices)
        if groups is not None and len(groups) != n:
            raise ValueError(f"{n} samples but {len(groups)} group names")
        if names is not None and len(names) != n:
            raise ValueError(f"{n} samples but {len(names)} sample names")
        self.groups, self.names, self.label = groups, names, label

    def __len__(self) -> int:
        return len(self.indices)

    def subset(self, index: torch.Tensor) -> SampleSplit:
        """The samples at ``index``, in that order (nothing is read)."""
        picked = index.tolist()
        groups = None if self.groups is None else [self.groups[i] for i in picked]
        names = None if self.names is None else [self.names[i] for i in picked]
        return SampleSplit(self.dataset, self.indices[index], groups, names, self.label)

    @staticmethod
    def concat(
        parts: list[SampleSplit], groups: list[str] | None, names: list[str] | None
    ) -> SampleSplit:
        """One split of the samples of ``parts``, in order (see ``base.concat_splits``)."""
        first = parts[0]
        if all(p.dataset is first.dataset for p in parts):
            indices = torch.cat([p.indices for p in parts])
            return SampleSplit(first.dataset, indices, groups, names, first.label)
        joined = torch.utils.data.ConcatDataset(
            [torch.utils.data.Subset(p.dataset, p.indices.tolist()) for p in parts]
        )
        return SampleSplit(joined, None, groups, names, first.label)


class _Failure:
    """What a worker returns instead of a sample or batch it could not make (picklable)."""

    def __init__(self, message: str, detail: str = "") -> None:
        self.message, self.detail = message, detail


class _Samples(Dataset):
    """What the DataLoader reads: key ``(epoch, position)`` gives ``(dataset index, (input,
    target))`` of the split's sample at ``position``, seeded and transformed, or a _Failure."""

    def __init__(
        self,
        split: SampleSplit,
        transforms: Sequence[Transform],
        seed: int,
        reading: torch.Tensor | None = None,
    ) -> None:
        self.dataset, self.indices = split.dataset, split.indices.tolist()
        self.names, self.label = split.names, split.label
        self.transforms, self.seed = list(transforms), seed
        # Shared with the training process: the sample each worker is reading now (-1: none),
        # so that a worker that dies without a word (a crash in C, the OOM killer) is named.
        self.reading = reading

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: tuple[int, int]) -> tuple[int, Any] | _Failure:
        epoch, position = key
        index = self.indices[position]
        worker = get_worker_info()
        in_main = worker is None
        if worker is not None and self.reading is not None:
            self.reading[worker.id] = index
        if in_main:  # keep the training's own random streams as they were
            saved = torch.get_rng_state(), np.random.get_state(), random.getstate()
        seed_globals(sample_seed(self.seed, epoch, index))
        try:
            sample = as_pair(self.dataset[index])
            for transform in self.transforms:
                sample = transform(*sample)
        except Exception as exc:
            name = f" ({self.names[position]})" if self.names is not None else ""
            first = (str(exc).strip().splitlines() or [""])[0]
            return _Failure(
                f"sample {index}{name}: {type(exc).__name__}: {first}",
                traceback.format_exc(),
            )
        finally:
            if in_main:
                torch.set_rng_state(saved[0])
                np.random.set_state(saved[1])
                random.setstate(saved[2])
            elif self.reading is not None:
                self.reading[worker.id] = -1
        return index, sample


def as_pair(sample: Any) -> tuple[Any, Any]:
    """``(input, target)`` of what a dataset returned: a pair, or a dict with one of
    :data:`INPUT_KEYS` and one of :data:`TARGET_KEYS`; NumPy arrays become tensors."""
    if isinstance(sample, dict):
        x = next((sample[k] for k in INPUT_KEYS if k in sample), None)
        y = next((sample[k] for k in TARGET_KEYS if k in sample), None)
        if x is None or y is None:
            raise TypeError(
                f"returned a dict with keys {sorted(sample)}; it needs an input key "
                f"({'/'.join(INPUT_KEYS)}) and a target key ({'/'.join(TARGET_KEYS)})"
            )
        sample = (x, y)
    if not isinstance(sample, (tuple, list)) or len(sample) != 2:
        raise TypeError(
            f"returned {type(sample).__name__}"
            f"{f' of length {len(sample)}' if isinstance(sample, (tuple, list)) else ''}; "
            "a sample must be (input, target) or a dict with 'input' and 'target'"
        )
    return tuple(torch.from_numpy(v) if isinstance(v, np.ndarray) else v for v in sample)  # type: ignore[return-value]


def _shape(value: Any) -> tuple[int, ...] | None:
    shape = getattr(value, "shape", None)
    return None if shape is None else tuple(shape)


def collate(items: list[tuple[int, Any] | _Failure]) -> tuple[list[int], Any] | _Failure:
    """Stack samples into a batch, or the first failure; samples of different shapes are a
    failure naming both dataset indices."""
    for item in items:
        if isinstance(item, _Failure):
            return item
    indices = [index for index, _ in items]  # type: ignore[misc]
    samples = [sample for _, sample in items]  # type: ignore[misc]
    for part, what in ((0, "input"), (1, "target")):
        first = _shape(samples[0][part])
        for index, sample in zip(indices[1:], samples[1:]):
            shape = _shape(sample[part])
            if shape != first:
                return _Failure(
                    f"sample {index} has {what} shape {shape} but sample {indices[0]} has "
                    f"{first}: every sample must have the same shape (resize in the dataset "
                    "or in data.train_transform / data.eval_transform)"
                )
    try:
        return indices, default_collate(samples)
    except (TypeError, RuntimeError) as exc:
        first_line = (str(exc).strip().splitlines() or [""])[0]
        return _Failure(f"samples {indices[0]}..{indices[-1]} cannot be batched: {first_line}")


def _init_worker(seed: int, rank: int, epoch: int, worker_id: int) -> None:
    """Seed a worker from (seed, rank, worker, epoch) and leave SIGINT and SIGTERM to the
    training process: it stops at a safe point and then shuts its workers down; a worker that
    died of the signal first would end the run with a worker error instead."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    seed_globals(_mix(seed, rank, worker_id, epoch) >> 1)


class _Plan:
    """The DataLoader's batch sampler: the keys of the batches the loader planned last."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[int, int]]] = []

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class SampleReader:
    """Reads planned batches of a :class:`SampleSplit` through a DataLoader (one per loader,
    kept between epochs when ``persistent_workers``)."""

    def __init__(
        self,
        split: SampleSplit,
        transforms: Sequence[Transform] = (),
        *,
        seed: int = 0,
        rank: int = 0,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = True,
        prefetch_factor: int = 2,
    ) -> None:
        self.split = split
        self.reading = torch.full((max(num_workers, 1),), -1, dtype=torch.long).share_memory_()
        self.samples = _Samples(split, transforms, seed, self.reading if num_workers else None)
        self.seed, self.rank = seed, rank
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.persistent_workers, self.prefetch_factor = persistent_workers, prefetch_factor
        self.plan = _Plan()
        self._loader: DataLoader | None = None

    def _dataloader(self, epoch: int) -> DataLoader:
        if self._loader is not None and self.persistent_workers:
            return self._loader
        workers = self.num_workers
        extra: dict[str, Any] = {}
        if workers > 0:
            extra = {
                "persistent_workers": self.persistent_workers,
                "prefetch_factor": self.prefetch_factor,
                "worker_init_fn": _WorkerInit(self.seed, self.rank, epoch),
            }
        self._loader = DataLoader(
            self.samples,
            batch_sampler=self.plan,
            num_workers=workers,
            collate_fn=collate,
            pin_memory=self.pin_memory,
            # Its own generator: a DataLoader draws a base seed at every epoch, which from the
            # global generator would shift the training's dropout and augmentation draws.
            generator=torch.Generator().manual_seed(_mix(self.seed, self.rank) >> 1),
            **extra,
        )
        return self._loader

    def read(self, planned: list[tuple[torch.Tensor, int]], epoch: int) -> Iterator[Batch]:
        """The batches of ``planned`` (positions in the split, global batch size), in order."""
        self.plan.batches = [[(epoch, p) for p in idx.tolist()] for idx, _ in planned]
        loader = self._dataloader(epoch)
        # The DataLoader would install a SIGCHLD handler that raises a dead worker's error
        # wherever the training process happens to be (inside a callback, a checkpoint write).
        # Without it, the error comes from next() below, after at most a few seconds.
        watch = hasattr(signal, "SIGCHLD") and threading.current_thread() is threading.main_thread()
        sigchld = signal.getsignal(signal.SIGCHLD) if watch else None
        it = iter(loader)
        if watch and signal.getsignal(signal.SIGCHLD) is not sigchld:
            signal.signal(signal.SIGCHLD, sigchld)
        for idx, global_size in planned:
            try:
                got = next(it)
            except StopIteration:
                return
            except (RuntimeError, ConnectionError, EOFError) as exc:
                # A dead worker: torch's own error, or a pipe it broke while sending a batch.
                if isinstance(exc, RuntimeError) and "DataLoader worker" not in str(exc):
                    raise
                raise self._worker_died(exc) from exc
            if isinstance(got, _Failure):
                if got.detail:
                    log.debug("%s", got.detail)
                raise DataError(f"{self.split.label}: {got.message}")
            _, (inputs, targets) = got
            yield Batch(inputs, targets, global_size or len(idx))

    def _worker_died(self, exc: Exception) -> DataError:
        """The error of a worker that died while reading: it names the samples that workers
        were reading at that moment (the dead worker's among them)."""
        reading = sorted({i for i in self.reading.tolist() if i >= 0})
        what = f"while reading sample {', '.join(map(str, reading))}" if reading else ""
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        self.close()  # the other workers are of no more use
        return DataError(f"{self.split.label}: a DataLoader worker died {what} ({first_line})")

    def close(self) -> None:
        """Shut the workers down (they are also shut down when the reader is collected)."""
        self._loader = None


class _WorkerInit:
    """A picklable ``worker_init_fn`` (see :func:`_init_worker`)."""

    def __init__(self, seed: int, rank: int, epoch: int) -> None:
        self.seed, self.rank, self.epoch = seed, rank, epoch

    def __call__(self, worker_id: int) -> None:
        _init_worker(self.seed, self.rank, self.epoch, worker_id)


class MapStyleDataset:
    """A user's map-style dataset (``__getitem__`` and ``__len__``) as a dltemplate dataset:
    :meth:`describe` from its first sample (or its own ``describe()``), :meth:`load` as
    :class:`SampleSplit` s. ``test`` is its own test split (``data.test_args``) or None.

    The dataset may say more through attributes: ``classes`` (class names, as torchvision's
    datasets do) or ``num_classes``; ``mean`` and ``std`` per channel (on the [0, 1] scale, for
    uint8 inputs); ``groups`` and ``names`` (one per sample: splits keep groups whole, ``eval``
    names samples by ``names``).
    """

    def __init__(self, dataset: Any, test: Any | None, label: str, seed: int = 0) -> None:
        self.dataset, self.test, self.label, self.seed = dataset, test, label, seed
        self._info: DataInfo | None = None

    def describe(self) -> DataInfo:
        """Shapes from the first sample, class names from ``classes`` / ``num_classes``."""
        if self._info is not None:
            return self._info
        if callable(getattr(self.dataset, "describe", None)):
            self._info = self.dataset.describe()
            return self._info
        _check_length(self.dataset, self.label)
        got = _Samples(SampleSplit(self.dataset, label=self.label), (), self.seed)[(0, 0)]
        if isinstance(got, _Failure):
            raise DataError(f"{self.label}: {got.message}")
        x, y = got[1]
        if _shape(x) is None:
            raise DataError(
                f"{self.label}: sample 0's input is a {type(x).__name__}; return a tensor or "
                "a NumPy array (convert images in the dataset or in a transform)"
            )
        shape = _shape(x) or ()
        classes = getattr(self.dataset, "classes", None)
        if classes is not None:
            names = [str(c) for c in classes]
        elif getattr(self.dataset, "num_classes", None) is not None:
            names = [str(i) for i in range(int(self.dataset.num_classes))]
        elif isinstance(y, torch.Tensor) and (y.is_floating_point() or y.dim() > 0):
            names = []  # regression, masks: one output channel
        else:
            raise DataError(
                f"{self.label}: its targets are class labels but it does not say how many "
                "classes there are: give the dataset a 'classes' list of names (as "
                "torchvision's datasets have) or a 'num_classes' attribute"
            )
        channels = shape[0] if len(shape) >= 2 else 1
        uint8 = isinstance(x, torch.Tensor) and x.dtype == torch.uint8
        mean = getattr(self.dataset, "mean", None)
        std = getattr(self.dataset, "std", None)
        mean = ((0.5 if uint8 else 0.0),) * channels if mean is None else mean
        std = ((0.5 if uint8 else 1.0),) * channels if std is None else std
        mean, std = (tuple(float(v) for v in values) for values in (mean, std))
        self._info = DataInfo(shape, max(1, len(names)), names, mean, std)
        return self._info

    def load(self) -> tuple[SampleSplit, SampleSplit | None]:
        """The whole dataset as the pool, its test split or None; nothing is read yet."""
        pool = self._split(self.dataset, self.label)
        test = None if self.test is None else self._split(self.test, f"{self.label} (test)")
        return pool, test

    @staticmethod
    def _split(dataset: Any, label: str) -> SampleSplit:
        n = _check_length(dataset, label)
        groups, names = getattr(dataset, "groups", None), getattr(dataset, "names", None)
        for attr, values in (("groups", groups), ("names", names)):
            if values is not None and len(values) != n:
                raise DataError(f"{label}: has {n} samples but {len(values)} {attr}")
        return SampleSplit(
            dataset,
            groups=None if groups is None else [str(g) for g in groups],
            names=None if names is None else [str(s) for s in names],
            label=label,
        )


def _check_length(dataset: Any, label: str) -> int:
    """``len(dataset)``; a DataError when it is 0."""
    n = len(dataset)
    if n == 0:
        raise DataError(f"{label}: the dataset has no samples (its length is 0)")
    return n


def is_map_style(obj: Any) -> bool:
    """Whether ``obj`` can be read as a map-style dataset (``__getitem__`` and ``__len__``)."""
    return (
        hasattr(obj, "__getitem__")
        and hasattr(obj, "__len__")
        and not isinstance(obj, torch.utils.data.IterableDataset)
    )
