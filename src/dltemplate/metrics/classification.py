"""Classification metrics from logits (N, C) and integer targets (N,)."""

from __future__ import annotations

from typing import Any

import torch

from dltemplate.metrics.base import Metric
from dltemplate.registry import METRICS


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    # x/0 -> 0, as scikit-learn's zero_division=0
    safe = torch.where(den > 0, den, torch.ones_like(den))
    return torch.where(den > 0, num / safe, torch.zeros_like(num))


@METRICS.register("accuracy")
class Accuracy(Metric):
    """Share of samples whose highest logit is the target."""

    counts_only = True

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Zero the counts."""
        self.correct = torch.zeros((), dtype=torch.float64)
        self.total = torch.zeros((), dtype=torch.float64)

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        """Count correct predictions in the batch."""
        self.correct = self.correct.to(outputs.device) + (outputs.argmax(1) == targets).sum()
        self.total = self.total.to(outputs.device) + targets.numel()

    def state(self) -> list[torch.Tensor]:
        """Correct and total counts."""
        return [self.correct, self.total]

    def compute(self) -> dict[str, float]:
        """``{"accuracy": correct / total}``."""
        return {"accuracy": float(_safe_div(self.correct, self.total))}


DEFAULT_TOP_K = 5  # topk_accuracy's k unless one is given


@METRICS.register("topk_accuracy")
class TopKAccuracy(Accuracy):
    """Share of samples whose target is among the ``k`` highest logits."""

    def __init__(self, k: int = DEFAULT_TOP_K) -> None:
        self.k = k
        super().__init__()

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        """Count targets within the top k."""
        k = min(self.k, outputs.shape[1])
        hit = (outputs.topk(k, dim=1).indices == targets[:, None]).any(dim=1)
        self.correct = self.correct.to(outputs.device) + hit.sum()
        self.total = self.total.to(outputs.device) + targets.numel()

    def compute(self) -> dict[str, float]:
        """``{"top<k>_accuracy": ...}``."""
        return {f"top{self.k}_accuracy": float(_safe_div(self.correct, self.total))}


@METRICS.register("confusion_matrix")
class ConfusionMatrix(Metric):
    """Counts ``matrix[true, predicted]``; reported whole, no scalars logged."""

    counts_only = True

    def __init__(self, num_classes: int, class_names: list[str] | None = None) -> None:
        self.num_classes = num_classes
        self.class_names = class_names or [str(i) for i in range(num_classes)]
        self.reset()

    def reset(self) -> None:
        """Zero the matrix."""
        self.matrix = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        """Add the batch's (target, prediction) pairs."""
        pred = outputs.argmax(1)
        flat = targets.long() * self.num_classes + pred
        counts = torch.bincount(flat, minlength=self.num_classes**2)
        self.matrix = self.matrix.to(outputs.device) + counts.view_as(self.matrix)

    def state(self) -> list[torch.Tensor]:
        """The matrix."""
        return [self.matrix]

    def compute(self) -> dict[str, float]:
        """No scalars: the matrix is in :meth:`report`."""
        return {}

    def report(self) -> dict[str, Any]:
        """``{"confusion_matrix": rows of counts, "class_names": [...]}``."""
        return {"confusion_matrix": self.matrix.cpu().tolist(), "class_names": self.class_names}


@METRICS.register("precision_recall_f1")
class PrecisionRecallF1(ConfusionMatrix):
    """Per-class precision, recall and F1 from the confusion matrix; macro averages logged."""

    def _per_class(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        m = self.matrix.double().cpu()
        tp = m.diag()
        precision = _safe_div(tp, m.sum(0))
        recall = _safe_div(tp, m.sum(1))
        f1 = _safe_div(2 * precision * recall, precision + recall)
        return precision, recall, f1

    def compute(self) -> dict[str, float]:
        """Macro (unweighted mean over classes) precision, recall and F1."""
        p, r, f = self._per_class()
        return {
            "precision_macro": float(p.mean()),
            "recall_macro": float(r.mean()),
            "f1_macro": float(f.mean()),
        }

    def report(self) -> dict[str, Any]:
        """Macro averages, per-class lists and the confusion matrix."""
        p, r, f = self._per_class()
        per_class = {"precision": p.tolist(), "recall": r.tolist(), "f1": f.tolist()}
        return {**self.compute(), **per_class, **super().report()}
