"""TrainerBase: the train / validate / test loop, readable top to bottom.

Everything task-specific goes through the :class:`~dltemplate.engine.task.Task` hooks; every
optional behaviour (precision, clipping, early stopping, accumulation, checkpoints) is a small
named piece that the loop calls. Read :meth:`TrainerBase.fit` first.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dltemplate.config import Config, config_to_dict
from dltemplate.data.base import Batch, IndexLoader, TensorSplit
from dltemplate.engine import distributed as D
from dltemplate.engine.checkpoint import (
    checkpoint_name,
    load_checkpoint,
    load_model_weights,
    newest_checkpoint,
    save_checkpoint,
    unwrap_model,
)
from dltemplate.engine.device import select_device
from dltemplate.engine.early_stopping import EarlyStopping
from dltemplate.engine.evaluator import evaluate_loader
from dltemplate.engine.meters import AverageMeter
from dltemplate.engine.precision import Precision
from dltemplate.engine.rundir import MetricsTable, new_run_dir, save_config
from dltemplate.engine.runlog import (
    EpochProgress,
    attach_log_file,
    setup_logging,
    use_progress_bar,
)
from dltemplate.engine.seeding import rng_state, seed_everything, set_rng_state
from dltemplate.engine.task import Task, import_plugins, make_task
from dltemplate.errors import CheckpointError, ConfigError, did_you_mean
from dltemplate.optim import build_optimizer, build_scheduler, is_plateau, scheduler_interval

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

        # Everything that can be wrong with the config or the data fails here, before any write.
        self.info = self.task.data_info()
        self.model = self.task.build_model(self.info).to(self.device)
        self.criterion = self.task.build_loss().to(self.device)
        self.metrics = self.task.build_metrics(self.info)
        self._check_monitor()
        self.precision = Precision(tc.precision, self.device)
        resume_from = self._resume_checkpoint() if tc.resume else None
        # Rank 0 loads first, so that files are downloaded and decode caches written once.
        if not self.dist.is_main:
            D.barrier()
        self.data = self.task.load_data()
        if self.dist.is_main and self.dist.enabled:
            D.barrier()
        self.train_loader, self.val_loader, self.test_loader = self._make_loaders()
        self.optimizer = build_optimizer(cfg.optimizer, self.model.parameters())
        self.steps_per_epoch = math.ceil(len(self.train_loader) / tc.grad_accum_steps)
        self.scheduler = build_scheduler(
            cfg.scheduler,
            self.optimizer,
            epochs=self.epochs,
            steps_per_epoch=self.steps_per_epoch,
            monitor_mode=tc.monitor_mode,
        )
        self.step_scheduler_per_batch = scheduler_interval(cfg.scheduler) == "step"
        self.early_stopping = EarlyStopping(
            tc.monitor_mode, tc.early_stopping_patience, tc.early_stopping_min_delta
        )
        self.epoch, self.global_step, self.batch_in_epoch = 0, 0, 0
        self.train_meter = AverageMeter()
        if resume_from is not None:
            self._restore(*resume_from)
        self.train_model, self.eval_model = self._wrap_model(dp_ids)
        self._open_run_dir(resume_from[1] if resume_from else None)

    # == the loop ===============================================================================
    def fit(self) -> dict[str, float]:
        """Train for ``trainer.epochs`` (or until early stopping), then test; return test metrics.

        Whatever stops the run (an exception, Ctrl-C) first writes the interrupt checkpoint.
        """
        try:
            while self.epoch < self.epochs and not self.early_stopping.should_stop:
                started = time.perf_counter()
                train = self.train_epoch()
                val = self.evaluate(self.val_loader, "val")
                self.end_epoch(train, val, time.perf_counter() - started)
            if self.early_stopping.should_stop:
                log.info(
                    "early stopping: %s did not improve for %d epochs",
                    self.cfg.trainer.monitor,
                    self.early_stopping.bad_epochs,
                )
            metrics = self.test() if self.cfg.trainer.test_after_fit else {}
            D.barrier()  # leave together: gloo aborts a process whose peer left first
            return metrics
        except BaseException as exc:
            self.save_interrupt_checkpoint(exc)
            raise
        finally:
            self.close()

    def train_epoch(self) -> dict[str, float]:
        """One pass over the training data; returns the epoch's mean loss and metrics."""
        tc = self.cfg.trainer
        self.train_model.train()
        loader = self.train_loader
        loader.set_epoch(self.epoch)
        loader.skip_batches = self.batch_in_epoch  # resuming part-way through this epoch
        if self.batch_in_epoch == 0:
            self.train_meter.reset()
            self.metrics.reset()
        progress = self._progress(len(loader), f"epoch {self.epoch + 1}/{self.epochs}")
        for i, batch in enumerate(loader, start=loader.skip_batches):
            batch = self.task.prepare_batch(batch, self.device, self.info)
            if self.cfg.data.augment:
                batch = self.task.augment(batch, self.info)
            n = len(batch.targets)
            update_now = (i + 1) % tc.grad_accum_steps == 0 or i + 1 == len(loader)
            # Skip DDP's gradient all-reduce on micro-batches that only accumulate.
            sync = contextlib.nullcontext() if update_now else self._no_sync()
            with sync:
                with self.precision.autocast():
                    outputs = self.task.forward(self.train_model, batch)
                    loss = self.task.compute_loss(self.criterion, outputs, batch)
                # Weigh by this process's share of the global batch: DDP averages gradients
                # over processes, so the sum over ranks is the mean over the global batch.
                share = n * self.dist.world_size / batch.global_size
                self.precision.backward(loss * share / tc.grad_accum_steps)
            if update_now:
                self.optimizer_step()
                self.batch_in_epoch = i + 1
            self.train_meter.update(loss.detach(), n)
            self.task.update_metrics(self.metrics, _detach(outputs), batch)
            report = progress.wants_loss()
            progress.update(n * self.dist.world_size, loss.item() if report else None)
            if report and self.writer is not None:
                self.writer.add_scalar("train/loss_step", loss.item(), self.global_step)
                self.writer.add_scalar("train/lr", self.lr, self.global_step)
        progress.close()
        self.metrics.sync(D.all_reduce_sum)
        D.all_reduce_sum(self.train_meter.state())
        return {"loss": self.train_meter.avg, **self.metrics.compute()}

    def optimizer_step(self) -> None:
        """Unscale, clip, step, zero the gradients, and step a per-batch scheduler."""
        tc = self.cfg.trainer
        if tc.clip_grad_norm is not None or tc.clip_grad_value is not None:
            self.precision.unscale(self.optimizer)
            clip_gradients(list(self.model.parameters()), tc.clip_grad_norm, tc.clip_grad_value)
        self.precision.step(self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        if self.scheduler is not None and self.step_scheduler_per_batch:
            self.scheduler.step()

    def evaluate(self, loader: IndexLoader, split: str) -> dict[str, float]:
        """Mean loss and metrics over ``loader``, each sample counted once across processes."""

        def pictures(i: int, batch: Batch, outputs: torch.Tensor) -> None:
            if i == 0 and self.writer is not None:
                self.task.log_images(self.writer, split, batch, outputs, self.global_step)

        return evaluate_loader(
            self.task,
            self.eval_model,
            self.criterion,
            self.metrics,
            loader,
            device=self.device,
            info=self.info,
            precision=self.precision,
            on_batch=pictures,
        )

    def end_epoch(self, train: dict[str, float], val: dict[str, float], seconds: float) -> None:
        """Step the epoch scheduler, track the best, write table/curves/TensorBoard, checkpoint."""
        row = {f"train/{k}": v for k, v in train.items()}
        row.update({f"val/{k}": v for k, v in val.items()})
        score = row.get(self.cfg.trainer.monitor, float("nan"))
        lr = self.lr
        if self.scheduler is not None and not self.step_scheduler_per_batch:
            self.scheduler.step(score) if is_plateau(self.scheduler) else self.scheduler.step()
        improved = self.early_stopping.update(score)
        # Every rank decides alike because metrics were reduced; rank 0's word settles it anyway.
        self.early_stopping.bad_epochs = D.broadcast_object(self.early_stopping.bad_epochs)
        self.epoch, self.batch_in_epoch = self.epoch + 1, 0
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
        state = self.checkpoint_state()  # collective: every rank takes part
        if improved:
            self.save("best", state)
        self.save("last", state)

    def test(self) -> dict[str, float]:
        """Evaluate the best checkpoint (or the current weights) on the test split."""
        best = self.run_dir / checkpoint_name(self.cfg.model.name, "best")
        D.barrier()  # rank 0 has finished writing it
        if best.exists():
            load_model_weights(self.model, load_checkpoint(best)["model"], str(best))
        metrics = self.evaluate(self.test_loader, "test")
        log.info(
            "test (%s): %s",
            "best checkpoint" if best.exists() else "final weights",
            " ".join(f"{k} {v:.4f}" for k, v in metrics.items()),
        )
        if self.dist.is_main:
            (self.run_dir / "test_metrics.json").write_text(json.dumps(metrics, indent=2))
            for key, value in metrics.items():
                self.writer.add_scalar(f"test/{key}", value, self.epoch)
        return metrics

    # == checkpoints ============================================================================
    def checkpoint_state(self, collective: bool = True) -> dict[str, Any]:
        """Everything needed to continue the run exactly (tensors and plain types only)."""
        rng = D.gather_objects(rng_state()) if collective else [rng_state()]
        return {
            "model_name": self.cfg.model.name,
            "model": unwrap_model(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.precision.scaler.state_dict(),
            "epoch": self.epoch,
            "global_step": self.global_step,
            "batch_in_epoch": self.batch_in_epoch,
            "train_progress": [t.cpu() for t in self.train_meter.state()]
            + [t.cpu() for m in self.metrics.metrics for t in m.state()],
            "best_score": self.early_stopping.best,
            "early_stopping": self.early_stopping.state_dict(),
            "rng": rng,
            "config": config_to_dict(self.cfg),
        }

    def save(self, kind: str, state: dict[str, Any]) -> Path | None:
        """Write ``<Model>_<kind>_ckpt.pth`` on rank 0 (not in fast_dev_run)."""
        if not self.dist.is_main or self.fast_dev_run:
            return None
        path = self.run_dir / checkpoint_name(self.cfg.model.name, kind)
        save_checkpoint(path, state)
        return path

    def save_interrupt_checkpoint(self, exc: BaseException) -> None:
        """Write the interrupt checkpoint (if enabled) and say where, before the run stops."""
        what = "Ctrl-C" if isinstance(exc, KeyboardInterrupt) else type(exc).__name__
        if not self.cfg.trainer.save_on_exception or not self.dist.is_main:
            return
        try:
            path = self.save("interrupt", self.checkpoint_state(collective=False))
        except Exception as save_exc:  # the original error matters more than this one
            log.error("run stopped by %s; saving a checkpoint failed too: %s", what, save_exc)
            return
        if path is not None:
            log.error(
                "run stopped by %s at epoch %d, step %d; checkpoint saved to %s",
                what,
                self.epoch + 1,
                self.global_step,
                path,
            )

    def _resume_checkpoint(self) -> tuple[dict[str, Any], Path]:
        path = Path(self.cfg.trainer.resume)
        ckpt_path = newest_checkpoint(path) if path.is_dir() else path
        state = load_checkpoint(ckpt_path)
        load_model_weights(self.model, state["model"], str(ckpt_path))  # fails before any write
        return state, ckpt_path

    def _restore(self, state: dict[str, Any], path: Path) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if (state["scheduler"] is None) != (self.scheduler is None):
            raise CheckpointError(f"{path}: the checkpoint's scheduler does not match the config")
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.precision.scaler.load_state_dict(state["scaler"])
        self.epoch, self.global_step = state["epoch"], state["global_step"]
        self.batch_in_epoch = state["batch_in_epoch"]
        self.early_stopping.load_state_dict(state["early_stopping"])
        own = self.train_meter.state() + [t for m in self.metrics.metrics for t in m.state()]
        for mine, saved in zip(own, state["train_progress"]):
            mine.copy_(saved)
        rng = state["rng"]
        set_rng_state(rng[self.dist.rank] if self.dist.rank < len(rng) else rng[0])

    # == set-up helpers =========================================================================
    def _check_monitor(self) -> None:
        names = ["loss", *self.metrics.compute()]
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
        if resumed_from is not None:
            run_dir = resumed_from.parent
        else:
            made = new_run_dir(self.cfg.experiment.output_dir) if self.dist.is_main else None
            run_dir = Path(D.broadcast_object(str(made) if made else None))
        self.run_dir = run_dir
        if not self.dist.is_main:
            return
        attach_log_file(run_dir / "train.log")
        from torch.utils.tensorboard import SummaryWriter  # slow import: only where needed

        self.table = MetricsTable(run_dir / "metrics.csv")
        if resumed_from is None:
            save_config(run_dir, self.cfg.experiment.name, config_to_dict(self.cfg))
            log.info("run %s started: %s", run_dir.name, run_dir)
        else:
            self.table.truncate(self.epoch + 1)  # drop rows of epochs that will run again
            log.info(
                "run %s resumed from %s at epoch %d, step %d",
                run_dir.name,
                resumed_from,
                self.epoch + 1,
                self.global_step,
            )
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
        D.shutdown_distributed()
