"""Issue #7: ``train`` and ``eval`` work for a task that is not classification (a regression task
written here), and outputs that would silently broadcast against their targets are an error."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import run_dirs
from torch import nn

from dltemplate.cli import format_report
from dltemplate.data.base import Batch, DataInfo, InMemoryDataset, TensorSplit
from dltemplate.engine.task import Task
from dltemplate.metrics.base import Metric, MetricCollection
from dltemplate.registry import DATASETS, METRICS, MODELS, TASKS

WEIGHTS = torch.linspace(-1.0, 1.0, 8)


@DATASETS.register("any_task_linear")
class LinearData(InMemoryDataset):
    """``y = x . w + 0.5 + noise`` for 8 random features; no official test split."""

    info = DataInfo(input_shape=(8,), num_classes=1, class_names=[])

    def load(self) -> tuple[TensorSplit, TensorSplit | None]:
        """240 samples, the same every time."""
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(240, 8, generator=gen)
        y = x @ WEIGHTS + 0.5 + 0.05 * torch.randn(240, generator=gen)
        return TensorSplit(x, y), None


@MODELS.register("any_task_linear_model")
class LinearModel(nn.Module):
    """One linear layer; ``(N,)`` outputs, or ``(N, 1)`` with ``keep_dim``."""

    def __init__(self, input_shape: tuple[int, ...] = (8,), keep_dim: bool = False) -> None:
        super().__init__()
        self.linear = nn.Linear(input_shape[0], 1)
        self.keep_dim = keep_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Predictions for a batch of feature vectors."""
        y = self.linear(x)
        return y if self.keep_dim else y.squeeze(1)


@METRICS.register("any_task_mse")
class MeanSquaredError(Metric):
    """Mean squared error over every sample seen."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Zero the sums."""
        self.sum = torch.zeros((), dtype=torch.float64)
        self.count = torch.zeros((), dtype=torch.float64)

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        """Add the batch's squared errors."""
        errors = (outputs.double() - targets.double()) ** 2
        self.sum = self.sum.to(outputs.device) + errors.sum()
        self.count = self.count.to(outputs.device) + targets.numel()

    def state(self) -> list[torch.Tensor]:
        """The sum of squared errors and the sample count."""
        return [self.sum, self.count]

    def compute(self) -> dict[str, float]:
        """``{"mse": sum / count}``."""
        return {"mse": float(self.sum / self.count.clamp(min=1))}


@TASKS.register("any_task_regression")
class RegressionTask(Task):
    """Regression of one number per sample; predictions described by their first feature."""

    def default_metrics(self, info: DataInfo) -> list[str]:
        """Every run of this task logs the MSE."""
        return ["any_task_mse"]

    def update_metrics(self, metrics: MetricCollection, outputs: Any, batch: Batch) -> None:
        """Feed the predictions, flattened, to the metrics."""
        metrics.update(outputs.float().reshape(-1), batch.targets)

    def describe_predictions(
        self, batch: Batch, outputs: torch.Tensor, info: DataInfo, limit: int = 10
    ) -> list[dict[str, Any]]:
        """The first feature, the prediction and the target of the first ``limit`` samples."""
        return [
            {"x0": round(float(x[0]), 3), "predicted": round(float(p), 3), "target": round(t, 3)}
            for x, p, t in zip(
                batch.inputs[:limit], outputs[:limit].reshape(-1), batch.targets[:limit].tolist()
            )
        ]


CONFIG = """\
experiment:
  name: AnyTask
  task: any_task_regression
  seed: 0
data:
  name: any_task_linear
  batch_size: 32
model:
  name: any_task_linear_model
loss:
  name: mse
optimizer:
  name: adam
  lr: 0.05
trainer:
  epochs: 3
  monitor: val/loss
  monitor_mode: min
  progress_bar: "off"
"""


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """The regression run's YAML config."""
    path = tmp_path / "any_task.yaml"
    path.write_text(CONFIG)
    return path


def test_a_regression_task_trains_and_evaluates(cli, config, tmp_path, capsys):
    out_dir = tmp_path / "runs"
    assert cli("train", config, f"experiment.output_dir={out_dir}", "loss.name=mse") == 0
    run = run_dirs(out_dir)[0]
    capsys.readouterr()
    assert cli("eval", run) == 0
    out = capsys.readouterr().out
    assert "loss:" in out and "mse:" in out and "sample predictions:" in out
    sample_lines = [line for line in out.splitlines() if line.startswith("  x0 ")]
    assert len(sample_lines) == 10
    assert ", predicted " in sample_lines[0] and ", target " in sample_lines[0]
    report = json.loads((run / "eval_test_best.json").read_text())
    assert report["num_samples"] == 48  # 20 % of 240 set aside by seed
    assert set(report["samples"][0]) == {"x0", "predicted", "target"}
    test = json.loads((run / "test_metrics.json").read_text())
    assert report["metrics"]["mse"] == pytest.approx(test["mse"])
    assert report["metrics"]["mse"] == pytest.approx(report["metrics"]["loss"], rel=1e-5)


def test_outputs_that_would_broadcast_are_an_error_naming_both_shapes(
    cli, config, tmp_path, capsys
):
    out_dir = tmp_path / "runs"
    status = cli("train", config, f"experiment.output_dir={out_dir}", "model.args={keep_dim: true}")
    assert status == 2
    err = capsys.readouterr().err
    assert "loss.name=mse: the model's outputs have shape (32, 1) but the targets (32,)" in err
    assert "they would broadcast to (32, 32)" in err


def test_integer_targets_and_other_losses_are_not_checked():
    cfg = type("Cfg", (), {"loss": type("Loss", (), {"name": "x"})()})()
    task = Task(cfg)  # type: ignore[arg-type]
    logits, labels = torch.randn(4, 3), torch.tensor([0, 2, 1, 0])
    loss = task.compute_loss(nn.CrossEntropyLoss(), logits, Batch(logits, labels, 4))
    assert loss.shape == ()
    masks = torch.ones(4, 5, 5)  # (N, H, W) float masks against (N, 1, H, W) logits

    def own_loss(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (o.squeeze(1) - t).abs().mean()

    assert task.compute_loss(own_loss, torch.zeros(4, 1, 5, 5), Batch(masks, masks, 4)) == 1.0


def test_format_report_prints_any_entry():
    report = {
        "checkpoint": "ckpt.pth",
        "split": "test",
        "num_samples": 3,
        "metrics": {"loss": 0.25, "note": "n/a"},
        "report": {},
        "samples": [
            {"prediction": "cat", "label": "dog", "correct": False},
            {"prediction": 1.5, "label": 1.25},
            {"x0": 0.1, "predicted": 1.2},
            [1, 2],
        ],
    }
    lines = format_report(report).splitlines()
    assert lines[1:3] == ["  loss: 0.2500", "  note: n/a"]
    assert lines[4].startswith("  predicted 'cat'") and lines[4].endswith("label 'dog'  (wrong)")
    assert lines[5].startswith("  predicted 1.5") and lines[5].endswith("label 1.25")
    assert lines[6:] == ["  x0 0.1, predicted 1.2", "  [1, 2]"]
