"""Choosing the device: automatic (CUDA, then Apple MPS, then CPU) or as configured."""

from __future__ import annotations

import logging

import torch

from dltemplate.errors import ConfigError

log = logging.getLogger("dltemplate")

# Also for a run trained on a GPU and evaluated where there is none (its saved device).
ELSEWHERE = " (experiment.device=auto uses what this machine has)"


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def select_device(
    device: str = "auto", gpu_devices: list[int] | None = None, local_rank: int | None = None
) -> tuple[torch.device, list[int]]:
    """Return ``(device, data_parallel_ids)``.

    ``gpu_devices`` is the seed's list of GPU indices: the ones that exist are used (several
    through DataParallel); when none exists the run falls back to the CPU with a warning.
    Under ``torchrun`` (``local_rank`` given) each process takes ``cuda:<local_rank>``.
    """
    n_cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if local_rank is not None:
        if device in ("auto", "cuda") and n_cuda:
            return torch.device("cuda", local_rank), []
        if device.startswith("cuda") and not n_cuda:
            raise ConfigError(f"experiment.device={device}: no CUDA device is available{ELSEWHERE}")
        return torch.device("cpu" if device == "auto" else device), []
    if gpu_devices:
        present = [i for i in gpu_devices if 0 <= i < n_cuda]
        missing = [i for i in gpu_devices if i not in present]
        if missing:
            log.warning(
                "experiment.gpu_devices=%s: GPU(s) %s not present (%d CUDA device(s))%s",
                gpu_devices,
                missing,
                n_cuda,
                "" if present else "; falling back to the CPU",
            )
        if present:
            return torch.device("cuda", present[0]), present if len(present) > 1 else []
        return torch.device("cpu"), []
    if device == "auto":
        if n_cuda:
            return torch.device("cuda"), []
        return torch.device("mps" if _mps_available() else "cpu"), []
    try:
        chosen = torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"experiment.device={device!r}: {exc}") from exc
    if chosen.type == "cuda" and (chosen.index or 0) >= n_cuda:
        raise ConfigError(
            f"experiment.device={device}: {n_cuda} CUDA device(s) available{ELSEWHERE}"
        )
    if chosen.type == "mps" and not _mps_available():
        raise ConfigError(f"experiment.device={device}: MPS is not available{ELSEWHERE}")
    return chosen, []
