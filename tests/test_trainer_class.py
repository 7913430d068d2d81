"""Issue #7: ``experiment.trainer`` names a TrainerBase subclass that ``train``, ``resume`` and
``eval`` all use (eval through its ``evaluator_class``); a bad path stops before any work."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import QUICK_DIGITS as SMALL
from conftest import REPO, readme_block, run_dirs

import dltemplate
from dltemplate.assemble import evaluator_class, trainer_class
from dltemplate.config import Config
from dltemplate.engine.evaluator import EvaluatorBase
from dltemplate.engine.trainer import TrainerBase
from dltemplate.errors import ConfigError

DEMO = REPO / "configs" / "digits_mlp.yaml"
REPORTING = "trainer_pkg.reporting:ReportingTrainer"
EXTRA = """

class NotATrainer:
    pass


class BadEvaluatorTrainer(TrainerBase):
    evaluator_class = NotATrainer
"""


@pytest.fixture
def trainer_pkg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A package in ``tmp_path`` holding the README's trainer (and two wrong classes)."""
    package = tmp_path / "trainer_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "reporting.py").write_text(readme_block("# my_trainers.py") + EXTRA)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m.startswith("trainer_pkg")]:
        monkeypatch.delitem(sys.modules, name)
    return package


def fits(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "fits.jsonl").read_text().splitlines()]


def test_train_resume_and_eval_use_the_configured_trainer(cli, tmp_path, trainer_pkg, capsys):
    out = tmp_path / "runs"
    chosen = f"experiment.trainer={REPORTING}"
    assert cli("train", DEMO, *SMALL, f"experiment.output_dir={out}", chosen) == 0
    (run,) = run_dirs(out)
    test = json.loads((run / "test_metrics.json").read_text())
    assert fits(run) == [{"epochs": 1, "test": test}]
    (saved,) = run.glob("config_*.json")
    assert json.loads(saved.read_text())["experiment"]["trainer"] == REPORTING

    # The saved config names a class to import: the user trusts their own run.
    assert cli("resume", run, "trainer.epochs=2", "--trust-code") == 0  # the saved config's class
    assert [f["epochs"] for f in fits(run)] == [1, 2]
    assert len((run / "metrics.csv").read_text().splitlines()) == 3

    capsys.readouterr()
    assert cli("eval", run, "--trust-code") == 0
    report = json.loads((run / "eval_test_best.json").read_text())
    assert report["parameters"] == 64 * 32 + 32 + 32 * 10 + 10  # the trainer's evaluator ran

    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    misspelt = "experiment.trainer=trainer_pkg.reporting:ReportingTrainr"
    assert cli("resume", run, misspelt, "--trust-code") == 2
    assert "did you mean 'ReportingTrainer'" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before


def test_the_python_api_uses_the_configured_trainer(tmp_path, trainer_pkg):
    out = tmp_path / "runs"
    result = dltemplate.train(
        DEMO, [*SMALL, f"experiment.output_dir={out}", f"experiment.trainer={REPORTING}"]
    )
    assert fits(result.run_dir) == [{"epochs": 1, "test": result.test_metrics}]
    with pytest.raises(ConfigError, match="experiment.trainer="):  # imports code: not trusted
        dltemplate.resume(result.run_dir)
    # finished: nothing is trained, so the trainer's fit does not run again
    assert dltemplate.resume(result.run_dir, trust_code=True) == result
    assert len(fits(result.run_dir)) == 1
    assert dltemplate.evaluate(result.run_dir, split="val", trust_code=True)["parameters"] > 0


@pytest.mark.parametrize(
    ("path", "message"),
    [
        (
            "trainer_pkg.reporting:ReportingTrainr",
            "experiment.trainer: module 'trainer_pkg.reporting' has no 'ReportingTrainr' "
            "(did you mean 'ReportingTrainer'?)",
        ),
        ("trainer_pkg.reportin:ReportingTrainer", "experiment.trainer: cannot import module"),
        ("trainer_pkg.reporting:NotATrainer", "is not a subclass of"),
        ("trainer_pkg.reporting:ReportingEvaluator", "is not a subclass of"),
        ("ReportingTrainer", "experiment.trainer='ReportingTrainer': expected package.module"),
        ("trainer_pkg.reporting:BadEvaluatorTrainer", "its evaluator_class"),
    ],
)
def test_a_bad_trainer_path_stops_before_any_work(
    cli, tmp_path, trainer_pkg, capsys, path, message
):
    out = tmp_path / "runs"
    assert (
        cli("train", DEMO, *SMALL, f"experiment.output_dir={out}", f"experiment.trainer={path}")
        == 2
    )
    err = capsys.readouterr().err
    assert message in err and "experiment.trainer" in err
    assert not out.exists()  # nothing written


def test_no_trainer_is_trainer_base_and_its_evaluator():
    cfg = Config()
    assert trainer_class(cfg) is TrainerBase
    assert evaluator_class(cfg) is getattr(TrainerBase, "evaluator_class", EvaluatorBase)
    cfg.experiment.trainer = "dltemplate.engine.trainer:TrainerBase"
    assert trainer_class(cfg) is TrainerBase
    with pytest.raises(ConfigError, match=r"experiment.trainer=\[1\]: expected str or NoneType"):
        dltemplate.load_config({"experiment": {"trainer": [1]}})
