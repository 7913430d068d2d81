"""Damaged files in a run directory, and other bad paths: exit status 2, one line naming the
file, nothing written (issue #8)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, free_port, run_dirs

DEMO = REPO / "configs" / "digits_mlp.yaml"
SMALL = ["data.train_val_sample_rate=0.3", "model.args.hidden=[16]", "trainer.epochs=2"]


def digests(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` and the hash of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def stopped_run(cli, tmp_path) -> Path:
    """A run stopped after its first epoch (resumable), with its files."""
    out = tmp_path / "out"
    assert cli("train", DEMO, f"experiment.output_dir={out}", *SMALL, "trainer.epochs=1") == 0
    (run,) = run_dirs(out)
    return run


@pytest.mark.parametrize(
    "damage, culprit",
    [
        (lambda run: next(run.glob("config_*.json")).write_text('{"experiment": {"na'), "config_"),
        (lambda run: next(run.glob("config_*.json")).write_bytes(b"\x00\xff\x13"), "config_"),
        (
            lambda run: (run / "metrics.csv").write_bytes(b"\x00\xff garbage\n\x01\x02"),
            "metrics.csv",
        ),
        (lambda run: (run / "metrics.csv").write_text("epoch,lr\nnot a number,1\n"), "metrics.csv"),
        (lambda run: (run / "metrics.csv").write_text("garbage header\n"), "metrics.csv"),
    ],
    ids=["truncated config", "binary config", "binary metrics", "garbled metrics", "no epoch"],
)
def test_a_damaged_run_file_stops_resume_with_one_line(cli, capsys, stopped_run, damage, culprit):
    damage(stopped_run)
    before = digests(stopped_run)
    capsys.readouterr()
    assert cli("resume", stopped_run, "trainer.epochs=2") == 2
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("dltemplate: error:")]
    assert culprit in line and str(stopped_run) in line
    assert "Traceback" not in err
    assert digests(stopped_run) == before  # train.log included: nothing appended


def test_sample_data_onto_a_file_is_refused(cli, tmp_path, capsys):
    target = tmp_path / "a_file"
    target.write_text("mine")
    assert cli("make-sample-data", "carvana", target, "--n", "2") == 2
    err = capsys.readouterr().err
    assert f"{target}: exists and is not a folder" in err and "Traceback" not in err
    assert target.read_text() == "mine"


@pytest.mark.slow
def test_a_bad_config_under_torchrun_is_one_line_from_rank_0(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port()), "-m", "dltemplate", "train", str(DEMO),
           f"experiment.output_dir={tmp_path / 'out'}", "trainer.epoch=3"]  # fmt: skip
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    # rank 0's line; torchrun's own report quotes each rank's error file after "traceback :"
    lines = [x for x in done.stderr.splitlines() if x.startswith("dltemplate: error:")]
    assert len(lines) == 1 and "did you mean 'trainer.epochs'" in lines[0], done.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_a_file_that_cannot_be_written_is_named_not_its_temporary_file(tmp_path):
    from dltemplate.atomic import atomic_write_text

    blocker = tmp_path / "a_file"  # a file where a folder should be: nothing can go inside
    blocker.write_text("keep me")
    with pytest.raises(OSError) as info:
        atomic_write_text(blocker / "out.json", "{}")
    assert f"cannot write {blocker / 'out.json'}" in str(info.value)
    assert ".tmp" not in str(info.value) and blocker.read_text() == "keep me"
