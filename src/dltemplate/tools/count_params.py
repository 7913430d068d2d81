"""The seed's parameter counter: trainable and total parameters per module."""

from __future__ import annotations

from torch import nn


def count_parameters(model: nn.Module) -> list[tuple[str, int, int]]:
    """``(name, trainable, total)`` for each direct child of ``model``, then ``total``."""
    rows = []
    for name, child in model.named_children():
        params = list(child.parameters())
        rows.append(
            (
                name,
                sum(p.numel() for p in params if p.requires_grad),
                sum(p.numel() for p in params),
            )
        )
    own = list(model.parameters(recurse=False))
    if own:
        rows.append(
            ("(own)", sum(p.numel() for p in own if p.requires_grad), sum(p.numel() for p in own))
        )
    params = list(model.parameters())
    rows.append(
        ("total", sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))
    )
    return rows


def format_counts(rows: list[tuple[str, int, int]], title: str) -> str:
    """A table of the counts."""
    width = max(len("module"), *(len(r[0]) for r in rows))
    lines = [title, f"{'module':<{width}}  {'trainable':>12}  {'total':>12}"]
    lines += [f"{n:<{width}}  {t:>12,}  {a:>12,}" for n, t, a in rows]
    return "\n".join(lines)
