"""What a model's forward returns: one tensor, or several heads as a list or tuple.

Deep supervision (UNet++ in training) gives one output per head. This module is the one place
that knows: losses take the mean of their per-head values, everything that wants one prediction
(metrics, pictures, predicted masks) takes the mean of the heads, and the trainer detaches both
kinds alike.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

Outputs = torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor, ...]


def is_multi_head(outputs: Any) -> bool:
    """Whether ``outputs`` holds several heads (a list or tuple) rather than one tensor."""
    return isinstance(outputs, (list, tuple))


def heads(outputs: Outputs) -> list[torch.Tensor]:
    """The heads of ``outputs`` as a list (one tensor: a list of one); ValueError when empty."""
    if not is_multi_head(outputs):
        return [outputs]
    if not outputs:
        raise ValueError("the model returned an empty list of outputs")
    return list(outputs)


def mean_over_heads(
    outputs: Outputs, per_head: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """``per_head(outputs)`` for one tensor; for several heads, the mean of ``per_head``."""
    if not is_multi_head(outputs):
        return per_head(outputs)  # not stacked: one head's value is returned as it is
    return torch.stack([per_head(o) for o in heads(outputs)]).mean()


def merged_prediction(outputs: Outputs) -> torch.Tensor:
    """The one prediction of ``outputs``: the tensor itself, or the element-wise mean of the
    heads in their own dtype."""
    if not is_multi_head(outputs):
        return outputs
    return torch.stack(heads(outputs)).mean(0)


def detach_outputs(outputs: Outputs) -> Outputs:
    """``outputs`` detached from the graph, in the same structure (tensor, list or tuple)."""
    if is_multi_head(outputs):
        return type(outputs)(o.detach() for o in outputs)
    return outputs.detach()
