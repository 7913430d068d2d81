"""TrainerBase: the train / validate / test loop, readable top to bottom.

The trainer is handed a built run (:class:`RunParts`: model, loaders, schedule, callbacks, the
run's saved state) by the composition root, :func:`dltemplate.assemble.build_trainer`;
everything task-specific goes through the :class:`~dltemplate.engine.task.Task` hooks; what
happens around the loop — checkpoints, early stopping, the metrics table, TensorBoard, the
progress bar, and your own — are callbacks called at the loop's events. What a checkpoint holds
and how a run is restored is :class:`~dltemplate.engine.run_state.RunState`. Read
:meth:`TrainerBase.fit` first.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dltemplate.atomic import atomic_write_text
from dltemplate.config import Config
from dltemplate.config.loader import config_to_dict, notice_signal
from dltemplate.config.trust import code_references
from dltemplate.data.base import Batch, DataInfo, DataSplits
from dltemplate.data.loader import IndexLoader
from dltemplate.engine import distributed as D
from dltemplate.engine.build import Schedule
from dltemplate.engine.checkpoint import load_checkpoint, load_model_weights, unwrap_model
from dltemplate.engine.clipping import clip_gradients
from dltemplate.engine.evaluation import Evaluation
from dltemplate.engine.evaluator import EvaluatorBase
from dltemplate.engine.loop_state import LoopState
from dltemplate.engine.meters import AverageMeter
from dltemplate.engine.precision import Precision
from dltemplate.engine.restarts import forget_restart_marker
from dltemplate.engine.run_state import RunState, stop_cause
from dltemplate.engine.runlog import format_duration
from dltemplate.engine.stopping import (
    BoundarySnapshot,
    RunStopped,
    StopSignals,
    set_run_finished,
)
from dltemplate.engine.task import Task
from dltemplate.errors import NonFiniteLossError
from dltemplate.metrics.base import MetricCollection
from dltemplate.models.heads import detach_outputs
from dltemplate.optim import is_plateau
from dltemplate.registry import is_code_name

log = logging.getLogger("dltemplate")

# One micro-batch of an accumulation window: its detached loss, its sample count on this
# process, its detached outputs and the batch, counted in the epoch's sums once the step is done.
MicroBatch = tuple[torch.Tensor, int, Any, Batch]


@dataclass
class RunParts:
    """A built run, everything the loop needs (see :func:`dltemplate.assemble.build_trainer`)."""

    task: Task
    info: DataInfo
    model: nn.Module  # the bare model, on its device
    train_model: nn.Module  # what training calls: compiled / DataParallel / DDP, as asked
    eval_model: nn.Module  # what evaluation calls (no DDP: it needs every rank in lockstep)
    criterion: nn.Module
    precision: Precision
    evaluation: Evaluation
    train_metrics: MetricCollection  # training's own metric state, apart from evaluation's
    train_meter: AverageMeter
    data: DataSplits
    train_loader: IndexLoader
    val_loader: IndexLoader
    test_loader: IndexLoader
    schedule: Schedule
    callbacks: Any  # a dltemplate.callbacks.CallbackList: one list of listeners per event
    state: LoopState
    run_state: RunState
    snapshot: BoundarySnapshot
    dist: D.DistContext
    device: torch.device
    run_dir: Path


def window_of(i: int, accum: int, batches: int) -> tuple[int, int]:
    """The accumulation window of micro-batch ``i``: ``[first, end)``; ``accum`` micro-batches,
    the epoch's last window shorter if the epoch does not divide."""
    first = i - i % accum
    return first, min(first + accum, batches)


def micro_share(n: int, world_size: int, window_sizes: list[int]) -> float:
    """The weight of a micro-batch of ``n`` samples on this process: its share of the window's
    samples over all processes (``window_sizes``, global). DDP averages gradients over
    processes, so the step then follows the mean loss of the window's global batch, whatever
    the window's length (a short last window included)."""
    return n * world_size / sum(window_sizes)


class TrainerBase:
    """Trains a built run as ``cfg`` says; rank 0 writes the run directory.

    :func:`dltemplate.assemble.build_trainer` builds it from a config; then call :meth:`fit`.
    Callbacks act at the loop's events and see the surface
    :class:`dltemplate.callbacks.base.Loop`; a subclass (named in ``experiment.trainer``) may
    override any method here.
    """

    evaluator_class: type[EvaluatorBase] = EvaluatorBase  # what ``dltemplate eval`` uses

    def __init__(self, cfg: Config, parts: RunParts) -> None:
        self.cfg = cfg
        self.task, self.info, self.data = parts.task, parts.info, parts.data
        self.model, self.criterion = parts.model, parts.criterion
        self.train_model, self.eval_model = parts.train_model, parts.eval_model
        self.precision, self.evaluation = parts.precision, parts.evaluation
        self.train_metrics, self.train_meter = parts.train_metrics, parts.train_meter
        self.train_loader, self.val_loader = parts.train_loader, parts.val_loader
        self.test_loader = parts.test_loader
        self.schedule, self.optimizer = parts.schedule, parts.schedule.optimizer
        self.callbacks, self.state, self.run_state = parts.callbacks, parts.state, parts.run_state
        self.snapshot, self.dist, self.device = parts.snapshot, parts.dist, parts.device
        self.run_dir: Path | None = parts.run_dir
        self.writer: Any = None  # TensorBoard, given by the tensorboard callback on rank 0
        self.averaged_model: nn.Module | None = None  # evaluated instead, if set (ema)
        notice = cfg.trainer.notice_signal
        self.stop = StopSignals(
            notice_signal(notice) if notice is not None else None, say=self.dist.is_main
        )
        self._losses: list[tuple[torch.Tensor, int]] = []  # (loss, its step) not yet read
        self._last_window: list[MicroBatch] = []

    # == the loop ===============================================================================
    def fit(self) -> dict[str, float]:
        """Train for ``trainer.epochs`` (or until a callback ends training), then test; return
        the test metrics.

        A signal stops the run at the next step boundary; callbacks see the exception first
        (the checkpoint callback writes the interrupt checkpoint), then it is re-raised.
        """
        cb, state = self.callbacks, self.state
        session_started = time.perf_counter()
        try:
            with self.stop:
                for fn in cb.on_fit_start:
                    fn(self)
                while state.epoch < state.epochs and not state.training_ended:
                    epoch_started = time.perf_counter()
                    train = self.train_epoch()
                    val = self.validate()
                    self.end_epoch(train, val, time.perf_counter() - epoch_started)
                    self.check_stop()
                state.phase = "test"
                metrics = self.test() if self.cfg.trainer.test_after_fit else {}
                for fn in cb.on_fit_end:
                    fn(self)
                if self.dist.is_main:
                    forget_restart_marker(self.cfg.experiment.output_dir)
                set_run_finished(True)  # all written: a signal from now on has nothing to stop
                self._log_summary(time.perf_counter() - session_started)
            D.barrier()  # leave together: gloo aborts a process whose peer left first
            return metrics
        except BaseException as exc:
            for fn in cb.on_exception:
                fn(self, exc)
            self._log_stop(exc)
            raise
        finally:
            self.close()

    def train_epoch(self) -> dict[str, float]:
        """One pass over the training data; returns the epoch's mean loss and metrics."""
        cb, state, loader = self.callbacks, self.state, self.train_loader
        accum = self.cfg.trainer.grad_accum_steps
        self.train_model.train()
        loader.set_epoch(state.epoch)
        loader.skip_batches = state.batch_in_epoch  # resuming part-way through this epoch
        if state.batch_in_epoch == 0:
            self.train_meter.reset()
            self.train_metrics.reset()
        self.snapshot.epoch_start()
        for fn in cb.on_train_epoch_start:
            fn(self)
        sizes = loader.global_batch_sizes()  # samples per batch over all processes
        window: list[MicroBatch] = []  # the micro-batches since the last optimizer step
        for i, batch in enumerate(loader, start=loader.skip_batches):
            state.logged_loss = None
            for fn in cb.on_train_batch_start:
                fn(self, i)
            batch = self.task.prepare_batch(batch, self.device, self.info)
            if self.cfg.data.augment:
                batch = self.task.augment(batch, self.info)
            n = len(batch.targets)
            first, end = window_of(i, accum, len(loader))
            steps_now = i + 1 == end  # the last micro-batch of its window: the optimizer steps
            # Only the step's micro-batch all-reduces gradients under DDP; the others accumulate.
            with contextlib.nullcontext() if steps_now else self._no_sync():
                with self.precision.autocast():
                    outputs = self.task.forward(self.train_model, batch)
                    loss = self.task.compute_loss(self.criterion, outputs, batch)
                share = micro_share(n, self.dist.world_size, sizes[first:end])
                self.precision.backward(loss if share == 1 else loss * share)
            loss = loss.detach()
            window.append((loss, n, detach_outputs(outputs), batch))
            if steps_now:
                self.optimizer_step(window, position=i + 1)
                window = []
            for fn in cb.on_train_batch_end:
                fn(self, i, loss)
            if steps_now:
                self.check_stop()  # a step boundary: a signal stops the run here, exactly
        self.snapshot.epoch_end()
        results = self._reduced_train_results()
        for fn in cb.on_train_epoch_end:
            fn(self, results)
        return results

    def optimizer_step(self, window: list[MicroBatch], position: int) -> None:
        """Unscale, clip, step, zero the gradients, step a per-batch scheduler, then count the
        window's micro-batches in the epoch's loss and metrics and read the loss when it is
        due: all of it, or (if interrupted part-way) none of it as far as the checkpoint is
        concerned."""
        tc, cb, state = self.cfg.trainer, self.callbacks, self.state
        clipping = tc.clip_grad_norm is not None or tc.clip_grad_value is not None
        with self._critical("an optimizer step"):
            if clipping or cb.on_before_optimizer_step:
                self.precision.unscale(self.optimizer)  # clipping and callbacks see true grads
            for fn in cb.on_before_optimizer_step:
                fn(self)
            if clipping:
                clip_gradients(self.model.parameters(), tc.clip_grad_norm, tc.clip_grad_value)
            self.precision.step(self.optimizer)
            self.optimizer.zero_grad(set_to_none=True)
            state.global_step += 1
            state.batch_in_epoch = position
            if self.scheduler is not None and self.schedule.per_step:
                self.scheduler.step()
            for loss, n, outputs, batch in window:
                self.train_meter.update(loss, n)
                self.task.update_metrics(self.train_metrics, outputs, batch)
                self._losses.append((loss, state.global_step))
            self._last_window = window
            if state.global_step % tc.log_every_n_steps == 0:
                state.logged_loss = self.read_losses()  # the one wait for the device, if due
            for fn in cb.on_after_optimizer_step:
                fn(self)
            self.snapshot.take()

    def validate(self) -> dict[str, float]:
        """The validation of this epoch, between the validation events."""
        self.state.phase = "val"
        for fn in self.callbacks.on_validation_start:
            fn(self)
        val = self.evaluate(self.val_loader, "val")
        for fn in self.callbacks.on_validation_end:
            fn(self, val)
        return val

    def end_epoch(self, train: dict[str, float], val: dict[str, float], seconds: float) -> None:
        """Step the epoch scheduler, track the best score, then the ``on_epoch_end`` callbacks
        (table, TensorBoard, early stopping, checkpoints) with the epoch's metrics.csv row."""
        state = self.state
        self.read_losses()  # the epoch's last losses are checked before any checkpoint
        row = {f"train/{k}": v for k, v in train.items()}
        row.update({f"val/{k}": v for k, v in val.items()})
        score = row.get(self.cfg.trainer.monitor, float("nan"))
        lr = self.lr
        with self._critical("the end of an epoch"):
            if self.scheduler is not None and not self.schedule.per_step:
                self.scheduler.step(score) if is_plateau(self.scheduler) else self.scheduler.step()
            # Metrics were reduced, so every rank decides alike; rank 0's word settles it anyway.
            state.improved = bool(D.broadcast_object(state.best.update(score, state.epoch + 1)))
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            row = {"epoch": state.epoch, "lr": lr, "seconds": round(seconds, 3), **row}
            for fn in self.callbacks.on_epoch_end:
                fn(self, row)
            self.snapshot.take()
        state.phase = "train"

    def test(self) -> dict[str, float]:
        """Evaluate the best checkpoint (or the final weights) on the test split."""
        best = self.run_state.path("best")
        D.barrier()  # rank 0 has finished writing it
        if best.exists():  # into the bare model: a wrapper's keys carry its prefixes
            weights = load_checkpoint(best)["model"]
            load_model_weights(unwrap_model(self.evaluated_model), weights, str(best))
        for fn in self.callbacks.on_test_start:
            fn(self)
        metrics = self.evaluate(self.test_loader, "test")
        # Processes test together, so they stop together: a signal that reached one of them
        # during the test stops them all here, before anything is written (resume tests again).
        self.check_stop()
        for fn in self.callbacks.on_test_end:
            fn(self, metrics)
        log.info(
            "test (%s): %s",
            "best checkpoint" if best.exists() else "final weights",
            " ".join(f"{k} {v:.4f}" for k, v in metrics.items()),
        )
        if self.dist.is_main:
            atomic_write_text(self.run_dir / "test_metrics.json", json.dumps(metrics, indent=2))
        return metrics

    def evaluate(self, loader: IndexLoader, split: str) -> dict[str, float]:
        """Mean loss and metrics over ``loader``, each sample counted once across processes."""

        batches = len(loader)

        def each_batch(i: int, batch: Batch, outputs: Any) -> None:
            if i == 0 and self.writer is not None:
                self.task.log_images(self.writer, split, batch, outputs, self.state.global_step)
            for fn in self.callbacks.on_eval_batch_end:
                fn(self, split, i, batches)
            # One process can stop between batches; several agree at the next step boundary.
            if self.stop.requested and not self.dist.enabled:
                raise RunStopped(self.stop.requested, at_boundary=True)

        model = self.averaged_model if self.averaged_model is not None else self.eval_model
        return self.evaluation.run(model, loader, on_batch=each_batch)

    # == step boundaries: stopping, and reading the loss =========================================
    def check_stop(self) -> None:
        """At a step boundary: stop (every process at the same step) if a signal asked to."""
        name = self.stop.agreed(self.dist.enabled)
        if name is not None:
            raise RunStopped(name, at_boundary=True)

    def read_losses(self) -> float | None:
        """The mean loss of the micro-batches since the last read (one wait for the device),
        checked first: a non-finite one stops the run naming its step (``trainer.stop_on_nan``)
        before any checkpoint is overwritten with bad weights."""
        losses, self._losses = self._losses, []
        if not losses:
            return None
        stacked = torch.stack([loss.float() for loss, _ in losses])
        if self.cfg.trainer.stop_on_nan:
            finite = torch.isfinite(stacked)
            if not bool(finite.all()):
                first = int((~finite).nonzero()[0])
                loss, step = losses[first]
                raise NonFiniteLossError(
                    f"the training loss is {float(loss):.4g} at step {step} (epoch "
                    f"{self.state.epoch + 1}); stopping before any checkpoint is overwritten "
                    f"(trainer.stop_on_nan=false trains on)"
                )
        return float(stacked.mean())

    @contextlib.contextmanager
    def _critical(self, what: str) -> Iterator[None]:
        # An exception in here leaves the state half-updated: no interrupt checkpoint then.
        self.state.torn = what
        yield
        self.state.torn = None

    # == what callbacks may call (see dltemplate.callbacks.base.Loop) ============================
    def request_stop(self, reason: str) -> None:
        """Stop at the next step boundary with an exact interrupt checkpoint, as SIGTERM does;
        ``reason`` is logged (e.g. ``max_time``)."""
        self.stop.request(reason)

    def end_training(self, by: Any, reason: str) -> None:
        """End training after this epoch, then test; the run records ``by`` (a callback, by its
        state key) as what ended it, and only ``by`` may reopen it on a resume."""
        if self.state.stopped_by is None:
            self.state.stopped_by, self.state.stop_reason = by.state_key, reason

    def evaluate_with(self, model: nn.Module | None) -> None:
        """Evaluate (validation, the test, the best checkpoints) with ``model`` instead of the
        trained weights (an average, as ``ema`` does); None: the trained weights."""
        self.averaged_model = model

    def set_writer(self, writer: Any) -> None:
        """The TensorBoard writer that callbacks and the task's ``log_images`` write to."""
        self.writer = writer

    @property
    def evaluated_model(self) -> nn.Module:
        """The model that validation, the test and the best checkpoints use."""
        return self.averaged_model if self.averaged_model is not None else self.model

    @property
    def step_loss(self) -> torch.Tensor | None:
        """The mean training loss of the last optimizer step's samples on this process (a 0-d
        tensor: ``float()`` of it waits for the GPU, so read it every few steps, not every
        one); None before the first step."""
        window = self._last_window
        total = sum(n for _, n, _, _ in window)
        if total == 0:
            return None
        return sum(loss.float() * n for loss, n, _, _ in window) / total

    @property
    def unwrapped_model(self) -> nn.Module:
        """The bare model, without DDP / DataParallel / compile wrappers."""
        return unwrap_model(self.model)

    @property
    def scheduler(self) -> Any:
        """The learning-rate scheduler (None without one)."""
        return self.schedule.scheduler

    @property
    def lr(self) -> float:
        """The current learning rate (first parameter group)."""
        return float(self.optimizer.param_groups[0]["lr"])

    # == the end of a run =======================================================================
    def _log_stop(self, exc: BaseException) -> None:
        """One line: what stopped the run, where, what was saved, how to go on."""
        if self.run_dir is None or not self.dist.is_main:
            return
        interrupt = self.run_state.interrupt
        state = self.state  # its epoch counts those done: the test comes after the last one
        where = "during the final test" if state.phase == "test" else f"at epoch {state.epoch + 1}"
        log.error(
            "run stopped by %s %s, step %d; %s; %s: %s",
            stop_cause(exc),
            where,
            state.global_step,
            interrupt.note,
            "continue with" if interrupt.path else "resume continues from the newest checkpoint",
            self.resume_command(),
        )

    def resume_command(self) -> str:
        """The command that continues this run exactly: under torchrun, with the same number of
        processes (per node, and nodes), since the data order and random streams depend on it."""
        trust = self._trust_flag()
        if not self.dist.enabled:
            return f"dltemplate resume {self.run_dir}{trust}"
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", self.dist.world_size))
        nodes = max(1, self.dist.world_size // per_node)
        spread = f"--nnodes {nodes} " if nodes > 1 else ""
        return (
            f"torchrun {spread}--nproc_per_node {per_node} -m dltemplate resume "
            f"{self.run_dir}{trust}"
        )

    def _trust_flag(self) -> str:
        """`` --trust-code`` when the run's config names code to import (which a run directory
        only runs when trusted), else ``""``."""
        return " --trust-code" if any(code_references(config_to_dict(self.cfg))) else ""

    def _log_summary(self, seconds: float) -> None:
        """The last lines of a run: how long, the best epoch and its score, where things are."""
        if not self.dist.is_main:
            return
        monitor, best = self.cfg.trainer.monitor, self.state.best
        if best.score is None:
            said = f"{monitor} never had a score"
        else:
            at = f"epoch {best.epoch}" if best.epoch else "an unrecorded epoch"
            said = f"best {monitor} {best.score:.4f} at {at}"
        log.info(
            "run %s finished: %d epoch(s), %d steps, %s in this session; %s",
            self.run_dir.name,
            self.state.epoch,
            self.state.global_step,
            format_duration(seconds),
            said,
        )
        checkpoints = sorted(p.name for p in self.run_dir.glob("*_ckpt.pth"))
        if not checkpoints:  # fast_dev_run writes none: there is nothing to evaluate
            why = " (trainer.fast_dev_run)" if self.cfg.trainer.fast_dev_run else ""
            log.info("run directory %s; no checkpoint written%s", self.run_dir, why)
            return
        names = {"dataset": self.cfg.data.name, "model": self.cfg.model.name}
        given = [param for param, name in names.items() if is_code_name(name)]
        how = (  # objects given in Python cannot be rebuilt by the command line
            f"dltemplate.evaluate(run, {', '.join(f'{p}=...' for p in given)}) in Python"
            if given
            else f"dltemplate eval {self.run_dir}{self._trust_flag()}"
        )
        log.info(
            "run directory %s; checkpoints: %s; evaluate with: %s",
            self.run_dir,
            ", ".join(checkpoints),
            how,
        )

    # == helpers ================================================================================
    def _reduced_train_results(self) -> dict[str, float]:
        """The epoch's training results over all processes; the local sums stay as they were,
        so that a checkpoint taken later (during validation) holds this process's own share."""
        own = self.train_meter.state() + self.train_metrics.state()
        local = [t.clone() for t in own] if self.dist.enabled else None
        self.train_metrics.sync(D.all_reduce_sum)
        D.all_reduce_sum(self.train_meter.state())
        results = {"loss": self.train_meter.avg, **self.train_metrics.compute()}
        if local is not None:
            for mine, kept in zip(self.train_meter.state() + self.train_metrics.state(), local):
                mine.copy_(kept)
        return results

    def _no_sync(self) -> contextlib.AbstractContextManager[Any]:
        if isinstance(self.train_model, DistributedDataParallel):
            return self.train_model.no_sync()
        return contextlib.nullcontext()

    def close(self) -> None:
        """Close what callbacks left open and leave the process group."""
        if getattr(self, "writer", None) is not None:
            self.writer.close()
            self.writer = None
        for name in ("train_loader", "val_loader", "test_loader"):
            if getattr(self, name, None) is not None:
                getattr(self, name).close()  # DataLoader workers, if any
        # Free the DDP wrapper while the process group lives: freed after it, its last hold on
        # gloo can deadlock at exit (the GIL against gloo's worker thread).
        if isinstance(getattr(self, "train_model", None), DistributedDataParallel):
            self.train_model = self.eval_model
            gc.collect()
        self.run_state.close()  # the run directory's lock: the last thing the run writes is done
        D.shutdown_distributed()
