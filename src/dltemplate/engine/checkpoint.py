"""Checkpoints: written atomically, loadable with ``torch.load(weights_only=True)``.

A checkpoint holds only tensors and plain types; the model is saved unwrapped (no ``module.``
or ``_orig_mod.`` prefixes), so it loads into a bare model on any device.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dltemplate.errors import CheckpointError

FORMAT = "dltemplate-checkpoint-v1"
KINDS = ("best", "last", "interrupt")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare model inside DataParallel / DistributedDataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def strip_prefixes(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Drop ``module.`` / ``_orig_mod.`` key prefixes that wrapped models leave in state dicts."""
    out = {}
    for key, value in state_dict.items():
        while key.startswith(("module.", "_orig_mod.")):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def checkpoint_name(model_name: str, kind: str) -> str:
    """The seed's file name: ``<Model>_<kind>_ckpt.pth``."""
    safe = model_name.rsplit(":", 1)[-1].replace("/", "_")
    return f"{safe}_{kind}_ckpt.pth"


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically: a crash mid-write leaves the old file intact."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            torch.save({"format": FORMAT, **state}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)  # atomic on POSIX and Windows
    finally:
        if tmp.exists():
            tmp.unlink()


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a dltemplate checkpoint on the CPU; anything else is a CheckpointError naming it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds on foreign files (KeyError, IndexError...)
        raise CheckpointError(f"{path}: not a readable checkpoint ({exc})") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a dltemplate checkpoint (no '{FORMAT}' marker)")
    return state


def find_checkpoint(run_dir: Path, kinds: tuple[str, ...] = ("best", "last")) -> Path:
    """The first existing ``*_<kind>_ckpt.pth`` in ``run_dir``, trying ``kinds`` in order."""
    for kind in kinds:
        found = sorted(Path(run_dir).glob(f"*_{kind}_ckpt.pth"))
        if found:
            return found[0]
    raise CheckpointError(f"{run_dir}: no checkpoint ({', '.join(kinds)}) in this directory")


def newest_checkpoint(run_dir: Path) -> Path:
    """The checkpoint in ``run_dir`` that got furthest (most optimizer steps): where to resume."""
    candidates = [
        p for kind in ("last", "interrupt") for p in Path(run_dir).glob(f"*_{kind}_ckpt.pth")
    ]
    if not candidates:
        raise CheckpointError(
            f"{run_dir}: nothing to resume (no *_last_ckpt.pth or *_interrupt_ckpt.pth)"
        )
    return max(candidates, key=lambda p: (load_checkpoint(p)["global_step"], p.stat().st_mtime))


def load_model_weights(model: nn.Module, state_dict: dict[str, Any], source: str) -> None:
    """Load weights strictly; a checkpoint of another model is a CheckpointError saying how."""
    state_dict = strip_prefixes(state_dict)
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state_dict.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append("shape mismatch: " + "; ".join(wrong[:3]))
        if missing:
            parts.append("missing keys: " + ", ".join(missing[:5]))
        if unexpected:
            parts.append("unexpected keys: " + ", ".join(unexpected[:5]))
        raise CheckpointError(
            f"{source}: checkpoint does not match the configured model ({'; '.join(parts)})"
        )
    model.load_state_dict(state_dict)
