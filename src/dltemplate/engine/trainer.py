"""TrainerBase: the train / validate / test loop, readable top to bottom.

Everything task-specific goes through the :class:`~dltemplate.engine.task.Task` hooks; every
optional behaviour (precision, clipping, early stopping, accumulation, checkpoints) is a small
named piece that the loop calls. Read :meth:`TrainerBase.fit` first.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dltemplate.callbacks.base import CallbackList
from dltemplate.config import Config, config_to_dict
from dltemplate.data.base import Batch, IndexLoader, TensorSplit
from dltemplate.engine import distributed as D
from dltemplate.engine.atomic import atomic_write_text
from dltemplate.engine.checkpoint import (
    checkpoint_name,
    load_checkpoint,
    load_model_weights,
    newest_intact_checkpoint,
    save_checkpoint,
    unwrap_model,
)
from dltemplate.engine.device import select_device
from dltemplate.engine.early_stopping import EarlyStopping
from dltemplate.engine.evaluator import evaluate_loader
from dltemplate.engine.meters import AverageMeter
from dltemplate.engine.precision import Precision
from dltemplate.engine.restarts import forget_restart_marker, remember_run_dir, restarted_run_dir
from dltemplate.engine.rundir import (
    MetricsTable,
    find_config,
    new_run_dir,
    remove_stale_temp_files,
    save_config,
)
from dltemplate.engine.runlog import (
    EpochProgress,
    attach_log_file,
    setup_logging,
    use_progress_bar,
)
from dltemplate.engine.seeding import rng_state, seed_everything, set_rng_state
from dltemplate.engine.stopping import BoundarySnapshot, RunStopped, StopSignals, rank_seed
from dltemplate.engine.sync_batchnorm import convert_sync_batchnorm
from dltemplate.engine.task import Task, import_plugins, make_task
from dltemplate.errors import (
    CheckpointError,
    ConfigError,
    NonFiniteLossError,
    UsageError,
    did_you_mean,
)
from dltemplate.metrics.base import MetricCollection
from dltemplate.optim import build_optimizer, build_scheduler, is_plateau, scheduler_interval
from dltemplate.optim.stretch import StretchedSchedule, is_stretched_state, stretch_scheduler
from dltemplate.registry import CALLBACKS

log = logging.getLogger("dltemplate")


def limit_batches(limit: int | float | None, full: int, key: str) -> int | None:
    """Lightning's convention: an int is a count of batches, a float a fraction of the epoch."""
    if limit is None:
        return None
    if isinstance(limit, float):
        if not 0.0 < limit <= 1.0:
            raise ConfigError(
                f"{key}={limit}: a fraction must be in (0, 1]; use an int for a count"
            )
        return max(1, int(full * limit))
    if limit < 1:
        raise ConfigError(f"{key}={limit}: must be at least 1")
    return limit


def _detach(outputs: Any) -> Any:
    # Models may return several heads (deep supervision) as a list or tuple.
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(o.detach() for o in outputs)
    return outputs.detach()


def clip_gradients(params: list[nn.Parameter], norm: float | None, value: float | None) -> None:
    """Clip gradients by global norm and/or element value (after unscaling)."""
    if value is not None:
        torch.nn.utils.clip_grad_value_(params, value)
    if norm is not None:
        torch.nn.utils.clip_grad_norm_(params, norm)


def build_callbacks(cfg: Config) -> CallbackList:
    """The callbacks of ``cfg.callbacks``, in order; a bad name or argument is a ConfigError."""
    built = []
    for i, item in enumerate(cfg.callbacks):
        key = f"callbacks[{i}]"
        try:
            built.append(CALLBACKS.build(item.name, f"{key}.name", **item.args))
        except (TypeError, ValueError) as exc:  # the callback refused its arguments
            raise ConfigError(f"{key} '{item.name}': {exc}") from exc
    return CallbackList(built)


class _NotExact(Exception):
    """The state of the last step boundary is not known: no interrupt checkpoint then."""


class TrainerBase:
    """Trains ``task``'s model as ``cfg`` says; rank 0 writes the run directory.

    Build it, then call :meth:`fit`. Subclass and override a hook of :class:`Task` (or a method
    here) to change one piece without copying the loop.
    """

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
        seed_everything(cfg.experiment.seed, cfg.experiment.deterministic)
        self.writer: Any = None
        self.finished_already: str | None = None

        # Everything that can be wrong with the config or the data fails here, before any write.
        self.info = self.task.data_info()
        self.model = self.task.build_model(self.info).to(self.device)
        if tc.sync_batchnorm and self.dist.enabled:  # before the optimizer: same parameters
            self.model = convert_sync_batchnorm(self.model, self.device)
        self.criterion = self.task.build_loss().to(self.device)
        # Training and evaluation keep separate metric state: a validation never touches the
        # training epoch's running sums (an interrupt during validation resumes them intact).
        self.train_metrics = self.task.build_metrics(self.info)
        self.eval_metrics = self.task.build_metrics(self.info)
        self._check_monitor()
        self.precision = Precision(tc.precision, self.device)
        self.callbacks = build_callbacks(cfg)
        for setup in self.callbacks.setup:
            setup(self)
        self._restart_dir = self._restarted_run_dir()
        resume_from = self._resume_checkpoint() if tc.resume else None
        if resume_from is not None and self._is_finished(resume_from[0]):
            return  # nothing to do, nothing to write: fit() says so
        # Rank 0 loads first, so that files are downloaded and decode caches written once.
        if not self.dist.is_main:
            D.barrier()
        self.data = self.task.load_data()
        if self.dist.is_main and self.dist.enabled:
            D.barrier()
        self.train_loader, self.val_loader, self.test_loader = self._make_loaders()
        self.optimizer = build_optimizer(cfg.optimizer, self.model.parameters())
        self.steps_per_epoch = math.ceil(len(self.train_loader) / tc.grad_accum_steps)
        self.step_scheduler_per_batch = scheduler_interval(cfg.scheduler) == "step"
        # How many times the scheduler is stepped over the whole run (its length).
        self.schedule_total = self.epochs * (
            self.steps_per_epoch if self.step_scheduler_per_batch else 1
        )
        self.scheduler = build_scheduler(
            cfg.scheduler,
            self.optimizer,
            epochs=self.epochs,
            steps_per_epoch=self.steps_per_epoch,
            monitor_mode=tc.monitor_mode,
        )
        self.early_stopping = EarlyStopping(
            tc.monitor_mode, tc.early_stopping_patience, tc.early_stopping_min_delta
        )
        self.epoch, self.global_step, self.batch_in_epoch = 0, 0, 0
        self.train_meter = AverageMeter()
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
        self._losses: list[torch.Tensor] = []  # losses since the last finiteness check
        self._last_window: list[tuple[torch.Tensor, int, Any, Batch]] = []
        self.phase = "train"
        self._open_run_dir(resume_from[1] if resume_from else None)

    # == the loop ===============================================================================
    def fit(self) -> dict[str, float]:
        """Train for ``trainer.epochs`` (or until early stopping), then test; return test metrics.

        A signal stops the run at the next step boundary with an exact interrupt checkpoint; an
        exception writes the checkpoint of the last boundary first (see :meth:`save_interrupt`).
        """
        if self.finished_already is not None:
            log.info("%s", self.finished_already)
            D.shutdown_distributed()
            return self._saved_test_metrics()
        cb = self.callbacks
        try:
            with self.stop:
                for fn in cb.on_fit_start:
                    fn(self)
                while self.epoch < self.epochs and not self.early_stopping.should_stop:
                    started = time.perf_counter()
                    train = self.train_epoch()
                    self.phase = "val"
                    for fn in cb.on_validation_start:
                        fn(self)
                    val = self.evaluate(self.val_loader, "val")
                    for fn in cb.on_validation_end:
                        fn(self, val)
                    self.end_epoch(train, val, time.perf_counter() - started)
                    self.phase = "train"
                    self.check_stop()
                if self.early_stopping.should_stop:
                    log.info(
                        "early stopping: %s did not improve for %d epochs",
                        self.cfg.trainer.monitor,
                        self.early_stopping.bad_epochs,
                    )
                self.phase = "test"
                metrics = self.test() if self.cfg.trainer.test_after_fit else {}
                self.mark_finished()
                for fn in cb.on_fit_end:
                    fn(self)
            D.barrier()  # leave together: gloo aborts a process whose peer left first
            return metrics
        except BaseException as exc:
            for fn in cb.on_exception:
                fn(self, exc)
            self.save_interrupt(exc)
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
        progress = self._progress(len(loader), f"epoch {self.epoch + 1}/{self.epochs}")
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
            sync = contextlib.nullcontext() if update_now else self._no_sync()
            with sync:
                with self.precision.autocast():
                    outputs = self.task.forward(self.train_model, batch)
                    loss = self.task.compute_loss(self.criterion, outputs, batch)
                # Weigh by this micro-batch's share of the window's samples over all processes
                # (DDP averages gradients over processes): the step then follows the mean loss
                # of the window's global batch, whatever the window's length.
                share = n * self.dist.world_size / sum(sizes[first:last])
                self.precision.backward(loss * share)
            window.append((loss.detach(), n, _detach(outputs), batch))
            if update_now:
                self.optimizer_step(window, position=i + 1)
                window = []
            for fn in cb.on_train_batch_end:
                fn(self, i, loss.detach())
            report = progress.wants_loss()
            progress.update(n * self.dist.world_size, loss.item() if report else None)
            if report:
                self.check_finite()
                if self.writer is not None:
                    self.writer.add_scalar("train/loss_step", loss.item(), self.global_step)
                    self.writer.add_scalar("train/lr", self.lr, self.global_step)
            if update_now:
                self.check_stop()
        progress.close()
        self.snapshot.epoch_end()
        results = self._reduced(self.train_meter, self.train_metrics)
        for fn in cb.on_train_epoch_end:
            fn(self, results)
        return results

    def optimizer_step(self, window: list[tuple[torch.Tensor, int, Any, Batch]], position: int):
        """Unscale, clip, step, zero the gradients, step a per-batch scheduler, then count the
        window's micro-batches in the epoch's loss and metrics: all of it, or (if interrupted
        part-way) none of it as far as the checkpoint is concerned."""
        tc = self.cfg.trainer
        with self._critical("an optimizer step"):
            clipping = tc.clip_grad_norm is not None or tc.clip_grad_value is not None
            if clipping or self.callbacks.on_before_optimizer_step:
                self.precision.unscale(self.optimizer)  # callbacks see true gradients
            for fn in self.callbacks.on_before_optimizer_step:
                fn(self)
            if clipping:
                params = list(self.model.parameters())
                clip_gradients(params, tc.clip_grad_norm, tc.clip_grad_value)
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
            for fn in self.callbacks.on_after_optimizer_step:
                fn(self)
            self.snapshot.take()

    def check_stop(self) -> None:
        """At a step boundary: stop (every process at the same step) if a signal asked to."""
        name = self.stop.agreed(self.dist.enabled)
        if name is not None:
            raise RunStopped(name, at_boundary=True)

    def check_finite(self) -> None:
        """Stop with an error naming the step if a loss since the last check was not finite
        (``trainer.stop_on_nan``): before any checkpoint can be overwritten with bad weights."""
        losses, self._losses = self._losses, []
        if not self.cfg.trainer.stop_on_nan or not losses:
            return
        finite = torch.isfinite(torch.stack([x.float() for x in losses]))
        if bool(finite.all()):
            return
        first = int((~finite).nonzero()[0])
        step = self.global_step - len(losses) + first + 1
        raise NonFiniteLossError(
            f"the training loss is {float(losses[first]):.4g} at step {step} (epoch "
            f"{self.epoch + 1}); stopping before any checkpoint is overwritten "
            f"(trainer.stop_on_nan=false trains on)"
        )

    @contextlib.contextmanager
    def _critical(self, what: str) -> Iterator[None]:
        # An exception in here leaves the state half-updated: no interrupt checkpoint then.
        self._torn = what
        yield
        self._torn = None

    def evaluate(self, loader: IndexLoader, split: str) -> dict[str, float]:
        """Mean loss and metrics over ``loader``, each sample counted once across processes."""

        def each_batch(i: int, batch: Batch, outputs: torch.Tensor) -> None:
            if i == 0 and self.writer is not None:
                self.task.log_images(self.writer, split, batch, outputs, self.global_step)
            # One process can stop between batches; several agree at the next step boundary.
            if self.stop.requested and not self.dist.enabled:
                raise RunStopped(self.stop.requested, at_boundary=True)

        return evaluate_loader(
            self.task,
            self.eval_model,
            self.criterion,
            self.eval_metrics,
            loader,
            device=self.device,
            info=self.info,
            precision=self.precision,
            on_batch=each_batch,
        )

    def end_epoch(self, train: dict[str, float], val: dict[str, float], seconds: float) -> None:
        """Step the epoch scheduler, track the best, write table/curves/TensorBoard, checkpoint."""
        self.check_finite()
        row = {f"train/{k}": v for k, v in train.items()}
        row.update({f"val/{k}": v for k, v in val.items()})
        score = row.get(self.cfg.trainer.monitor, float("nan"))
        lr = self.lr
        with self._critical("the end of an epoch"):
            if self.scheduler is not None and not self.step_scheduler_per_batch:
                self.scheduler.step(score) if is_plateau(self.scheduler) else self.scheduler.step()
            improved = self.early_stopping.update(score)
            # Every rank decides alike as metrics were reduced; rank 0's word settles it anyway.
            self.early_stopping.bad_epochs = D.broadcast_object(self.early_stopping.bad_epochs)
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            self._log_epoch(row, lr, seconds, improved)
            for fn in self.callbacks.on_epoch_end:
                fn(self, row)
            state = self.checkpoint_state()  # collective: every rank takes part
            if improved:
                self.save("best", state)
            self.save("last", state)
            self.snapshot.take()

    def _log_epoch(self, row: dict[str, float], lr: float, seconds: float, improved: bool):
        shown = {"loss", self.cfg.trainer.monitor.split("/", 1)[-1]}
        log.info(
            "epoch %d/%d %s | lr %.3g | %.1fs%s",
            self.epoch,
            self.epochs,
            " ".join(f"{k} {v:.4f}" for k, v in row.items() if k.split("/")[-1] in shown),
            lr,
            seconds,
            " *best" if improved else "",
        )
        if self.dist.is_main:
            self.table.append({"epoch": self.epoch, "lr": lr, "seconds": round(seconds, 3), **row})
            self.table.plot(self.run_dir / "curves.png")
            for key, value in row.items():
                self.writer.add_scalar(key, value, self.epoch)
            self.writer.add_scalar("lr", lr, self.epoch)
            self.writer.flush()

    def test(self) -> dict[str, float]:
        """Evaluate the best checkpoint (or the current weights) on the test split."""
        best = self.run_dir / checkpoint_name(self.cfg.model.name, "best")
        D.barrier()  # rank 0 has finished writing it
        if best.exists():
            load_model_weights(self.model, load_checkpoint(best)["model"], str(best))
        for fn in self.callbacks.on_test_start:
            fn(self)
        metrics = self.evaluate(self.test_loader, "test")
        for fn in self.callbacks.on_test_end:
            fn(self, metrics)
        log.info(
            "test (%s): %s",
            "best checkpoint" if best.exists() else "final weights",
            " ".join(f"{k} {v:.4f}" for k, v in metrics.items()),
        )
        if self.dist.is_main:
            atomic_write_text(self.run_dir / "test_metrics.json", json.dumps(metrics, indent=2))
            for key, value in metrics.items():
                self.writer.add_scalar(f"test/{key}", value, self.epoch)
        return metrics

    def mark_finished(self) -> None:
        """Record in the last checkpoint that the run is complete, so that ``resume`` of it
        changes nothing; forget a torchrun restart marker."""
        if self.dist.is_main and not self.fast_dev_run:
            path = self.run_dir / checkpoint_name(self.cfg.model.name, "last")
            if path.exists():
                state = load_checkpoint(path)
                state.pop("digest", None)
                save_checkpoint(path, {**state, "finished": True})
            forget_restart_marker(self.cfg.experiment.output_dir)

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
            raise _NotExact("the task drew from Python's or NumPy's generator in this epoch")
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
            "best_score": self.early_stopping.best,
            "early_stopping": self.early_stopping.state_dict(),
            "rng": D.gather_objects(rng),
            "callbacks": self.callbacks.state_dict(),
            "finished": False,
            "config": config_to_dict(self.cfg),
        }

    def save(self, kind: str, state: dict[str, Any]) -> Path | None:
        """Write ``<Model>_<kind>_ckpt.pth`` on rank 0 (not in fast_dev_run)."""
        if not self.dist.is_main or self.fast_dev_run:
            return None
        path = self.run_dir / checkpoint_name(self.cfg.model.name, kind)
        save_checkpoint(path, state)
        return path

    def save_interrupt(self, exc: BaseException) -> None:
        """Write the interrupt checkpoint where the state allows an exact resume, and say so.

        A signal stops at a step boundary (exact). After another exception on one process, the
        state of the last boundary is saved (its random state and buffers were kept). No
        checkpoint is written when the stop tore an optimizer step or an epoch's end, during
        the final test (training is complete), after a non-finite loss, or when one process of
        several failed alone: ``resume`` then continues from the newest checkpoint on disk.
        """
        what = exc.signal_name if isinstance(exc, RunStopped) else type(exc).__name__
        if isinstance(exc, KeyboardInterrupt) and not isinstance(exc, RunStopped):
            what = "SIGINT"
        agreed = isinstance(exc, RunStopped) and exc.at_boundary
        where = f"at epoch {self.epoch + 1}, step {self.global_step}"
        if getattr(self, "run_dir", None) is None:
            return
        reason = None
        if not self.cfg.trainer.save_on_exception or self.fast_dev_run:
            reason = "interrupt checkpoints are off"
        elif isinstance(exc, NonFiniteLossError):
            reason = "the weights are not to be trusted"
        elif isinstance(exc, UsageError):
            reason = "the configuration or input is wrong: fix it, then resume"
        elif self.phase == "test":
            reason = "training was complete (the final test runs again on resume)"
        elif self._torn is not None:
            reason = f"it stopped part-way through {self._torn}"
        elif self.dist.enabled and not agreed:
            reason = "one process of several failed on its own"
        if reason is not None:
            if self.dist.is_main:
                log.error(
                    "run stopped by %s %s; no interrupt checkpoint written (%s); resume "
                    "continues from the newest checkpoint: dltemplate resume %s",
                    what,
                    where,
                    reason,
                    self.run_dir,
                )
            return
        try:
            state = self.checkpoint_state(at_last_boundary=True)
            path = self.save("interrupt", state)
        except _NotExact as why:
            log.error(
                "run stopped by %s %s; no interrupt checkpoint written (%s); resume continues "
                "from the newest checkpoint: dltemplate resume %s",
                what,
                where,
                why,
                self.run_dir,
            )
            return
        except Exception as save_exc:  # the original error matters more than this one
            log.error("run stopped by %s; saving a checkpoint failed too: %s", what, save_exc)
            return
        if path is not None:
            log.error(
                "run stopped by %s %s; checkpoint saved to %s; continue with: dltemplate resume %s",
                what,
                where,
                path,
                self.run_dir,
            )

    def _train_state(self) -> list[torch.Tensor]:
        return self.train_meter.state() + [t for m in self.train_metrics.metrics for t in m.state()]

    def _reduced(self, meter: AverageMeter, metrics: MetricCollection) -> dict[str, float]:
        """The epoch's training results over all processes; the local sums stay as they were,
        so that a checkpoint taken later (during validation) holds this process's own share."""
        local = [t.clone() for t in self._train_state()]
        metrics.sync(D.all_reduce_sum)
        D.all_reduce_sum(meter.state())
        results = {"loss": meter.avg, **metrics.compute()}
        for mine, kept in zip(self._train_state(), local):
            mine.copy_(kept)
        return results

    def _restarted_run_dir(self) -> Path | None:
        """The run directory to start over in, if any: one given to resume that holds no
        checkpoint yet (killed early), or under ``torchrun --max-restarts`` the one a restarted
        worker was writing (resumed from its newest checkpoint if it has one)."""
        resume = self.cfg.trainer.resume
        if resume:
            if Path(resume).is_dir() and not any(Path(resume).glob("*_ckpt.pth")):
                self.cfg.trainer.resume = None  # stopped before its first checkpoint
                return Path(resume)
            return None
        found = restarted_run_dir(self.cfg.experiment.output_dir) if self.dist.is_main else None
        found = D.broadcast_object(str(found) if found else None)
        if found is None:
            return None
        if any(Path(found).glob("*_ckpt.pth")):
            self.cfg.trainer.resume = found
            return None
        return Path(found)

    def _resume_checkpoint(self) -> tuple[dict[str, Any], Path]:
        path = Path(self.cfg.trainer.resume)
        if path.is_dir():
            if self.dist.is_main:
                remove_stale_temp_files(path)  # a killed writer's leftovers
            ckpt_path, skipped = newest_intact_checkpoint(path)
            for bad, why in skipped:
                log.warning("skipping damaged checkpoint %s (%s)", bad, why)
            if skipped:
                log.warning("resuming from the newest intact checkpoint: %s", ckpt_path)
        else:
            ckpt_path = path
        state = load_checkpoint(ckpt_path)
        load_model_weights(self.model, state["model"], str(ckpt_path))  # fails before any write
        return state, ckpt_path

    def _is_finished(self, state: dict[str, Any]) -> bool:
        """Whether the checkpoint's run is complete for this config (``resume`` of it is a
        no-op); a larger ``trainer.epochs`` makes it unfinished again (train longer)."""
        stopped_early = EarlyStopping(
            self.cfg.trainer.monitor_mode, self.cfg.trainer.early_stopping_patience
        )
        stopped_early.load_state_dict(state["early_stopping"])
        done = state["epoch"] >= self.epochs or stopped_early.should_stop
        if not (state.get("finished") and done):
            return False
        self.run_dir = Path(self.cfg.trainer.resume)
        if self.run_dir.is_file():
            self.run_dir = self.run_dir.parent
        self.finished_already = (
            f"run {self.run_dir} is finished (epoch {state['epoch']}, step "
            f"{state['global_step']}"
            + "): nothing to do; "
            + (
                "early stopping ended it (a larger trainer.early_stopping_patience continues it)"
                if stopped_early.should_stop
                else "resume with a larger trainer.epochs to train longer"
            )
        )
        return True

    def _saved_test_metrics(self) -> dict[str, float]:
        path = self.run_dir / "test_metrics.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def _restore(self, state: dict[str, Any], path: Path) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        saved = state["scheduler"]
        if (saved is None) != (self.scheduler is None):
            raise CheckpointError(f"{path}: the checkpoint's scheduler does not match the config")
        if self.scheduler is not None:
            if is_stretched_state(saved):
                self.scheduler = StretchedSchedule.from_state_dict(self.optimizer, saved)
            else:
                self.scheduler.load_state_dict(saved)
        self.precision.scaler.load_state_dict(state["scaler"])
        self.epoch, self.global_step = state["epoch"], state["global_step"]
        self.batch_in_epoch = state["batch_in_epoch"]
        self.early_stopping.load_state_dict(state["early_stopping"])
        progress = state["train_progress"]
        if progress and isinstance(progress[0], torch.Tensor):  # written by an older version
            progress = [progress]
        if len(progress) == self.dist.world_size:
            for mine, kept in zip(self._train_state(), progress[self.dist.rank]):
                mine.copy_(kept)
        self._train_longer(state)
        for name in self.callbacks.load_state_dict(state.get("callbacks", [])):
            log.warning("callback %s has no saved state in %s: it starts afresh", name, path)
        rng = state["rng"]
        if len(rng) == self.dist.world_size:
            set_rng_state(rng[self.dist.rank])
        else:  # another number of processes: the stream cannot continue exactly anyway
            log.warning(
                "%s was written by %d process(es), this run has %d: random streams start afresh",
                path,
                len(rng),
                self.dist.world_size,
            )

    def _train_longer(self, state: dict[str, Any]) -> None:
        """A resume asking for more epochs stretches what was left of the schedule over the new
        length (see :mod:`dltemplate.optim.stretch`): no jump, no stepping past its end."""
        old_total = state.get("schedule_total")
        if old_total is None:  # an older checkpoint: recompute from its config
            saved = state["config"]["trainer"]
            old_total = saved["epochs"] * (
                self.steps_per_epoch if self.step_scheduler_per_batch else 1
            )
        if self.scheduler is None or self.schedule_total <= old_total:
            return
        done = self.global_step if self.step_scheduler_per_batch else self.epoch
        self.scheduler = stretch_scheduler(
            self.scheduler, self.optimizer, done=done, old_total=old_total,
            new_total=self.schedule_total,
        )  # fmt: skip
        log.info(
            "training longer: the rest of the learning-rate schedule (scheduler steps %d-%d) is "
            "stretched over steps %d-%d",
            done,
            old_total,
            done,
            self.schedule_total,
        )

    # == set-up helpers =========================================================================
    def _check_monitor(self) -> None:
        names = ["loss", *self.eval_metrics.compute()]
        valid = [f"{split}/{n}" for split in ("val", "train") for n in names]
        if self.cfg.trainer.monitor not in valid:
            raise ConfigError(
                f"trainer.monitor='{self.cfg.trainer.monitor}' is not a logged metric"
                f"{did_you_mean(self.cfg.trainer.monitor, valid)}; choose from {', '.join(valid)}"
            )

    def _make_loaders(self) -> tuple[IndexLoader, IndexLoader, IndexLoader]:
        tc, d, seed = self.cfg.trainer, self.cfg.data, self.cfg.experiment.seed
        if tc.grad_accum_steps < 1:
            raise ConfigError(f"trainer.grad_accum_steps={tc.grad_accum_steps}: must be >= 1")
        eval_bs = d.eval_batch_size or 2 * d.batch_size
        where = {"rank": self.dist.rank, "world_size": self.dist.world_size}
        train_split: TensorSplit = self.data.train
        val_split = self.data.val
        if len(train_split) == 0:
            raise ConfigError("data: the training split is empty (check the sample rates)")
        train = IndexLoader(train_split, d.batch_size, training=True, seed=seed, **where)
        limits = [tc.limit_train_batches, tc.limit_val_batches, tc.limit_test_batches]
        if self.fast_dev_run:
            limits = [tc.fast_dev_run] * 3
        if tc.overfit_batches > 0:  # the same few batches, in order, to train and to validate
            n = min(len(train_split), tc.overfit_batches * d.batch_size * self.dist.world_size)
            train = IndexLoader(train_split, d.batch_size, training=True, shuffle=False, **where)
            limits[0] = tc.overfit_batches
            val_split = train_split.subset(torch.arange(n))
        val = IndexLoader(val_split, eval_bs, training=False, **where)
        test = IndexLoader(self.data.test, eval_bs, training=False, **where)
        keys = [
            "trainer.limit_train_batches",
            "trainer.limit_val_batches",
            "trainer.limit_test_batches",
        ]
        for loader, limit, key in zip((train, val, test), limits, keys):
            loader.limit_batches = limit_batches(limit, loader.full_length(), key)
        return train, val, test

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

    def _open_run_dir(self, resumed_from: Path | None) -> None:
        """Create (rank 0) or reopen the run directory; set up logging, table and TensorBoard."""
        self.writer = None
        output_dir = self.cfg.experiment.output_dir
        if resumed_from is not None:
            run_dir = resumed_from.parent
        elif self._restart_dir is not None:  # torchrun restarted us before any checkpoint
            run_dir = self._restart_dir
        else:
            made = new_run_dir(output_dir) if self.dist.is_main else None
            run_dir = Path(D.broadcast_object(str(made) if made else None))
        self.run_dir = run_dir
        if not self.dist.is_main:
            return
        remove_stale_temp_files(run_dir)  # a killed writer's leftovers
        attach_log_file(run_dir / "train.log")
        from torch.utils.tensorboard import SummaryWriter  # slow import: only where needed

        self.table = MetricsTable(run_dir / "metrics.csv")
        if resumed_from is None:
            save_config(run_dir, self.cfg.experiment.name, config_to_dict(self.cfg))
            remember_run_dir(output_dir, run_dir)
            if self._restart_dir is None:
                log.info("run %s started: %s", run_dir.name, run_dir)
            else:
                self.table.truncate(1)
                log.info("run %s had no checkpoint yet: started over in %s", run_dir.name, run_dir)
        else:
            self.table.truncate(self.epoch + 1)  # drop rows of epochs that will run again
            log.info(
                "run %s resumed from %s at epoch %d, step %d",
                run_dir.name,
                resumed_from,
                self.epoch + 1,
                self.global_step,
            )
            self._update_saved_config(run_dir)
        log.info("command: %s", " ".join(sys.argv))
        n_params = sum(p.numel() for p in self.model.parameters())
        log.info(
            "device %s x %d process(es); model %s (%d parameters); train %d, val %d, "
            "test %d samples",
            self.device,
            self.dist.world_size,
            self.cfg.model.name,
            n_params,
            len(self.data.train),
            len(self.data.val),
            len(self.data.test),
        )
        for note in self.data.notes:
            log.info("data: %s", note)
        groups = self.data.group_record()
        if groups is not None and resumed_from is None:
            (run_dir / "split.json").write_text(json.dumps(groups, indent=1))
        # purge_step drops TensorBoard events past the resumed step, so curves do not fold back.
        self.writer = SummaryWriter(str(run_dir / "summary"), purge_step=self.global_step or None)

    def _update_saved_config(self, run_dir: Path) -> None:
        """A resume that changes the config (train longer) rewrites the saved config, so that
        the run directory alone says how the run goes on."""
        path = find_config(run_dir)
        saved = json.loads(path.read_text())
        meta = saved.pop("_meta", {})
        now = config_to_dict(self.cfg)
        now["trainer"]["resume"] = saved.get("trainer", {}).get("resume")
        changed = []
        for section, values in now.items():
            if not isinstance(values, dict):  # a list section (callbacks): compared whole
                if saved.get(section, []) != values:
                    changed.append(f"{section}: {saved.get(section)!r} -> {values!r}")
                continue
            changed += [
                f"{section}.{key}: {saved.get(section, {}).get(key)!r} -> {value!r}"
                for key, value in values.items()
                if saved.get(section, {}).get(key) != value
            ]
        if changed:
            log.info("config changed on resume: %s", "; ".join(changed))
            atomic_write_text(path, json.dumps({**now, "_meta": meta}, indent=2))

    def _progress(self, total: int, desc: str) -> EpochProgress:
        tc = self.cfg.trainer
        return EpochProgress(
            total,
            desc,
            bar=use_progress_bar(tc.progress_bar),
            every=tc.log_every_n_steps,
            enabled=self.dist.is_main,
            initial=self.batch_in_epoch,
        )

    @property
    def step_loss(self) -> torch.Tensor:
        """The mean training loss of the last optimizer step's samples on this process (a 0-d
        tensor: ``float()`` of it waits for the GPU, so read it every few steps, not every one)."""
        window = self._last_window
        total = sum(n for _, n, _, _ in window)
        return sum(loss.float() * n for loss, n, _, _ in window) / total

    def request_stop(self, reason: str) -> None:
        """Stop at the next step boundary with an exact interrupt checkpoint, as SIGTERM does;
        ``reason`` is logged (e.g. ``max_time``)."""
        self.stop.request(reason)

    @property
    def unwrapped_model(self) -> nn.Module:
        """The bare model, without DDP / DataParallel / compile wrappers."""
        return unwrap_model(self.model)

    @property
    def lr(self) -> float:
        """The current learning rate (first parameter group)."""
        return float(self.optimizer.param_groups[0]["lr"])

    def close(self) -> None:
        """Finish the curves picture, close TensorBoard and leave the process group."""
        if getattr(self, "table", None) is not None:
            self.table.wait()
        if getattr(self, "writer", None) is not None:
            self.writer.close()
            self.writer = None
        # Free the DDP wrapper while the process group lives: freed after it, its last hold on
        # gloo can deadlock at exit (the GIL against gloo's worker thread).
        if isinstance(getattr(self, "train_model", None), DistributedDataParallel):
            self.train_model = self.eval_model
            gc.collect()
        D.shutdown_distributed()
