"""Running averages that weigh each batch by its size."""

from __future__ import annotations

import torch


class AverageMeter:
    """Mean of per-batch values weighted by batch size (a short last batch counts less).

    The sum stays a tensor on the value's device, so updating never waits for the GPU.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget everything."""
        self.sum = torch.zeros((), dtype=torch.float64)
        self.count = torch.zeros((), dtype=torch.float64)
        self._pending = 0  # samples counted but not yet added into ``count``

    def update(self, value: torch.Tensor | float, n: int = 1) -> None:
        """Add a batch whose mean is ``value`` over ``n`` samples."""
        if not isinstance(value, torch.Tensor):
            value = torch.tensor(float(value))
        if self.sum.device != value.device:  # once: the sums live where the values are
            self.sum, self.count = self.sum.to(value.device), self.count.to(value.device)
        self.sum.add_(value.detach(), alpha=n)  # in place, in float64: one op per batch
        self._pending += n  # a Python int: counts are exact, added when read

    def state(self) -> list[torch.Tensor]:
        """Sum and count, which add up across processes (reduced and restored in place)."""
        if self._pending:
            self.count.add_(self._pending)
            self._pending = 0
        return [self.sum, self.count]

    @property
    def avg(self) -> float:
        """The weighted mean so far (0 before any update)."""
        total, count = self.state()
        return float(total / count) if float(count) > 0 else 0.0
