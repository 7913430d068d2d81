"""Shared fixtures: small generated data and a way to run the command line in-process."""

from __future__ import annotations

import contextlib
import gzip
import os
import re
import signal
import socket
import subprocess
from pathlib import Path

# One torch (and BLAS) thread per test process, subprocesses included (they inherit the
# environment), unless the caller set a count: on a busy machine, threads per core make every
# process slower; under pytest-xdist each worker is one process. Before numpy and torch load.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# One quick epoch of the digits demo on a third of the data, for tests that need any run.
QUICK_DIGITS = [
    "data.train_val_sample_rate=0.3",
    "model.args.hidden=[32]",
    "trainer.epochs=1",
    "trainer.progress_bar=off",
]


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


def readme_block(first_line: str) -> str:
    """The README's fenced code block that starts with ``first_line``."""
    readme = (REPO / "README.md").read_text()
    for block in re.findall(r"```\w*\n(.*?)```", readme, flags=re.S):
        if block.startswith(first_line):
            return block
    raise AssertionError(f"README has no code block starting with {first_line!r}")


@pytest.fixture(scope="session", autouse=True)
def cache_in_tmp(tmp_path_factory: pytest.TempPathFactory):
    """Every decode cache of the tests (subprocesses included: they inherit the environment)
    in a temporary folder: the default is a per-user folder in the home directory."""
    from dltemplate.data.image_cache import CACHE_ENV

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, str(tmp_path_factory.mktemp("user_cache")))
        yield


@pytest.fixture
def fast_and_tidy(monkeypatch: pytest.MonkeyPatch):
    """No curves picture (a second of matplotlib per epoch on 2 cores, not what most tests are
    about); afterwards, close the train.log that in-process runs leave the logger writing to."""
    import logging

    from dltemplate.engine import rundir

    monkeypatch.setattr(rundir, "plot_curves", lambda *a, **k: None)
    yield
    log = logging.getLogger("dltemplate")
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()


def metric_rows(run: Path) -> list[dict[str, str]]:
    """The rows of a run's metrics.csv, as text."""
    import csv

    with open(run / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def load_ckpt(path: Path) -> dict:
    """A checkpoint as torch loads it, on the CPU, weights only."""
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def run_dirs(output_dir: Path) -> list[Path]:
    """Run directories under ``output_dir``, oldest first."""
    return sorted(p for p in Path(output_dir).iterdir() if p.is_dir())


def free_port() -> int:
    """A free TCP port, so concurrent test runs do not fight over torchrun's default."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """Process ids below ``pid`` (torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def run_launcher(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 120) -> str:
    """Run ``cmd``; return its output. A hang fails the test after ``timeout`` seconds, with
    torchrun and its workers killed (output goes to a file: no pipe left open by a worker)."""
    log = cwd / f"launcher_{len(list(cwd.glob('launcher_*.log')))}.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=sink, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for pid in [*descendants(proc.pid), proc.pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.wait()
            pytest.fail(f"torchrun hung for {timeout} s:\n{log.read_text()[-4000:]}")
    output = log.read_text()
    assert proc.returncode == 0, output[-4000:]
    return output


def mapped_file(tensor) -> str | None:
    """The file whose memory map holds ``tensor``'s data (Linux: from /proc/self/maps), or
    None when the data lies in ordinary memory."""
    address = tensor.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        start, end = (int(a, 16) for a in fields[0].split("-"))
        if start <= address < end:
            return fields[5] if len(fields) == 6 and fields[5].startswith("/") else None
    return None


def run_results(run: Path) -> dict[str, object]:
    """What must be bit-identical between a stopped-and-resumed run and one never stopped:
    the last checkpoint's weights, optimizer, scheduler, counters and callback states, every
    metrics.csv row but ``seconds``, and test_metrics.json."""
    import csv
    import json

    import torch

    (last,) = run.glob("*_last_ckpt.pth")
    state = torch.load(last, weights_only=True)
    with open(run / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        row.pop("seconds")
    return {
        "model": state["model"],
        "optimizer": state["optimizer"],
        "scheduler": state["scheduler"],
        "steps": (state["epoch"], state["global_step"]),
        "callbacks": state["callbacks"],  # every callback's state (an ema's average)
        "rows": rows,
        "test": json.loads((run / "test_metrics.json").read_text()),
    }


def assert_identical(a: object, b: object, where: str = "") -> None:
    """``a`` and ``b`` are equal all the way down: tensors bit for bit, dicts key by key."""
    import torch

    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_identical(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def stop_at_training_forward(
    monkeypatch: pytest.MonkeyPatch, at_call: int, way: str = "exception"
) -> object:
    """Raise (``way="exception"``: the run saves an interrupt checkpoint and exits 1) or send
    SIGTERM to this process (exit 130) at the ``at_call``-th training forward pass of a
    classification run; return the original ``forward`` to put back."""
    from dltemplate.tasks.classification import ClassificationTask

    original = ClassificationTask.forward
    calls = {"n": 0}

    def forward(self, model, batch):
        if model.training:
            calls["n"] += 1
            if calls["n"] == at_call:
                if way == "exception":
                    raise RuntimeError("injected")
                os.kill(os.getpid(), signal.SIGTERM)
        return original(self, model, batch)

    monkeypatch.setattr(ClassificationTask, "forward", forward)
    return original
