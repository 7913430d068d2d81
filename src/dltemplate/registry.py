"""Name -> component registries, so that the config picks datasets, models, losses... by name.

A component is added with a decorator (``@MODELS.register("MyNet")``) in any imported module,
or named in the config as ``package.module:ClassName`` without registering at all. Registering a
name again (a notebook cell run twice) replaces it, with a warning.

Objects built in Python (``dltemplate.train(cfg, dataset=..., model=...)``) are *given* for the
duration of a call (:func:`given_objects`) under a reserved name, ``<code ClassName>``, that
the run's saved config keeps: it says where they came from, and a later command that cannot
have them (``dltemplate eval RUN``) says what to pass instead (:func:`objects_not_given`).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import inspect
import logging
import os
import sys
import types
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

from dltemplate.errors import ConfigError, did_you_mean

T = TypeVar("T")
log = logging.getLogger("dltemplate")


class Registry:
    """A named table of factories (classes or functions) of one kind of component."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, Callable[..., Any]] = {}

    def register(self, name: str | None = None) -> Callable[[T], T]:
        """Decorator that registers a class or function under ``name`` (default: its own name)."""

        def deco(obj: T) -> T:
            key = name or obj.__name__  # type: ignore[attr-defined]
            if is_code_name(key):
                raise ValueError(f"{self.kind} name {key!r}: '<code ...>' names are reserved")
            old = self._items.get(key)
            if old is not None and old is not obj:
                log.warning(
                    "%s '%s' registered again: %s replaces %s",
                    self.kind,
                    key,
                    _describe(obj),
                    _describe(old),
                )
            self._items[key] = obj  # type: ignore[assignment]
            return obj

        return deco

    def names(self) -> list[str]:
        """Registered names, sorted."""
        load_builtins()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items or (self.kind, name) in _GIVEN.get()

    def get(self, name: str, key: str = "") -> Callable[..., Any]:
        """Look ``name`` up, or import it when it has the form ``package.module:Attr``.

        ``key`` is the config key that holds the name, quoted in the error message.
        """
        where = f"{key}: " if key else ""
        given = _GIVEN.get()
        if (self.kind, name) in given:
            return given[(self.kind, name)]
        if is_code_name(name):
            raise ConfigError(_not_given_message([(key or f"{self.kind}.name", name)], ""))
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


def _describe(obj: Any) -> str:
    """``module.QualName`` of a registered object, for the re-registration warning."""
    module = getattr(obj, "__module__", None) or "?"
    return f"{module}.{getattr(obj, '__qualname__', type(obj).__name__)}"


# == objects given in Python ======================================================================
CODE_PREFIX = "<code "
# (registry kind, name) -> factory, for the call in progress (a context variable: concurrent
# calls in other threads see their own objects, and nothing outlives the call).
_GIVEN: contextvars.ContextVar[Mapping[tuple[str, str], Any]] = contextvars.ContextVar(
    "dltemplate_given", default=types.MappingProxyType({})
)
# The config keys that may name objects given in Python -> the argument (and registry kind).
GIVEN_KEYS = {"data.name": "dataset", "model.name": "model"}


def is_code_name(name: Any) -> bool:
    """Whether ``name`` is the reserved name of an object given in Python (``<code Net>``)."""
    return isinstance(name, str) and name.startswith(CODE_PREFIX) and name.endswith(">")


def code_name(obj: Any) -> str:
    """The reserved name of an object given in Python: ``<code ClassName>`` for an instance,
    ``<code function_name>`` for a class or function (a ``functools.partial``: its function)."""
    target = obj.func if isinstance(obj, functools.partial) else obj
    if isinstance(target, type) or inspect.isroutine(target):
        label = getattr(target, "__name__", None) or type(target).__name__
    else:
        label = type(target).__name__
    return f"{CODE_PREFIX}{label.replace('<', '').replace('>', '')}>"


def code_label(name: str) -> str:
    """``Net`` for ``<code Net>`` (file names: ``Net_best_ckpt.pth``); other names as they are."""
    return name[len(CODE_PREFIX) : -1] if is_code_name(name) else name


@contextlib.contextmanager
def given_objects(entries: Mapping[tuple[Registry, str], Any]) -> Iterator[None]:
    """Within the block, ``registry.get(name)`` returns the given factory for each
    ``(registry, name)`` of ``entries`` (in this thread or task only); afterwards the names
    are gone again. Nested blocks add to the outer one's objects."""
    merged = {**_GIVEN.get(), **{(reg.kind, name): obj for (reg, name), obj in entries.items()}}
    token = _GIVEN.set(merged)
    try:
        yield
    finally:
        _GIVEN.reset(token)


def objects_not_given(raw: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(key, name)`` of each ``data.name`` / ``model.name`` of a raw config (a run's saved
    config) that names an object given in Python which the call in progress does not have."""
    missing = []
    for key, param in GIVEN_KEYS.items():
        section, field = key.split(".")
        part = raw.get(section)
        name = part.get(field) if isinstance(part, Mapping) else None
        if is_code_name(name) and (param, name) not in _GIVEN.get():
            missing.append((key, name))
    return missing


def refuse_objects_not_given(raw: Mapping[str, Any], source: str) -> None:
    """A ConfigError (one line) when a run's saved config ``raw`` (with the caller's overrides)
    names objects that were given in Python and are not given now: a saved config cannot
    rebuild them, so the message says what to pass instead."""
    missing = objects_not_given(raw)
    if missing:
        raise ConfigError(_not_given_message(missing, source))


def _not_given_message(missing: list[tuple[str, str]], source: str) -> str:
    """What :func:`refuse_objects_not_given` and a lookup of a ``<code ...>`` name say."""
    params = [GIVEN_KEYS.get(key, key) for key, _ in missing]
    what = " and ".join(f"{p} ({k}={n!r})" for p, (k, n) in zip(params, missing))
    verb = "were objects" if len(missing) > 1 else "was an object"
    them = "them" if len(missing) > 1 else "it"
    args = ", ".join(f"{p}=..." for p in params)
    named = " ".join(f"{k}=package.module:Class" for k, _ in missing)
    where = f"{source}: " if source else ""
    return (
        f"{where}the run's {what} {verb} given in Python, which a saved config cannot "
        f"rebuild: pass {them} again from Python, dltemplate.evaluate(run, {args}) or "
        f"dltemplate.resume(run, {args}); or name an importable or registered one instead, "
        f"{named}"
    )


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
