"""The seed's configuration comparator: which keys differ between two saved configs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dltemplate.config.loader import read_yaml


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


def compare_configs(a: str | Path, b: str | Path) -> list[tuple[str, Any, Any]]:
    """``(key, value_in_a, value_in_b)`` for every differing key (``_meta`` versions ignored)."""
    left, right = flatten(read_yaml(a)), flatten(read_yaml(b))
    missing = object()
    diffs = []
    for key in sorted(set(left) | set(right)):
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
