"""Tasks (registered by name in :data:`dltemplate.registry.TASKS`): hooks for the engine."""

from dltemplate.tasks.classification import ClassificationTask
from dltemplate.tasks.segmentation import SegmentationTask

__all__ = ["ClassificationTask", "SegmentationTask"]
