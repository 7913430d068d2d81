"""The seed's configuration comparator: which keys differ between two configs.

Each side is a config file (YAML, or a run's saved JSON), a run directory (its saved config) or
a checkpoint (the config inside it). Both are resolved first (read, checked and completed with
every default, as ``train`` would run them), so a key left at its default in one file and
written out in the other is no difference; only free-form ``args`` mappings can hold a key that
one side lacks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dltemplate.config.loader import config_from_dict, config_to_dict, load_config
from dltemplate.engine.rundir import find_config, read_saved_config


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


CHECKPOINT_SUFFIXES = (".pth", ".pt")
NOT_COMPARED = frozenset({"experiment.run_name"})  # a label, derived from the overrides it names


def resolved(path: str | Path) -> dict[str, Any]:
    """The config at ``path`` (YAML or a run's JSON, a run directory or a checkpoint) as nested
    dicts, defaults filled in. Nothing is imported or built from it, so no trust is needed."""
    path = Path(path)
    if path.is_dir():
        raw = read_saved_config(path)[0]
        return config_to_dict(config_from_dict(raw, str(find_config(path))))
    if path.suffix in CHECKPOINT_SUFFIXES:
        from dltemplate.engine.checkpoint import load_checkpoint  # torch: only for checkpoints

        return config_to_dict(config_from_dict(load_checkpoint(path)["config"], str(path)))
    return config_to_dict(load_config(path, name_run=False))


def compare_configs(a: str | Path, b: str | Path) -> list[tuple[str, Any, Any]]:
    """``(key, value_in_a, value_in_b)`` for every key whose resolved value differs (``_meta``
    versions and the run's name ignored); a config that does not load is a ConfigError naming
    its file and key."""
    left, right = flatten(resolved(a)), flatten(resolved(b))
    missing = object()
    diffs = []
    for key in sorted((set(left) | set(right)) - NOT_COMPARED):
        va, vb = left.get(key, missing), right.get(key, missing)
        if va != vb:
            diffs.append(
                (key, "<absent>" if va is missing else va, "<absent>" if vb is missing else vb)
            )
    return diffs


def format_diff(diffs: list[tuple[str, Any, Any]], a: str, b: str) -> str:
    """A table of the differences, or a line saying there are none."""
    if not diffs:
        return f"{a} and {b}: no differences"
    width = max(len(k) for k, _, _ in diffs)
    lines = [f"{'key':<{width}}  {a}  ->  {b}"]
    lines += [f"{k:<{width}}  {va!r}  ->  {vb!r}" for k, va, vb in diffs]
    return "\n".join(lines)
