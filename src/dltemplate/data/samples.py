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
both indices; a worker that exits names the sample it was reading.

**Nothing waits forever.** A sample that takes longer than ``data.timeout`` seconds to read is
interrupted where it is read (in a worker or in the training process, by a watchdog thread that
sends SIGALRM to the reading thread) and stops the run with :class:`SampleTimeoutError`, naming
it; a limit on the wait for a whole batch backs this up for a worker that no signal can
interrupt (stuck in C). A worker killed by a signal (the OOM killer, ``kill -9``) stops the run with
:class:`WorkerLostError`, naming the worker, the signal and the sample. Both are failures of the
run, not bad input (exit status 1; the command line reports an ``OSError`` in one line): the
interrupt checkpoint is written and ``resume`` continues. A signal that stops the run at once
(a second Ctrl-C), or any error while waiting for workers, kills the workers (SIGKILL: they
ignore SIGTERM, see :func:`_init_worker`) instead of waiting for a sample that may never come;
on Linux a worker also dies with the training process (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import logging
import os
import random
import signal
import sys
import threading
import time
import traceback
import weakref
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
DEFAULT_TIMEOUT = 300.0  # seconds one sample may take to read (data.timeout)
# Seconds added to the wait for a whole batch from the workers (their start, the batch's
# collation and transfer), on top of data.timeout for each of its samples.
_BACKSTOP_SLACK = 60.0
_PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h)


class SampleTimeoutError(TimeoutError):
    """A sample took longer than ``data.timeout`` seconds to read: the run fails (exit status
    1, one line naming the sample); the data may answer again, so ``resume`` continues."""


class WorkerLostError(ChildProcessError):
    """A DataLoader worker was killed by a signal (the OOM killer, ``kill -9``, a crash in C):
    the run fails (exit status 1, one line naming the worker, the signal and the sample)."""


class _TimedOut(BaseException):
    """Raised in the reading thread by the watchdog's SIGALRM (a BaseException, so that a
    dataset's own ``except Exception`` does not swallow it)."""


class _Watchdog:
    """Interrupts this process's main thread when the sample it reads passes its deadline: a
    thread sleeps until the deadline and sends SIGALRM, whose handler raises :class:`_TimedOut`
    in the dataset's code (a blocking read, sleep or lock wait returns at once). One per
    process (:func:`_watchdog`); the thread wakes about once per timeout, never per sample.
    A SIGALRM that is not the watchdog's goes on to the handler installed before."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.main = threading.main_thread().ident or 0
        self.reading: tuple[int, float] | None = None  # (serial, deadline) of the sample now
        self.serial = 0
        self.idle = DEFAULT_TIMEOUT  # how long the thread sleeps when nothing is read
        self.fired: int | None = None  # the serial of the sample the watchdog interrupted
        self.sent = False  # a SIGALRM of the watchdog's is on its way
        self.previous: Any = signal.SIG_DFL
        self.handler = self._on_alarm  # one bound method, to recognise it as installed
        self._wake = threading.Event()
        thread = threading.Thread(target=self._watch, name="dltemplate-timeout", daemon=True)
        thread.start()

    def begin(self, timeout: float) -> None:
        """A sample is being read now; it must be read within ``timeout`` seconds."""
        if signal.getsignal(signal.SIGALRM) is not self.handler:
            self.previous = signal.signal(signal.SIGALRM, self.handler)
        self.serial += 1
        self.reading = (self.serial, time.monotonic() + timeout)
        if timeout < self.idle:  # the thread may sleep longer than this sample may take
            self.idle = timeout
            self._wake.set()

    def _watch(self) -> None:
        while True:
            current = self.reading
            if current is None or current[0] == self.fired:
                self._wake.wait(self.idle)
            elif current[1] > time.monotonic():
                self._wake.wait(current[1] - time.monotonic())
            elif self.reading is current:
                self.fired, self.sent = current[0], True
                signal.pthread_kill(self.main, signal.SIGALRM)
            self._wake.clear()

    def _on_alarm(self, signum: int, frame: Any) -> None:
        if self.sent:
            self.sent = False
            current = self.reading
            if current is not None and current[0] == self.fired:
                raise _TimedOut
            return  # the sample ended meanwhile
        if callable(self.previous):
            self.previous(signum, frame)


_WATCHDOG: _Watchdog | None = None


def _watchdog() -> _Watchdog | None:
    """This process's watchdog, or None where a sample cannot be interrupted (not the main
    thread, or no SIGALRM: Windows)."""
    global _WATCHDOG
    if not hasattr(signal, "pthread_kill") or not hasattr(signal, "SIGALRM"):
        return None
    if threading.current_thread() is not threading.main_thread():
        return None
    if _WATCHDOG is None or _WATCHDOG.pid != os.getpid():  # a forked worker has no thread
        _WATCHDOG = _Watchdog()
    return _WATCHDOG


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

    def __init__(self, message: str, detail: str = "", timed_out: bool = False) -> None:
        self.message, self.detail, self.timed_out = message, detail, timed_out


class _Samples(Dataset):
    """What the DataLoader reads: key ``(epoch, position)`` gives ``(dataset index, (input,
    target))`` of the split's sample at ``position``, seeded and transformed, or a _Failure."""

    def __init__(
        self,
        split: SampleSplit,
        transforms: Sequence[Transform],
        seed: int,
        reading: torch.Tensor | None = None,
        timeout: float | None = None,
    ) -> None:
        self.dataset, self.indices = split.dataset, split.indices.tolist()
        self.names, self.label = split.names, split.label
        self.transforms, self.seed, self.timeout = list(transforms), seed, timeout
        # Shared with the training process: the position of the sample each worker is reading
        # now (-1: none), so that a worker that dies without a word (a crash in C, the OOM
        # killer) is named.
        self.reading = reading

    def __len__(self) -> int:
        return len(self.indices)

    def describe(self, position: int) -> str:
        """``23`` or ``23 (digit0023.png)``: the sample at ``position``, as messages name it."""
        name = f" ({self.names[position]})" if self.names is not None else ""
        return f"{self.indices[position]}{name}"

    def __getitem__(self, key: tuple[int, int]) -> tuple[int, Any] | _Failure:
        epoch, position = key
        index = self.indices[position]
        worker = get_worker_info()
        in_main = worker is None
        if worker is not None and self.reading is not None:
            self.reading[worker.id] = position
        if in_main:  # keep the training's own random streams as they were
            saved = torch.get_rng_state(), np.random.get_state(), random.getstate()
        seed_globals(sample_seed(self.seed, epoch, index))
        watch = None if self.timeout is None else _watchdog()
        try:
            if watch is not None:
                watch.begin(self.timeout)  # type: ignore[arg-type]
            try:
                sample = as_pair(self.dataset[index])
                for transform in self.transforms:
                    sample = transform(*sample)
            finally:
                if watch is not None:
                    watch.reading = None
        except _TimedOut:
            if watch is not None:
                watch.reading = None  # in case the signal came before the line above
            return _Failure(
                f"sample {self.describe(position)}: not read within data.timeout="
                f"{self.timeout:g} s (a larger data.timeout, or null, waits longer)",
                timed_out=True,
            )
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [""])[0]
            return _Failure(
                f"sample {self.describe(position)}: {type(exc).__name__}: {first}",
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


#: What a worker leaves to the training process: Ctrl-C, SIGTERM and a cluster's notice
#: (``trainer.notice_signal``: SIGUSR1 or SIGUSR2), which SLURM sends to every process of a step.
WORKER_IGNORES = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


@contextlib.contextmanager
def notices_held() -> Iterator[None]:
    """Block the notice signals (SIGUSR1, SIGUSR2) in this thread while processes start: the
    processes started meanwhile (data workers; under ``spawn`` and ``forkserver`` also
    multiprocessing's forkserver and resource tracker) inherit the blocked mask and never get a
    notice, which SLURM sends to every process of the step and whose default action would end
    them (a run then failed with "a DataLoader worker died" instead of stopping). A notice that
    comes meanwhile is not lost: another thread takes it for the process, or this one when the
    hold ends."""
    held = {signal.SIGUSR1, signal.SIGUSR2}
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not (
        threading.main_thread()
    ):
        yield
        return
    before = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def _init_worker(seed: int, rank: int, epoch: int, worker_id: int) -> None:
    """Seed a worker from (seed, rank, worker, epoch) and leave the signals that stop a run
    (:data:`WORKER_IGNORES`) to the training process: it stops at a safe point and then shuts
    its workers down; a worker that died of the signal first would end the run with a worker
    error instead (a notice's default action kills a worker started by ``spawn`` or
    ``forkserver``, Python 3.14's default; a forked one ran the trainer's handler and said
    "stopping" again). So SIGTERM does not end a worker: :meth:`SampleReader.close` uses
    SIGKILL for one that will not stop."""
    for sig in WORKER_IGNORES:
        signal.signal(sig, signal.SIG_IGN)
    seed_globals(_mix(seed, rank, worker_id, epoch) >> 1)


def _die_with_parent(parent: int) -> None:
    """Linux: have the kernel SIGKILL this worker as soon as the training process ``parent``
    dies (its SIGKILL, a crash), instead of living on for seconds printing broken-pipe
    tracebacks, or forever inside a sample that never returns. Elsewhere: nothing.

    Under the ``forkserver`` start method (Python 3.14's default on Linux) the worker's parent
    is multiprocessing's fork server, which ends when the training process does: the signal
    then comes through it."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            return
    except (OSError, AttributeError):  # no prctl in this C library: the old behaviour
        return
    if os.getppid() != parent and not _alive(parent):  # it died before prctl took effect:
        os._exit(0)  # no signal will come
    sys.excepthook = _QuietWhenOrphaned(sys.excepthook)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's (its number was reused)
        return True
    return True


class _QuietWhenOrphaned:
    """A worker's ``sys.excepthook`` (multiprocessing's file-descriptor sharing thread reports
    through it): the training process's connections close as it dies, a moment before the
    kernel's SIGKILL reaches the worker; wait for that signal instead of printing a traceback
    of the broken connection. Any other error is printed as before."""

    def __init__(self, previous: Callable[..., Any]) -> None:
        self.previous = previous

    def __call__(self, kind: type[BaseException], value: BaseException, tb: Any) -> None:
        if isinstance(value, (ConnectionError, EOFError)):
            time.sleep(2.0)  # the parent's death kills this process here
        self.previous(kind, value, tb)


class _Plan:
    """The DataLoader's batch sampler: the keys of the batches the loader planned last."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[int, int]]] = []

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


# The readers whose workers may be alive, to kill those at exit (see _close_readers_at_exit).
_READERS: weakref.WeakSet[SampleReader] = weakref.WeakSet()


def _close_readers_at_exit() -> None:
    """Shut down the workers that no one closed: multiprocessing's own exit handler would send
    them SIGTERM, which they ignore, and then wait for them forever."""
    for reader in list(_READERS):
        reader.close()


def _kill(workers: list[Any]) -> None:
    """SIGKILL the worker processes still alive and wait (briefly) for them to go."""
    for worker in workers:
        if worker.is_alive():
            worker.kill()
    for worker in workers:
        worker.join(timeout=5)


class SampleReader:
    """Reads planned batches of a :class:`SampleSplit` through a DataLoader (one per loader,
    kept between epochs when ``persistent_workers``). A sample may take ``timeout`` seconds to
    read (None: no limit)."""

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
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> None:
        self.split = split
        self.reading = torch.full((max(num_workers, 1),), -1, dtype=torch.long).share_memory_()
        self.samples = _Samples(
            split, transforms, seed, self.reading if num_workers else None, timeout
        )
        self.seed, self.rank, self.timeout = seed, rank, timeout
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.persistent_workers, self.prefetch_factor = persistent_workers, prefetch_factor
        self.plan = _Plan()
        self._loader: DataLoader | None = None
        self._iter: Any = None  # the DataLoader's iterator while its workers may be alive

    def _dataloader(self, epoch: int) -> DataLoader:
        if self._loader is not None and self.persistent_workers:
            return self._loader
        workers = self.num_workers
        extra: dict[str, Any] = {}
        if workers > 0:
            # Workers die with the process that starts them; not with a thread that may end.
            main = threading.current_thread() is threading.main_thread()
            extra = {
                "persistent_workers": self.persistent_workers,
                "prefetch_factor": self.prefetch_factor,
                "worker_init_fn": _WorkerInit(
                    self.seed, self.rank, epoch, os.getpid() if main else None
                ),
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
        # Without it, the error comes from next() below (see _next).
        watch = hasattr(signal, "SIGCHLD") and threading.current_thread() is threading.main_thread()
        sigchld = signal.getsignal(signal.SIGCHLD) if watch else None
        try:
            with notices_held():  # the workers (and forkserver, resource tracker) start here
                it = iter(loader)
        except BaseException:
            self.close(kill=True)
            raise
        if watch and signal.getsignal(signal.SIGCHLD) is not sigchld:
            signal.signal(signal.SIGCHLD, sigchld)
        if self.num_workers and it is not self._iter:
            self._iter = it
            _READERS.add(self)
            # Last registered runs first: before torch's and multiprocessing's exit handlers.
            atexit.unregister(_close_readers_at_exit)
            atexit.register(_close_readers_at_exit)
        # How long the training process waits for a batch: a worker no signal can interrupt
        # (stuck in C) may read a whole batch, each sample taking nearly data.timeout.
        biggest = max((len(idx) for idx, _ in planned), default=1)
        wait = None if self.timeout is None else self.timeout * biggest + _BACKSTOP_SLACK
        for idx, global_size in planned:
            try:
                got = self._next(it, watch, wait)
            except StopIteration:
                return
            if isinstance(got, _Failure):
                if got.detail:
                    log.debug("%s", got.detail)
                message = f"{self.split.label}: {got.message}"
                if got.timed_out:
                    self.close(kill=True)  # other workers may be stuck alike
                    raise SampleTimeoutError(message)
                raise DataError(message)
            _, (inputs, targets) = got
            yield Batch(inputs, targets, global_size or len(idx))

    def _next(self, it: Any, watch: bool, wait: float | None) -> Any:
        """``next(it)``, waiting at most ``wait`` seconds (None: no limit) for the workers; a
        worker's death, a timeout or a signal while waiting ends the workers (SIGKILL) and
        raises the error that names the worker and its sample."""
        if not self.num_workers:
            return next(it)
        previous = None
        if watch:  # a worker that dies while this process waits for it stops the wait at once

            def on_child(signum: int, frame: Any) -> None:
                if self._iter is it:  # not the workers that close() is ending
                    self._check_workers(it)
                if callable(previous):
                    previous(signum, frame)

            previous = signal.signal(signal.SIGCHLD, on_child)
        dog = _watchdog() if watch and wait is not None else None
        try:
            try:
                if dog is not None:
                    dog.begin(wait)  # type: ignore[arg-type]
                self._check_workers(it)  # one may have died while this process was training
                return next(it)
            finally:
                if dog is not None:
                    dog.reading = None
        except StopIteration:
            raise
        except _TimedOut:
            error = self._timed_out(wait or 0.0)
            self.close(kill=True)
            raise error from None
        except (RuntimeError, ConnectionError, EOFError) as exc:
            # A dead worker: torch's own error, or a pipe it broke while sending a batch.
            text = str(exc)
            if isinstance(exc, RuntimeError) and "DataLoader worker" not in text:
                self.close(kill=True)
                raise
            died = self._worker_died(it, exc)
            self.close(kill=True)
            raise died from exc
        except BaseException:  # a second Ctrl-C, a worker named by on_child: do not wait
            self.close(kill=True)
            raise
        finally:
            if watch:
                signal.signal(signal.SIGCHLD, previous)

    def _check_workers(self, it: Any) -> None:
        """Raise the error of a worker of ``it`` that died (not one that torch shut down)."""
        if getattr(it, "_shutdown", True):
            return
        status = getattr(it, "_workers_status", [])
        for worker_id, worker in enumerate(getattr(it, "_workers", [])):
            if worker_id < len(status) and status[worker_id] and not worker.is_alive():
                raise self._worker_died(it, None)

    def _dead_workers(self, it: Any) -> list[tuple[int, Any]]:
        """``(worker id, process)`` of the workers of ``it`` that died; a worker that broke a
        pipe may take a moment to be seen dead, so this waits up to a second for one."""
        workers = list(enumerate(getattr(it, "_workers", [])))
        deadline = time.monotonic() + 1.0
        while True:
            dead = [(i, w) for i, w in workers if w.exitcode is not None or not w.is_alive()]
            if dead or time.monotonic() > deadline:
                return dead
            time.sleep(0.02)

    def _worker_died(self, it: Any, exc: BaseException | None) -> Exception:
        """The error of a worker that died while reading: which worker, of what, reading which
        sample. Killed by a signal: :class:`WorkerLostError` (the run failed); exited with a
        status (the dataset's code ended the process): :class:`DataError`."""
        label = self.split.label
        dead = self._dead_workers(it)
        if not dead:  # no worker to name: the samples that workers were reading
            positions = sorted({p for p in self.reading.tolist() if p >= 0})
            what = ", ".join(self.samples.describe(p) for p in positions)
            what = f"while reading sample {what} " if what else ""
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            return DataError(f"{label}: a DataLoader worker died {what}({first})")
        worker_id, process = dead[0]
        position = int(self.reading[worker_id]) if worker_id < len(self.reading) else -1
        where = (
            f"while reading sample {self.samples.describe(position)}"
            if position >= 0
            else "between samples"
        )
        code = process.exitcode
        if code is not None and code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            return WorkerLostError(
                f"{label}: DataLoader worker {worker_id} (pid {process.pid}) was killed by "
                f"{name} {where}; the run failed (resume continues it)"
            )
        return DataError(
            f"{label}: a DataLoader worker died {where}: worker {worker_id}, pid "
            f"{process.pid}, exit status {code}"
        )

    def _timed_out(self, waited: float) -> SampleTimeoutError:
        """The error of a batch that did not come (a worker that the watchdog's signal could
        not interrupt, stuck in C): it names the samples that workers were reading."""
        positions = sorted({p for p in self.reading.tolist() if p >= 0})
        what = ", ".join(self.samples.describe(p) for p in positions)
        return SampleTimeoutError(
            f"{self.split.label}: no batch came from the DataLoader workers in {waited:g} s "
            f"(data.timeout={self.timeout:g} s a sample)"
            + (f" while they were reading sample {what}" if what else "")
        )

    def close(self, kill: bool = False) -> None:
        """Shut the workers down (they are also shut down when the reader is collected, and
        at exit): a worker inside a sample, or every worker with ``kill``, gets SIGKILL first
        (it may never finish), the others exit as torch asks them to."""
        it, self._iter, self._loader = self._iter, None, None
        _READERS.discard(self)
        if it is None:
            return
        workers = list(getattr(it, "_workers", []))
        busy = [w for i, w in enumerate(workers) if kill or self.reading[i] >= 0]
        _kill(busy)
        try:
            it._shutdown_workers()
        except Exception:  # a queue that a killed worker left broken: the worker is gone anyway
            log.debug("shutting down DataLoader workers", exc_info=True)
        _kill(workers)  # any that did not answer (they ignore SIGTERM)
        self.reading.fill_(-1)


class _WorkerInit:
    """A picklable ``worker_init_fn`` (see :func:`_init_worker`, :func:`_die_with_parent`)."""

    def __init__(self, seed: int, rank: int, epoch: int, parent: int | None = None) -> None:
        self.seed, self.rank, self.epoch, self.parent = seed, rank, epoch, parent

    def __call__(self, worker_id: int) -> None:
        if self.parent is not None:
            _die_with_parent(self.parent)
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

    def __init__(
        self,
        dataset: Any,
        test: Any | None,
        label: str,
        seed: int = 0,
        timeout: float | None = None,
    ) -> None:
        self.dataset, self.test, self.label, self.seed = dataset, test, label, seed
        self.timeout = timeout  # seconds sample 0 may take to read in describe()
        self._info: DataInfo | None = None

    def describe(self) -> DataInfo:
        """Shapes from the first sample, class names from ``classes`` / ``num_classes``."""
        if self._info is not None:
            return self._info
        if callable(getattr(self.dataset, "describe", None)):
            self._info = self.dataset.describe()
            return self._info
        _check_length(self.dataset, self.label)
        split = SampleSplit(self.dataset, label=self.label)
        got = _Samples(split, (), self.seed, timeout=self.timeout)[(0, 0)]
        if isinstance(got, _Failure):
            error = SampleTimeoutError if got.timed_out else DataError
            raise error(f"{self.label}: {got.message}")
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
