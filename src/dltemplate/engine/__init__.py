"""The training engine: trainer, evaluator, task hooks, checkpoints, distributed set-up."""

from dltemplate.engine.evaluator import EvaluatorBase, evaluate_loader
from dltemplate.engine.task import Task
from dltemplate.engine.trainer import TrainerBase

__all__ = ["EvaluatorBase", "Task", "TrainerBase", "evaluate_loader"]
