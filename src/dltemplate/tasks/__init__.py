"""Tasks (registered by name in :data:`dltemplate.registry.TASKS`): hooks for the engine."""

from dltemplate.tasks.classification import ClassificationTask

__all__ = ["ClassificationTask"]
