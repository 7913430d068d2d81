"""The optional pieces of the loop, each checked by what a user would see."""

from __future__ import annotations

import csv
import json
import logging
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, readme_block, run_dirs

from dltemplate.assemble import build_trainer
from dltemplate.config import load_config
from dltemplate.engine.trainer import TrainerBase
from dltemplate.tasks.classification import ClassificationTask

DEMO = REPO / "configs" / "digits_mlp.yaml"


def rows(run: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(open(run / "metrics.csv")))


def trainer(tmp_path: Path, *overrides: str) -> TrainerBase:
    cfg = load_config(DEMO, [f"experiment.output_dir={tmp_path / 'out'}", *overrides])
    return build_trainer(cfg, ClassificationTask(cfg))


def test_fast_dev_run_runs_one_batch_per_split_and_writes_no_checkpoint(cli, tmp_path):
    assert cli("train", DEMO, f"experiment.output_dir={tmp_path}", "trainer.fast_dev_run=2") == 0
    (run,) = run_dirs(tmp_path)
    assert not list(run.glob("*.pth"))
    assert len(rows(run)) == 1
    t = trainer(tmp_path, "trainer.fast_dev_run=2")
    assert (len(t.train_loader), len(t.val_loader), len(t.test_loader)) == (2, 2, 2)
    t.close()


def test_limit_batches_int_and_fraction(tmp_path):
    t = trainer(tmp_path, "trainer.limit_train_batches=3", "trainer.limit_val_batches=0.5")
    assert len(t.train_loader) == 3
    assert len(t.val_loader) == max(1, int(t.val_loader.full_length() * 0.5))
    t.close()


def test_overfit_batches_memorises_them(cli, tmp_path):
    assert (
        cli(
            "train",
            DEMO,
            f"experiment.output_dir={tmp_path}",
            "trainer.overfit_batches=2",
            "trainer.epochs=30",
            "scheduler.name=none",
            "optimizer.lr=0.003",
        )
        == 0
    )
    last = rows(run_dirs(tmp_path)[0])[-1]
    assert float(last["train/accuracy"]) == 1.0 and float(last["val/accuracy"]) == 1.0


def test_early_stopping_stops_after_patience(cli, tmp_path, caplog):
    # lr=0: validation never improves after the first epoch.
    assert (
        cli(
            "train",
            DEMO,
            f"experiment.output_dir={tmp_path}",
            "optimizer.lr=0.0",
            "trainer.early_stopping_patience=2",
            "trainer.epochs=10",
        )
        == 0
    )
    assert len(rows(run_dirs(tmp_path)[0])) == 3
    assert "early stopping" in (run_dirs(tmp_path)[0] / "train.log").read_text()


def test_plateau_scheduler_is_fed_the_monitored_metric(cli, tmp_path):
    assert cli("train", DEMO, f"experiment.output_dir={tmp_path}", "trainer.epochs=4",
               "scheduler.name=plateau", "scheduler.args={patience: 0, factor: 0.5}",
               "trainer.monitor=val/loss", "trainer.monitor_mode=min",
               "optimizer.name=sgd", "optimizer.lr=1e-6") == 0  # fmt: skip
    lrs = [float(r["lr"]) for r in rows(run_dirs(tmp_path)[0])]
    # val/loss barely moves with a tiny lr: epoch 1 sets the best, and each epoch after it
    # (patience 0) halves the rate for the next one.
    assert lrs == pytest.approx([1e-6, 1e-6, 5e-7, 2.5e-7])


def test_step_scheduler_steps_per_epoch_and_onecycle_per_step(tmp_path):
    t = trainer(
        tmp_path,
        "scheduler.name=step",
        "scheduler.args={step_size: 1, gamma: 0.5}",
        "trainer.epochs=2",
        "trainer.limit_train_batches=2",
        "trainer.test_after_fit=false",
    )
    t.fit()
    assert t.lr == pytest.approx(0.001 * 0.25)
    t = trainer(
        tmp_path,
        "scheduler.name=onecycle",
        "trainer.epochs=1",
        "trainer.limit_train_batches=4",
        "trainer.test_after_fit=false",
    )
    assert t.schedule.per_step and t.scheduler.total_steps == 4
    t.fit()
    assert t.scheduler.last_epoch == 4


def test_clip_grad_norm_bounds_each_sgd_update(tmp_path):
    t = trainer(
        tmp_path,
        "optimizer.name=sgd",
        "optimizer.lr=1.0",
        "trainer.clip_grad_norm=0.001",
        "trainer.epochs=1",
        "trainer.limit_train_batches=1",
        "trainer.test_after_fit=false",
    )
    before = [p.detach().clone() for p in t.model.parameters()]
    t.fit()
    change = torch.sqrt(sum(((p - b) ** 2).sum() for p, b in zip(t.model.parameters(), before)))
    assert 0 < change <= 0.001 * 1.0001


def test_clip_grad_value_bounds_each_element(tmp_path):
    t = trainer(
        tmp_path,
        "optimizer.name=sgd",
        "optimizer.lr=1.0",
        "trainer.clip_grad_value=1e-4",
        "trainer.epochs=1",
        "trainer.limit_train_batches=1",
        "trainer.test_after_fit=false",
    )
    before = [p.detach().clone() for p in t.model.parameters()]
    t.fit()
    biggest = max((p - b).abs().max() for p, b in zip(t.model.parameters(), before))
    assert 0 < biggest <= 1e-4 * 1.0001


def test_gradient_accumulation_equals_a_larger_batch(tmp_path):
    common = [
        "trainer.epochs=1",
        "trainer.test_after_fit=false",
        "optimizer.name=sgd",
        "optimizer.lr=0.1",
        "scheduler.name=none",
    ]
    big = trainer(tmp_path, *common, "data.batch_size=32", "trainer.limit_train_batches=5")
    big.fit()
    small = trainer(
        tmp_path,
        *common,
        "data.batch_size=16",
        "trainer.grad_accum_steps=2",
        "trainer.limit_train_batches=10",
    )
    small.fit()
    assert small.state.global_step == big.state.global_step == 5
    for a, b in zip(big.model.parameters(), small.model.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_bf16_precision_trains_on_cpu(cli, tmp_path):
    assert (
        cli(
            "train",
            DEMO,
            f"experiment.output_dir={tmp_path}",
            "trainer.precision=bf16",
            "trainer.epochs=3",
        )
        == 0
    )
    assert json.loads((run_dirs(tmp_path)[0] / "test_metrics.json").read_text())["accuracy"] > 0.8


def test_seed_makes_runs_repeatable_and_deterministic_option(tmp_path):
    a = trainer(
        tmp_path,
        "trainer.epochs=1",
        "trainer.test_after_fit=false",
        "model.args.dropout=0.3",
        "experiment.deterministic=true",
    )
    a.fit()
    b = trainer(
        tmp_path,
        "trainer.epochs=1",
        "trainer.test_after_fit=false",
        "model.args.dropout=0.3",
        "experiment.deterministic=true",
    )
    b.fit()
    assert torch.are_deterministic_algorithms_enabled()
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(p, q)
    # the next run of the process (a notebook, these tests) does not keep the setting
    trainer(tmp_path, "trainer.epochs=1", "trainer.test_after_fit=false")
    assert not torch.are_deterministic_algorithms_enabled()


def test_gpu_devices_that_do_not_exist_fall_back_to_cpu(cli, tmp_path):
    assert (
        cli(
            "train",
            DEMO,
            f"experiment.output_dir={tmp_path}",
            "experiment.gpu_devices=[1]",
            "trainer.fast_dev_run=1",
        )
        == 0
    )
    log = (run_dirs(tmp_path)[0] / "train.log").read_text()
    assert "falling back to the CPU" in log and "device cpu" in log


def test_sub_sampling_rates_shrink_the_splits(tmp_path):
    t = trainer(tmp_path, "data.train_val_sample_rate=0.5", "data.test_sample_rate=0.5")
    full = trainer(tmp_path)
    assert len(t.data.train) + len(t.data.val) == pytest.approx(
        (len(full.data.train) + len(full.data.val)) / 2, abs=1
    )
    assert len(t.data.test) == pytest.approx(len(full.data.test) / 2, abs=1)
    t.close()
    full.close()


def test_eval_prints_metrics_confusion_matrix_and_named_predictions(cli, tmp_path, capsys):
    assert cli("train", DEMO, f"experiment.output_dir={tmp_path}", "trainer.epochs=2") == 0
    run = run_dirs(tmp_path)[0]
    capsys.readouterr()
    assert cli("eval", run) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "confusion matrix" in out and "predicted" in out
    report = json.loads((run / "eval_test_best.json").read_text())
    test = json.loads((run / "test_metrics.json").read_text())
    assert report["metrics"]["accuracy"] == pytest.approx(test["accuracy"])
    assert sum(map(sum, report["report"]["confusion_matrix"])) == report["num_samples"]


def readme_commands(first_line: str) -> list[list[str]]:
    """The ``dltemplate ...`` command lines of a README block, split as a shell would."""
    return [shlex.split(line)[1:] for line in readme_block(first_line).splitlines()]


def test_plugin_model_by_decorator_and_by_path_as_the_readme_shows(cli, tmp_path):
    (tmp_path / "my_models.py").write_text(readme_block("# my_models.py"))
    by_name, by_path = readme_commands(
        "dltemplate train configs/digits_mlp.yaml experiment.imports=[my_models]"
    )
    common = [f"experiment.output_dir={tmp_path / 'a'}", "trainer.epochs=1"]
    assert cli(by_name[0], DEMO, *by_name[2:], *common) == 0
    assert (run_dirs(tmp_path / "a")[0] / "TinyNet_best_ckpt.pth").exists()
    common = [f"experiment.output_dir={tmp_path / 'b'}", "trainer.epochs=1"]
    assert cli(by_path[0], DEMO, *by_path[2:], *common) == 0
    run = run_dirs(tmp_path / "b")[0]
    assert torch.load(run / "TinyNet_best_ckpt.pth", weights_only=True)["config"]["model"] == {
        "name": "my_models:TinyNet",
        "args": {"width": 16},
    }
    assert cli("eval", run) == 2  # the saved config imports code: only when trusted
    assert cli("eval", run, "--trust-code") == 0  # the saved config finds the model again


def test_plugin_dataset_as_the_readme_shows(cli, tmp_path):
    (tmp_path / "my_data.py").write_text(readme_block("# my_data.py"))
    (command,) = readme_commands(
        "dltemplate train configs/digits_mlp.yaml experiment.imports=[my_data]"
    )
    assert (
        cli(command[0], DEMO, *command[2:], f"experiment.output_dir={tmp_path}", "trainer.epochs=2")
        == 0
    )
    test = json.loads((run_dirs(tmp_path)[0] / "test_metrics.json").read_text())
    assert test["accuracy"] == 1.0


def test_an_exception_saves_a_checkpoint_and_exits_1(cli, tmp_path, monkeypatch):
    def boom(self, *args):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(TrainerBase, "end_epoch", boom)
    assert cli("train", DEMO, f"experiment.output_dir={tmp_path}", "trainer.epochs=2") == 1
    run = run_dirs(tmp_path)[0]
    assert (run / "Vanilla_interrupt_ckpt.pth").exists()
    log = (run / "train.log").read_text()
    assert "RuntimeError" in log and "Vanilla_interrupt_ckpt.pth" in log
    logging.getLogger("dltemplate").handlers.clear()


def test_compile_wraps_the_model_and_checkpoints_stay_unprefixed(tmp_path):
    t = trainer(tmp_path, "trainer.compile=true")
    assert hasattr(t.train_model, "_orig_mod")  # torch.compile's wrapper (compiles lazily)
    keys = list(t.run_state.state_dict()["model"])
    assert keys and not any(k.startswith(("_orig_mod.", "module.")) for k in keys)
    t.close()


def test_plain_progress_lines_when_not_a_terminal(cli, tmp_path):
    assert (
        cli(
            "train",
            DEMO,
            f"experiment.output_dir={tmp_path}",
            "trainer.epochs=1",
            "trainer.log_every_n_steps=10",
        )
        == 0
    )
    log = (run_dirs(tmp_path)[0] / "train.log").read_text()
    # the rate's digits depend on the machine's speed: 1234 or 12.3 samples/s
    assert re.search(r"epoch 1/1 \[10/41\] 24%, loss \d+\.\d+, \d+(\.\d+)? samples/s", log)


def test_sigterm_saves_the_interrupt_checkpoint(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "dltemplate", "train", str(DEMO), "trainer.epochs=1000",
         "model.args.hidden=[32]", f"experiment.output_dir={tmp_path}"],
        stderr=subprocess.PIPE, text=True, cwd=tmp_path,
    )  # fmt: skip
    for line in proc.stderr:  # wait until training is under way
        if "epoch 1/1000 train/" in line:  # the end of epoch 1
            break
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == 130
    run = run_dirs(tmp_path)[0]
    state = torch.load(run / "Vanilla_interrupt_ckpt.pth", weights_only=True)
    assert state["global_step"] >= 41  # past the first epoch
    assert "checkpoint saved to" in (run / "train.log").read_text()


def test_small_cnn_learns_digits(cli, tmp_path):
    assert (
        cli(
            "train",
            DEMO,
            f"experiment.output_dir={tmp_path}",
            "model.name=SmallCNN",
            "model.args={width: 16}",
            "trainer.epochs=3",
            "optimizer.lr=0.003",
        )
        == 0
    )
    assert json.loads((run_dirs(tmp_path)[0] / "test_metrics.json").read_text())["accuracy"] > 0.9


def test_progress_bar_on_shows_loss_and_throughput(cli, tmp_path, capsys):
    assert (
        cli(
            "train",
            DEMO,
            f"experiment.output_dir={tmp_path}",
            "trainer.epochs=1",
            "trainer.progress_bar=on",
            "trainer.log_every_n_steps=5",
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "epoch 1/1" in err and "loss=" in err and "samples_s=" in err
