"""Which configs may import code: a run's saved config names only registered components.

A config the user writes (a YAML file, ``section.key=value`` overrides, a Config in Python) is
theirs: its ``package.module:Name`` paths, ``experiment.imports`` and ``experiment.trainer``
import code by design. A config read back from a run directory or a checkpoint may come from
someone else, and importing a module runs it; so such a config is checked here, before any of
it is imported, and refused unless the user trusts it (``--trust-code``, ``trust_code=True``).
The saved config is checked before the user's overrides are applied: what the user names on
the command line is their own choice.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from dltemplate.errors import ConfigError

# Keys whose value is a registry name: a name with ':' is a module path, imported.
_NAME_KEYS = (
    ("experiment", "task"),
    ("data", "name"),
    ("model", "name"),
    ("loss", "name"),
    ("optimizer", "name"),
    ("scheduler", "name"),
)


def code_references(raw: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    """``(key, value)`` for each entry of a raw (unvalidated) config that would import code:
    module paths (``package.module:Name``) in registry names, trainer metrics, data
    transforms and callbacks,
    every ``experiment.imports`` module and any ``experiment.trainer``. Entries of the wrong
    shape are skipped: validating the config rejects them before anything is built."""

    def section(name: str) -> Mapping[str, Any]:
        value = raw.get(name)
        return value if isinstance(value, Mapping) else {}

    experiment = section("experiment")
    imports = experiment.get("imports")
    for i, module in enumerate(imports if isinstance(imports, list) else []):
        yield f"experiment.imports[{i}]", module
    if experiment.get("trainer") is not None:
        yield "experiment.trainer", experiment["trainer"]
    for name, key in _NAME_KEYS:
        value = section(name).get(key)
        if _is_path(value):
            yield f"{name}.{key}", value
    metrics = section("trainer").get("metrics")
    for i, value in enumerate(metrics if isinstance(metrics, list) else []):
        if _is_path(value):
            yield f"trainer.metrics[{i}]", value
    for key in ("train_transform", "eval_transform"):
        transforms = section("data").get(key)
        for i, item in enumerate(transforms if isinstance(transforms, list) else []):
            value = item.get("name") if isinstance(item, Mapping) else item
            if _is_path(value):
                yield f"data.{key}[{i}].name", value
    callbacks = raw.get("callbacks")
    for i, item in enumerate(callbacks if isinstance(callbacks, list) else []):
        value = item.get("name") if isinstance(item, Mapping) else item
        if _is_path(value):
            yield f"callbacks[{i}].name", value


def _is_path(value: Any) -> bool:
    """Whether a registry name is a ``package.module:Name`` path (see registry.import_path)."""
    return isinstance(value, str) and ":" in value


def refuse_untrusted_code(raw: Mapping[str, Any], source: str, trust_code: bool = False) -> None:
    """Raise a ConfigError naming the first key of ``raw`` (a config saved in a run directory
    or a checkpoint, read from ``source``) that would import code, unless ``trust_code``.

    Call it on the saved config before the user's overrides are applied and before anything
    in it is imported.
    """
    if trust_code or not isinstance(raw, Mapping):
        return
    found = list(code_references(raw))
    if not found:
        return
    key, value = found[0]
    more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
    raise ConfigError(
        f"{source}: the saved config names code to import, {key}={value!r}{more}; a run "
        "directory or checkpoint may only name registered components: pass --trust-code "
        "(trust_code=True in Python) if you trust where it came from"
    )
