"""Metrics, registered by name in :data:`dltemplate.registry.METRICS`."""

from dltemplate.metrics.base import Metric, MetricCollection
from dltemplate.metrics.classification import (
    Accuracy,
    ConfusionMatrix,
    PrecisionRecallF1,
    TopKAccuracy,
)

__all__ = [
    "Accuracy",
    "ConfusionMatrix",
    "Metric",
    "MetricCollection",
    "PrecisionRecallF1",
    "TopKAccuracy",
]
