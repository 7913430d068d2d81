"""The evaluation loop shared by validation, the final test and ``dltemplate eval``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from dltemplate.data.base import Batch, DataInfo
from dltemplate.data.loader import IndexLoader
from dltemplate.engine import distributed as D
from dltemplate.engine.meters import AverageMeter
from dltemplate.engine.precision import Precision
from dltemplate.engine.task import Task
from dltemplate.metrics.base import MetricCollection


class Evaluation:
    """The evaluation loop, assembled once from a task, its loss and metrics, and used alike by
    the trainer (validation, test) and by ``dltemplate eval``."""

    def __init__(
        self,
        task: Task,
        criterion: nn.Module,
        metrics: MetricCollection,
        info: DataInfo,
        device: torch.device,
        precision: Precision,
    ) -> None:
        self.task, self.criterion, self.metrics = task, criterion, metrics
        self.info, self.device, self.precision = info, device, precision

    @torch.no_grad()
    def run(
        self,
        model: nn.Module,
        loader: IndexLoader,
        on_batch: Callable[[int, Batch, Any], None] | None = None,
    ) -> dict[str, float]:
        """Mean loss and metrics of ``model`` over ``loader``, reduced across processes (each
        sample once); ``{}`` for an empty loader. ``on_batch(index, batch, outputs)`` sees
        every batch (pictures, sample predictions)."""
        task = self.task
        model.eval()
        self.metrics.reset()
        meter = AverageMeter()
        for i, batch in enumerate(loader):
            batch = task.prepare_batch(batch, self.device, self.info)
            with self.precision.autocast():
                outputs = task.forward(model, batch)
                loss = task.compute_loss(self.criterion, outputs, batch)
            meter.update(loss, len(batch.targets))
            task.update_metrics(self.metrics, outputs, batch)
            if on_batch is not None:
                on_batch(i, batch, outputs)
        self.metrics.sync(D.all_reduce_sum)
        D.all_reduce_sum(meter.state())
        return {"loss": meter.avg, **self.metrics.compute()} if float(meter.state()[1]) else {}
