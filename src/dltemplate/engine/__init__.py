"""The training engine: trainer, evaluator, task hooks, checkpoints, distributed set-up.

The names below are imported on first use, so that importing one engine module (as the
callbacks do) does not pull in the whole trainer.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "EvaluatorBase": "dltemplate.engine.evaluator",
    "Evaluation": "dltemplate.engine.evaluation",
    "Task": "dltemplate.engine.task",
    "TrainerBase": "dltemplate.engine.trainer",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'dltemplate.engine' has no attribute '{name}'")
    return getattr(importlib.import_module(_WHERE[name]), name)
