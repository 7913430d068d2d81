"""Callbacks: the base class, the built-in ones the loop runs by default, and the shipped
extras, all registered in ``CALLBACKS``; :func:`build_callbacks` assembles a run's list."""

from __future__ import annotations

from dltemplate.callbacks.base import EVENTS, Callback, CallbackList, Loop
from dltemplate.callbacks.checkpoint import Checkpoint
from dltemplate.callbacks.early_stopping import EarlyStoppingCallback
from dltemplate.callbacks.ema import EMA
from dltemplate.callbacks.freeze import Freeze
from dltemplate.callbacks.grad_norm import GradNorm
from dltemplate.callbacks.max_time import MaxTime
from dltemplate.callbacks.metrics_table import MetricsTableCallback
from dltemplate.callbacks.mlflow import MLflow  # imports mlflow only when built
from dltemplate.callbacks.progress import Progress
from dltemplate.callbacks.tensorboard import TensorBoard
from dltemplate.config import Config
from dltemplate.errors import ConfigError
from dltemplate.registry import CALLBACKS

# On by default, in this order, each place for a reason:
DEFAULT_CALLBACKS = (
    "progress",  # first: its epoch line is logged before anything another callback says
    "tensorboard",  # before the others: it opens the writer they (grad_norm...) may log to
    "metrics_table",  # the row is on disk before a checkpoint says the epoch is done
    "early_stopping",  # ends training before the checkpoint records who ended it
)
# After the config's own callbacks: an epoch's checkpoint holds the state they reached at its end.
LAST_CALLBACKS = ("checkpoint",)


def build_callbacks(cfg: Config, added: list[Callback] | None = None) -> CallbackList:
    """The run's callbacks: the built-in ones (configured or turned off by naming them in
    ``cfg.callbacks``), then the config's others in their order, then ``added`` (built in code:
    a sweep's trial reporter), before ``checkpoint``; a bad name or argument is a ConfigError
    naming ``callbacks[i]``."""
    built_in = {*DEFAULT_CALLBACKS, *LAST_CALLBACKS}
    chosen: dict[str, tuple[str, dict, bool]] = {n: (n, {}, True) for n in built_in}
    extra = []
    for i, item in enumerate(cfg.callbacks):
        key = f"callbacks[{i}]"
        if item.name in built_in:
            if chosen[item.name][0] != item.name:  # configured by an earlier entry already
                raise ConfigError(
                    f"{key} '{item.name}': already configured by {chosen[item.name][0]}; "
                    "list a built-in callback once"
                )
            chosen[item.name] = (key, item.args, item.enabled)
        elif item.enabled:
            extra.append((key, item.name, item.args))
    order = [(chosen[n][0], n, chosen[n][1]) for n in DEFAULT_CALLBACKS if chosen[n][2]]
    order += extra
    order += [(chosen[n][0], n, chosen[n][1]) for n in LAST_CALLBACKS if chosen[n][2]]
    built: list[Callback] = []
    where: dict[str, str] = {}  # state key -> the config entry that made it
    for key, name, args in order:
        try:
            callback = CALLBACKS.build(name, f"{key}.name", **args)
        except (TypeError, ValueError) as exc:  # the callback refused its arguments
            raise ConfigError(f"{key} '{name}': {exc}") from exc
        state_key = callback.state_key
        if state_key in where:  # their saved states would collide
            raise ConfigError(
                f"{key} '{name}': the same callback as {where[state_key]} (state key "
                f"{state_key}); list it once, or give the two different arguments"
            )
        where[state_key] = key
        built.append(callback)
    last = len(built) - (1 if order and order[-1][1] in LAST_CALLBACKS else 0)
    built[last:last] = list(added or [])  # their stops recorded by the epoch's checkpoint
    return CallbackList(built)


__all__ = [
    "DEFAULT_CALLBACKS",
    "EMA",
    "EVENTS",
    "Callback",
    "CallbackList",
    "Checkpoint",
    "EarlyStoppingCallback",
    "Freeze",
    "GradNorm",
    "Loop",
    "MaxTime",
    "MLflow",
    "MetricsTableCallback",
    "Progress",
    "TensorBoard",
    "build_callbacks",
]
