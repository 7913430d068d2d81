"""Image classification: uint8 images normalised on the device, logits, class metrics."""

from __future__ import annotations

from typing import Any

import torch

from dltemplate.data.base import Batch, DataInfo, channel_stats
from dltemplate.engine.task import Task
from dltemplate.metrics.classification import DEFAULT_TOP_K
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
