"""Name -> component registries, so that the config picks datasets, models, losses... by name.

A component is added with a decorator (``@MODELS.register("MyNet")``) in any imported module,
or named in the config as ``package.module:ClassName`` without registering at all.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from dltemplate.errors import ConfigError, did_you_mean

T = TypeVar("T")


class Registry:
    """A named table of factories (classes or functions) of one kind of component."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, Callable[..., Any]] = {}

    def register(self, name: str | None = None) -> Callable[[T], T]:
        """Decorator that registers a class or function under ``name`` (default: its own name)."""

        def deco(obj: T) -> T:
            key = name or obj.__name__  # type: ignore[attr-defined]
            if key in self._items and self._items[key] is not obj:
                raise ValueError(f"{self.kind} '{key}' is registered twice")
            self._items[key] = obj  # type: ignore[assignment]
            return obj

        return deco

    def names(self) -> list[str]:
        """Registered names, sorted."""
        load_builtins()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def get(self, name: str, key: str = "") -> Callable[..., Any]:
        """Look ``name`` up, or import it when it has the form ``package.module:Attr``.

        ``key`` is the config key that holds the name, quoted in the error message.
        """
        where = f"{key}: " if key else ""
        if ":" in name:
            return import_path(name, key)
        if name not in self._items:
            load_builtins()
        if name not in self._items:
            hint = did_you_mean(name, self._items)
            raise ConfigError(
                f"{where}unknown {self.kind} '{name}'{hint}; "
                f"known: {', '.join(self.names())} (or give 'package.module:Name')"
            )
        return self._items[name]

    def build(self, name: str, key: str = "", /, **kwargs: Any) -> Any:
        """Call the factory of ``name`` with ``kwargs``; bad arguments are ConfigErrors."""
        factory = self.get(name, key)
        try:
            signature = inspect.signature(factory)
        except ValueError:  # builtins without a signature: let the call itself decide
            return factory(**kwargs)
        try:
            signature.bind(**kwargs)
        except TypeError as exc:
            named = [n for n, p in signature.parameters.items() if p.kind in _NAMED]
            unknown = [k for k in kwargs if k not in named]
            hint = did_you_mean(unknown[0], named) if unknown else ""
            raise ConfigError(f"{key or self.kind} '{name}': {exc}{hint}") from exc
        return factory(**kwargs)


def import_path(path: str, key: str = "") -> Any:
    """The object that ``package.module:Attr`` names; a ConfigError (naming ``key``, with a
    "did you mean") when the module cannot be imported or has no such attribute."""
    where = f"{key}: " if key else ""
    if os.getcwd() not in sys.path:  # a my_models.py beside the config just works
        sys.path.append(os.getcwd())
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{where}cannot import module '{module_name}': {exc}") from exc
    if not hasattr(module, attr):
        hint = did_you_mean(attr, [n for n in dir(module) if not n.startswith("_")])
        raise ConfigError(f"{where}module '{module_name}' has no '{attr}'{hint}")
    return getattr(module, attr)


_NAMED = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
_BUILTIN_PACKAGES = ("data", "models", "losses", "metrics", "optim", "tasks", "callbacks")


def load_builtins() -> None:
    """Import the packages that register dltemplate's own components (once, on first lookup)."""
    for package in _BUILTIN_PACKAGES:
        importlib.import_module(f"dltemplate.{package}")


def accepted_kwargs(factory: Callable[..., Any], offered: dict[str, Any]) -> dict[str, Any]:
    """The subset of ``offered`` that ``factory`` names as parameters (``**kwargs`` takes none)."""
    try:
        params = inspect.signature(factory).parameters
    except ValueError:
        return {}
    named = {n for n, p in params.items() if p.kind is not inspect.Parameter.VAR_KEYWORD}
    return {k: v for k, v in offered.items() if k in named}


DATASETS = Registry("dataset")
MODELS = Registry("model")
LOSSES = Registry("loss")
OPTIMIZERS = Registry("optimizer")
SCHEDULERS = Registry("scheduler")
METRICS = Registry("metric")
TASKS = Registry("task")
CALLBACKS = Registry("callback")
TRANSFORMS = Registry("transform")
