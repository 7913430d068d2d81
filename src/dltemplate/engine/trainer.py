"""TrainerBase: the train / validate / test loop, readable top to bottom.

Building the run (model, loss, metrics, loaders, optimizer) is :mod:`dltemplate.engine.build`;
everything task-specific goes through the :class:`~dltemplate.engine.task.Task` hooks; what
happens around the loop — checkpoints, early stopping, the metrics table, TensorBoard, the
progress bar, and your own — are callbacks (:mod:`dltemplate.callbacks`) called at the loop's
events. Read :meth:`TrainerBase.fit` first.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dltemplate.atomic import atomic_write_text
from dltemplate.callbacks import build_callbacks
from dltemplate.config import Config, config_to_dict
from dltemplate.data.base import Batch
from dltemplate.data.loader import IndexLoader
from dltemplate.engine import distributed as D
from dltemplate.engine.build import build_components, build_loaders, build_schedule
from dltemplate.engine.checkpoint import (
    checkpoint_name,
    link_checkpoint,
    load_checkpoint,
    load_model_weights,
    save_checkpoint,
    unwrap_model,
)
from dltemplate.engine.clipping import clip_gradients
from dltemplate.engine.device import select_device
from dltemplate.engine.early_stopping import EarlyStopping
from dltemplate.engine.evaluator import EvaluatorBase
from dltemplate.engine.meters import AverageMeter
from dltemplate.engine.restarts import forget_restart_marker
from dltemplate.engine.resume import ResumeMixin
from dltemplate.engine.rundir import check_output_dir
from dltemplate.engine.runlog import format_duration, setup_logging
from dltemplate.engine.seeding import rng_state, seed_everything
from dltemplate.engine.stopping import BoundarySnapshot, RunStopped, StopSignals, rank_seed
from dltemplate.engine.task import Task, import_plugins, make_task
from dltemplate.engine.threads import apply_threads
from dltemplate.errors import NonFiniteLossError, UsageError
from dltemplate.models.heads import detach_outputs
from dltemplate.optim import is_plateau

log = logging.getLogger("dltemplate")


class NotResumable(Exception):
    """The state of the last step boundary is not known: no interrupt checkpoint then."""


class TrainerBase(ResumeMixin):
    """Trains ``task``'s model as ``cfg`` says; rank 0 writes the run directory.

    Build it, then call :meth:`fit`. Callbacks (``cfg.callbacks``) act at the loop's events;
    a subclass (named in ``experiment.trainer``) may override any method here.
    """

    evaluator_class: type[EvaluatorBase] = EvaluatorBase  # what ``dltemplate eval`` uses
    NotResumable = NotResumable

    def __init__(self, cfg: Config, task: Task | None = None) -> None:
        import_plugins(cfg)
        self.cfg = cfg
        tc = cfg.trainer
        self.task = task or make_task(cfg)
        self.fast_dev_run = tc.fast_dev_run > 0
        self.epochs = 1 if self.fast_dev_run else tc.epochs
        want_cuda = cfg.experiment.device.startswith(("auto", "cuda")) and torch.cuda.is_available()
        self.dist = D.init_distributed(use_cuda=want_cuda)
        setup_logging(None, self.dist.is_main)  # the file joins once the run directory exists
        local_rank = self.dist.local_rank if self.dist.enabled else None
        self.device, dp_ids = select_device(
            cfg.experiment.device, cfg.experiment.gpu_devices, local_rank
        )
        self.threads = apply_threads(cfg.experiment.threads, self.dist.enabled)
        seed_everything(cfg.experiment.seed, cfg.experiment.deterministic)
        # What callbacks read and set (see dltemplate.callbacks.base).
        self.run_dir: Path | None = None
        self.writer: Any = None  # TensorBoard, opened by the tensorboard callback on rank 0
        self.averaged_model: nn.Module | None = None  # evaluated instead, if set (ema)
        self.should_stop = False  # set by a callback: end training after this epoch
        self.improved = False  # whether the epoch just ended is the best so far
        self.best_epoch: int | None = None  # the epoch (1-based) of self.best's score
        self.logged_loss: float | None = None  # the loss, on the steps the trainer reads it
        self.stop_note = "no interrupt checkpoint written (checkpointing is off)"
        self.epoch, self.global_step, self.batch_in_epoch = 0, 0, 0
        self.finished_already: str | None = None

        # Everything that can be wrong with the config or the data fails here, before any write.
        sync_bn = tc.sync_batchnorm and self.dist.enabled
        parts = build_components(cfg, self.task, self.device, sync_batchnorm=sync_bn)
        self.info, self.model, self.criterion = parts.info, parts.model, parts.criterion
        self.precision, self.evaluation = parts.precision, parts.evaluation
        # Training keeps its own metric state: a validation never touches the epoch's sums.
        self.train_metrics = parts.train_metrics()
        self.train_meter = AverageMeter()
        self.best = EarlyStopping(tc.monitor_mode, None, tc.early_stopping_min_delta)
        self.callbacks = build_callbacks(cfg)
        for setup in self.callbacks.setup:
            setup(self)
        resume_from = self._find_resume()
        if resume_from is not None and self._is_finished(resume_from[0]):
            return  # nothing to do, nothing to write: fit() says so
        if resume_from is None and self.dist.is_main:  # before a long first decode of the data
            check_output_dir(cfg.experiment.output_dir)
        # Rank 0 loads first, so that files are downloaded and decode caches written once.
        if not self.dist.is_main:
            D.barrier()
        self.data = self.task.load_data()
        if self.dist.is_main and self.dist.enabled:
            D.barrier()
        self.train_loader, self.val_loader, self.test_loader = build_loaders(
            cfg, self.data, self.dist.rank, self.dist.world_size
        )
        schedule = build_schedule(cfg, self.model, self.epochs, len(self.train_loader))
        self.optimizer, self.scheduler = schedule.optimizer, schedule.scheduler
        self.steps_per_epoch, self.schedule_total = schedule.steps_per_epoch, schedule.total
        self.step_scheduler_per_batch = schedule.per_step
        # Each process draws its own random numbers (dropout, augmentation), seeded from the
        # seed and its rank; the model was built before, from the same seed on every rank.
        if self.dist.rank > 0:
            seed_everything(rank_seed(cfg.experiment.seed, self.dist.rank))
        if resume_from is not None:
            self._restore(*resume_from)
        self.train_model, self.eval_model = self._wrap_model(dp_ids)
        self.stop = StopSignals()
        self.snapshot = BoundarySnapshot(unwrap_model(self.model))
        self._torn: str | None = None  # set while a step or an epoch end is half done
        self._losses: list[torch.Tensor] = []  # losses since the trainer last read them
        self._last_window: list[tuple[torch.Tensor, int, Any, Batch]] = []
        self.phase = "train"
        self._open_run_dir(resume_from[1] if resume_from else None)

    # == the loop ===============================================================================
    def fit(self) -> dict[str, float]:
        """Train for ``trainer.epochs`` (or until a callback stops it), then test; return the
        test metrics.

        A signal stops the run at the next step boundary; callbacks see the exception first
        (the checkpoint callback writes the interrupt checkpoint), then it is re-raised.
        """
        if self.finished_already is not None:
            log.info("%s", self.finished_already)
            D.shutdown_distributed()
            return self._saved_test_metrics()
        cb = self.callbacks
        started = time.perf_counter()
        try:
            with self.stop:
                for fn in cb.on_fit_start:
                    fn(self)
                while self.epoch < self.epochs and not self.should_stop:
                    started = time.perf_counter()
                    train = self.train_epoch()
                    val = self.validate()
                    self.end_epoch(train, val, time.perf_counter() - started)
                    self.check_stop()
                self.phase = "test"
                metrics = self.test() if self.cfg.trainer.test_after_fit else {}
                for fn in cb.on_fit_end:
                    fn(self)
                self._log_summary(time.perf_counter() - started)
                if self.dist.is_main:
                    forget_restart_marker(self.cfg.experiment.output_dir)
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
        accum = self.cfg.trainer.grad_accum_steps
        self.train_model.train()
        loader = self.train_loader
        loader.set_epoch(self.epoch)
        loader.skip_batches = self.batch_in_epoch  # resuming part-way through this epoch
        if self.batch_in_epoch == 0:
            self.train_meter.reset()
            self.train_metrics.reset()
        self.snapshot.epoch_start()
        cb = self.callbacks
        for fn in cb.on_train_epoch_start:
            fn(self)
        sizes = loader.global_batch_sizes()
        window: list[tuple[torch.Tensor, int, Any, Batch]] = []  # micro-batches since the step
        for i, batch in enumerate(loader, start=loader.skip_batches):
            for fn in cb.on_train_batch_start:
                fn(self, i)
            batch = self.task.prepare_batch(batch, self.device, self.info)
            if self.cfg.data.augment:
                batch = self.task.augment(batch, self.info)
            n = len(batch.targets)
            # An accumulation window is `accum` micro-batches; the epoch's last may be shorter.
            first = i - i % accum
            last = min(first + accum, len(loader))
            update_now = i + 1 == last
            # Skip DDP's gradient all-reduce on micro-batches that only accumulate.
            with contextlib.nullcontext() if update_now else self._no_sync():
                with self.precision.autocast():
                    outputs = self.task.forward(self.train_model, batch)
                    loss = self.task.compute_loss(self.criterion, outputs, batch)
                # Weigh by this micro-batch's share of the window's samples over all processes
                # (DDP averages gradients over processes): the step then follows the mean loss
                # of the window's global batch, whatever the window's length.
                share = n * self.dist.world_size / sum(sizes[first:last])
                self.precision.backward(loss * share if share != 1 else loss)
            loss = loss.detach()
            window.append((loss, n, detach_outputs(outputs), batch))
            self.logged_loss = None
            if update_now:
                self.optimizer_step(window, position=i + 1)
                window = []
                if self.global_step % self.cfg.trainer.log_every_n_steps == 0:
                    self.logged_loss = self.read_losses()
            for fn in cb.on_train_batch_end:
                fn(self, i, loss)
            if update_now:
                self.check_stop()
        self.snapshot.epoch_end()
        results = self._reduced_train_results()
        for fn in cb.on_train_epoch_end:
            fn(self, results)
        return results

    def optimizer_step(self, window: list[tuple[torch.Tensor, int, Any, Batch]], position: int):
        """Unscale, clip, step, zero the gradients, step a per-batch scheduler, then count the
        window's micro-batches in the epoch's loss and metrics: all of it, or (if interrupted
        part-way) none of it as far as the checkpoint is concerned."""
        tc = self.cfg.trainer
        cb = self.callbacks
        with self._critical("an optimizer step"):
            clipping = tc.clip_grad_norm is not None or tc.clip_grad_value is not None
            if clipping or cb.on_before_optimizer_step:
                self.precision.unscale(self.optimizer)  # callbacks see true gradients
            for fn in cb.on_before_optimizer_step:
                fn(self)
            if clipping:
                clip_gradients(self.model.parameters(), tc.clip_grad_norm, tc.clip_grad_value)
            self.precision.step(self.optimizer)
            self.optimizer.zero_grad(set_to_none=True)
            self.global_step += 1
            self.batch_in_epoch = position
            if self.scheduler is not None and self.step_scheduler_per_batch:
                self.scheduler.step()
            for loss, n, outputs, batch in window:
                self.train_meter.update(loss, n)
                self.task.update_metrics(self.train_metrics, outputs, batch)
                self._losses.append(loss)
            self._last_window = window
            for fn in cb.on_after_optimizer_step:
                fn(self)
            self.snapshot.take()

    def validate(self) -> dict[str, float]:
        """The validation of this epoch, between the validation events."""
        self.phase = "val"
        for fn in self.callbacks.on_validation_start:
            fn(self)
        val = self.evaluate(self.val_loader, "val")
        for fn in self.callbacks.on_validation_end:
            fn(self, val)
        return val

    def end_epoch(self, train: dict[str, float], val: dict[str, float], seconds: float) -> None:
        """Step the epoch scheduler, track the best score, then the ``on_epoch_end`` callbacks
        (table, TensorBoard, early stopping, checkpoints) with the epoch's metrics.csv row."""
        self.read_losses()
        row = {f"train/{k}": v for k, v in train.items()}
        row.update({f"val/{k}": v for k, v in val.items()})
        score = row.get(self.cfg.trainer.monitor, float("nan"))
        lr = self.lr
        with self._critical("the end of an epoch"):
            if self.scheduler is not None and not self.step_scheduler_per_batch:
                self.scheduler.step(score) if is_plateau(self.scheduler) else self.scheduler.step()
            # Metrics were reduced, so every rank decides alike; rank 0's word settles it anyway.
            self.improved = bool(D.broadcast_object(self.best.update(score)))
            if self.improved:
                self.best_epoch = self.epoch + 1
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            row = {"epoch": self.epoch, "lr": lr, "seconds": round(seconds, 3), **row}
            for fn in self.callbacks.on_epoch_end:
                fn(self, row)
            self.snapshot.take()
        self.phase = "train"

    def test(self) -> dict[str, float]:
        """Evaluate the best checkpoint (or the final weights) on the test split."""
        best = self.run_dir / checkpoint_name(self.cfg.model.name, "best")
        D.barrier()  # rank 0 has finished writing it
        if best.exists():
            load_model_weights(self._evaluated_model(), load_checkpoint(best)["model"], str(best))
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

        def each_batch(i: int, batch: Batch, outputs: Any) -> None:
            if i == 0 and self.writer is not None:
                self.task.log_images(self.writer, split, batch, outputs, self.global_step)
            # One process can stop between batches; several agree at the next step boundary.
            if self.stop.requested and not self.dist.enabled:
                raise RunStopped(self.stop.requested, at_boundary=True)

        return self.evaluation.run(self._evaluated_model(), loader, on_batch=each_batch)

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
        stacked = torch.stack([x.float() for x in losses])
        if self.cfg.trainer.stop_on_nan:
            finite = torch.isfinite(stacked)
            if not bool(finite.all()):
                first = int((~finite).nonzero()[0])
                step = self.global_step - len(losses) + first + 1
                raise NonFiniteLossError(
                    f"the training loss is {float(losses[first]):.4g} at step {step} (epoch "
                    f"{self.epoch + 1}); stopping before any checkpoint is overwritten "
                    f"(trainer.stop_on_nan=false trains on)"
                )
        return float(stacked.mean())

    @contextlib.contextmanager
    def _critical(self, what: str) -> Iterator[None]:
        # An exception in here leaves the state half-updated: no interrupt checkpoint then.
        self._torn = what
        yield
        self._torn = None

    def request_stop(self, reason: str) -> None:
        """Stop at the next step boundary with an exact interrupt checkpoint, as SIGTERM does;
        ``reason`` is logged (e.g. ``max_time``)."""
        self.stop.request(reason)

    # == checkpoints ============================================================================
    def checkpoint_state(self, at_last_boundary: bool = False) -> dict[str, Any]:
        """Everything needed to continue the run exactly (tensors and plain types only).

        Collective under several processes (every rank's random state is gathered).
        ``at_last_boundary``: the model buffers and random state as they were at the last step
        boundary, for a stop part-way through a step.
        """
        model = unwrap_model(self.model)
        rng = self.snapshot.rng() if at_last_boundary else rng_state()
        unknown = torch.tensor([rng is None], dtype=torch.int64, device=D.collective_device())
        D.all_reduce_max(unknown)  # every process decides alike
        if unknown.item():
            raise NotResumable("the task drew from Python's or NumPy's generator in this epoch")
        return {
            "model_name": self.cfg.model.name,
            "model": self.snapshot.model_state(model) if at_last_boundary else model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "schedule_total": self.schedule_total,
            "scaler": self.precision.scaler.state_dict(),
            "epoch": self.epoch,
            "global_step": self.global_step,
            "batch_in_epoch": self.batch_in_epoch,
            "world_size": self.dist.world_size,
            # Each process's own running sums of the epoch (reduced only to report them).
            "train_progress": D.gather_objects([t.cpu() for t in self._train_state()]),
            "best_score": self.best.best,
            "best_epoch": self.best_epoch,
            "early_stopping": self.best.state_dict(),
            "stopped_early": self.should_stop,
            "rng": D.gather_objects(rng),
            "callbacks": self.callbacks.state_dict(),
            "finished": False,
            "config": config_to_dict(self.cfg),
        }

    def evaluated_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """``state`` with the weights that were evaluated (an average, if one is used): what
        the best checkpoints hold. Such a file cannot resume training (no optimizer in it)."""
        if self.averaged_model is None:
            return state
        weights = unwrap_model(self.averaged_model).state_dict()
        return {**{k: v for k, v in state.items() if k != "optimizer"}, "model": weights}

    def save(self, kind: str, state: dict[str, Any]) -> Path | None:
        """Write ``<Model>_<kind>_ckpt.pth`` on rank 0 (not in fast_dev_run)."""
        if not self.dist.is_main or self.fast_dev_run:
            return None
        path = self.run_dir / checkpoint_name(self.cfg.model.name, kind)
        save_checkpoint(path, state)
        return path

    def link(self, source: Path, kind: str) -> Path | None:
        """Make ``<Model>_<kind>_ckpt.pth`` the same file as ``source`` (same state, rank 0)."""
        if not self.dist.is_main or self.fast_dev_run:
            return None
        path = self.run_dir / checkpoint_name(self.cfg.model.name, kind)
        link_checkpoint(source, path)
        return path

    def interrupt_state(self, exc: BaseException) -> dict[str, Any]:
        """The state an interrupt checkpoint may hold after ``exc``, or :class:`NotResumable`.

        A signal stops at a step boundary (exact). After another exception on one process, the
        state of the last boundary is saved (its random state and buffers were kept). None is
        exact when the stop tore an optimizer step or an epoch's end, during the final test
        (training is complete), after a non-finite loss or a configuration error, or when one
        process of several failed alone: ``resume`` then continues from the newest checkpoint.
        """
        agreed = isinstance(exc, RunStopped) and exc.at_boundary
        if getattr(self, "run_dir", None) is None:
            raise NotResumable("the run had not started")
        if isinstance(exc, NonFiniteLossError):
            raise NotResumable("the weights are not to be trusted")
        if isinstance(exc, UsageError):
            raise NotResumable("the configuration or input is wrong: fix it, then resume")
        if self.phase == "test":
            raise NotResumable("training was complete (the final test runs again on resume)")
        if self._torn is not None:
            raise NotResumable(f"it stopped part-way through {self._torn}")
        if self.dist.enabled and not agreed:
            raise NotResumable("one process of several failed on its own")
        return self.checkpoint_state(at_last_boundary=True)

    def _log_stop(self, exc: BaseException) -> None:
        """One line: what stopped the run, where, what was saved, how to go on."""
        if self.run_dir is None or not self.dist.is_main:
            return
        what = exc.signal_name if isinstance(exc, RunStopped) else type(exc).__name__
        if isinstance(exc, KeyboardInterrupt) and not isinstance(exc, RunStopped):
            what = "SIGINT"
        saved = self.stop_note.startswith("checkpoint saved")
        log.error(
            "run stopped by %s at epoch %d, step %d; %s; %s: dltemplate resume %s",
            what,
            self.epoch + 1,
            self.global_step,
            self.stop_note,
            "continue with" if saved else "resume continues from the newest checkpoint",
            self.run_dir,
        )

    def _log_summary(self, seconds: float) -> None:
        """The last lines of a run: how long, the best epoch and its score, where things are."""
        if not self.dist.is_main:
            return
        monitor = self.cfg.trainer.monitor
        if self.best.best is None:
            best = f"{monitor} never had a score"
        else:
            at = f"epoch {self.best_epoch}" if self.best_epoch else "an unrecorded epoch"
            best = f"best {monitor} {self.best.best:.4f} at {at}"
        log.info(
            "run %s finished: %d epoch(s), %d steps, %s in this session; %s",
            self.run_dir.name,
            self.epoch,
            self.global_step,
            format_duration(seconds),
            best,
        )
        checkpoints = sorted(p.name for p in self.run_dir.glob("*_ckpt.pth"))
        log.info(
            "run directory %s; checkpoints: %s; evaluate with: dltemplate eval %s",
            self.run_dir,
            ", ".join(checkpoints) or "none written",
            self.run_dir,
        )

    def mark_finished(self) -> None:
        """Record in the last checkpoint that the run is complete, so that ``resume`` of it
        changes nothing."""
        if self.dist.is_main and not self.fast_dev_run:
            path = self.run_dir / checkpoint_name(self.cfg.model.name, "last")
            if path.exists():
                state = load_checkpoint(path)
                state.pop("digest", None)
                save_checkpoint(path, {**state, "finished": True})

    # == helpers ================================================================================
    def _train_state(self) -> list[torch.Tensor]:
        return self.train_meter.state() + self.train_metrics.state()

    def _reduced_train_results(self) -> dict[str, float]:
        """The epoch's training results over all processes; the local sums stay as they were,
        so that a checkpoint taken later (during validation) holds this process's own share."""
        local = [t.clone() for t in self._train_state()] if self.dist.enabled else None
        self.train_metrics.sync(D.all_reduce_sum)
        D.all_reduce_sum(self.train_meter.state())
        results = {"loss": self.train_meter.avg, **self.train_metrics.compute()}
        if local is not None:
            for mine, kept in zip(self._train_state(), local):
                mine.copy_(kept)
        return results

    def _evaluated_model(self) -> nn.Module:
        return self.averaged_model if self.averaged_model is not None else self.eval_model

    def _wrap_model(self, dp_ids: list[int]) -> tuple[nn.Module, nn.Module]:
        """(model for training, model for evaluation): compiled, DataParallel, DDP as asked."""
        model: nn.Module = self.model
        if self.cfg.trainer.compile:
            model = torch.compile(model)  # type: ignore[assignment]
        if dp_ids:
            model = nn.DataParallel(model, device_ids=dp_ids)
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            # Evaluation uses the bare model: DDP's forward would need every rank in lockstep.
            return DistributedDataParallel(model, device_ids=ids), model
        return model, model

    def _no_sync(self) -> contextlib.AbstractContextManager[Any]:
        if isinstance(self.train_model, DistributedDataParallel):
            return self.train_model.no_sync()
        return contextlib.nullcontext()

    @property
    def step_loss(self) -> torch.Tensor:
        """The mean training loss of the last optimizer step's samples on this process (a 0-d
        tensor: ``float()`` of it waits for the GPU, so read it every few steps, not every one)."""
        window = self._last_window
        total = sum(n for _, n, _, _ in window)
        return sum(loss.float() * n for loss, n, _, _ in window) / total

    @property
    def unwrapped_model(self) -> nn.Module:
        """The bare model, without DDP / DataParallel / compile wrappers."""
        return unwrap_model(self.model)

    @property
    def lr(self) -> float:
        """The current learning rate (first parameter group)."""
        return float(self.optimizer.param_groups[0]["lr"])

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
        D.shutdown_distributed()
