"""What a new user sees: the curves picture, help and config printing, the end-of-run summary,
rates and counts in messages, metrics that make sense for the data, compare-configs, threads."""

from __future__ import annotations

from typing import Any

import pytest

from dltemplate.engine.rundir import curves_figure


def _rows(names: list[str], epochs: int) -> list[dict[str, Any]]:
    """metrics.csv rows: train and val of each name, for ``epochs`` epochs."""
    return [
        {
            "epoch": str(e),
            "lr": "0.01",
            **{f"{s}/{n}": str(1 / (e + i)) for i, n in enumerate(names) for s in ("train", "val")},
        }
        for e in range(1, epochs + 1)
    ]


@pytest.mark.parametrize("names", [["loss"], ["loss", "accuracy", "dice"], list("abcdefgh")])
@pytest.mark.parametrize("epochs", [2, 5])
def test_curves_have_integer_epoch_ticks_and_nothing_clipped(names, epochs):
    fig = curves_figure(_rows(names, epochs))
    renderer = fig.canvas.get_renderer()
    fig.draw(renderer)
    box = fig.bbox
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert len(panels) == len(names)
    for ax in panels:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
        for label in ax.get_xticklabels():
            if label.get_text():
                assert label.get_text().lstrip("−-").isdigit(), label.get_text()
        # the x label, and everything drawn around the panel (tick labels, title, legend)
        for extent in (ax.xaxis.label.get_window_extent(renderer), ax.get_tightbbox(renderer)):
            assert box.x0 <= extent.x0 and extent.x1 <= box.x1, (ax.get_title(), extent)
            assert box.y0 <= extent.y0 and extent.y1 <= box.y1, (ax.get_title(), extent)
