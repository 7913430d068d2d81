"""The typed configuration: one dataclass per section, each field with a default and a comment.

This file is the config reference: every key a YAML file or a ``section.key=value`` override
may set is a field below.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass
class ExperimentConfig:
    """Who the run is and where it goes."""

    name: str = "Experiment"  # the seed's proj_name: used in the config file name and the log
    task: str = "classification"  # registered task: its hooks build the data, model, loss, metrics
    trainer: str | None = None  # package.module:Class, a TrainerBase subclass; None: TrainerBase
    output_dir: str = "./Results"  # runs land in <output_dir>/<timestamp>_<run_name>/
    # names the run directory after its timestamp; None: from the config file's name and the
    # command line's overrides (digits_mlp_lr=0.01), or the bare timestamp for a config in code
    run_name: str | None = None
    seed: int = 42  # seeds Python, NumPy, torch, data order and splits
    deterministic: bool = False  # torch.use_deterministic_algorithms (slower on GPU)
    tf32: bool | None = None  # TF32 matmuls/convolutions on GPUs that have them; null: on CUDA
    # cuDNN autotuning (fastest kernels for fixed shapes); null: on CUDA for in-memory data,
    # off with experiment.deterministic
    cudnn_benchmark: bool | None = None
    device: str = "auto"  # auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps
    gpu_devices: list[int] | None = None  # the seed's GPU list; several -> DataParallel
    imports: list[str] = field(default_factory=list)  # modules to import (your registrations)
    threads: int | None = None  # torch CPU threads; None: torch's default, under torchrun cores/N


@dataclass
class DataConfig:
    """Which dataset, how it is split and batched."""

    name: str = "digits"  # registered dataset or package.module:Class
    root: str = "./Dataset"  # the seed's data_dir
    download: bool = True  # fetch missing files when the dataset knows how
    batch_size: int = 64  # per process
    eval_batch_size: int | None = None  # per process; default: 2 x batch_size
    val_fraction: float = 0.1  # share of the (sub-sampled) training pool kept for validation
    test_fraction: float = 0.2  # set aside for test when the dataset has no test split
    train_val_sample_rate: float = 1.0  # the seed's sub-sampling of the training pool
    test_sample_rate: float = 1.0  # the seed's sub-sampling of the test split
    augment: bool = False  # random training-time augmentation, as the task defines it
    # Where in-memory splits live: auto (the run's GPU when they fit in a quarter of its
    # memory, else cpu) | cpu | cuda (the run's GPU, always); batches are then indexed there
    device: Literal["auto", "cpu", "cuda"] = "auto"
    args: dict[str, Any] = field(default_factory=dict)  # extra keyword arguments
    # The dataset's own test split (map-style datasets): data.args with these on top,
    # e.g. {train: false}; null: a test split is carved out of the pool (test_fraction).
    test_args: dict[str, Any] | None = None
    # Per-sample reading (map-style datasets and image files read every epoch):
    num_workers: int = 0  # DataLoader worker processes; 0 reads in the training process
    pin_memory: bool | None = None  # page-locked batches for a faster GPU copy; null: on CUDA
    persistent_workers: bool = True  # keep the workers between epochs (num_workers > 0)
    prefetch_factor: int = 2  # batches each worker reads ahead (num_workers > 0)
    timeout: float | None = 300.0  # seconds one sample may take to read; null: wait forever
    # Per-sample transforms, names or {name, args} (registered or package.module:function):
    train_transform: list[Any] = field(default_factory=list)  # training samples
    eval_transform: list[Any] = field(default_factory=list)  # validation and test samples


@dataclass
class ModelConfig:
    """Which network. Input shape and class count come from the dataset when accepted."""

    name: str = "Vanilla"  # registered model or package.module:Class
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class LossConfig:
    """Which loss."""

    name: str = "cross_entropy"
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimizerConfig:
    """Which optimizer and its learning rate."""

    name: str = "adam"  # sgd | adam | adamw | package.module:Class
    lr: float = 1e-3
    weight_decay: float = 0.0
    fused: bool | None = None  # one fused kernel per step (sgd, adam, adamw); null: on CUDA
    args: dict[str, Any] = field(default_factory=dict)  # e.g. momentum, betas


@dataclass
class SchedulerConfig:
    """How the learning rate changes."""

    name: str = "none"  # none | step | cosine | plateau | onecycle | package.module:Class
    interval: Literal["epoch", "step"] | None = None  # None: the scheduler's natural interval
    args: dict[str, Any] = field(default_factory=dict)  # e.g. step_size, gamma, max_lr


@dataclass
class TrainerConfig:
    """The training loop and its optional pieces."""

    epochs: int = 10
    precision: Literal["32", "bf16", "fp16"] = "32"  # fp16 only on CUDA
    grad_accum_steps: int = 1  # optimizer step every N batches
    clip_grad_norm: float | None = None  # clip the global gradient norm to this
    clip_grad_value: float | None = None  # clip each gradient element to +-this
    monitor: str = "val/accuracy"  # metric that picks the best checkpoint and early stops
    monitor_mode: Literal["min", "max"] = "max"
    early_stopping_patience: int | None = None  # epochs without improvement; None: off
    early_stopping_min_delta: float = 0.0  # smaller changes do not count as improvement
    compile: bool = False  # torch.compile the model
    channels_last: bool | None = None  # NHWC weights for convolutions; null: on CUDA with conv
    metrics: list[str] = field(default_factory=list)  # extra metrics; the task adds its own
    fast_dev_run: int = 0  # N>0: 1 epoch of N batches per split, no checkpoints
    limit_train_batches: int | float | None = None  # int count, or fraction of an epoch
    limit_val_batches: int | float | None = None
    limit_test_batches: int | float | None = None
    overfit_batches: int = 0  # N>0: train and validate on the same first N batches
    log_every_n_steps: int = 50  # read the loss every N optimizer steps: bar, log, TensorBoard
    progress_bar: Literal["auto", "on", "off"] = "auto"  # auto: a bar only on a terminal
    save_on_exception: bool = True  # write <Model>_interrupt_ckpt.pth when a run stops
    notice_signal: str | None = "SIGUSR1"  # preemption notice: stop, checkpoint, requeue (SLURM)
    stop_on_nan: bool = True  # a NaN/inf training loss stops the run before any checkpoint
    sync_batchnorm: bool = False  # BatchNorm statistics over all processes (DDP == 1 process)
    test_after_fit: bool = True  # evaluate the best checkpoint on the test split
    resume: str | None = None  # run directory or checkpoint to continue from


@dataclass
class CallbackConfig:
    """One callback: a registered name (grad_norm, ema, freeze, max_time) or a
    package.module:Class path, with its keyword arguments. In YAML a bare name will do.
    Naming a built-in one (progress, tensorboard, metrics_table, early_stopping, checkpoint)
    sets its arguments, or turns it off with ``enabled: false``."""

    name: str
    args: dict[str, Any] = field(default_factory=dict)
    enabled: bool = True  # false: leave this (built-in) callback out


@dataclass
class Config:
    """The whole configuration of a run."""

    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    callbacks: list[CallbackConfig] = field(default_factory=list)  # run in this order
