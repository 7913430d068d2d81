"""Callbacks: behaviours hung on the training loop's events.

The loop calls, in this order (``*`` repeats)::

    setup                                            once the model is built, before any data is
                                                     loaded or file written: check arguments
    on_fit_start
    * on_train_epoch_start
      * on_train_batch_start(batch_index)            every micro-batch
        on_before_optimizer_step                     gradients present and unscaled
        on_after_optimizer_step                      weights updated, counters moved on
        on_train_batch_end(batch_index, loss)        every micro-batch (loss: a 0-d tensor)
      on_train_epoch_end(metrics)                    the epoch's training loss and metrics
      on_validation_start / on_validation_end(metrics)
      on_epoch_end(row)                              the epoch's metrics.csv row, after the
                                                     scheduler and early stopping
    on_test_start / on_test_end(metrics)
    on_fit_end
    on_exception(exc)                                whatever stopped the run, before it unwinds

Each event receives the trainer first, which gives access to ``model``, ``unwrapped_model``,
``optimizer``, ``epoch``, ``global_step``, ``step_loss``, ``logged_loss`` (a float on the steps
where the trainer read the loss, else None), ``improved`` (in ``on_epoch_end``: the epoch is the
best so far), ``writer`` (TensorBoard, rank 0 only, else None), ``run_dir``, ``dist``,
``averaged_model`` (set it to have validation, the test and the best checkpoints use other
weights, as ``ema`` does), ``should_stop`` (set it to end training after this epoch) and
:meth:`~dltemplate.engine.trainer.TrainerBase.request_stop` (stop now, resumably).

The built-in behaviours are callbacks too (``progress``, ``tensorboard``, ``metrics_table``,
``early_stopping``, ``checkpoint``): see :func:`dltemplate.callbacks.build_callbacks`.

A callback with state returns it from :meth:`Callback.state_dict` (tensors and plain types);
it is saved in every checkpoint and restored on resume. For an exact resume, change that state
only in ``on_before_optimizer_step`` / ``on_after_optimizer_step`` (part of the optimizer step)
or in epoch-level events: the checkpoint of an interrupt holds the state of the last completed
step. An event a callback does not override is never called, so it costs nothing per batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from dltemplate.engine.trainer import TrainerBase

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
    "on_validation_end",
    "on_epoch_end",
    "on_test_start",
    "on_test_end",
    "on_fit_end",
    "on_exception",
)


class Callback:
    """Base class: override the events you need (see the module docstring for their order)."""

    def setup(self, trainer: TrainerBase) -> None:
        """The model is built, nothing is written yet: raise ConfigError for a bad argument."""

    def on_fit_start(self, trainer: TrainerBase) -> None:
        """Training is about to start (or to go on, after a resume)."""

    def on_train_epoch_start(self, trainer: TrainerBase) -> None:
        """A training epoch starts (also when resuming part-way through it)."""

    def on_train_batch_start(self, trainer: TrainerBase, batch_index: int) -> None:
        """A micro-batch is about to go through the model."""

    def on_before_optimizer_step(self, trainer: TrainerBase) -> None:
        """Gradients are accumulated and unscaled; the optimizer has not stepped yet."""

    def on_after_optimizer_step(self, trainer: TrainerBase) -> None:
        """The optimizer (and a per-step scheduler) stepped; ``global_step`` counts it."""

    def on_train_batch_end(
        self, trainer: TrainerBase, batch_index: int, loss: torch.Tensor
    ) -> None:
        """A micro-batch is done (``loss`` is detached; ``.item()`` on it waits for the GPU)."""

    def on_train_epoch_end(self, trainer: TrainerBase, metrics: dict[str, float]) -> None:
        """The training part of an epoch is done: its mean loss and metrics."""

    def on_validation_start(self, trainer: TrainerBase) -> None:
        """Validation is about to run."""

    def on_validation_end(self, trainer: TrainerBase, metrics: dict[str, float]) -> None:
        """Validation is done: its loss and metrics."""

    def on_epoch_end(self, trainer: TrainerBase, row: dict[str, float]) -> None:
        """The epoch is complete (scheduler stepped, best tracked): its ``metrics.csv`` row."""

    def on_test_start(self, trainer: TrainerBase) -> None:
        """The final test is about to run."""

    def on_test_end(self, trainer: TrainerBase, metrics: dict[str, float]) -> None:
        """The final test is done: its metrics."""

    def on_fit_end(self, trainer: TrainerBase) -> None:
        """The run is complete."""

    def on_exception(self, trainer: TrainerBase, exc: BaseException) -> None:
        """The run is stopping because of ``exc`` (a signal's stop included)."""

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
        for event in EVENTS:
            listeners = [
                getattr(cb, event)
                for cb in self.callbacks
                if getattr(type(cb), event) is not getattr(Callback, event)
            ]
            setattr(self, event, listeners)

    def state_dict(self) -> list[dict[str, Any]]:
        """Every callback's class name and state, in order."""
        return [{"callback": type(cb).__name__, "state": cb.state_dict()} for cb in self.callbacks]

    def load_state_dict(self, saved: list[dict[str, Any]]) -> list[str]:
        """Restore :meth:`state_dict`, matching callbacks by position and class name; return the
        names of callbacks that found no saved state (added since the checkpoint)."""
        fresh = []
        for i, cb in enumerate(self.callbacks):
            name = type(cb).__name__
            if i < len(saved) and saved[i]["callback"] == name:
                cb.load_state_dict(saved[i]["state"])
            elif cb.state_dict():
                fresh.append(name)
        return fresh
