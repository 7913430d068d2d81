"""Building a run from its config, separate from running it.

:func:`build_components` makes what needs no data (model, loss, metrics, precision): it is
where a wrong config fails, before anything is read or written, and what ``eval`` reuses.
:func:`build_loaders` and :func:`build_schedule` make the training parts once the data is there.
Each is a plain function of the config, testable on its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dltemplate.config import Config
from dltemplate.data.base import DataInfo, DataSplits
from dltemplate.data.loader import IndexLoader, ReadOptions
from dltemplate.data.transforms import build_transforms
from dltemplate.engine.evaluation import Evaluation
from dltemplate.engine.precision import Precision
from dltemplate.engine.speed import apply_channels_last, resolve_channels_last
from dltemplate.engine.sync_batchnorm import convert_sync_batchnorm
from dltemplate.engine.task import Task
from dltemplate.errors import ConfigError, did_you_mean, short_repr
from dltemplate.metrics.base import MetricCollection
from dltemplate.optim import build_optimizer, build_scheduler, scheduler_interval


@dataclass
class Components:
    """What a config builds without data: the model, what scores it, and how it evaluates."""

    task: Task
    info: DataInfo
    model: nn.Module
    criterion: nn.Module
    precision: Precision
    evaluation: Evaluation  # owns the evaluation metrics

    def train_metrics(self) -> MetricCollection:
        """A fresh metric state for training (kept apart from evaluation's)."""
        return self.task.build_metrics(self.info)


def build_components(
    cfg: Config, task: Task, device: torch.device, sync_batchnorm: bool = False
) -> Components:
    """Model (on ``device``), loss, precision and the evaluation, as ``cfg`` says.

    ``sync_batchnorm``: BatchNorm layers become :class:`SyncBatchNorm`-like layers (several
    processes), before any optimizer sees the parameters.
    """
    info = task.data_info()
    with config_section("model", cfg.model.name, cfg.model.args):
        model = task.build_model(info).to(device)
    if resolve_channels_last(cfg.trainer.channels_last, model, device):
        model = apply_channels_last(model)
    task.check_model(model, info, device)  # its outputs fit the task, before any data is read
    if sync_batchnorm:
        model = convert_sync_batchnorm(model, device)
    with config_section("loss", cfg.loss.name, cfg.loss.args):
        criterion = task.build_loss().to(device)
    precision = Precision(cfg.trainer.precision, device)
    evaluation = Evaluation(task, criterion, task.build_metrics(info), info, device, precision)
    check_monitor(cfg.trainer.monitor, evaluation.metrics)
    return Components(task, info, model, criterion, precision, evaluation)


@contextmanager
def config_section(section: str, name: str, args: dict[str, Any]) -> Iterator[None]:
    """Report an error raised while building ``section``'s component as a ConfigError naming
    the section, its name and its args (``model.name=Vanilla model.args={...}: why``): a
    factory's own TypeError/ValueError/RuntimeError means its config is wrong."""
    try:
        yield
    except torch.OutOfMemoryError:
        raise  # the device is too small, the config may be right: not exit status 2
    except (TypeError, ValueError, RuntimeError) as exc:
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        said = lines[0] if len(lines[0]) <= 300 else lines[0][:297] + "..."  # never in full
        raise ConfigError(
            f"{section}.name={name} {section}.args={short_repr(args)}: {said}"
        ) from exc


def check_monitor(monitor: str, metrics: MetricCollection) -> None:
    """``trainer.monitor`` must name a logged metric (``val/`` or ``train/``)."""
    names = ["loss", *metrics.compute()]
    valid = [f"{split}/{n}" for split in ("val", "train") for n in names]
    if monitor not in valid:
        raise ConfigError(
            f"trainer.monitor='{monitor}' is not a logged metric"
            f"{did_you_mean(monitor, valid)}; choose from {', '.join(valid)}"
        )


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


def read_options(cfg: Config, training: bool) -> ReadOptions:
    """How loaders read map-style datasets: ``data.num_workers`` ... and the training's or the
    evaluation's per-sample transforms."""
    d = cfg.data
    key = "data.train_transform" if training else "data.eval_transform"
    transforms = build_transforms(d.train_transform if training else d.eval_transform, key)
    pin = torch.cuda.is_available() if d.pin_memory is None else d.pin_memory
    return ReadOptions(
        d.num_workers, pin, d.persistent_workers, d.prefetch_factor, transforms, d.timeout
    )


def build_loaders(
    cfg: Config, data: DataSplits, rank: int = 0, world_size: int = 1
) -> tuple[IndexLoader, IndexLoader, IndexLoader]:
    """Train, validation and test loaders for this process, with the ``trainer.limit_*``,
    ``fast_dev_run`` and ``overfit_batches`` settings applied."""
    tc, d, seed = cfg.trainer, cfg.data, cfg.experiment.seed
    if tc.grad_accum_steps < 1:
        raise ConfigError(f"trainer.grad_accum_steps={tc.grad_accum_steps}: must be >= 1")
    eval_bs = d.eval_batch_size or 2 * d.batch_size
    where = {"rank": rank, "world_size": world_size}
    train_split, val_split = data.train, data.val
    if len(train_split) == 0:
        raise ConfigError("data: the training split is empty (check the sample rates)")
    if len(val_split) == 0 and d.val_fraction > 0 and tc.overfit_batches == 0:
        raise ConfigError(
            f"data: the validation split is empty (train {len(train_split)}, val 0, test "
            f"{len(data.test)} samples): data.val_fraction={d.val_fraction} leaves no sample (or "
            "group) for it; raise it, or set it to 0 and monitor a train/ metric"
        )
    fit, check = read_options(cfg, True), read_options(cfg, False)
    train = IndexLoader(train_split, d.batch_size, training=True, seed=seed, read=fit, **where)
    limits = [tc.limit_train_batches, tc.limit_val_batches, tc.limit_test_batches]
    if tc.fast_dev_run > 0:
        limits = [tc.fast_dev_run] * 3
    if tc.overfit_batches > 0:  # the same few batches, in order, to train and to validate
        n = min(len(train_split), tc.overfit_batches * d.batch_size * world_size)
        train = IndexLoader(
            train_split, d.batch_size, training=True, shuffle=False, seed=seed, read=fit, **where
        )
        limits[0] = tc.overfit_batches
        val_split = train_split.subset(torch.arange(n))
    val = IndexLoader(val_split, eval_bs, training=False, seed=seed, read=check, **where)
    test = IndexLoader(data.test, eval_bs, training=False, seed=seed, read=check, **where)
    keys = [
        "trainer.limit_train_batches",
        "trainer.limit_val_batches",
        "trainer.limit_test_batches",
    ]
    for loader, limit, key in zip((train, val, test), limits, keys):
        loader.limit_batches = limit_batches(limit, loader.full_length(), key)
    return train, val, test


@dataclass
class Schedule:
    """The optimizer, its scheduler and the run's length in optimizer and scheduler steps."""

    optimizer: torch.optim.Optimizer
    scheduler: Any  # an LRScheduler, ReduceLROnPlateau, or None
    steps_per_epoch: int  # optimizer steps
    per_step: bool  # the scheduler steps with the optimizer (else once an epoch)
    total: int  # scheduler steps over the whole run: the schedule's length


def build_schedule(cfg: Config, model: nn.Module, epochs: int, batches_per_epoch: int) -> Schedule:
    """The optimizer over ``model``'s parameters and a scheduler sized for ``epochs``."""
    with config_section("optimizer", cfg.optimizer.name, cfg.optimizer.args):
        device = next(model.parameters(), torch.empty(0)).device
        optimizer = build_optimizer(cfg.optimizer, model.parameters(), device)
    steps_per_epoch = -(-batches_per_epoch // cfg.trainer.grad_accum_steps)
    per_step = scheduler_interval(cfg.scheduler) == "step"
    with config_section("scheduler", cfg.scheduler.name, cfg.scheduler.args):
        scheduler = build_scheduler(
            cfg.scheduler,
            optimizer,
            epochs=epochs,
            steps_per_epoch=steps_per_epoch,
            monitor_mode=cfg.trainer.monitor_mode,
        )
    total = epochs * (steps_per_epoch if per_step else 1)
    return Schedule(optimizer, scheduler, steps_per_epoch, per_step, total)
