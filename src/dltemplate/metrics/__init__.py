"""Metrics, registered by name in :data:`dltemplate.registry.METRICS`."""

from dltemplate.metrics.base import Metric, MetricCollection
from dltemplate.metrics.classification import (
    Accuracy,
    ConfusionMatrix,
    PrecisionRecallF1,
    TopKAccuracy,
)
from dltemplate.metrics.segmentation import Dice, IoU

__all__ = [
    "Dice",
    "IoU",
    "Accuracy",
    "ConfusionMatrix",
    "Metric",
    "MetricCollection",
    "PrecisionRecallF1",
    "TopKAccuracy",
]
