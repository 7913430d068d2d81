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

    def update(self, value: torch.Tensor | float, n: int = 1) -> None:
        """Add a batch whose mean is ``value`` over ``n`` samples."""
        value = torch.as_tensor(value).detach()
        if self.sum.device != value.device:  # once: the sums live where the values are
            self.sum, self.count = self.sum.to(value.device), self.count.to(value.device)
        self.sum.add_(value, alpha=n)  # in place, in float64: one small op per batch
        self.count.add_(n)

    def state(self) -> list[torch.Tensor]:
        """Sum and count, which add up across processes."""
        return [self.sum, self.count]

    @property
    def avg(self) -> float:
        """The weighted mean so far (0 before any update)."""
        return float(self.sum / self.count) if float(self.count) > 0 else 0.0
