"""Optimizers and learning-rate schedulers, registered by name.

Schedulers are built with ``total``, the number of times they will be stepped (epochs, or
optimizer steps when stepped per step), so that cosine and one-cycle need no extra settings.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.optim import lr_scheduler

from dltemplate.config import OptimizerConfig, SchedulerConfig
from dltemplate.errors import ConfigError
from dltemplate.registry import OPTIMIZERS, SCHEDULERS, accepted_kwargs

OPTIMIZERS.register("sgd")(torch.optim.SGD)
OPTIMIZERS.register("adam")(torch.optim.Adam)
OPTIMIZERS.register("adamw")(torch.optim.AdamW)
OPTIMIZERS.register("rmsprop")(torch.optim.RMSprop)


@SCHEDULERS.register("none")
def no_scheduler(optimizer: torch.optim.Optimizer, total: int) -> None:
    """A constant learning rate."""
    return None


@SCHEDULERS.register("step")
def step_lr(
    optimizer: torch.optim.Optimizer, total: int, step_size: int | None = None, gamma: float = 0.1
) -> lr_scheduler.StepLR:
    """Multiply the rate by ``gamma`` every ``step_size`` steps (default: a third of the run)."""
    if step_size is not None and step_size < 1:  # torch takes 0 and negatives, then misbehaves
        raise ValueError(f"step_size={step_size}: must be at least 1 (or left out)")
    if not gamma > 0:  # 0 or less would zero the rate, or flip its sign
        raise ValueError(f"gamma={gamma}: must be > 0")
    if step_size is None:
        step_size = max(1, total // 3)
    return lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=gamma)


@SCHEDULERS.register("cosine")
def cosine(
    optimizer: torch.optim.Optimizer, total: int, eta_min: float = 0.0
) -> lr_scheduler.CosineAnnealingLR:
    """Cosine decay from the base rate to ``eta_min`` over the whole run."""
    if not eta_min >= 0:  # torch trains on with a negative rate
        raise ValueError(f"eta_min={eta_min}: must be >= 0")
    return lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total), eta_min=eta_min)


@SCHEDULERS.register("plateau")
def plateau(
    optimizer: torch.optim.Optimizer, total: int, mode: str = "max", **kwargs: Any
) -> lr_scheduler.ReduceLROnPlateau:
    """Cut the rate when the monitored metric stops improving (fed that metric every epoch)."""
    return lr_scheduler.ReduceLROnPlateau(optimizer, mode=mode, **kwargs)


@SCHEDULERS.register("onecycle")
def onecycle(
    optimizer: torch.optim.Optimizer, total: int, max_lr: float | None = None, **kwargs: Any
) -> lr_scheduler.OneCycleLR:
    """One-cycle policy over the run; ``max_lr`` defaults to the optimizer's rate."""
    if max_lr is not None and not max_lr > 0:  # torch trains on with a negative rate
        raise ValueError(f"max_lr={max_lr}: must be > 0 (or left out: the optimizer's lr)")
    max_lr = optimizer.param_groups[0]["lr"] if max_lr is None else max_lr
    return lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, total_steps=max(1, total), **kwargs)


_STEPPED_PER_BATCH = {"onecycle"}  # schedulers whose natural interval is the optimizer step


FUSED = ("sgd", "adam", "adamw")  # the built-in optimizers torch has a fused kernel for


def fused_setting(cfg: OptimizerConfig, device: torch.device) -> bool | None:
    """``optimizer.fused``: True/False to pass as ``fused=``, or None to leave torch's default.

    null: fused on CUDA for sgd, adam and adamw (one kernel for all parameters instead of a few
    per tensor; the same arithmetic on every step, so resumes stay exact), torch's default
    elsewhere (the CPU computes as before). true for another optimizer: a ConfigError."""
    if cfg.fused is None:
        return True if device.type == "cuda" and cfg.name in FUSED else None
    if cfg.fused and cfg.name not in FUSED:
        raise ConfigError(
            f"optimizer.fused=true: optimizer.name={cfg.name} has no fused kernel; "
            f"use one of {', '.join(FUSED)}, or optimizer.fused=null"
        )
    return cfg.fused


def build_optimizer(
    cfg: OptimizerConfig,
    params: Iterable[torch.nn.Parameter],
    device: torch.device | None = None,
) -> torch.optim.Optimizer:
    """The optimizer named in ``cfg`` over ``params`` (on ``device``: default the CPU)."""
    kwargs: dict[str, Any] = {"lr": cfg.lr, "weight_decay": cfg.weight_decay}
    fused = fused_setting(cfg, device or torch.device("cpu"))
    if fused or (fused is False and cfg.name in FUSED):  # others take no such argument
        kwargs["fused"] = fused
    return OPTIMIZERS.build(
        cfg.name, "optimizer.name", params=list(params), **{**kwargs, **cfg.args}
    )


def scheduler_interval(cfg: SchedulerConfig) -> str:
    """'epoch' or 'step': as configured, else the scheduler's natural interval."""
    return cfg.interval or ("step" if cfg.name in _STEPPED_PER_BATCH else "epoch")


def build_scheduler(
    cfg: SchedulerConfig,
    optimizer: torch.optim.Optimizer,
    *,
    epochs: int,
    steps_per_epoch: int,
    monitor_mode: str,
) -> Any:
    """The scheduler named in ``cfg``, or None; sized for ``epochs`` x ``steps_per_epoch``."""
    total = epochs * steps_per_epoch if scheduler_interval(cfg) == "step" else epochs
    factory = SCHEDULERS.get(cfg.name, "scheduler.name")
    extra = accepted_kwargs(factory, {"total": total, "mode": monitor_mode})
    return SCHEDULERS.build(
        cfg.name, "scheduler.name", optimizer=optimizer, **{**extra, **cfg.args}
    )


def is_plateau(scheduler: Any) -> bool:
    """Whether ``scheduler`` must be stepped with the monitored metric."""
    return isinstance(scheduler, lr_scheduler.ReduceLROnPlateau)
