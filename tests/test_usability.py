"""What a new user sees: the curves picture, help and config printing, the end-of-run summary,
rates and counts in messages, metrics that make sense for the data, compare-configs, threads."""

from __future__ import annotations

import shlex
from typing import Any

import pytest
import yaml
from conftest import REPO

from dltemplate.cli import main
from dltemplate.config import Config, config_to_dict, load_config
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


def test_train_help_explains_overrides_with_examples_that_work(capsys, monkeypatch):
    with pytest.raises(SystemExit) as exit:
        main(["train", "--help"])
    assert exit.value.code == 0
    out = capsys.readouterr().out
    assert "section.key=value" in out
    examples = [
        shlex.split(line.split("#")[0])
        for line in out.splitlines()
        if line.strip().startswith("dltemplate ")
    ]
    assert len(examples) >= 3 and any("trainer.epochs=5" in ex for ex in examples)
    # every example is a valid config with valid overrides: `config` resolves it
    monkeypatch.chdir(REPO)
    for ex in examples:
        assert main(["config", *ex[2:]]) == 0, ex
    assert "trainer:" in capsys.readouterr().out


def test_config_prints_the_resolved_config_as_yaml(cli, tmp_path, capsys):
    cfg_file = tmp_path / "small.yaml"
    cfg_file.write_text("model:\n  name: Vanilla\ntrainer:\n  epochs: 7\n")
    assert cli("config", cfg_file, "optimizer.lr=3e-4", "model.args.hidden=[16]") == 0
    printed = capsys.readouterr().out
    resolved = yaml.safe_load(printed)
    assert set(resolved) == set(config_to_dict(Config()))  # every section, defaults included
    assert resolved["trainer"]["epochs"] == 7 and resolved["optimizer"]["lr"] == 3e-4
    assert resolved["model"]["args"] == {"hidden": [16]}
    assert resolved["data"]["batch_size"] == Config().data.batch_size
    # what it prints is a config train accepts, resolving to the same
    again = tmp_path / "printed.yaml"
    again.write_text(printed)
    assert load_config(again) == load_config(
        cfg_file, ["optimizer.lr=3e-4", "model.args.hidden=[16]"]
    )


def test_config_of_a_bad_key_is_one_line_and_exit_2(cli, tmp_path, capsys):
    cfg_file = tmp_path / "small.yaml"
    cfg_file.write_text("trainer:\n  epochs: 7\n")
    assert cli("config", cfg_file, "trainer.epoch=3") == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "trainer.epochs" in captured.err and len(captured.err.strip().splitlines()) == 1
