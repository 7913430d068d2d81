"""Stopping a run exactly: signals that take effect at the next step boundary, and the state of
the run as it was at that boundary.

A signal (Ctrl-C, SIGTERM from a scheduler or torchrun) only *asks* the run to stop; the loop
stops at the next optimizer-step boundary, where weights, optimizer, scheduler, counters, meters
and random generators all agree, so the interrupt checkpoint resumes exactly. A second signal
stops at once. An exception between two boundaries is saved from :class:`BoundarySnapshot`: the
random-generator states and model buffers (BatchNorm statistics) as they were at the last one.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType
from typing import Any

import torch
from torch import nn

from dltemplate.engine import distributed as D
from dltemplate.engine.seeding import host_rng_state, same_host_rng_state, torch_rng_state

_HANDLED = (signal.SIGINT, signal.SIGTERM)
# Set once a run in this process has written all its results (until the next run starts): a
# signal after that has nothing left to stop (see :func:`run_finished`).
_FINISHED = threading.Event()


def run_finished() -> bool:
    """Whether the last run started in this process has finished: its checkpoints, metrics
    and summary are written. A SIGTERM or a cluster's notice that arrives after that (a
    preemption notice as the job ends) is ignored instead of stopping a finished run, which
    would requeue the job to run nothing."""
    return _FINISHED.is_set()


def set_run_finished(finished: bool) -> None:
    """Mark the run of this process finished (the trainer, once all is written, before its
    summary lines) or not (a command or a run starting)."""
    if finished:
        _FINISHED.set()
    else:
        _FINISHED.clear()


class RunStopped(KeyboardInterrupt):
    """The run stopped because a signal asked it to (at a step boundary, or at once on the second
    signal). ``signal_name`` is e.g. ``'SIGTERM'``."""

    def __init__(self, signal_name: str, at_boundary: bool) -> None:
        super().__init__(signal_name)
        self.signal_name = signal_name
        self.at_boundary = at_boundary


def stopping_message(name: str, again: str) -> str:
    """What a run says the moment a signal asks it to stop (on its own line, even after a
    progress bar)."""
    return (
        f"\ndltemplate: {name}: stopping after this step, then writing the interrupt checkpoint"
        f"... ({again} stops at once)\n"
    )


class StopSignals:
    """Within ``with StopSignals():``, SIGINT, SIGTERM and the cluster's ``notice`` signal (a
    preemption notice, SIGUSR1 by default) set :attr:`requested` instead of stopping; a second
    signal raises :class:`RunStopped` at once. Outside the main thread (where Python cannot
    install handlers) it does nothing."""

    def __init__(self, notice: signal.Signals | None = None, say: bool = True) -> None:
        self.requested: str | None = None
        self.handled = (*_HANDLED, *((notice,) if notice is not None else ()))
        self.say = say  # print at once that the run is stopping (rank 0 of a run)
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        set_run_finished(False)
        if threading.current_thread() is threading.main_thread():
            for sig in self.handled:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if run_finished():  # everything is written: nothing left to stop
            return
        if self.requested is not None:  # asked twice: the user means now
            raise RunStopped(name, at_boundary=False)
        self.requested = name
        if self.say:
            again = "Ctrl-C again" if signum == signal.SIGINT else f"{name} again"
            # os.write: a print could be refused here, inside a write to stderr it interrupted
            os.write(2, stopping_message(name, again).encode())

    def request(self, reason: str) -> None:
        """Ask the run to stop at the next step boundary, as a signal would (e.g. ``max_time``)."""
        if self.requested is None:
            self.requested = reason

    def agreed(self, distributed: bool) -> str | None:
        """The reason every process stops for at this boundary, or None to go on.

        Under several processes a signal may reach one process, or reach them at different
        steps: one all-reduce makes every process stop at the same step.
        """
        if not distributed:
            return self.requested
        flag = torch.tensor(
            [int(self.requested is not None)], dtype=torch.int64, device=D.collective_device()
        )
        D.all_reduce_max(flag)
        if not flag.item():
            return None
        reasons = [r for r in D.gather_objects(self.requested) if r is not None]
        return reasons[0]


class BoundarySnapshot:
    """What changes between two step boundaries without an optimizer step: the random-generator
    states (dropout, augmentation) and the model's buffers (BatchNorm running statistics).

    :meth:`take` at each boundary reads torch's generators (cheap) and copies the buffers in one
    fused call. Python's and NumPy's generators cost ~40 µs to read, and the engine does not use
    them while training: they are read at each epoch's start, and at each step only once an
    epoch showed that the task draws from them. After an exception part-way through a step,
    :meth:`model_state` and :meth:`rng` give the state as it was at the last boundary.
    """

    def __init__(self, model: nn.Module) -> None:
        self.names = [name for name, _ in model.named_buffers()]
        self.live = [b for _, b in model.named_buffers()]
        self.saved = [b.detach().clone() for b in self.live]
        self.host_every_step = False
        self.host = host_rng_state()
        self.device = torch_rng_state()

    def take(self) -> None:
        """Record the state at this boundary."""
        if self.live:
            with torch.no_grad():
                torch._foreach_copy_(self.saved, self.live)
        self.device = torch_rng_state()
        if self.host_every_step:
            self.host = host_rng_state()

    def take_all(self) -> None:
        """Record everything at this boundary, Python's and NumPy's generators included (after
        a run's state was restored)."""
        self.take()
        self.host = host_rng_state()

    def epoch_start(self) -> None:
        """Record Python's and NumPy's generators as a training epoch starts."""
        if not self.host_every_step:
            self.host = host_rng_state()

    def epoch_end(self) -> None:
        """If the epoch drew from Python's or NumPy's generator, read them at every step on."""
        if not self.host_every_step and not same_host_rng_state(self.host, host_rng_state()):
            self.host_every_step = True

    def rng(self) -> dict[str, Any] | None:
        """Every generator's state at the last boundary, or None if it is not known (the task
        drew from Python's or NumPy's generator for the first time during this epoch)."""
        if not self.host_every_step and not same_host_rng_state(self.host, host_rng_state()):
            return None
        return {**self.host, **self.device}

    def model_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """``model.state_dict()`` with its buffers as they were at the last boundary."""
        state = dict(model.state_dict())
        for name, saved in zip(self.names, self.saved):
            if name in state:
                state[name] = saved.clone()
        return state
