"""Issue #8: a run directory or checkpoint runs no code unless the user trusts it.

A checkpoint passes ``torch.load(weights_only=True)`` and its digest is valid, yet its saved
config may name ``os:system`` or a module to import. ``eval``, ``predict``, ``resume`` and
``count-params`` of it must refuse (exit status 2, the key named) before importing anything;
``--trust-code`` (``trust_code=True``) lets it import.
"""

from __future__ import annotations

import importlib
import json
import shutil
import sys
import uuid
from pathlib import Path

import pytest
from conftest import QUICK_DIGITS as SMALL
from conftest import REPO, run_dirs

import dltemplate
from dltemplate.cli import main
from dltemplate.config.trust import code_references, refuse_untrusted_code
from dltemplate.engine.checkpoint import load_checkpoint, save_checkpoint
from dltemplate.errors import ConfigError

DEMO = REPO / "configs" / "digits_mlp.yaml"


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny finished run of the digits demo, copied by each test before it is crafted."""
    out = tmp_path_factory.mktemp("trust") / "runs"
    assert main(["train", str(DEMO), *SMALL, f"experiment.output_dir={out}"]) == 0
    (run,) = run_dirs(out)
    return run


class Crafted:
    """A copy of the clean run whose saved config (checkpoints and config JSON) names code,
    and a module beside it that writes ``marker`` when it is imported."""

    def __init__(self, clean_run: Path, tmp_path: Path, name: str) -> None:
        self.run = tmp_path / "run"
        shutil.copytree(clean_run, self.run)
        self.module = f"evil_{name}"  # one per test: an import is cached in sys.modules
        self.marker = tmp_path / "imported.txt"
        (tmp_path / f"{self.module}.py").write_text(
            f"from pathlib import Path\nPath({str(self.marker)!r}).write_text('ran')\n"
            "def metric(**kwargs):\n    raise SystemExit('a metric from the crafted module')\n"
        )
        importlib.invalidate_caches()
        self.ckpt = self.run / "Vanilla_best_ckpt.pth"
        self.config_json = next(self.run.glob("config_*.json"))

    def set(self, section: str, key: str | None, value: object, where: str = "both") -> None:
        """Write ``value`` into the saved config at ``section[.key]``: in the checkpoints, the
        config JSON, or both; the checkpoints are re-saved with a valid digest."""
        if where in ("both", "checkpoint"):
            for ckpt in self.run.glob("*_ckpt.pth"):
                state = load_checkpoint(ckpt)
                _put(state["config"], section, key, value)
                save_checkpoint(ckpt, state)
        if where in ("both", "json"):
            raw = json.loads(self.config_json.read_text())
            _put(raw, section, key, value)
            self.config_json.write_text(json.dumps(raw))


def _put(raw: dict, section: str, key: str | None, value: object) -> None:
    if key is None:
        raw[section] = value
    else:
        raw.setdefault(section, {})[key] = value


@pytest.fixture
def crafted(clean_run: Path, tmp_path: Path):
    """A crafted copy of the clean run; the module it names is forgotten afterwards."""
    made = Crafted(clean_run, tmp_path, uuid.uuid4().hex[:12])
    yield made
    sys.modules.pop(made.module, None)


def refused(cli, capsys, *args: object) -> str:
    """Run the command; assert it was refused as untrusted code; return stderr."""
    assert cli(*args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "--trust-code" in err
    return err


COMMANDS = {
    "eval run": lambda c: ["eval", c.run],
    "eval checkpoint": lambda c: ["eval", c.ckpt],
    "predict": lambda c: ["predict", c.run, "picture.png", "--out", c.run / "pred"],
    "resume run": lambda c: ["resume", c.run, "trainer.epochs=2"],
    "resume checkpoint": lambda c: ["resume", c.ckpt, "trainer.epochs=2"],
    "count-params run": lambda c: ["count-params", c.run],
    "count-params checkpoint": lambda c: ["count-params", c.ckpt],
    "count-params saved config": lambda c: ["count-params", c.config_json],
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_saved_imports_are_refused_and_not_imported(cli, capsys, crafted, command):
    crafted.set("experiment", "imports", [crafted.module])
    err = refused(cli, capsys, *COMMANDS[command](crafted))
    assert f"experiment.imports[0]='{crafted.module}'" in err
    assert not crafted.marker.exists()  # the module never ran
    assert not (crafted.run / "pred").exists()


@pytest.mark.parametrize(
    ("section", "key", "value", "named"),
    [
        ("model", "name", "os:system", "model.name='os:system'"),
        ("experiment", "task", "MOD:metric", "experiment.task="),
        ("data", "name", "MOD:metric", "data.name="),
        ("loss", "name", "MOD:metric", "loss.name="),
        ("optimizer", "name", "MOD:metric", "optimizer.name="),
        ("scheduler", "name", "MOD:metric", "scheduler.name="),
        ("experiment", "trainer", "MOD:Trainer", "experiment.trainer="),
        ("trainer", "metrics", ["accuracy", "MOD:metric"], "trainer.metrics[1]="),
        ("callbacks", None, [{"name": "MOD:Callback"}], "callbacks[0].name="),
        ("callbacks", None, ["ema", "MOD:Callback"], "callbacks[1].name="),
        ("data", "train_transform", ["hflip", "MOD:metric"], "data.train_transform[1].name="),
        ("data", "eval_transform", [{"name": "MOD:metric"}], "data.eval_transform[0].name="),
    ],
)
def test_every_module_path_in_a_saved_config_is_refused(
    cli, capsys, crafted, section, key, value, named
):
    value = json.loads(json.dumps(value).replace("MOD", crafted.module))
    crafted.set(section, key, value)
    for args in (["eval", crafted.ckpt], ["resume", crafted.run]):
        assert named in refused(cli, capsys, *args)
    assert not crafted.marker.exists()


def test_the_run_directorys_config_json_is_checked_too(cli, capsys, crafted):
    crafted.set("experiment", "imports", [crafted.module], where="json")
    err = refused(cli, capsys, "resume", crafted.run, "trainer.epochs=2")
    assert crafted.config_json.name in err and "experiment.imports[0]" in err
    assert not crafted.marker.exists()
    assert len(list(crafted.run.glob("*_ckpt.pth"))) == 2  # nothing written


def test_trust_code_lets_the_saved_config_import(cli, capsys, crafted):
    crafted.set("experiment", "imports", [crafted.module])
    assert cli("count-params", crafted.run, "--trust-code") == 0
    assert crafted.marker.read_text() == "ran"
    crafted.marker.unlink()
    sys.modules.pop(crafted.module, None)
    assert cli("eval", crafted.run, "--trust-code", "--limit-batches", "1") == 0
    assert crafted.marker.exists()


def test_the_users_own_overrides_are_trusted(cli, capsys, clean_run, tmp_path, crafted):
    # The clean run's saved config names nothing; the module is the user's own choice.
    assert cli("eval", clean_run, f"experiment.imports=[{crafted.module}]",
               "--limit-batches", "1", "--out", tmp_path / "report.json") == 0  # fmt: skip
    assert crafted.marker.exists()


def test_train_with_trainer_resume_uses_the_users_config_not_the_saved_one(cli, crafted):
    crafted.set("experiment", "imports", [crafted.module])
    assert cli("train", DEMO, *SMALL, f"trainer.resume={crafted.run}") == 0  # finished: no-op
    assert not crafted.marker.exists()


def test_python_api_refuses_unless_trust_code(crafted, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    crafted.set("model", "name", f"{crafted.module}:metric")
    with pytest.raises(ConfigError, match="model.name="):
        dltemplate.evaluate(crafted.run)
    with pytest.raises(ConfigError, match="model.name="):
        dltemplate.resume(crafted.run)
    with pytest.raises(ConfigError, match="model.name="):
        dltemplate.api.config_of_run(crafted.ckpt)
    assert not crafted.marker.exists()
    raw, _ = dltemplate.api.config_of_run(crafted.ckpt, trust_code=True)
    assert raw["model"]["name"] == f"{crafted.module}:metric"


def test_registered_names_pass_and_references_are_listed():
    ok = {"model": {"name": "Vanilla"}, "callbacks": ["ema", {"name": "grad_norm"}]}
    refuse_untrusted_code(ok, "run")  # no error
    bad = {"experiment": {"imports": ["a", "b"], "trainer": "x:T"}, "loss": {"name": "m:f"}}
    assert list(code_references(bad)) == [
        ("experiment.imports[0]", "a"),
        ("experiment.imports[1]", "b"),
        ("experiment.trainer", "x:T"),
        ("loss.name", "m:f"),
    ]
    with pytest.raises(ConfigError, match=r"experiment.imports\[0\]='a' \(and 3 more\)"):
        refuse_untrusted_code(bad, "run")
    refuse_untrusted_code(bad, "run", trust_code=True)
    refuse_untrusted_code({"model": "not a mapping", "callbacks": 3}, "run")  # shape: elsewhere
