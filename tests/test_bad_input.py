"""Bad input exits with status 2, a message naming the culprit, and no damage to runs."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from conftest import REPO, run_dirs

DEMO = REPO / "configs" / "digits_mlp.yaml"
FASHION = REPO / "configs" / "fashion_mnist_mlp.yaml"


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("trainer.epoch=3", "did you mean 'trainer.epochs'"),
        ("trainr.epochs=3", "did you mean 'trainer'"),
        ("trainer.epochs=three", "trainer.epochs"),
        ("trainer.precision=16", "trainer.precision"),
        ("model.name=Vanila", "did you mean 'Vanilla'"),
        ("data.name=digit", "did you mean 'digits'"),
        ("optimizer.name=adamm", "did you mean 'adam'"),
        ("scheduler.name=cosin", "did you mean 'cosine'"),
        ("trainer.monitor=val/acuracy", "did you mean 'val/accuracy'"),
        ("model.args.hiden=[8]", "hiden"),
        ("trainer.precision=fp16", "CUDA"),
    ],
)
def test_bad_config_exits_2_naming_the_key(cli, tmp_path, capsys, override, expected):
    out = tmp_path / "out"
    assert cli("train", DEMO, f"experiment.output_dir={out}", override) == 2
    err = capsys.readouterr().err
    assert expected in err
    assert not out.exists() or run_dirs(out) == []  # nothing written


def test_missing_config_file(cli, capsys):
    assert cli("train", "nope.yaml") == 2
    assert "nope.yaml" in capsys.readouterr().err


def test_missing_fashion_mnist_folder_says_where_to_put_which_files(cli, tmp_path, capsys):
    missing = tmp_path / "no_data"
    code = cli("train", FASHION, f"data.root={missing}", "data.download=false",
               f"experiment.output_dir={tmp_path / 'out'}")  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "train-images-idx3-ubyte" in err
    assert not (tmp_path / "out").exists()


def test_truncated_idx_file_is_named(cli, fashion_root, tmp_path, capsys):
    target = fashion_root / "t10k-labels-idx1-ubyte"
    target.write_bytes(target.read_bytes()[:-5])
    code = cli("train", FASHION, f"data.root={fashion_root}",
               f"experiment.output_dir={tmp_path / 'out'}")  # fmt: skip
    assert code == 2
    assert "t10k-labels-idx1-ubyte" in capsys.readouterr().err


@pytest.fixture
def trained_run(cli, tmp_path) -> Path:
    out = tmp_path / "out"
    assert cli("train", DEMO, f"experiment.output_dir={out}", "trainer.epochs=1") == 0
    (run,) = run_dirs(out)
    return run


def test_eval_of_something_that_is_not_a_checkpoint(cli, tmp_path, capsys, trained_run):
    bogus = tmp_path / "notes.pth"
    bogus.write_text("experiment:\n  name: x\n")
    assert cli("eval", bogus) == 2
    assert "notes.pth" in capsys.readouterr().err
    assert cli("eval", tmp_path / "missing.pth") == 2
    assert "missing.pth" in capsys.readouterr().err
    cfg = next(trained_run.glob("config_*.json"))
    assert cli("eval", cfg) == 2  # a run's config JSON is not a checkpoint either


def test_checkpoint_of_another_model_is_refused_and_left_intact(cli, capsys, trained_run):
    ckpt = trained_run / "Vanilla_best_ckpt.pth"
    before = digest(ckpt)
    assert cli("eval", ckpt, "model.args.hidden=[32]") == 2
    err = capsys.readouterr().err
    assert "Vanilla_best_ckpt.pth" in err and "does not match" in err
    assert cli("resume", trained_run, "model.args.hidden=[32]", "trainer.epochs=2") == 2
    assert digest(ckpt) == before


def test_resume_of_a_folder_without_checkpoints(cli, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli("resume", empty) == 2
    assert "empty" in capsys.readouterr().err
