"""Image classification: uint8 images normalised on the device, logits, class metrics."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dltemplate.data.base import Batch, DataInfo, channel_stats
from dltemplate.engine.task import Task
from dltemplate.errors import ConfigError
from dltemplate.metrics.classification import DEFAULT_TOP_K
from dltemplate.models.heads import heads
from dltemplate.registry import TASKS


@TASKS.register("classification")
class ClassificationTask(Task):
    """Cross-entropy on logits; accuracy, top-k, precision/recall/F1 and a confusion matrix."""

    def default_metrics(self, info: DataInfo) -> list[str]:
        """Every classification run logs these; top-5 accuracy only with more than 5 classes
        (with 5 or fewer it is always 1)."""
        names = ["accuracy", "topk_accuracy", "precision_recall_f1"]  # the last: the matrix too
        if info.num_classes <= DEFAULT_TOP_K:
            names.remove("topk_accuracy")
        return names

    def prepare_batch(self, batch: Batch, device: torch.device, info: DataInfo) -> Batch:
        """Move to ``device`` first (uint8 is 4x less to copy), then scale and normalise there."""
        x = batch.inputs.to(device, non_blocking=True)
        mean, std = channel_stats(info, x.device)
        shape = (1, -1) + (1,) * (x.dim() - 2)  # also for inputs that are not images
        if x.dtype == torch.uint8:  # a fresh float copy: normalised in place, no more copies
            x = x.float().div_(255.0).sub_(mean.view(shape)).div_(std.view(shape))
        else:  # x may be the dataset's own tensor: not in place
            x = (x - mean.view(shape)) / std.view(shape)
        return Batch(x, batch.targets.to(device, non_blocking=True), batch.global_size)

    def check_model(self, model: nn.Module, info: DataInfo, device: torch.device) -> None:
        """One forward pass of two blank inputs before any data is read: the model must give
        ``(N, num_classes)`` logits (a library model left with its 1000-class head would fail
        in the loss only after the run had started, leaving checkpoints that cannot resume)."""
        inputs = torch.zeros((2, *info.input_shape), device=device)
        batch = Batch(inputs, torch.zeros(2, dtype=torch.long, device=device), 2)
        was_training = model.training
        model.eval()  # no dropout draws, no BatchNorm statistics touched
        try:
            with torch.no_grad():
                outputs = self.forward(model, batch)
        finally:
            model.train(was_training)
        shapes = [tuple(o.shape) for o in heads(outputs)]
        if any(shape != (2, info.num_classes) for shape in shapes):
            raise ConfigError(
                f"model.name={self.cfg.model.name}: for 2 inputs of shape "
                f"{tuple(info.input_shape)} it returns {', '.join(map(str, shapes))}, but the data "
                f"has {info.num_classes} classes: the model must return (N, {info.num_classes}) "
                "logits (give a library model num_classes, or replace its head)"
            )

    def describe_predictions(
        self, batch: Batch, outputs: torch.Tensor, info: DataInfo, limit: int = 10
    ) -> list[dict[str, Any]]:
        """The first ``limit`` predictions of a batch with their labels, by class name."""
        pred = outputs.argmax(1)[:limit].tolist()
        true = batch.targets[:limit].tolist()
        names = info.class_names
        return [
            {"prediction": names[p], "label": names[t], "correct": p == t}
            for p, t in zip(pred, true)
        ]
