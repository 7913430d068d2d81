"""End-to-end training through the command line: the demo, run directory, resume, DDP."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, free_port, run_dirs

from dltemplate.assemble import build_trainer
from dltemplate.config import load_config
from dltemplate.tasks.classification import ClassificationTask

DEMO = REPO / "configs" / "digits_mlp.yaml"


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["model"]


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_demo_reaches_95_percent_and_fills_the_run_directory(cli, tmp_path):
    assert cli("train", DEMO, f"experiment.output_dir={tmp_path / 'out'}") == 0
    (run,) = run_dirs(tmp_path / "out")
    test = json.loads((run / "test_metrics.json").read_text())
    assert test["accuracy"] >= 0.95

    stamp = run.name[: len("YYYYmmdd_HHMMSS")]  # the run directory: <stamp>_<run name>
    (cfg_file,) = run.glob(f"config_DigitsMLP_{stamp}.json")
    saved = json.loads(cfg_file.read_text())
    assert saved["model"]["name"] == "Vanilla" and saved["trainer"]["epochs"] == 15
    assert saved["_meta"]["torch"] == torch.__version__ and saved["_meta"]["python"]
    log = (run / "train.log").read_text().splitlines()
    assert run.name in log[0]
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == list(range(1, 16))
    assert {"train/loss", "val/loss", "val/accuracy", "lr"} <= rows[0].keys()
    assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert list((run / "summary").glob("events.out.tfevents.*"))

    best = torch.load(run / "Vanilla_best_ckpt.pth", weights_only=True)
    for key in (
        "model",
        "optimizer",
        "scheduler",
        "scaler",
        "epoch",
        "global_step",
        "best_score",
        "callbacks",
        "stopped_by",
        "rng",
        "config",
    ):
        assert key in best
    assert best["best_score"] == max(float(r["val/accuracy"]) for r in rows)
    last = torch.load(run / "Vanilla_last_ckpt.pth", weights_only=True)
    assert last["epoch"] == 15 and not any(k.startswith("module.") for k in last["model"])


def test_tensorboard_holds_step_loss_lr_and_epoch_metrics(cli, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "out"
    assert (
        cli(
            "train",
            DEMO,
            f"experiment.output_dir={out}",
            "trainer.epochs=2",
            "trainer.log_every_n_steps=5",
        )
        == 0
    )
    (run,) = run_dirs(out)
    acc = EventAccumulator(str(run / "summary"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {
        "train/loss_step",
        "train/lr",
        "train/loss",
        "val/loss",
        "val/accuracy",
        "train/accuracy",
        "val/f1_macro",
        "test/accuracy",
    } <= tags
    assert len(acc.Scalars("val/accuracy")) == 2
    assert len(acc.Scalars("train/loss_step")) >= 10  # 41 steps per epoch, one point every 5


def _interrupting_task(stop_at_step: int):
    """A classification task whose forward raises KeyboardInterrupt at a given optimizer step."""

    class Interrupt(ClassificationTask):
        calls = 0

        def forward(self, model, batch):
            if model.training:
                Interrupt.calls += 1
                if Interrupt.calls == stop_at_step + 1:
                    raise KeyboardInterrupt
            return super().forward(model, batch)

    return Interrupt


@pytest.mark.parametrize("stop_at_step", [50, 41 * 2])  # mid-epoch 2, and at its end
def test_resume_after_ctrl_c_matches_an_uninterrupted_run(cli, tmp_path, stop_at_step):
    common = ["trainer.epochs=3", "model.args.dropout=0.2", "scheduler.name=onecycle"]
    assert cli("train", DEMO, f"experiment.output_dir={tmp_path / 'full'}", *common) == 0
    (full,) = run_dirs(tmp_path / "full")

    out = tmp_path / "stopped"
    cfg = load_config(DEMO, [f"experiment.output_dir={out}", *common])
    task = _interrupting_task(stop_at_step)(cfg)
    with pytest.raises(KeyboardInterrupt):
        build_trainer(cfg, task).fit()
    (run,) = run_dirs(out)
    interrupt = torch.load(run / "Vanilla_interrupt_ckpt.pth", weights_only=True)
    assert interrupt["global_step"] == stop_at_step
    assert "checkpoint saved to" in (run / "train.log").read_text()

    assert cli("resume", run) == 0
    assert run_dirs(out) == [run]  # same run directory, no new one
    assert (
        max_diff(weights(run / "Vanilla_last_ckpt.pth"), weights(full / "Vanilla_last_ckpt.pth"))
        < 1e-6
    )
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    full_rows = list(csv.DictReader(open(full / "metrics.csv")))
    assert float(rows[-1]["val/loss"]) == pytest.approx(float(full_rows[-1]["val/loss"]), abs=1e-5)
    log = (run / "train.log").read_text()
    assert "started" in log and "resumed from" in log


def test_resume_last_and_train_with_trainer_resume(cli, tmp_path):
    out = tmp_path / "out"
    assert cli("train", DEMO, f"experiment.output_dir={out}", "trainer.epochs=2") == 0
    (run,) = run_dirs(out)
    # Asking for more epochs continues the same run directory from its last checkpoint.
    assert cli("resume", "last", "--output-dir", out, "trainer.epochs=3") == 0
    assert run_dirs(out) == [run]
    assert torch.load(run / "Vanilla_last_ckpt.pth", weights_only=True)["epoch"] == 3
    assert (
        cli(
            "train",
            DEMO,
            f"experiment.output_dir={out}",
            "trainer.epochs=4",
            f"trainer.resume={run}",
        )
        == 0
    )
    assert run_dirs(out) == [run]
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]


@pytest.mark.slow  # torchrun with 2 processes (test_equivalence has more)
def test_two_processes_with_half_batches_match_one_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = [str(DEMO), "trainer.epochs=2", "model.args.dropout=0.0"]
    one = subprocess.run(
        [
            sys.executable,
            "-m",
            "dltemplate",
            "train",
            *common,
            "data.batch_size=32",
            f"experiment.output_dir={tmp_path / 'one'}",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(free_port()),
            "-m",
            "dltemplate",
            "train",
            *common,
            "data.batch_size=16",
            f"experiment.output_dir={tmp_path / 'two'}",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert two.returncode == 0, two.stderr
    (run_one,) = run_dirs(tmp_path / "one")
    (run_two,) = run_dirs(tmp_path / "two")  # one run directory, not one per process
    assert (
        max_diff(
            weights(run_one / "Vanilla_last_ckpt.pth"), weights(run_two / "Vanilla_last_ckpt.pth")
        )
        < 1e-5
    )
    # Metrics reduced across processes, each test sample counted once: identical results.
    m1 = json.loads((run_one / "test_metrics.json").read_text())
    m2 = json.loads((run_two / "test_metrics.json").read_text())
    assert m1["accuracy"] == pytest.approx(m2["accuracy"], abs=1e-9)
    assert m1["loss"] == pytest.approx(m2["loss"], abs=1e-5)
    # Each process has its own random stream, saved per rank.
    rng = torch.load(run_two / "Vanilla_last_ckpt.pth", weights_only=True)["rng"]
    assert len(rng) == 2 and not torch.equal(rng[0]["torch"], rng[1]["torch"])
    # Rank 0 alone logs: each epoch line appears once in the log.
    assert (run_two / "train.log").read_text().count("epoch 1/2 ") == 1
