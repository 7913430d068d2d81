"""The GPU's fast settings, each a config key whose ``null``/``auto`` means "on where it is safe".

On the CPU every automatic setting resolves to off, so CPU runs compute exactly what they did
before these keys existed. On CUDA:

- ``data.device``: in-memory splits (:class:`~dltemplate.data.base.TensorSplit`) are moved to
  the GPU once when they fit in :data:`DATA_BUDGET` of its memory; batches are then gathered
  there (no host-to-device copy per batch). The numbers are the same as from the CPU.
- ``experiment.tf32``: float32 matmuls and convolutions in TF32 on GPUs that have it (compute
  capability 8.0+): ~10 mantissa bits inside the products, deterministic.
- ``experiment.cudnn_benchmark``: cuDNN times the candidate kernels for each new shape and keeps
  the fastest; on for fixed shapes (in-memory data), off under ``experiment.deterministic``
  (the chosen kernel may differ between processes and restarts).
- ``trainer.channels_last``: convolutional models hold NHWC weights (tensor cores' layout);
  :func:`apply_channels_last`.
- ``optimizer.fused``: see :func:`dltemplate.optim.fused_setting`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dltemplate.config import Config
from dltemplate.config.loader import CUDNN_CONFLICT
from dltemplate.data.base import DataSplits, TensorSplit, splits_to
from dltemplate.errors import ConfigError

DATA_BUDGET = 0.25  # data.device=auto: in-memory data up to this share of the GPU's memory


def has_tf32(device: torch.device) -> bool:
    """Whether ``device`` is a GPU with TF32 tensor cores (Ampere, compute capability 8.0+)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8


def resolve_tf32(setting: bool | None, device: torch.device) -> bool:
    """``experiment.tf32``: as set, or (null) on for a GPU that has TF32."""
    return has_tf32(device) if setting is None else setting


def check_speed_config(cfg: Config, device: torch.device) -> None:
    """The fast settings' keys that cannot hold for this run: a ConfigError, before any work."""
    if cfg.experiment.cudnn_benchmark and cfg.experiment.deterministic:
        raise ConfigError(CUDNN_CONFLICT)
    if cfg.data.device == "cuda":
        refuse_gpu_data_off_the_gpu(device)


def refuse_gpu_data_off_the_gpu(device: torch.device) -> None:
    """``data.device=cuda`` for a run that trains on ``device``: a ConfigError unless it is a
    GPU."""
    if device.type != "cuda":
        raise ConfigError(f"data.device=cuda: this run trains on {device}; use auto or cpu")


def resolve_cudnn_benchmark(cfg: Config, device: torch.device, fixed_shapes: bool) -> bool:
    """``experiment.cudnn_benchmark``: as set, or (null) on CUDA when the inputs' shapes are
    fixed and the run is not deterministic (a training run checks the two keys together
    first: :func:`check_speed_config`)."""
    setting, deterministic = cfg.experiment.cudnn_benchmark, cfg.experiment.deterministic
    if setting is None:
        return device.type == "cuda" and fixed_shapes and not deterministic
    return setting


def apply_backends(cfg: Config, device: torch.device, fixed_shapes: bool) -> dict[str, bool]:
    """Set TF32 and cuDNN autotuning for this process as ``cfg`` says; return what was set.

    On a CPU run nothing is touched unless a key is set explicitly (the flags only concern
    CUDA kernels)."""
    tf32 = resolve_tf32(cfg.experiment.tf32, device)
    benchmark = resolve_cudnn_benchmark(cfg, device, fixed_shapes)
    if device.type == "cuda" or cfg.experiment.tf32 is not None:
        precision = "tf32" if tf32 else "ieee"
        torch.backends.cuda.matmul.fp32_precision = precision
        torch.backends.cudnn.conv.fp32_precision = precision
    if device.type == "cuda" or cfg.experiment.cudnn_benchmark is not None:
        torch.backends.cudnn.benchmark = benchmark
    return {"tf32": tf32, "cudnn_benchmark": benchmark}


def has_convolutions(model: nn.Module) -> bool:
    """Whether ``model`` has 2-D convolutions (the layers channels_last speeds up)."""
    return any(isinstance(m, nn.Conv2d | nn.ConvTranspose2d) for m in model.modules())


def resolve_channels_last(setting: bool | None, model: nn.Module, device: torch.device) -> bool:
    """``trainer.channels_last``: as set, or (null) on CUDA for a model with convolutions."""
    if setting is None:
        return device.type == "cuda" and has_convolutions(model)
    return setting


def apply_channels_last(model: nn.Module) -> nn.Module:
    """Hold ``model``'s 4-D weights in NHWC order (in place; other tensors are untouched).

    Inputs need no conversion: a convolution with NHWC weights computes in NHWC, and
    checkpoints load into a model of either layout (values are copied, not strides)."""
    return model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]


def is_channels_last(model: nn.Module) -> bool:
    """Whether ``model``'s convolution weights are held in NHWC order."""
    weights = [p for p in model.parameters() if p.dim() == 4]
    return bool(weights) and all(
        p.is_contiguous(memory_format=torch.channels_last) for p in weights
    )


def data_bytes(data: DataSplits) -> int:
    """Bytes of the tensors behind the in-memory splits (shared sources counted once)."""
    seen: dict[int, int] = {}
    for split in (data.train, data.val, data.test):
        for t in (split.source_inputs, split.source_targets, split.index):
            if t is not None:
                seen[id(t)] = t.numel() * t.element_size()
    return sum(seen.values())


def resolve_data_device(
    setting: str, data: DataSplits, device: torch.device
) -> tuple[torch.device, str]:
    """Where ``data.device`` puts the splits, and why (a line for the log).

    ``auto``: the run's GPU when every split is in memory and all of it fits in
    :data:`DATA_BUDGET` of the GPU's memory, else the CPU. ``cuda``: the run's GPU, which must
    be a GPU, for in-memory splits only (a ConfigError otherwise). ``cpu``: the CPU."""
    cpu = torch.device("cpu")
    in_memory = all(isinstance(s, TensorSplit) for s in (data.train, data.val, data.test))
    if setting == "cpu":
        return cpu, "data.device=cpu: batches are copied to the device one by one"
    if setting == "cuda":
        refuse_gpu_data_off_the_gpu(device)
        if not in_memory:
            raise ConfigError(
                "data.device=cuda: this dataset is read sample by sample (DataLoader); only "
                "in-memory splits can live on the GPU; use auto or cpu"
            )
        return device, "data.device=cuda: the in-memory splits live on the GPU"
    if device.type != "cuda":
        return cpu, f"data.device=auto: the data stays on the CPU (the run is on {device})"
    if not in_memory:
        return cpu, "data.device=auto: the data is read sample by sample, on the CPU"
    size = data_bytes(data)
    budget = DATA_BUDGET * torch.cuda.get_device_properties(device).total_memory
    if size > budget:
        return cpu, (
            f"data.device=auto: {size / 2**30:.2f} GiB of data is over {DATA_BUDGET:.0%} of "
            "the GPU's memory; it stays on the CPU"
        )
    return device, f"data.device=auto: {size / 2**20:.1f} MiB of data lives on the GPU"


def place_data(setting: str, data: DataSplits, device: torch.device) -> DataSplits:
    """``data`` with its in-memory splits where ``data.device`` says, the reason in its notes
    (which the run logs); unchanged on the CPU."""
    where, why = resolve_data_device(setting, data, device)
    if device.type == "cuda" or setting != "auto":  # a CPU run's log stays as it was
        data.notes.append(why)
    if where.type == "cpu":
        return data
    return splits_to(data, where)


def speed_summary(settings: dict[str, Any]) -> str:
    """One log line: which fast settings this run uses."""
    return ", ".join(f"{k} {'on' if v else 'off'}" for k, v in settings.items())
