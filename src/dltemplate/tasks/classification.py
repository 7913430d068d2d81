"""Image classification: uint8 images normalised on the device, logits, class metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dltemplate.data.base import Batch, DataInfo, channel_stats
from dltemplate.data.image_folder import check_image, decode_image
from dltemplate.engine.task import Task
from dltemplate.errors import ConfigError, UsageError
from dltemplate.metrics.classification import DEFAULT_TOP_K
from dltemplate.models.heads import heads, merged_prediction
from dltemplate.registry import TASKS

PREDICT_BATCH = 64  # images decoded and run at once by predict


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
            x = self.normalize_inputs(x, info)
        return Batch(x, batch.targets.to(device, non_blocking=True), batch.global_size)

    def normalize_inputs(self, x: torch.Tensor, info: DataInfo) -> torch.Tensor:
        """Inputs on the [0, 1] scale minus the dataset's mean, over its std, per channel;
        float64 (NumPy's default) as float32, the models' type."""
        if x.dtype == torch.float64:
            x = x.float()
        mean, std = channel_stats(info, x.device)
        shape = (1, -1) + (1,) * (x.dim() - 2)  # also for inputs that are not images
        return (x - mean.view(shape)) / std.view(shape)

    def predictions(self, outputs: Any) -> torch.Tensor:
        """Class probabilities: the softmax of the logits (of the mean of the heads' logits)."""
        return torch.softmax(merged_prediction(outputs).float(), dim=1)

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

    @torch.no_grad()
    def predict(
        self,
        model: nn.Module,
        paths: list[Path],
        device: torch.device,
        info: DataInfo,
        top_k: int = 1,
    ) -> list[dict[str, Any]]:
        """The ``top_k`` most probable classes of each image file, with their probabilities.

        Images are decoded as image_folder decodes its data (resized bilinearly to the run's
        size, grey or RGB as its inputs are, uint8), normalised by :meth:`prepare_batch` and
        run :data:`PREDICT_BATCH` at a time on ``device``. Every header is read first, so a
        file that is not an image (or too large to decode safely) stops with a DataError
        naming it before any work; one whose pixels turn out corrupt stops when reached."""
        shape = tuple(info.input_shape)
        if len(shape) != 3 or shape[0] not in (1, 3):
            raise UsageError(
                f"predict reads image files, but the run's inputs have shape {shape}, not "
                "(channels, height, width) with 1 (grey) or 3 (RGB) channels"
            )
        if not 1 <= top_k <= info.num_classes:
            raise UsageError(f"--top-k {top_k}: must be 1 to {info.num_classes} (the classes)")
        for path in paths:
            check_image(path)
        names = list(info.class_names)
        names += [str(i) for i in range(len(names), info.num_classes)]  # unnamed classes
        size, grayscale = (int(shape[1]), int(shape[2])), shape[0] == 1
        model.eval()
        records = []
        for start in range(0, len(paths), PREDICT_BATCH):
            chunk = paths[start : start + PREDICT_BATCH]
            images = np.stack([decode_image(path, size, grayscale) for path in chunk])
            labels = torch.zeros(len(chunk), dtype=torch.long)  # none: predict has no targets
            batch = self.prepare_batch(Batch(torch.from_numpy(images), labels, len(chunk)),
                                       device, info)  # fmt: skip
            # the same probabilities dltemplate export and load_model give
            best = self.predictions(self.forward(model, batch)).topk(top_k, dim=1)
            for path, probs, classes in zip(chunk, best.values.tolist(), best.indices.tolist()):
                records.append(
                    {
                        "file": str(path),
                        "predictions": [
                            {"class": names[c], "probability": p} for c, p in zip(classes, probs)
                        ],
                    }
                )
        return records
