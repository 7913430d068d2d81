"""``torchrun --max-restarts``: a job whose worker is killed finishes in its one run directory,
with the results of a job that was never stopped."""

from __future__ import annotations

import csv
import os
import re
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, assert_identical, free_port, run_dirs, run_launcher, run_results

DEMO = REPO / "configs" / "digits_mlp.yaml"
EPOCHS = 3
# 115 training samples, 2 processes x 16: 4 optimizer steps per epoch. Adam, cosine schedule and
# dropout: the optimizer, scheduler and per-rank random states must all come back exactly.
COMMON = [
    "data.train_val_sample_rate=0.1",
    "data.val_fraction=0.2",
    "data.batch_size=16",
    "model.args.hidden=[32]",
    "model.args.dropout=0.1",
    f"trainer.epochs={EPOCHS}",
    "experiment.imports=[killer]",
]
STEPS_PER_EPOCH = 4

# Imported by every worker through experiment.imports; kills rank 1 with SIGKILL right after
# global step $KILL_AFTER_STEP, on torchrun's first attempt only. Registers nothing.
KILLER = """
import os
import signal

from dltemplate.engine.trainer import TrainerBase

_step = TrainerBase.optimizer_step
_after = int(os.environ.get("KILL_AFTER_STEP", "0"))


def _optimizer_step(self, window, position):
    _step(self, window, position)
    if (
        _after
        and self.state.global_step == _after
        and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0"
        and os.environ.get("RANK") == "1"
    ):
        os.kill(os.getpid(), signal.SIGKILL)


TrainerBase.optimizer_step = _optimizer_step
"""


def static_rendezvous() -> tuple[list[str], dict[str, str]]:
    """torchrun's default rendezvous, as the README launches it."""
    return ["--master_port", str(free_port())], {}


def torchrun(cwd: Path, out: Path, kill_after: int) -> str:
    """Train DEMO with ``torchrun --nproc_per_node 2 --max-restarts 1`` from ``cwd`` (where the
    killer plugin lies); return the launcher's output."""
    (cwd / "killer.py").write_text(KILLER)
    launch, extra_env = RENDEZVOUS()
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--max-restarts",
        "1",
        *launch,
        "-m",
        "dltemplate",
        "train",
        str(DEMO),
        *COMMON,
        f"experiment.output_dir={out}",
    ]
    env = {**os.environ, **extra_env, "OMP_NUM_THREADS": "1", "KILL_AFTER_STEP": str(kill_after)}
    return run_launcher(cmd, cwd, env)


def last_weights(run: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(run / "Vanilla_last_ckpt.pth", map_location="cpu", weights_only=True)
    return ckpt["model"]


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The run directory of the same job, never stopped."""
    cwd = tmp_path_factory.mktemp("reference")
    torchrun(cwd, cwd / "out", kill_after=0)
    (run,) = run_dirs(cwd / "out")
    return run


# The README's plain `torchrun --nproc_per_node 2 ...` (static rendezvous): its TCP store
# outlives a restart, so the engine keys its process group's store by attempt.
RENDEZVOUS = static_rendezvous

CASES = [
    pytest.param(
        STEPS_PER_EPOCH + 2, id="after_checkpoint", marks=pytest.mark.slow
    ),  # epoch 2, step 2 of 4
    pytest.param(2, id="before_any_checkpoint", marks=pytest.mark.slow),  # epoch 1, step 2
]


@pytest.mark.parametrize("kill_after", CASES)
def test_killed_worker_restarts_into_the_same_run_with_identical_results(
    reference, tmp_path, kill_after
):
    """SIGKILL of rank 1 part-way through training: torchrun restarts the job, which finishes
    in its one run directory with the weights, table and test metrics of a never-stopped job."""
    out = tmp_path / "out"
    output = torchrun(tmp_path, out, kill_after)
    assert re.search(r"exitcode\W+-9", output)  # the kill happened: rank 1 died of SIGKILL
    (run,) = run_dirs(out)
    assert not list(out.glob(".torchrun_*"))  # the restart marker is gone once finished
    log = (run / "train.log").read_text()
    assert log.count("command: ") == 2  # both attempts wrote to this run directory
    # ... each a command that runs the job again (not the path of dltemplate's __main__.py)
    rerun = f"command: torchrun --nproc_per_node 2 --max_restarts 1 -m dltemplate train {DEMO} "
    assert log.count(rerun) == 2
    if kill_after > STEPS_PER_EPOCH:  # from the checkpoint of epoch 1, not from scratch
        assert re.search(r"resumed from \S*_last_ckpt\.pth at epoch 2", log)
    else:
        assert "resumed from" not in log
        assert re.search(r"restarted|started over", log)
    diff = max_diff(last_weights(reference), last_weights(run))
    print(f"restart {kill_after=}: max |dw| = {diff:.3g}")
    epochs = [int(r["epoch"]) for r in csv.DictReader(open(run / "metrics.csv"))]
    assert epochs == list(range(1, EPOCHS + 1))
    # bit for bit: weights, optimizer, scheduler, counters, callbacks, metrics rows, test
    assert_identical(run_results(run), run_results(reference), f"restart {kill_after=}")
