"""Stop a run at a chosen point of the training loop, in a chosen way.

Used in-process by tests/test_stop_matrix.py and, for SIGKILL and torchrun, as a script:

    python tests/stop_injection.py POINT WAY NTH [RANK] -- train CONFIG key=value ...

The stop happens at the NTH time POINT is reached after the first epoch has ended (so a
checkpoint exists), on every process or only on process RANK.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from typing import Any

import torch.optim.optimizer as optimizer_module
from torch.optim import lr_scheduler

from dltemplate.engine import checkpoint as checkpoint_module
from dltemplate.engine.loop_state import BestScore
from dltemplate.engine.precision import Precision
from dltemplate.engine.task import Task
from dltemplate.engine.trainer import TrainerBase

POINTS = [
    "before_forward",
    "after_forward",
    "after_backward",
    "inside_optimizer_step",
    "after_optimizer_step",
    "after_scheduler_step",
    "epoch_end",  # between the epoch scheduler's step and the epoch counter moving on
    "validation",
    "final_test",
    "checkpoint_write",  # the temporary file is written, not yet renamed
]
WAYS = ["exception", "sigint", "sigterm", "sigkill"]
EXIT = {"exception": 1, "sigint": 130, "sigterm": 130, "sigkill": -signal.SIGKILL}


class InjectedFailure(RuntimeError):
    """The exception way of stopping."""


def install(point: str, way: str, nth: int, rank: int | None = None) -> Callable[[], None]:
    """Arrange the stop; return a function that undoes every patch."""
    if point not in POINTS or way not in WAYS:
        raise ValueError(f"unknown point {point!r} or way {way!r}")
    state = {"armed": False, "count": 0, "split": None, "done": False}
    undo: list[Callable[[], None]] = []

    def hit(where: str) -> None:
        if where != point or not state["armed"] or state["done"]:
            return
        if rank is not None and int(os.environ.get("RANK", "0")) != rank:
            return
        state["count"] += 1
        if state["count"] != nth:
            return
        state["done"] = True
        if way == "exception":
            raise InjectedFailure(f"injected at {point}")
        sig = {"sigint": signal.SIGINT, "sigterm": signal.SIGTERM, "sigkill": signal.SIGKILL}
        os.kill(os.getpid(), sig[way])

    def patch(owner: Any, name: str, make: Callable[[Any], Any]) -> None:
        original = getattr(owner, name)
        setattr(owner, name, make(original))
        undo.append(lambda: setattr(owner, name, original))

    def end_epoch(original):
        def wrapper(self, *args, **kwargs):
            original(self, *args, **kwargs)
            state["armed"] = True  # the first epoch's checkpoints exist from here on

        return wrapper

    def evaluate(original):
        def wrapper(self, loader, split):
            state["split"] = split
            try:
                return original(self, loader, split)
            finally:
                state["split"] = None

        return wrapper

    def forward(original):
        def wrapper(self, model, batch):
            if model.training:
                hit("before_forward")
            elif state["split"] == "val":
                hit("validation")
            elif state["split"] == "test":
                hit("final_test")
            out = original(self, model, batch)
            if model.training:
                hit("after_forward")
            return out

        return wrapper

    def after(where):
        def make(original):
            def wrapper(*args, **kwargs):
                out = original(*args, **kwargs)
                hit(where)
                return out

            return wrapper

        return make

    def scheduler_step(original):
        def wrapper(self, *args, **kwargs):
            initial = getattr(self, "_step_count", 0) == 0  # the constructor's own step
            out = original(self, *args, **kwargs)
            if not initial:
                hit("after_scheduler_step")
            return out

        return wrapper

    def torch_save(original):
        def wrapper(obj, f, *args, **kwargs):
            out = original(obj, f, *args, **kwargs)
            hit("checkpoint_write")
            return out

        return wrapper

    patch(TrainerBase, "end_epoch", end_epoch)
    patch(TrainerBase, "evaluate", evaluate)
    patch(Task, "forward", forward)
    patch(Precision, "backward", after("after_backward"))
    patch(Precision, "step", after("after_optimizer_step"))
    patch(lr_scheduler.LRScheduler, "step", scheduler_step)
    patch(BestScore, "update", after("epoch_end"))
    patch(checkpoint_module.torch, "save", torch_save)
    handle = optimizer_module.register_optimizer_step_post_hook(
        lambda opt, args, kwargs: hit("inside_optimizer_step")
    )
    undo.append(handle.remove)

    def undo_all() -> None:
        for fn in reversed(undo):
            fn()

    return undo_all


if __name__ == "__main__":
    from dltemplate.cli import main

    split = sys.argv.index("--")
    head, command = sys.argv[1:split], sys.argv[split + 1 :]
    install(head[0], head[1], int(head[2]), int(head[3]) if len(head) > 3 else None)
    sys.exit(main(command))
