"""Config loading, overrides, validation errors, and the registry's name lookups."""

from __future__ import annotations

import textwrap

import pytest
import torch

import dltemplate.models  # noqa: F401  (registers the models)
from dltemplate.config import Config, load_config
from dltemplate.config.loader import config_from_dict, config_to_dict, parse_override
from dltemplate.errors import ConfigError
from dltemplate.registry import MODELS, Registry


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(
        textwrap.dedent(
            """\
            experiment:
              name: Tiny
              seed: 7
            data:
              name: digits
              batch_size: 16
            model:
              name: Vanilla
              args:
                hidden: [32, 32]
            trainer:
              epochs: 3
              precision: 32
            """
        )
    )
    return path


def test_load_config_reads_yaml_and_keeps_defaults(config_file):
    cfg = load_config(config_file)
    assert isinstance(cfg, Config)
    assert cfg.experiment.name == "Tiny"
    assert cfg.experiment.seed == 7
    assert cfg.data.batch_size == 16
    assert cfg.model.args == {"hidden": [32, 32]}
    assert cfg.trainer.epochs == 3
    assert cfg.trainer.precision == "32"  # YAML int accepted as the string choice
    # untouched keys keep their defaults
    assert cfg.optimizer.name == "adam"
    assert cfg.optimizer.lr == pytest.approx(1e-3)
    assert cfg.trainer.monitor_mode == "max"


def test_load_config_without_a_file_is_all_defaults():
    assert config_to_dict(load_config(None)) == config_to_dict(Config())


def test_overrides_parse_types(config_file):
    cfg = load_config(
        config_file,
        [
            "trainer.epochs=5",
            "optimizer.lr=0.01",
            "experiment.deterministic=true",
            "experiment.gpu_devices=[0, 1]",
            "trainer.clip_grad_norm=null",
            "trainer.clip_grad_value=2",
            "model.args.hidden=[8,8]",
            "model.args.dropout=0.25",
            "experiment.name=Other Name",
            "trainer.metrics=[topk_accuracy]",
        ],
    )
    assert cfg.trainer.epochs == 5 and type(cfg.trainer.epochs) is int
    assert cfg.optimizer.lr == pytest.approx(0.01) and type(cfg.optimizer.lr) is float
    assert cfg.experiment.deterministic is True
    assert cfg.experiment.gpu_devices == [0, 1]
    assert cfg.trainer.clip_grad_norm is None
    assert cfg.trainer.clip_grad_value == 2.0 and type(cfg.trainer.clip_grad_value) is float
    assert cfg.model.args == {"hidden": [8, 8], "dropout": 0.25}
    assert cfg.experiment.name == "Other Name"
    assert cfg.trainer.metrics == ["topk_accuracy"]
    # the YAML file's other keys are untouched
    assert cfg.experiment.seed == 7


def test_override_creates_missing_section_and_later_override_wins():
    cfg = load_config(None, ["scheduler.args.gamma=0.5", "trainer.epochs=2", "trainer.epochs=4"])
    assert cfg.scheduler.args == {"gamma": 0.5}
    assert cfg.trainer.epochs == 4


def test_int_or_float_field_keeps_its_type():
    cfg = load_config(None, ["trainer.limit_train_batches=5", "trainer.limit_val_batches=0.5"])
    assert cfg.trainer.limit_train_batches == 5
    assert type(cfg.trainer.limit_train_batches) is int
    assert cfg.trainer.limit_val_batches == 0.5
    assert type(cfg.trainer.limit_val_batches) is float
    assert load_config(None, ["trainer.limit_test_batches=null"]).trainer.limit_test_batches is None


def test_exponent_notation_float(tmp_path):
    assert load_config(None, ["optimizer.lr=1e-3"]).optimizer.lr == pytest.approx(1e-3)
    path = tmp_path / "lr.yaml"
    path.write_text("optimizer:\n  lr: 3e-4\n")
    assert load_config(path).optimizer.lr == pytest.approx(3e-4)


def test_precision_yaml_int_is_accepted_as_string(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("trainer:\n  precision: 32\n")
    assert load_config(path).trainer.precision == "32"
    assert load_config(None, ["trainer.precision=bf16"]).trainer.precision == "bf16"


def test_unknown_section_suggests_the_closest():
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["traner.epochs=3"])
    assert "traner" in str(exc.value)
    assert "did you mean 'trainer'" in str(exc.value)


def test_unknown_key_suggests_the_closest(config_file):
    with pytest.raises(ConfigError) as exc:
        load_config(config_file, ["trainer.epoch=3"])
    msg = str(exc.value)
    assert "trainer.epoch" in msg
    assert "did you mean 'trainer.epochs'" in msg
    # the typo is the override's, not the file's: the message names the override, not the file
    assert msg.startswith("override 'trainer.epoch=3': unknown key")
    assert str(config_file) not in msg


def test_unknown_key_in_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optimizer:\n  lrate: 0.1\n")
    with pytest.raises(ConfigError, match="optimizer.lrate"):
        load_config(path)


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["trainer.epochs=abc"])
    assert "trainer.epochs" in str(exc.value)
    assert "integer" in str(exc.value)
    with pytest.raises(ConfigError, match="trainer.epochs"):
        load_config(None, ["trainer.epochs=2.5"])
    with pytest.raises(ConfigError, match="experiment.deterministic"):
        load_config(None, ["experiment.deterministic=maybe"])
    with pytest.raises(ConfigError, match="experiment.gpu_devices"):
        load_config(None, ["experiment.gpu_devices=[0, x]"])


def test_a_wrong_item_of_an_optional_list_names_the_item():
    """`gpu_devices: [0, null]` said "expected list or NoneType, got list": the item's own
    error says which item is wrong and what it should be."""
    for given, said in [
        ("[0, x]", "experiment.gpu_devices[1]='x': expected an integer, got str"),
        ("[null]", "experiment.gpu_devices[0]=None: expected an integer, got NoneType"),
        ("3", "experiment.gpu_devices=3: expected list or NoneType, got int"),
    ]:
        with pytest.raises(ConfigError) as exc:
            load_config(None, [f"experiment.gpu_devices={given}"])
        assert str(exc.value) == said


def test_literal_out_of_choices():
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["trainer.precision=16"])
    msg = str(exc.value)
    assert "trainer.precision" in msg
    for choice in ("32", "bf16", "fp16"):
        assert choice in msg
    with pytest.raises(ConfigError, match="trainer.monitor_mode"):
        load_config(None, ["trainer.monitor_mode=maximum"])


def test_missing_yaml_file_is_a_config_error(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as exc:
        load_config(missing)
    assert str(missing) in str(exc.value)


def test_malformed_yaml_is_a_config_error(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("trainer:\n  epochs: [1, 2\n  lr: : :\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert str(path) in str(exc.value)
    assert "YAML" in str(exc.value)


def test_yaml_that_is_not_a_mapping_is_a_config_error(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path)


def test_section_that_is_not_a_mapping():
    with pytest.raises(ConfigError, match="'trainer' must be a mapping"):
        config_from_dict({"trainer": 3})


def test_malformed_override_is_a_config_error():
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("trainer.epochs")
    with pytest.raises(ConfigError, match="section.key"):
        parse_override("epochs=3")
    with pytest.raises(ConfigError, match="'epochs' is not a mapping"):
        load_config(None, ["trainer.epochs=3", "trainer.epochs.x=3"])
    with pytest.raises(ConfigError, match="trainer.epochs"):
        load_config(None, ["trainer.epochs.x=3"])


def test_registry_unknown_name_suggests_closest():
    with pytest.raises(ConfigError) as exc:
        MODELS.get("Vanila", "model.name")
    msg = str(exc.value)
    assert "model.name" in msg
    assert "'Vanilla'" in msg
    assert "did you mean" in msg


def test_registry_imports_module_colon_attr():
    assert MODELS.get("torch.nn:Linear") is torch.nn.Linear
    layer = MODELS.build("torch.nn:Linear", "model.name", in_features=3, out_features=2)
    assert isinstance(layer, torch.nn.Linear) and layer.weight.shape == (2, 3)


def test_registry_bad_module_path_is_a_config_error():
    with pytest.raises(ConfigError, match="no_such_package_xyz"):
        MODELS.get("no_such_package_xyz.models:Net", "model.name")
    with pytest.raises(ConfigError) as exc:
        MODELS.get("torch.nn:Lineer", "model.name")
    assert "did you mean 'Linear'" in str(exc.value)


def test_registry_register_build_and_bad_arguments():
    reg = Registry("widget")

    @reg.register("double")
    def double(x: int) -> int:
        return 2 * x

    assert "double" in reg and reg.names() == ["double"]
    assert reg.build("double", x=4) == 8
    with pytest.raises(ConfigError, match="double"):
        reg.build("double", "widget.name", y=1)
    reg.register("double")(lambda x: x)  # again (a notebook cell run twice): replaced
    assert reg.build("double", x=4) == 4
