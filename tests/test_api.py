"""Issue #7: the Python API (``dltemplate.train``, ``resume``, ``evaluate``, ``load_config``,
``validate``) gives what the command line gives, and a config built in code is checked exactly
as YAML is."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import yaml
from conftest import REPO, readme_block, run_dirs

import dltemplate
from dltemplate.config import (
    Config,
    DataConfig,
    ExperimentConfig,
    ModelConfig,
    TrainerConfig,
    load_config,
)
from dltemplate.engine.evaluator import _jsonable
from dltemplate.errors import ConfigError, UsageError

DEMO = REPO / "configs" / "digits_mlp.yaml"
SMALL = [
    "data.train_val_sample_rate=0.3",
    "model.args.hidden=[32]",
    "trainer.epochs=2",
    "trainer.progress_bar=off",
]


def csv_rows(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def as_json(report: dict) -> dict:
    """The report as ``dltemplate eval`` writes it to JSON."""
    return json.loads(json.dumps(report, default=_jsonable))


@pytest.fixture(scope="module")
def yaml_run(tmp_path_factory: pytest.TempPathFactory) -> dltemplate.RunResult:
    """A 2-epoch run of the digits demo, trained from its YAML file with overrides."""
    out = tmp_path_factory.mktemp("api") / "runs"
    return dltemplate.train(DEMO, [*SMALL, f"experiment.output_dir={out}"])


def test_train_from_yaml_returns_the_run_and_its_files(yaml_run):
    run = yaml_run.run_dir
    assert run.is_dir() and run_dirs(run.parent) == [run]
    assert yaml_run.best_checkpoint == run / "Vanilla_best_ckpt.pth"
    assert (run / "Vanilla_best_ckpt.pth").is_file() and (run / "Vanilla_last_ckpt.pth").is_file()
    rows = csv_rows(run)
    assert [row["epoch"] for row in yaml_run.history] == [1, 2] == [int(r["epoch"]) for r in rows]
    assert all(type(row["epoch"]) is int for row in yaml_run.history)
    for got, saved in zip(yaml_run.history, rows):
        assert got == {k: (int(v) if k == "epoch" else float(v)) for k, v in saved.items()}
        assert got["val/accuracy"] > 0.0 and "train/loss" in got
    assert yaml_run.test_metrics == json.loads((run / "test_metrics.json").read_text())
    assert yaml_run.test_metrics["accuracy"] > 0.2  # better than chance after 2 tiny epochs


def test_evaluate_from_python_equals_what_the_cli_writes(yaml_run, cli, capsys):
    report = dltemplate.evaluate(yaml_run.run_dir)
    assert report["metrics"]["accuracy"] == pytest.approx(yaml_run.test_metrics["accuracy"])
    assert cli("eval", yaml_run.run_dir) == 0
    assert as_json(report) == json.loads((yaml_run.run_dir / "eval_test_best.json").read_text())

    checkpoint = yaml_run.run_dir / "Vanilla_last_ckpt.pth"
    val = dltemplate.evaluate(checkpoint, split="val", overrides=["data.eval_batch_size=7"])
    out = yaml_run.run_dir / "val_report.json"
    assert cli("eval", checkpoint, "--split", "val", "--out", out, "data.eval_batch_size=7") == 0
    assert as_json(val) == json.loads(out.read_text())
    assert val["split"] == "val" and val["checkpoint"] == str(checkpoint)
    with pytest.raises(UsageError, match="split='dev': must be one of train, val, test"):
        dltemplate.evaluate(yaml_run.run_dir, split="dev")


def test_evaluate_with_a_viz_dir_for_a_task_that_draws_nothing_makes_no_folder(yaml_run, tmp_path):
    report = dltemplate.evaluate(yaml_run.run_dir, viz_dir=tmp_path / "viz")
    assert not (tmp_path / "viz").exists() and "pictures" not in report
    assert report["metrics"]["accuracy"] == pytest.approx(yaml_run.test_metrics["accuracy"])


def test_resume_of_a_finished_run_returns_its_result_unchanged(yaml_run):
    files = {p.name: p.stat().st_mtime_ns for p in yaml_run.run_dir.iterdir()}
    assert dltemplate.resume(yaml_run.run_dir) == yaml_run
    assert dltemplate.resume(yaml_run.run_dir / "Vanilla_last_ckpt.pth") == yaml_run
    assert {p.name: p.stat().st_mtime_ns for p in yaml_run.run_dir.iterdir()} == files


def test_train_from_a_config_built_in_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = Config(
        experiment=ExperimentConfig(name="InCode", output_dir="runs", seed=1),
        data=DataConfig(name="digits", batch_size=32, train_val_sample_rate=0.3),
        model=ModelConfig(name="Vanilla", args={"hidden": [32]}),
        trainer=TrainerConfig(epochs=2, progress_bar="off"),
    )
    cfg.optimizer.lr = 2e-3
    result = dltemplate.train(cfg, ["trainer.epochs=3"])
    assert result.run_dir.parent == tmp_path / "runs"
    assert len(result.history) == 3 == len(csv_rows(result.run_dir))
    assert result.test_metrics == json.loads((result.run_dir / "test_metrics.json").read_text())
    (saved,) = result.run_dir.glob("config_InCode_*.json")
    saved = json.loads(saved.read_text())
    assert saved["optimizer"]["lr"] == 2e-3 and saved["trainer"]["epochs"] == 3
    assert cfg.trainer.epochs == 2  # the caller's Config is left as it was


@pytest.mark.parametrize(
    ("yaml_text", "change"),
    [
        ('trainer:\n  epochs: "3"\n', lambda c: setattr(c.trainer, "epochs", "3")),
        ("trainer:\n  precision: 16\n", lambda c: setattr(c.trainer, "precision", 16)),
        ("data:\n  batch_size: 3.5\n", lambda c: setattr(c.data, "batch_size", 3.5)),
        ("experiment:\n  imports: my_models\n", lambda c: setattr(c.experiment, "imports", "x")),
    ],
    ids=["epochs-str", "precision-choice", "batch-float", "imports-not-a-list"],
)
def test_a_config_built_in_code_fails_with_the_yaml_message(tmp_path, yaml_text, change):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as from_yaml:
        load_config(path)
    cfg = Config()
    change(cfg)
    with pytest.raises(ConfigError) as from_code:
        dltemplate.validate(cfg)
    # the same message, the YAML's naming its file first
    in_file = str(from_yaml.value)
    assert in_file.startswith(f"{path}: ")
    in_file = in_file.removeprefix(f"{path}: ")
    if "imports" in yaml_text:  # ... up to the value given
        assert str(from_code.value).split("=")[0] == in_file.split("=")[0]
        assert "expected a list" in str(from_code.value)
    else:
        assert str(from_code.value) == in_file
    out = tmp_path / "runs"
    cfg.experiment.output_dir = str(out)
    with pytest.raises(ConfigError, match="expected|must be one of"):
        dltemplate.train(cfg)
    assert not out.exists()  # checked before any work


def test_a_misspelt_key_set_by_attribute_is_an_unknown_key(tmp_path):
    (tmp_path / "bad.yaml").write_text("trainer:\n  epoch: 3\n")
    with pytest.raises(ConfigError) as from_yaml:
        load_config(tmp_path / "bad.yaml")
    cfg = Config()
    cfg.trainer.epoch = 3  # type: ignore[attr-defined]
    with pytest.raises(ConfigError) as from_code:
        dltemplate.validate(cfg)
    expected = "unknown key 'trainer.epoch' (did you mean 'trainer.epochs'?)"
    assert str(from_yaml.value) == f"{tmp_path / 'bad.yaml'}: {expected}"
    assert str(from_code.value) == f"config: {expected}"


def test_validate_checks_names_and_returns_a_typed_config():
    cfg = Config()
    cfg.optimizer.lr = 1  # an int where YAML's `lr: 1` also gives 1.0
    checked = dltemplate.validate(cfg)
    assert checked.optimizer.lr == 1.0 and type(checked.optimizer.lr) is float
    assert checked == dltemplate.load_config({"optimizer": {"lr": 1}})
    cfg.data.name = "digts"
    with pytest.raises(ConfigError, match=r"data.name: unknown dataset 'digts' \(did you mean"):
        dltemplate.validate(cfg)


def test_load_config_from_a_dict_leaves_the_dict_alone():
    raw = {"trainer": {"epochs": 4}, "model": {"args": {"hidden": [8]}}}
    cfg = dltemplate.load_config(raw, ["trainer.epochs=5", "model.args.dropout=0.1"])
    assert cfg.trainer.epochs == 5 and cfg.model.args == {"hidden": [8], "dropout": 0.1}
    assert raw == {"trainer": {"epochs": 4}, "model": {"args": {"hidden": [8]}}}


def test_import_dltemplate_does_not_import_torch():
    code = "import sys, dltemplate; assert 'torch' not in sys.modules; dltemplate.train"
    env_path = str(REPO / "src")
    subprocess.run(
        [sys.executable, "-c", code], check=True, env={"PYTHONPATH": env_path}, timeout=60
    )


def test_the_readme_python_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    demo = yaml.safe_load(DEMO.read_text())
    demo["data"]["train_val_sample_rate"] = 0.3  # the README's example, on less data
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "digits_mlp.yaml").write_text(yaml.safe_dump(demo))
    code = readme_block("# train_from_python.py")
    printed = io.StringIO()
    with redirect_stdout(printed):
        exec(compile(code, "train_from_python.py", "exec"), {"__name__": "__main__"})
    (run,) = run_dirs(tmp_path / "Results" / "from_python")
    assert len(csv_rows(run)) == 3
    lines = printed.getvalue().splitlines()
    assert lines[0] == f"{run} {run / 'Vanilla_best_ckpt.pth'}"
    assert [line.split()[0] for line in lines[1:4]] == ["1", "2", "3"]
    assert lines[-1] == "trainer.epochs='3': expected an integer, got str"


def test_the_readme_regression_task_runs_with_the_cli(cli, tmp_path, capsys):
    (tmp_path / "my_regression.py").write_text(readme_block("# my_regression.py"))
    (tmp_path / "regression.yaml").write_text(readme_block("# regression.yaml"))
    commands = [
        line.split()[1:] for line in readme_block("dltemplate train regression").splitlines()
    ]
    assert commands[0] == ["train", "regression.yaml"]
    assert cli(*commands[0]) == 0
    (run,) = run_dirs(tmp_path / "Results" / "regression")
    test = json.loads((run / "test_metrics.json").read_text())
    assert test["mae"] < 0.2 and test["loss"] < 0.05  # noise is 0.05: learnt, nearly
    capsys.readouterr()
    assert commands[1][0] == "eval" and cli("eval", run, *commands[1][2:]) == 0
    out = capsys.readouterr().out
    assert "mae:" in out and "predicted" in out and "target" in out
    saved = json.loads((run / "eval_test_best.json").read_text())
    assert set(saved["samples"][0]) == {"predicted", "target"}
