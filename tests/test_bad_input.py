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
        ("callbacks.0=ema", "override 'callbacks.0=ema': callbacks is a list, set whole"),
        ("callbacks.ema.decay=0.9", "callbacks is a list, set whole: e.g. callbacks=[grad_norm]"),
        ("callbacks=grad_norm", "override 'callbacks=grad_norm': callbacks must be a list"),
        # the shell split an unquoted list at its space: a traceback and exit 1 before
        ("callbacks=[{name:", "override 'callbacks=[{name:': not valid YAML"),
    ],
)
def test_bad_config_exits_2_naming_the_key(cli, tmp_path, capsys, override, expected):
    out = tmp_path / "out"
    assert cli("train", DEMO, f"experiment.output_dir={out}", override) == 2
    err = capsys.readouterr().err
    assert expected in err
    assert not out.exists() or run_dirs(out) == []  # nothing written


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("trainer.grad_accum_steps=0", "trainer.grad_accum_steps=0: must be at least 1"),
        ("trainer.limit_train_batches=0", "trainer.limit_train_batches=0: must be at least 1"),
        ("trainer.limit_val_batches=1.5", "trainer.limit_val_batches=1.5: a fraction must be"),
        ("trainer.limit_test_batches=.nan", "trainer.limit_test_batches=nan: a fraction"),
        ("data.train_val_sample_rate=0", "data.train_val_sample_rate=0.0: must be in (0, 1]"),
        ("data.test_sample_rate=1.5", "data.test_sample_rate=1.5: must be in (0, 1]"),
        ("experiment.threads=0", "experiment.threads=0: must be at least 1"),
    ],
)
def test_config_refuses_the_values_train_refuses(cli, tmp_path, capsys, override, expected):
    """`dltemplate config` checks a config as `train` does: these printed a config (exit 0)
    that `train` then refused. An override's value is the override's, not the file's fault."""
    assert cli("config", DEMO, override) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"dltemplate: error: {expected}"), captured.err
    assert len(captured.err.strip().splitlines()) == 1
    out = tmp_path / "out"
    assert cli("train", DEMO, f"experiment.output_dir={out}", override) == 2
    assert expected in capsys.readouterr().err
    assert not out.exists() or run_dirs(out) == []


def test_config_refuses_autotuning_with_deterministic_as_train_does(cli, capsys):
    assert (
        cli("config", DEMO, "experiment.deterministic=true", "experiment.cudnn_benchmark=true") == 2
    )
    assert capsys.readouterr().err.startswith(
        "dltemplate: error: experiment.cudnn_benchmark=true conflicts with "
        "experiment.deterministic=true"
    )


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


# == issue #8: every bad input is one line, exit status 2, nothing written =====================
SMALL = ["data.train_val_sample_rate=0.3", "model.args.hidden=[32]", "trainer.epochs=1"]


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    """stderr of a command that failed with a usage error: one line, no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    return err


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["optimizer.lr=-1"], "optimizer.lr=-1.0: must be a number >= 0"),
        (["optimizer.lr=.nan"], "optimizer.lr=nan"),
        (["model.args.hidden=128"], "model.name=Vanilla model.args={'hidden': 128}: "),
        (["model.args.hidden=[-5]"], "model.name=Vanilla model.args={'hidden': [-5]}: "),
        (
            ["loss.args={label_smoothing: 2}"],
            "loss.name=cross_entropy loss.args={'label_smoothing': 2}: label_smoothing=2",
        ),
        ([f"experiment.seed={10**30}"], f"experiment.seed={10**30}: must be in [0, 2**32)"),
        (["experiment.name=a/b"], "experiment.name='a/b': must be a plain name"),
        (["experiment.name=..\\\\x"], "experiment.name="),
        (["trainer.epochs=0"], "trainer.epochs=0: must be at least 1"),
        (["trainer.epochs=-2"], "trainer.epochs=-2: must be at least 1"),
        (["data.eval_batch_size=0"], "data.eval_batch_size=0: must be at least 1"),
        (["data.num_workers=-1"], "data.num_workers=-1: must be 0 or more"),
        (["data.prefetch_factor=0"], "data.prefetch_factor=0: must be at least 1"),
        (["data.train_transform=[flip]"], "data.train_transform[0]: unknown transform 'flip'"),
        (["data.test_args={train: false}"], "data.test_args: digits is a dltemplate dataset"),
        (["data.val_fraction=0"], "trainer.monitor=train/accuracy"),
        (["model.name=cnn", "model.args={widht: 16}"], "did you mean 'width'"),
        (["trainer.log_every_n_steps=0"], "trainer.log_every_n_steps=0: must be at least 1"),
        (["trainer.clip_grad_norm=-1"], "trainer.clip_grad_norm=-1.0: must be > 0"),
        (["trainer.clip_grad_value=0"], "trainer.clip_grad_value=0.0: must be > 0"),
        (["trainer.early_stopping_patience=-1"], "trainer.early_stopping_patience=-1: must be"),
        (["trainer.fast_dev_run=-1"], "trainer.fast_dev_run=-1: must be 0 (off) or more"),
        (["trainer.overfit_batches=-1"], "trainer.overfit_batches=-1: must be 0 (off) or more"),
        (["data.val_fraction=-0.1"], "data.val_fraction=-0.1: must be in [0, 1)"),
        (["data.test_fraction=1"], "data.test_fraction=1.0: must be in [0, 1)"),
        (
            ["scheduler.name=step", "scheduler.args={step_size: 0}"],
            "scheduler.name=step scheduler.args={'step_size': 0}: step_size=0: must be at least 1",
        ),
        (
            ["scheduler.name=onecycle", "scheduler.args={max_lr: -1}"],
            "scheduler.name=onecycle scheduler.args={'max_lr': -1}: max_lr=-1: must be > 0",
        ),
    ],
)
def test_bad_values_exit_2_in_one_line_and_write_nothing(
    cli, tmp_path, capsys, overrides, expected
):
    out = tmp_path / "out"
    assert cli("train", DEMO, *SMALL, f"experiment.output_dir={out}", *overrides) == 2
    assert expected in one_line_error(capsys)
    assert not out.exists()


def test_validation_split_may_be_empty_when_a_train_metric_is_monitored(cli, tmp_path):
    out = tmp_path / "out"
    args = [
        "data.val_fraction=0",
        "trainer.monitor=train/accuracy",
        "trainer.limit_train_batches=2",
    ]
    assert cli("train", DEMO, *SMALL, f"experiment.output_dir={out}", *args) == 0


def test_config_that_is_a_folder_or_binary(cli, tmp_path, capsys):
    assert cli("train", tmp_path) == 2
    assert f"{tmp_path}: is a folder" in one_line_error(capsys)
    binary = tmp_path / "model.pth"
    binary.write_bytes(bytes(range(256)) * 4)
    assert cli("train", binary) == 2
    assert f"{binary}: not a text file" in one_line_error(capsys)
    nul = tmp_path / "nul.yaml"
    nul.write_bytes(b"experiment:\n  name: \x00x\n")
    assert cli("train", nul) == 2
    assert f"{nul}" in one_line_error(capsys)


def test_yaml_syntax_error_names_file_line_and_column(cli, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("experiment:\n  name: x\ntrainer:\n  epochs: [1, 2\n  monitor: val/loss\n")
    assert cli("train", bad, f"experiment.output_dir={tmp_path / 'out'}") == 2
    err = one_line_error(capsys)
    assert f"{bad}:5:" in err and "not valid YAML" in err
    assert not (tmp_path / "out").exists()


def test_output_dir_that_is_a_file(cli, tmp_path, capsys):
    taken = tmp_path / "results.txt"
    taken.write_text("keep me")
    for out in (taken, taken / "sub"):
        assert cli("train", DEMO, *SMALL, f"experiment.output_dir={out}") == 2
        assert f"experiment.output_dir={out}: {taken} is a file" in one_line_error(capsys)
    assert taken.read_text() == "keep me"


def test_output_dir_that_is_not_writable(cli, tmp_path, capsys, monkeypatch):
    import os

    from dltemplate.engine import rundir

    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    # root may write anywhere: answer for the file system as it would for a user
    real_access = os.access
    monkeypatch.setattr(rundir.os, "access", lambda p, m: p != locked and real_access(p, m))
    assert cli("train", DEMO, *SMALL, f"experiment.output_dir={locked / 'runs'}") == 2
    assert f"cannot write in {locked}" in one_line_error(capsys)
    assert list(locked.iterdir()) == []


def test_an_option_that_is_a_config_key_suggests_the_override(cli, tmp_path, capsys):
    assert cli("train", DEMO, "--epochs", "5") == 2
    assert "did you mean trainer.epochs=5?" in one_line_error(capsys)
    assert cli("train", DEMO, "--batch-size=8") == 2
    assert "did you mean data.batch_size=8?" in one_line_error(capsys)


def test_eval_of_files_that_are_not_checkpoints_is_one_line(cli, tmp_path, capsys):
    import collections

    import torch

    text = tmp_path / "notes.pth"
    text.write_text("experiment:\n  name: x\n")
    pickled = tmp_path / "objects.pth"
    torch.save({"a": collections.Counter("ab"), "when": __import__("datetime").date(2024, 1, 1)},
               pickled)  # fmt: skip
    truncated = tmp_path / "cut.pth"
    truncated.write_bytes(b"PK\x03\x04 cut short")
    for path in (text, pickled, truncated):
        assert cli("eval", path) == 2
        err = one_line_error(capsys)
        assert f"{path} is not a dltemplate checkpoint" in err and "weights_only" not in err


def test_resume_of_a_run_with_a_truncated_config(cli, capsys, trained_run):
    config = next(trained_run.glob("config_*.json"))
    config.write_text(config.read_text()[:40])
    capsys.readouterr()  # the training's log
    before = {p.name: p.stat().st_mtime_ns for p in trained_run.iterdir()}
    assert cli("resume", trained_run, "trainer.epochs=2") == 2
    assert config.name in one_line_error(capsys)
    assert {p.name: p.stat().st_mtime_ns for p in trained_run.iterdir()} == before


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["eval", "run", "--limit-batches", "-1"], "--limit-batches: -1: must be at least 1"),
        (["eval", "run", "--limit-batches", "0"], "--limit-batches: 0: must be at least 1"),
        (["eval", "run", "--viz-freq", "0"], "--viz-freq: 0: must be at least 1"),
        (["eval", "run", "--split", "bogus"], "invalid choice: 'bogus'"),
        (["make-sample-data", "carvana", "out", "--n", "abc"], "invalid int value: 'abc'"),
        (["make-sample-data", "kitti", "out"], "invalid choice: 'kitti'"),
        ([], "the following arguments are required: command"),
    ],
)
def test_bad_arguments_are_one_line_without_the_usage_block(cli, tmp_path, capsys, args, expected):
    with pytest.raises(SystemExit) as stop:  # argparse exits on its own errors
        cli(*args)
    assert stop.value.code == 2
    err = one_line_error(capsys)
    assert expected in err and "usage:" not in err
    assert list(tmp_path.iterdir()) == []


def test_eval_out_that_is_a_folder_is_refused_before_evaluating(cli, tmp_path, capsys):
    folder = tmp_path / "reports"
    folder.mkdir()
    assert cli("eval", tmp_path / "run", "--out", folder) == 2
    assert f"--out {folder}: is a folder" in one_line_error(capsys)
    assert list(folder.iterdir()) == []


def test_count_params_with_bad_model_args_names_the_section(cli, capsys):
    assert cli("count-params", DEMO, "model.args.hidden=abc") == 2
    assert "model.name=Vanilla model.args={'hidden': 'abc'}: " in one_line_error(capsys)


def test_a_file_that_cannot_be_written_is_one_line_exit_1(cli, tmp_path, capsys):
    taken = tmp_path / "a_file"
    taken.write_text("keep me")
    assert cli("make-sample-data", "carvana", taken / "sub", "--n", "1") == 1
    err = one_line_error(capsys)
    assert err.startswith("dltemplate: error: ") and str(taken) in err
    assert ".tmp" not in err  # the file meant, not a temporary one
    assert taken.read_text() == "keep me"


def test_out_of_memory_while_building_is_not_a_config_error():
    """A model too large for the device is not a wrong config: it is not reported as one."""
    import torch

    from dltemplate.engine.build import config_section
    from dltemplate.errors import ConfigError

    with pytest.raises(torch.OutOfMemoryError):
        with config_section("model", "UNet", {}):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20 GiB")
    with pytest.raises(ConfigError, match=r"model.name=UNet model.args=\{'depth': 9\}: too deep"):
        with config_section("model", "UNet", {"depth": 9}):
            raise ValueError("too deep")
