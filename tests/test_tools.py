"""The config comparator, the parameter counter, and their command-line entries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from torch import nn

from dltemplate.cli import main
from dltemplate.tools.compare_configs import compare_configs, flatten, format_diff
from dltemplate.tools.count_params import count_parameters, format_counts

REPO = Path(__file__).resolve().parents[1]

BASE = {
    "experiment": {"name": "A", "seed": 1, "gpu_devices": None},
    "model": {"name": "Vanilla", "args": {"hidden": [8, 8], "dropout": 0.0}},
    "optimizer": {"name": "adam", "lr": 0.001},
    "trainer": {"epochs": 3, "metrics": []},
}


def write_json(path: Path, data: dict) -> str:
    path.write_text(json.dumps(data, indent=2))
    return str(path)


@pytest.fixture
def two_configs(tmp_path):
    other = json.loads(json.dumps(BASE))
    other["experiment"]["seed"] = 2
    other["model"]["args"]["hidden"] = [16, 8]
    other["optimizer"]["weight_decay"] = 0.01  # only in b (a: the default, 0)
    del other["trainer"]["metrics"]  # only in a, at its default: no difference
    del other["model"]["args"]["dropout"]  # a free-form argument only in a
    other["_meta"] = {"torch": "9.9"}  # saved versions: ignored
    return write_json(tmp_path / "a.json", BASE), write_json(tmp_path / "b.json", other)


def test_flatten_nested_keys():
    assert flatten({"a": {"b": 1, "c": {"d": [1]}}, "e": {}}) == {"a.b": 1, "a.c.d": [1], "e": {}}


def test_compare_configs_reports_exactly_the_differing_keys(two_configs):
    a, b = two_configs
    diffs = compare_configs(a, b)
    assert diffs == [
        ("experiment.seed", 1, 2),
        ("model.args.dropout", 0.0, "<absent>"),
        ("model.args.hidden", [8, 8], [16, 8]),
        ("optimizer.weight_decay", 0.0, 0.01),
    ]
    text = format_diff(diffs, a, b)
    for key, _, _ in diffs:
        assert key in text
    assert "experiment.name" not in text and "_meta" not in text


def test_compare_configs_sees_defaults_written_out_as_no_difference(tmp_path):
    short = tmp_path / "short.yaml"
    short.write_text("trainer: {epochs: 3}\n")
    full = tmp_path / "full.yaml"
    full.write_text(
        "trainer: {epochs: 3, monitor: val/accuracy, log_every_n_steps: 50}\n"
        "optimizer: {name: adam, lr: 0.001}\ncallbacks: []\n"
    )
    assert compare_configs(short, full) == []
    full.write_text("trainer: {epochs: 3, log_every_n_steps: 10}\n")
    assert compare_configs(short, full) == [("trainer.log_every_n_steps", 50, 10)]


def test_compare_configs_of_a_bad_config_names_the_file_and_key(tmp_path, capsys):
    good = write_json(tmp_path / "a.json", BASE)
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer: {epoch: 3}\n")
    assert main(["compare-configs", good, str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "trainer.epochs" in err


def test_compare_identical_configs_says_no_differences(tmp_path):
    a = write_json(tmp_path / "a.json", BASE)
    b = tmp_path / "b.yaml"  # same content, other format
    b.write_text(
        "experiment: {name: A, seed: 1, gpu_devices: null}\n"
        "model: {name: Vanilla, args: {hidden: [8, 8], dropout: 0.0}}\n"
        "optimizer: {name: adam, lr: 0.001}\n"
        "trainer: {epochs: 3, metrics: []}\n"
    )
    assert compare_configs(a, b) == []
    assert "no differences" in format_diff([], a, str(b))


def test_count_parameters_per_child_and_total():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3), nn.Linear(3, 2, bias=False))
    for p in model[2].parameters():
        p.requires_grad_(False)
    rows = count_parameters(model)
    first, frozen, last = 4 * 8 + 8, 8 * 3 + 3, 3 * 2
    assert rows == [
        ("0", first, first),
        ("1", 0, 0),
        ("2", 0, frozen),
        ("3", last, last),
        ("total", first + last, first + frozen + last),
    ]
    table = format_counts(rows, "model tiny")
    assert table.splitlines()[0] == "model tiny"
    assert f"{first + frozen + last:,}" in table.splitlines()[-1]


def test_count_parameters_includes_own_parameters():
    class WithScale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(nn.init.ones_(nn.Linear(1, 5).weight.detach().clone()))
            self.head = nn.Linear(2, 2)

    rows = count_parameters(WithScale())
    assert rows == [("head", 6, 6), ("(own)", 5, 5), ("total", 11, 11)]


def test_cli_compare_configs(two_configs, capsys):
    a, b = two_configs
    assert main(["compare-configs", a, b]) == 0
    out = capsys.readouterr().out
    for key in ("experiment.seed", "model.args.hidden", "optimizer.weight_decay"):
        assert key in out
    assert "experiment.name" not in out

    assert main(["compare-configs", a, a]) == 0
    assert "no differences" in capsys.readouterr().out


def test_cli_compare_configs_missing_file_is_usage_error(tmp_path, capsys):
    a = write_json(tmp_path / "a.json", BASE)
    missing = str(tmp_path / "missing.json")
    assert main(["compare-configs", a, missing]) == 2
    assert "missing.json" in capsys.readouterr().err


def test_cli_count_params_of_the_digits_mlp(monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    sizes = [8 * 8, 256, 256, 10]  # digits 1x8x8 -> hidden [256, 256] -> 10 classes
    expected = sum(i * o + o for i, o in zip(sizes[:-1], sizes[1:]))
    assert expected == 85_002
    assert main(["count-params", "configs/digits_mlp.yaml"]) == 0
    out = capsys.readouterr().out
    total_line = next(line for line in out.splitlines() if line.startswith("total"))
    assert total_line.split()[1:] == [f"{expected:,}", f"{expected:,}"]
    assert "Vanilla" in out.splitlines()[0]


def test_cli_count_params_with_override(monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    assert main(["count-params", "configs/digits_mlp.yaml", "model.args.hidden=[16]"]) == 0
    out = capsys.readouterr().out
    expected = 64 * 16 + 16 + 16 * 10 + 10
    total_line = next(line for line in out.splitlines() if line.startswith("total"))
    assert f"{expected:,}" in total_line
