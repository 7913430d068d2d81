"""Equivalences the README promises: accumulation == a big batch, N processes == 1 process
(with a short last batch, with synced BatchNorm), and per-rank random streams."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, free_port, run_dirs, run_launcher

from dltemplate.assemble import build_trainer
from dltemplate.config import load_config
from dltemplate.engine.trainer import TrainerBase
from dltemplate.tasks.classification import ClassificationTask

DEMO = REPO / "configs" / "digits_mlp.yaml"
B = 32  # the global batch every run here is compared at
# 1797 digits: 359 set aside for test, then train_val_sample_rate and val_fraction give these
# training lengths (asserted in the tests, so a change in the splits is noticed).
SMALL = ["data.train_val_sample_rate=0.1", "data.val_fraction=0.2"]  # 115 = 3 * 32 + 19
SMALL_LEN = 115
# Deterministic updates: plain SGD, constant learning rate, no dropout.
PLAIN = ["optimizer.name=sgd", "optimizer.lr=0.1", "scheduler.name=none"]
MLP = ["model.args.hidden=[32]", "model.args.dropout=0.0"]
CNN = ["model.name=SmallCNN", "model.args={width: 8, dropout: 0.0}"]


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest absolute difference over every tensor of two state dicts (same keys)."""
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def checkpoint(run: Path, kind: str = "last") -> dict:
    (path,) = run.glob(f"*_{kind}_ckpt.pth")
    return torch.load(path, map_location="cpu", weights_only=True)


def train_here(out: Path, *overrides: str) -> tuple[TrainerBase, dict[str, float]]:
    """One process, in this process: the trainer after ``fit`` and the test metrics."""
    cfg = load_config(DEMO, [f"experiment.output_dir={out}", *overrides])
    trainer = build_trainer(cfg, ClassificationTask(cfg))
    return trainer, trainer.fit()


def torchrun(out: Path, *overrides: str, nproc: int = 2) -> Path:
    """``torchrun --nproc_per_node nproc -m dltemplate train DEMO ...``; its one run directory."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_port",
        str(free_port()),
        "-m",
        "dltemplate",
        "train",
        str(DEMO),
        *overrides,
        f"experiment.output_dir={out}",
    ]
    run_launcher(cmd, out.parent, {**os.environ, "OMP_NUM_THREADS": "1"})
    (run,) = run_dirs(out)  # one run directory, not one per process
    return run


# Training lengths whose last batch of B is (a) full, (b) shorter than B/k for k = 2 and 4,
# (c) between B/k and B for k = 2 and 4, (d) between B/4 and B/2 (short for k = 2 only).
LAST_BATCH = {
    "full": lambda r: r == 0,
    "short": lambda r: 0 < r < B // 4,
    "between": lambda r: r > B // 2,
    "mixed": lambda r: B // 4 < r < B // 2,
}
LENGTHS = [
    pytest.param(["data.train_val_sample_rate=0.25", "data.val_fraction=0.2"], 288, id="full"),
    pytest.param(["data.train_val_sample_rate=0.1", "data.val_fraction=0.3"], 101, id="short"),
    pytest.param(SMALL, SMALL_LEN, id="between"),
    pytest.param(["data.train_val_sample_rate=0.15", "data.val_fraction=0.2"], 173, id="mixed"),
]


@pytest.mark.parametrize(("split", "length"), LENGTHS)
def test_accumulation_equals_one_big_batch_for_any_dataset_length(request, tmp_path, split, length):
    """k micro-batches of B/k with grad_accum_steps=k take the same steps as batches of B, short
    last batch included, and count ceil(len/B) optimizer steps per epoch."""
    assert LAST_BATCH[request.node.callspec.id](length % B)
    common = [*split, *PLAIN, *MLP, "trainer.epochs=2", "trainer.test_after_fit=false"]
    states, initial = {}, None
    for k in (1, 2, 4):
        out = tmp_path / f"k{k}"
        per_step = [f"data.batch_size={B // k}", f"trainer.grad_accum_steps={k}"]
        cfg = load_config(DEMO, [f"experiment.output_dir={out}", *common, *per_step])
        trainer = build_trainer(cfg, ClassificationTask(cfg))
        if initial is None:
            initial = {name: v.clone() for name, v in trainer.model.state_dict().items()}
        trainer.fit()
        assert len(trainer.data.train) == length
        assert trainer.schedule.steps_per_epoch == math.ceil(length / B)
        assert trainer.state.global_step == 2 * math.ceil(length / B)
        states[k] = trainer.model.state_dict()
    assert max_diff(states[1], initial) > 1e-2  # the weights moved
    for k in (2, 4):
        diff = max_diff(states[1], states[k])
        print(f"accumulation {request.node.callspec.id} k={k}: max |dw| = {diff:.3g}")
        assert diff <= 1e-5, f"k={k}: max |dw| = {diff:.3g}"


@pytest.mark.slow  # ~25 s; tests/test_training.py checks 2 processes == 1 on the full demo
def test_two_processes_match_one_with_a_short_odd_last_batch(tmp_path):
    """2 processes x 16 (and 2 x 8 x grad_accum 2) take the same steps as 1 process x 32 when the
    last global batch is short and odd: same weights, same test metrics."""
    assert SMALL_LEN % B % 2 == 1  # a last global batch of 19: 10 + 9 samples, or 16 + 3
    common = [*SMALL, *PLAIN, *MLP, "trainer.epochs=2"]
    one, metrics = train_here(tmp_path / "one", *common, f"data.batch_size={B}")
    assert len(one.data.train) == SMALL_LEN
    reference = checkpoint(one.run_dir)
    assert reference["global_step"] == 2 * math.ceil(SMALL_LEN / B)
    variants = {
        "ddp": ["data.batch_size=16"],
        "ddp_accum": ["data.batch_size=8", "trainer.grad_accum_steps=2"],
    }
    for name, per_rank in variants.items():
        run = torchrun(tmp_path / name, *common, *per_rank)
        ckpt = checkpoint(run)
        assert ckpt["global_step"] == reference["global_step"]
        diff = max_diff(reference["model"], ckpt["model"])
        print(f"{name}: max |dw| = {diff:.3g}")
        assert diff <= 1e-5, f"{name}: max |dw| = {diff:.3g}"
        test = json.loads((run / "test_metrics.json").read_text())
        assert test["accuracy"] == metrics["accuracy"]
        assert test["loss"] == pytest.approx(metrics["loss"], abs=1e-5)


@pytest.mark.slow  # ~30 s: two torchrun agents, as scripts/slurm/multinode.sbatch starts them
def test_two_nodes_of_one_process_match_one_process(tmp_path):
    """``torchrun --nnodes 2`` (one agent per "node", c10d rendezvous on 127.0.0.1) with 16
    samples each takes the same steps as 1 process x 32: same weights."""
    common = [*SMALL, *PLAIN, *MLP, "trainer.epochs=2"]
    one, _ = train_here(tmp_path / "one", *common, f"data.batch_size={B}")
    out, port = tmp_path / "nodes", free_port()
    agents = []
    for _ in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
               "--nproc_per_node", "1", "--rdzv_backend", "c10d",
               "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "two-nodes",
               "-m", "dltemplate", "train", str(DEMO), *common, "data.batch_size=16",
               f"experiment.output_dir={out}"]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        agents.append(subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.PIPE, text=True))  # fmt: skip
    for agent in agents:
        _, err = agent.communicate(timeout=300)
        assert agent.returncode == 0, err[-3000:]
    (run,) = run_dirs(out)
    diff = max_diff(checkpoint(one.run_dir)["model"], checkpoint(run)["model"])
    assert diff <= 1e-5, f"two nodes: max |dw| = {diff:.3g}"


@pytest.mark.slow  # ~30 s; tests/test_samples.py checks the batches of 2 ranks == 1 in-process
def test_a_map_style_dataset_with_workers_on_two_processes_matches_one(tmp_path, monkeypatch):
    """A map-style dataset with random per-sample noise and transforms, read by 2 workers per
    process: 2 processes x 16 take the steps of 1 process x 32 reading in-process."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO / "tests"), *sys.path]))
    common = [*SMALL, *PLAIN, *MLP, "trainer.epochs=2", "data.name=toy_datasets:DigitSamples",
              "data.train_transform=[hflip, {name: random_crop, args: {padding: 1}}]"]  # fmt: skip
    one, metrics = train_here(tmp_path / "one", *common, f"data.batch_size={B}")
    assert len(one.data.train) == SMALL_LEN
    reference = checkpoint(one.run_dir)
    run = torchrun(tmp_path / "ddp", *common, "data.batch_size=16", "data.num_workers=2")
    diff = max_diff(reference["model"], checkpoint(run)["model"])
    print(f"map-style, 2 workers, ddp: max |dw| = {diff:.3g}")
    assert diff <= 1e-5, f"max |dw| = {diff:.3g}"
    test = json.loads((run / "test_metrics.json").read_text())
    assert test["accuracy"] == metrics["accuracy"]


@pytest.mark.slow  # ~15 s; tests/test_sync_batchnorm.py checks the layer on 2 processes
def test_sync_batchnorm_makes_two_processes_match_one(tmp_path):
    """With trainer.sync_batchnorm, SmallCNN on 2 processes x 16 equals 1 process x 32, weights
    and BatchNorm running statistics alike; without it they differ clearly."""
    common = [*SMALL, *PLAIN, *CNN, "trainer.epochs=2", "trainer.test_after_fit=false"]
    one, _ = train_here(tmp_path / "one", *common, f"data.batch_size={B}")
    reference = checkpoint(one.run_dir)["model"]
    assert any(k.endswith("running_var") for k in reference)
    sync = ["data.batch_size=16", "trainer.sync_batchnorm=true"]
    synced = checkpoint(torchrun(tmp_path / "sync", *common, *sync))["model"]
    local = checkpoint(torchrun(tmp_path / "local", *common, "data.batch_size=16"))["model"]
    diff_synced, diff_local = max_diff(reference, synced), max_diff(reference, local)
    print(f"sync_batchnorm: max |dw| = {diff_synced:.3g}; without: {diff_local:.3g}")
    assert diff_synced <= 1e-5
    assert diff_local > 1e-3


@pytest.mark.slow  # tests/test_training.py checks the saved streams differ by rank too
def test_each_rank_draws_its_own_random_numbers(tmp_path):
    """Under 2 processes each rank draws from its own random stream (seeded by rank), and the
    checkpoint keeps one random state per rank: after the same dropout draws they differ."""
    dropout = ["model.args.hidden=[32]", "model.args.dropout=0.2"]
    short = ["trainer.epochs=1", "trainer.limit_train_batches=3", "trainer.test_after_fit=false"]
    run = torchrun(tmp_path / "out", *SMALL, "data.batch_size=16", *dropout, *short)
    rng = checkpoint(run)["rng"]
    assert len(rng) == 2
    assert not torch.equal(rng[0]["torch"], rng[1]["torch"])
