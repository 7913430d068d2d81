"""Shared fixtures: small generated data and a way to run the command line in-process."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def _idx(array: np.ndarray) -> bytes:
    dims = np.array(array.shape, dtype=">i4").tobytes()
    return bytes([0, 0, 8, array.ndim]) + dims + array.astype(np.uint8).tobytes()


def write_fashion_mnist(root: Path, n_train: int = 600, n_test: int = 200) -> Path:
    """Learnable Fashion-MNIST-shaped IDX files: class k lights up row band k of the image."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for i, k in enumerate(labels):
            images[i, 2 + 2 * k : 4 + 2 * k, 4:24] = 250
        (root / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(images)))
        (root / f"{prefix}-labels-idx1-ubyte").write_bytes(_idx(labels))
    return root


@pytest.fixture
def fashion_root(tmp_path: Path) -> Path:
    """A folder holding small synthetic Fashion-MNIST IDX files (no download)."""
    return write_fashion_mnist(tmp_path / "Dataset")


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Run ``dltemplate ...`` in-process from ``tmp_path``; returns the exit status."""
    from dltemplate.cli import main

    monkeypatch.chdir(tmp_path)

    def run(*args: str) -> int:
        return main([str(a) for a in args])

    return run


def run_dirs(output_dir: Path) -> list[Path]:
    """Run directories under ``output_dir``, oldest first."""
    return sorted(p for p in Path(output_dir).iterdir() if p.is_dir())
