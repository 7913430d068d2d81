"""Which trainer and evaluator classes a config builds, and the check of every name in a config.

``experiment.trainer`` names a :class:`TrainerBase` subclass as ``package.module:Class`` (None:
``TrainerBase`` itself). Evaluation uses that class's ``evaluator_class`` attribute (default
:class:`EvaluatorBase`), so a trainer that changes the loop can bring its own evaluator.
"""

from __future__ import annotations

import copy
from pathlib import Path

from dltemplate.config import Config, config_from_dict
from dltemplate.config.loader import apply_overrides
from dltemplate.config.trust import refuse_untrusted_code
from dltemplate.engine.checkpoint import keep_for_next_load, load_checkpoint
from dltemplate.engine.evaluator import EvaluatorBase, resolve_eval_target
from dltemplate.engine.task import import_plugins
from dltemplate.engine.trainer import TrainerBase
from dltemplate.errors import ConfigError
from dltemplate.registry import (
    CALLBACKS,
    DATASETS,
    LOSSES,
    METRICS,
    MODELS,
    OPTIMIZERS,
    SCHEDULERS,
    TASKS,
    import_path,
)

KEY = "experiment.trainer"


def trainer_class(cfg: Config) -> type[TrainerBase]:
    """The class ``experiment.trainer`` names (a ConfigError naming the key if it is not a
    ``package.module:Class`` path to a :class:`TrainerBase` subclass)."""
    path = cfg.experiment.trainer
    if path is None:
        return TrainerBase
    if ":" not in path:
        raise ConfigError(
            f"{KEY}={path!r}: expected package.module:Class (a subclass of "
            "dltemplate.engine.trainer.TrainerBase), or null for TrainerBase"
        )
    cls = import_path(path, KEY)
    if not (isinstance(cls, type) and issubclass(cls, TrainerBase)):
        raise ConfigError(
            f"{KEY}={path!r}: {cls!r} is not a subclass of dltemplate.engine.trainer.TrainerBase"
        )
    return cls


def evaluator_class(cfg: Config) -> type[EvaluatorBase]:
    """The evaluator of ``cfg``'s trainer: its ``evaluator_class`` (default EvaluatorBase)."""
    cls = getattr(trainer_class(cfg), "evaluator_class", EvaluatorBase)
    if not (isinstance(cls, type) and issubclass(cls, EvaluatorBase)):
        raise ConfigError(
            f"{KEY}={cfg.experiment.trainer!r}: its evaluator_class {cls!r} is not a subclass "
            "of dltemplate.engine.evaluator.EvaluatorBase"
        )
    return cls


def validate_names(cfg: Config) -> None:
    """Check every registry name and class path in ``cfg`` before any work starts (a
    ConfigError naming the key, with a "did you mean", if one is unknown)."""
    import_plugins(cfg)
    TASKS.get(cfg.experiment.task, "experiment.task")
    evaluator_class(cfg)  # the trainer class, and the evaluator it brings
    DATASETS.get(cfg.data.name, "data.name")
    MODELS.get(cfg.model.name, "model.name")
    LOSSES.get(cfg.loss.name, "loss.name")
    OPTIMIZERS.get(cfg.optimizer.name, "optimizer.name")
    SCHEDULERS.get(cfg.scheduler.name, "scheduler.name")
    for name in cfg.trainer.metrics:
        METRICS.get(name, "trainer.metrics")
    for i, item in enumerate(cfg.callbacks):
        CALLBACKS.get(item.name, f"callbacks[{i}].name")


def build_evaluator(
    target: str | Path, overrides: list[str] | None = None, trust_code: bool = False
) -> EvaluatorBase:
    """The evaluator of a run directory (its best, else last, checkpoint) or a checkpoint file,
    of the class its saved config's trainer names. The checkpoint is read once.

    The saved config may name only registered components unless ``trust_code`` (see
    :mod:`dltemplate.config.trust`); ``overrides`` are the caller's own and not checked.
    """
    path = resolve_eval_target(target)
    state = load_checkpoint(path)
    refuse_untrusted_code(state["config"], str(path), trust_code)
    raw = apply_overrides(copy.deepcopy(state["config"]), list(overrides or []))
    cfg = config_from_dict(raw, f"{path} (saved config)")
    import_plugins(cfg)
    cls = evaluator_class(cfg)
    keep_for_next_load(path, state)
    return cls(path, overrides)
