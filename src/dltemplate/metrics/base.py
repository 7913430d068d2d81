"""Metrics that accumulate over batches and reduce across processes.

A metric keeps its state as tensors that add up (counts, sums), so the state of N processes is
combined with one all-reduce (sum) and the result equals that of one process seeing every sample.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch


class Metric:
    """Base class: ``update`` per batch, ``compute`` scalars, ``report`` everything (JSON-able)."""

    def reset(self) -> None:
        """Forget all accumulated state."""
        raise NotImplementedError

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        """Accumulate one batch of model outputs and targets."""
        raise NotImplementedError

    def state(self) -> list[torch.Tensor]:
        """The tensors that add up across processes (reduced in place by the engine)."""
        raise NotImplementedError

    def compute(self) -> dict[str, float]:
        """Scalar results, logged per epoch."""
        raise NotImplementedError

    def report(self) -> dict[str, Any]:
        """Everything, including non-scalar results, for the evaluation report."""
        return dict(self.compute())


class MetricCollection:
    """Several metrics updated, reduced and computed together."""

    def __init__(self, metrics: Iterable[Metric]) -> None:
        self.metrics = list(metrics)

    def reset(self) -> None:
        """Reset every metric."""
        for m in self.metrics:
            m.reset()

    @torch.no_grad()
    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        """Update every metric with one batch."""
        for m in self.metrics:
            m.update(outputs, targets)

    def sync(self, all_reduce_sum: Callable[[list[torch.Tensor]], None]) -> None:
        """Sum every metric's state across processes (a no-op function on one process)."""
        tensors = [t for m in self.metrics for t in m.state()]
        if tensors:
            all_reduce_sum(tensors)

    def compute(self) -> dict[str, float]:
        """All scalar results in one dict."""
        out: dict[str, float] = {}
        for m in self.metrics:
            out.update(m.compute())
        return out

    def report(self) -> dict[str, Any]:
        """All results, scalar or not, in one dict."""
        out: dict[str, Any] = {}
        for m in self.metrics:
            out.update(m.report())
        return out
