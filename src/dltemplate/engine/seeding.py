"""Seeding and the random-number-generator state that a checkpoint carries."""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int, deterministic: bool | None = None) -> None:
    """Seed Python, NumPy and torch (all devices). ``deterministic`` True forces deterministic
    kernels, False lifts that (a process that runs several runs, a notebook or the tests, does
    not keep an earlier run's setting); None leaves it as it is."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it
        torch.backends.cudnn.benchmark = False
    if deterministic is not None:
        torch.use_deterministic_algorithms(deterministic)


def seed_worker(worker_id: int) -> None:
    """``DataLoader(worker_init_fn=...)``: seed NumPy and random from torch's worker seed."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def host_rng_state() -> dict[str, Any]:
    """Python's and NumPy's generator states, as tensors and plain types."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
    }


def torch_rng_state() -> dict[str, Any]:
    """torch's generator states (CPU, and every GPU): cheap to read."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def same_host_rng_state(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two :func:`host_rng_state` results are the same state."""
    na, nb = a["numpy"], b["numpy"]
    return (
        a["python"] == b["python"]
        and torch.equal(na["keys"], nb["keys"])
        and (na["pos"], na["has_gauss"], na["cached_gaussian"])
        == (nb["pos"], nb["has_gauss"], nb["cached_gaussian"])
    )


def rng_state() -> dict[str, Any]:
    """Every generator's state, as tensors and plain types (loads with ``weights_only=True``)."""
    return {**host_rng_state(), **torch_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x: Any) -> Any:
    # random.setstate wants tuples all the way down; a checkpoint may give lists back
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def rank_seed(seed: int, rank: int) -> int:
    """The seed of process ``rank``'s random stream: ``seed`` on rank 0, distinct elsewhere."""
    return seed if rank == 0 else (seed * 1_000_003 + rank * 7_919) % 2**63
