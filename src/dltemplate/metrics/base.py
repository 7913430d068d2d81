"""Metrics that accumulate over batches and reduce across processes.

A metric keeps its state as tensors that add up (counts, sums), so the state of N processes is
combined with one all-reduce (sum) and the result equals that of one process seeing every sample.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch


class Metric:
    """Base class: ``update`` per batch, ``compute`` scalars, ``report`` everything (JSON-able).

    Set ``counts_only = True`` when the state is whole-number counts (correct predictions, a
    confusion matrix): updates may then be gathered and applied several batches at once, with
    exactly the same result, which saves many small operations per batch.
    """

    counts_only = False

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
    """Several metrics updated, reduced and computed together.

    When every metric counts (``counts_only``), batches are kept and applied together, every
    ``defer`` batches and before the state is read: a few operations per ``defer`` batches
    instead of per batch, with bit-identical counts.
    """

    def __init__(self, metrics: Iterable[Metric], defer: int = 32) -> None:
        self.metrics = list(metrics)
        self.defer = defer if self.metrics and all(m.counts_only for m in self.metrics) else 0
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []

    def reset(self) -> None:
        """Reset every metric."""
        self._pending.clear()
        for m in self.metrics:
            m.reset()

    @torch.no_grad()
    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        """Update every metric with one batch (or keep it for the next :meth:`flush`)."""
        if self.defer:
            self._pending.append((outputs, targets))
            if len(self._pending) >= self.defer:
                self.flush()
            return
        for m in self.metrics:
            m.update(outputs, targets)

    @torch.no_grad()
    def flush(self) -> None:
        """Apply the batches kept so far."""
        if not self._pending:
            return
        outputs = torch.cat([o for o, _ in self._pending])
        targets = torch.cat([t for _, t in self._pending])
        self._pending.clear()
        for m in self.metrics:
            m.update(outputs, targets)

    def state(self) -> list[torch.Tensor]:
        """Every metric's state tensors, up to date (checkpointed and reduced in place)."""
        self.flush()
        return [t for m in self.metrics for t in m.state()]

    def sync(self, all_reduce_sum: Callable[[list[torch.Tensor]], None]) -> None:
        """Sum every metric's state across processes (a no-op function on one process)."""
        tensors = self.state()
        if tensors:
            all_reduce_sum(tensors)

    def compute(self) -> dict[str, float]:
        """All scalar results in one dict."""
        self.flush()
        out: dict[str, float] = {}
        for m in self.metrics:
            out.update(m.compute())
        return out

    def report(self) -> dict[str, Any]:
        """All results, scalar or not, in one dict."""
        self.flush()
        out: dict[str, Any] = {}
        for m in self.metrics:
            out.update(m.report())
        return out
