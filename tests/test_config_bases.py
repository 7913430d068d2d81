"""Configs that build on configs: ``base: OTHER.yaml`` (relative to the file), to any depth."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import REPO, run_dirs

from dltemplate.config import load_config
from dltemplate.config.loader import merge_configs
from dltemplate.errors import ConfigError
from dltemplate.sweeps.spec import load_sweep, trial_config

DEMO = REPO / "configs" / "digits_mlp.yaml"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture
def family(tmp_path: Path) -> Path:
    """Three generations in three folders: each base path is relative to the file naming it."""
    write(
        tmp_path / "shared" / "grand.yaml",
        "experiment: {name: Grand, seed: 7}\n"
        "model: {name: Vanilla, args: {hidden: [64, 64], dropout: 0.1}}\n"
        "optimizer: {name: adam, lr: 0.01}\n"
        "callbacks: [grad_norm]\n",
    )
    write(
        tmp_path / "family" / "base.yaml",
        "base: ../shared/grand.yaml\n"
        "data: {name: digits, batch_size: 16}\n"
        "model: {args: {hidden: [32]}}\n",
    )
    return write(
        tmp_path / "family" / "runs" / "child.yaml",
        "base: ../base.yaml\nexperiment: {name: Child}\noptimizer: {lr: 0.003}\ncallbacks: []\n",
    )


def test_a_config_overrides_its_bases_key_by_key_to_any_depth(family, monkeypatch):
    monkeypatch.chdir(family.parents[2])  # not the files' folder: bases are relative to files
    cfg = load_config(family.relative_to(family.parents[2]))
    assert cfg.experiment.name == "Child" and cfg.experiment.seed == 7  # child, grandparent
    assert cfg.data.name == "digits" and cfg.data.batch_size == 16  # parent
    assert cfg.optimizer.name == "adam" and cfg.optimizer.lr == 0.003  # merged section
    # mappings merge to any depth; a list is replaced whole, not merged item by item
    assert cfg.model.args == {"hidden": [32], "dropout": 0.1}
    assert cfg.callbacks == []
    # overrides still come last
    assert load_config(family, ["optimizer.lr=0.5"]).optimizer.lr == 0.5


def test_merge_replaces_lists_and_scalars_and_leaves_its_inputs_alone():
    base = {"a": {"b": [1, 2], "c": {"d": 1, "e": 2}}, "f": 1}
    child = {"a": {"b": [3], "c": {"e": None}}, "g": 2}
    assert merge_configs(base, child) == {"a": {"b": [3], "c": {"d": 1, "e": None}}, "f": 1, "g": 2}
    assert base == {"a": {"b": [1, 2], "c": {"d": 1, "e": 2}}, "f": 1}


def test_a_child_that_names_another_model_drops_the_bases_args_for_it(tmp_path, cli):
    """The base's model arguments were its model's: a child switching to SmallCNN gets only
    its own (``hidden`` would reach SmallCNN otherwise); the same model merges them; an empty
    ``args:`` is no arguments."""
    demo = REPO / "configs" / "digits_mlp.yaml"
    other = tmp_path / "cnn.yaml"
    other.write_text(f"base: {demo}\nmodel:\n  name: SmallCNN\n  args:\n    width: 8\n")
    assert load_config(other, []).model.args == {"width": 8}
    same = tmp_path / "same.yaml"
    same.write_text(f"base: {demo}\nmodel:\n  args:\n    dropout: 0.5\n")
    merged = load_config(same, []).model.args
    assert (
        merged["dropout"] == 0.5 and merged["hidden"] == load_config(demo, []).model.args["hidden"]
    )
    empty = tmp_path / "empty.yaml"
    empty.write_text(f"base: {demo}\nmodel:\n  name: SmallCNN\n  args:\n")
    assert load_config(empty, []).model.args == {}
    quick = [
        "trainer.epochs=1",
        "data.train_val_sample_rate=0.2",
        f"experiment.output_dir={tmp_path / 'o'}",
    ]
    assert cli("train", other, *quick) == 0


def test_another_optimizer_drops_the_bases_args_and_null_replaces_a_value(tmp_path):
    (tmp_path / "base.yaml").write_text(
        "optimizer:\n  name: sgd\n  lr: 0.1\n  args:\n    momentum: 0.9\n"
        "data:\n  eval_batch_size: 64\n"
    )
    child = tmp_path / "child.yaml"
    child.write_text("base: base.yaml\noptimizer:\n  name: adam\ndata:\n  eval_batch_size: null\n")
    cfg = load_config(child, [])
    assert (cfg.optimizer.name, cfg.optimizer.lr, cfg.optimizer.args) == ("adam", 0.1, {})
    assert cfg.data.eval_batch_size is None


def test_a_wrong_value_is_blamed_on_the_file_that_wrote_it(cli, tmp_path, capsys):
    """The file (the config or the base that set it) is named; an override's error is the
    override's."""
    (tmp_path / "base.yaml").write_text("trainer:\n  epochs: many\n")
    child = tmp_path / "child.yaml"
    child.write_text("base: base.yaml\noptimizer:\n  lr: fast\n")
    assert cli("config", child, "optimizer.lr=0.1") == 2
    assert capsys.readouterr().err.startswith(
        f"dltemplate: error: {tmp_path / 'base.yaml'}: trainer.epochs"
    )
    assert cli("config", child, "trainer.epochs=3") == 2
    assert capsys.readouterr().err.startswith(f"dltemplate: error: {child}: optimizer.lr='fast'")
    assert cli("config", child, "trainer.epochs=x", "optimizer.lr=1") == 2
    assert capsys.readouterr().err.startswith("dltemplate: error: trainer.epochs='x'")


def test_a_value_out_of_range_is_blamed_on_the_file_or_override_that_set_it(cli, tmp_path, capsys):
    """Rules on values (epochs >= 1, clipping > 0, finite args) name the file that wrote the
    value as type errors do: the base, not the config building on it; an override, no file."""
    (tmp_path / "base.yaml").write_text(
        "trainer:\n  epochs: 0\n  clip_grad_norm: -1\nmodel:\n  args: {dropout: .nan}\n"
    )
    child = tmp_path / "child.yaml"
    child.write_text("base: base.yaml\noptimizer:\n  lr: 0.1\n")
    base = tmp_path / "base.yaml"
    cases = [
        ((), f"{base}: trainer.epochs=0: must be at least 1"),
        (("trainer.epochs=2",), f"{base}: trainer.clip_grad_norm=-1.0: must be > 0"),
        (("trainer.epochs=2", "trainer.clip_grad_norm=1"), f"{base}: model.args.dropout=nan"),
        (("trainer.epochs=-3",), "trainer.epochs=-3: must be at least 1"),
        (
            ("optimizer.lr=-1", "trainer.epochs=1", "trainer.clip_grad_norm=1", "model.args={}"),
            "optimizer.lr=-1.0: must be a number >= 0",
        ),  # fmt: skip
    ]
    for overrides, expected in cases:
        assert cli("config", child, *overrides) == 2
        assert one_line_error(capsys).startswith(f"dltemplate: error: {expected}"), overrides
    (tmp_path / "own.yaml").write_text("trainer:\n  epochs: 0\n")  # no base: its own file
    assert cli("config", tmp_path / "own.yaml") == 2
    assert one_line_error(capsys).startswith(f"dltemplate: error: {tmp_path / 'own.yaml'}: ")


def test_config_prints_the_resolved_config_and_a_run_saves_it(cli, family, capsys, tmp_path):
    assert cli("config", family) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert "base" not in printed
    assert printed["model"]["args"] == {"hidden": [32], "dropout": 0.1}
    assert printed["experiment"]["name"] == "Child" and printed["optimizer"]["lr"] == 0.003

    out = tmp_path / "out"
    assert cli("train", family, f"experiment.output_dir={out}", "trainer.fast_dev_run=1",
               "trainer.progress_bar=off") == 0  # fmt: skip
    (run,) = run_dirs(out)
    (saved_file,) = run.glob("config_*.json")
    saved = json.loads(saved_file.read_text())
    assert "base" not in saved
    assert saved["model"]["args"] == {"hidden": [32], "dropout": 0.1}
    assert (saved["experiment"]["seed"], saved["data"]["batch_size"]) == (7, 16)


def test_a_cycle_of_bases_is_one_line_naming_the_files(cli, tmp_path, capsys):
    a = write(tmp_path / "a.yaml", "base: sub/b.yaml\ntrainer: {epochs: 2}\n")
    b = write(tmp_path / "sub" / "b.yaml", "base: ../a.yaml\n")
    assert cli("config", a) == 2
    err = one_line_error(capsys)
    assert "cycle" in err and str(a) in err and str(b) in err
    write(tmp_path / "self.yaml", "base: self.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "self.yaml")


def test_a_missing_or_wrong_base_names_the_file_that_asked_for_it(cli, tmp_path, capsys):
    child = write(tmp_path / "exp" / "child.yaml", "base: parent.yaml\n")
    assert cli("train", child) == 2
    err = one_line_error(capsys)
    assert err.startswith(f"dltemplate: error: {child}: base: parent.yaml: not found")
    assert str(tmp_path / "exp" / "parent.yaml") in err  # where it looked
    for value in ("[a.yaml]", "''", "3"):
        write(child, f"base: {value}\n")
        assert cli("config", child) == 2
        assert f"{child}: base=" in one_line_error(capsys)


def test_a_base_file_is_read_as_safely_as_any_config(cli, tmp_path, capsys):
    parent = write(tmp_path / "parent.yaml", "trainer:\n  epochs: 2\n  epochs: 3\n")
    child = write(tmp_path / "child.yaml", "base: parent.yaml\n")
    assert cli("config", child) == 2
    err = one_line_error(capsys)
    assert str(parent) in err and "given twice" in err
    write(parent, "a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
        for p, c in zip("abcdef", "bcdefg")
    ))  # fmt: skip
    assert cli("config", child) == 2
    assert str(parent) in one_line_error(capsys)
    write(parent, "trainer: {epoch: 3}\n")  # a key typo in a base names the base
    assert cli("config", child) == 2
    err = one_line_error(capsys)
    assert f"{parent}: unknown key 'trainer.epoch' (did you mean 'trainer.epochs'?)" in err


def test_the_shipped_family_unetpp_builds_on_unet():
    base_file, child_file = (
        REPO / "configs" / "unet_carvana.yaml",
        REPO / "configs" / "unetpp_carvana.yaml",
    )
    assert yaml.safe_load(child_file.read_text())["base"] == base_file.name
    base, child = load_config(base_file), load_config(child_file)
    assert (child.model.name, child.model.args["depth"]) == ("UNet++", 3)
    assert child.model.args["base_width"] == base.model.args["base_width"]  # merged, not replaced
    assert (child.data, child.loss, child.trainer) == (base.data, base.loss, base.trainer)


def test_a_sweep_over_a_config_with_a_base(tmp_path):
    write(tmp_path / "configs" / "base.yaml", f"base: {DEMO}\ntrainer: {{epochs: 2}}\n")
    sweep = write(
        tmp_path / "sweep.yaml",
        "name: s\nbase: configs/base.yaml\nparams:\n"
        "  optimizer.lr: {type: float, low: 0.001, high: 0.1, log: true}\n",
    )
    spec = load_sweep(sweep)
    cfg = trial_config(spec, {"optimizer.lr": 0.01})
    assert (cfg.trainer.epochs, cfg.optimizer.lr, cfg.data.name) == (2, 0.01, "digits")
