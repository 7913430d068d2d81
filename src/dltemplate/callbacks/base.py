"""Callbacks: behaviours hung on the training loop's events, and the surface they see.

The loop calls, in this order (``*`` repeats)::

    setup                                            once the model is built, before any data is
                                                     loaded or file written: check arguments
    on_fit_start
    * on_train_epoch_start
      * on_train_batch_start(batch_index)            every micro-batch
        on_before_optimizer_step                     gradients present and unscaled
        on_after_optimizer_step                      weights updated, counters moved on, the
                                                     loss read on the steps it is logged
        on_train_batch_end(batch_index, loss)        every micro-batch (loss: a 0-d tensor)
      on_train_epoch_end(metrics)                    the epoch's training loss and metrics
      on_validation_start
        * on_eval_batch_end("val", i, batches)        every validation batch (of ``batches``)
      on_validation_end(metrics)
      on_epoch_end(row)                              the epoch's metrics.csv row, after the
                                                     scheduler and the best score
    on_test_start
      * on_eval_batch_end("test", i, batches)         every test batch
    on_test_end(metrics)
    on_fit_end
    on_exception(exc)                                whatever stopped the run, before it unwinds

Each event receives the trainer first. What a callback may use of it is :class:`Loop`, listed
here and nowhere else: ``state`` (a :class:`~dltemplate.engine.loop_state.LoopState`: epoch,
global_step, batch_in_epoch, phase, best score, ``improved``, ``logged_loss``), ``cfg``,
``dist``, ``run_dir``, ``model`` / ``unwrapped_model``, ``optimizer``, ``train_loader``, ``lr``,
``step_loss``, ``writer``, ``evaluated_model``, ``run_state`` (the owner of the run's
checkpoints), and the four things a callback may change: :meth:`Loop.request_stop`,
:meth:`Loop.end_training`, :meth:`Loop.evaluate_with` and :meth:`Loop.set_writer`.
``setup(cfg, model)`` comes before the trainer exists: it gets the config and the bare model.

A callback with state returns it from :meth:`Callback.state_dict` (tensors and plain types); it
is saved in every checkpoint under the callback's :attr:`Callback.state_key` and restored on
resume. For an exact resume, change that state only in ``on_before_optimizer_step`` /
``on_after_optimizer_step`` (part of the optimizer step) or in epoch-level events: the
checkpoint of an interrupt holds the state of the last completed step. An event a callback does
not override is never called, so it costs nothing per batch.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from dltemplate.config import Config
from dltemplate.data.loader import IndexLoader
from dltemplate.engine.distributed import DistContext
from dltemplate.engine.loop_state import LoopState
from dltemplate.engine.run_state import RunState
from dltemplate.errors import CheckpointError, short_repr

log = logging.getLogger("dltemplate")

EVENTS = (
    "setup",
    "on_fit_start",
    "on_train_epoch_start",
    "on_train_batch_start",
    "on_before_optimizer_step",
    "on_after_optimizer_step",
    "on_train_batch_end",
    "on_train_epoch_end",
    "on_validation_start",
    "on_eval_batch_end",
    "on_validation_end",
    "on_epoch_end",
    "on_test_start",
    "on_test_end",
    "on_fit_end",
    "on_exception",
)


class Loop(Protocol):
    """What a callback sees of the trainer: read these, call the four methods; set nothing."""

    cfg: Config  # the run's config
    state: LoopState  # epoch, global_step, batch_in_epoch, phase, best, improved, logged_loss
    dist: DistContext  # rank, world_size, is_main
    run_dir: Path | None  # the run directory (None before it exists)
    model: nn.Module  # the model as trained (DDP / DataParallel / compile wrappers included)
    optimizer: torch.optim.Optimizer
    train_loader: IndexLoader  # len() batches; global_batch_sizes()
    writer: Any  # TensorBoard's SummaryWriter on rank 0 while the tensorboard callback runs
    run_state: RunState  # writes, links and marks the run's checkpoints

    @property
    def unwrapped_model(self) -> nn.Module:
        """The bare model, without wrappers."""
        ...

    @property
    def evaluated_model(self) -> nn.Module:
        """What validation, the test and the best checkpoints use (an average, if one is set)."""
        ...

    @property
    def lr(self) -> float:
        """The current learning rate (first parameter group)."""
        ...

    @property
    def step_loss(self) -> torch.Tensor | None:
        """The last optimizer step's mean loss on this process (None before the first)."""
        ...

    def request_stop(self, reason: str) -> None:
        """Stop at the next step boundary with an exact interrupt checkpoint (as SIGTERM)."""
        ...

    def end_training(self, by: Callback, reason: str) -> None:
        """End training after this epoch, then test; the run records ``by`` as what ended it."""
        ...

    def evaluate_with(self, model: nn.Module | None) -> None:
        """Evaluate (validation, test, best checkpoints) with ``model``; None: the trained one."""
        ...

    def set_writer(self, writer: Any) -> None:
        """Give the run a TensorBoard writer that others log to (None: no writer)."""
        ...


class Callback:
    """Base class: override the events you need (see the module docstring for their order)."""

    @property
    def state_key(self) -> str:
        """The name this callback's state is saved under: its class name, plus the arguments
        that tell two of its kind apart (see :meth:`key_with`). Two callbacks of a run may not
        share one."""
        return type(self).__qualname__

    def key_with(self, **arguments: Any) -> str:
        """A :attr:`state_key` made of the class name and ``arguments``:
        ``Freeze{epochs=1, modules=['net.0']}``."""
        args = ", ".join(f"{k}={arguments[k]!r}" for k in sorted(arguments))
        return f"{type(self).__qualname__}{{{args}}}"

    def setup(self, cfg: Config, model: nn.Module) -> None:
        """The bare model is built, no data loaded, nothing written: take defaults from ``cfg``
        and raise ConfigError (or ValueError) for a bad argument."""

    def on_fit_start(self, trainer: Loop) -> None:
        """Training is about to start (or to go on, after a resume)."""

    def on_train_epoch_start(self, trainer: Loop) -> None:
        """A training epoch starts (also when resuming part-way through it)."""

    def on_train_batch_start(self, trainer: Loop, batch_index: int) -> None:
        """A micro-batch is about to go through the model."""

    def on_before_optimizer_step(self, trainer: Loop) -> None:
        """Gradients are accumulated and unscaled; the optimizer has not stepped yet."""

    def on_after_optimizer_step(self, trainer: Loop) -> None:
        """The optimizer (and a per-step scheduler) stepped; ``state.global_step`` counts it;
        ``state.logged_loss`` holds the loss on the steps it is read."""

    def on_train_batch_end(self, trainer: Loop, batch_index: int, loss: torch.Tensor) -> None:
        """A micro-batch is done (``loss`` is detached; ``.item()`` on it waits for the GPU)."""

    def on_train_epoch_end(self, trainer: Loop, metrics: dict[str, float]) -> None:
        """The training part of an epoch is done: its mean loss and metrics."""

    def on_validation_start(self, trainer: Loop) -> None:
        """Validation is about to run."""

    def on_eval_batch_end(self, trainer: Loop, split: str, batch_index: int, batches: int) -> None:
        """Batch ``batch_index`` (of ``batches`` in this process) of the validation (``split``
        ``"val"``) or the final test (``"test"``) is done."""

    def on_validation_end(self, trainer: Loop, metrics: dict[str, float]) -> None:
        """Validation is done: its loss and metrics."""

    def on_epoch_end(self, trainer: Loop, row: dict[str, float]) -> None:
        """The epoch is complete (scheduler stepped, best tracked): its ``metrics.csv`` row."""

    def on_test_start(self, trainer: Loop) -> None:
        """The final test is about to run."""

    def on_test_end(self, trainer: Loop, metrics: dict[str, float]) -> None:
        """The final test is done: its metrics."""

    def on_fit_end(self, trainer: Loop) -> None:
        """The run is complete."""

    def on_exception(self, trainer: Loop, exc: BaseException) -> None:
        """The run is stopping because of ``exc`` (a signal's stop included)."""

    def stop_holds(self) -> bool:
        """Asked on resume of a run that this callback ended (its state restored first):
        whether it would still end it with today's arguments. By default it would: only the
        callback that ended a run may reopen it (early stopping does, given more patience)."""
        return True

    def state_dict(self) -> dict[str, Any]:
        """State to save in checkpoints (tensors and plain types); none by default."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""


class CallbackList:
    """The run's callbacks, with one list of bound methods per event: the loop calls
    ``for fn in callbacks.on_x: fn(trainer, ...)``, an empty loop where nobody listens."""

    def __init__(self, callbacks: list[Callback]) -> None:
        self.callbacks = list(callbacks)
        keys = [cb.state_key for cb in self.callbacks]
        twice = sorted({k for k in keys if keys.count(k) > 1})
        if twice:  # the composition root names the config entries; this guards code
            raise ValueError(f"two callbacks share the state key {twice[0]}")
        for event in EVENTS:
            listeners = [
                getattr(cb, event)
                for cb in self.callbacks
                if getattr(type(cb), event) is not getattr(Callback, event)
            ]
            setattr(self, event, listeners)

    def find(self, key: str) -> Callback | None:
        """The callback whose :attr:`Callback.state_key` is ``key``, if the run has it."""
        return next((cb for cb in self.callbacks if cb.state_key == key), None)

    def state_dict(self) -> dict[str, dict[str, Any]]:
        """Every callback's state that has one, by state key."""
        states = {cb.state_key: cb.state_dict() for cb in self.callbacks}
        return {key: state for key, state in states.items() if state}

    def load_state_dict(self, saved: dict[str, dict[str, Any]], source: str = "") -> None:
        """Restore :meth:`state_dict`, matching callbacks by state key; a callback with state
        but none saved (added since) starts afresh, and a saved state without its callback
        (removed since) is dropped, each with a warning."""
        for cb in self.callbacks:
            key = cb.state_key
            if key in saved:
                try:
                    cb.load_state_dict(saved[key])
                except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
                    raise CheckpointError(
                        f"{source}: cannot restore the state of callback {key} "
                        f"({short_repr(saved[key])}): {type(exc).__name__}: {exc}"
                    ) from exc
            elif cb.state_dict():
                log.warning("callback %s has no saved state in %s: it starts afresh", key, source)
        for key in saved:
            if self.find(key) is None:
                log.warning("%s holds the state of callback %s, which this run lacks", source, key)
