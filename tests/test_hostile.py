"""Hostile and broken inputs (issue #14): each is one row of one table.

A row prepares its input in a fresh folder (a config, a damaged copy of a trained run...), runs a
command and says what must come back: the exit status (2: bad input; 1: a failure during the
run), words the one error line must hold, and nothing written outside where the row allows.
Rows that once hung or ate memory run in a subprocess with a time limit; the rest in-process.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from conftest import QUICK_DIGITS, REPO, metric_rows, run_dirs
from PIL import Image

from dltemplate.callbacks import Callback
from dltemplate.engine.checkpoint import save_checkpoint

DEMO = REPO / "configs" / "digits_mlp.yaml"
LAST = "Vanilla_last_ckpt.pth"


@dataclass
class Case:
    """One hostile input: ``make(home, run)`` writes what it needs under ``home`` (``run`` is a
    copy of a trained run there) and returns the command's arguments."""

    name: str
    make: Callable[[Path, Path], list[str]]
    says: list[str]  # words the error line holds
    code: int = 2
    subprocess: bool = False  # once hung or exhausted memory: run apart, with a time limit
    writes: Callable[[Path], bool] = field(default=lambda p: False)  # paths it may write


def snapshot(home: Path) -> dict[str, str]:
    """Every file under ``home`` (links as their target's name) and a hash of its bytes."""
    out = {}
    for p in sorted(home.rglob("*")):
        key = str(p.relative_to(home))
        if p.is_symlink():
            out[key] = "-> " + os.readlink(p)
        elif p.is_file():
            out[key] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One quick digits run, trained once for the module; rows work on copies of it."""
    from dltemplate.cli import main

    home = tmp_path_factory.mktemp("trained")
    out = home / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(home)
        assert main(["train", str(DEMO), f"experiment.output_dir={out}", *QUICK_DIGITS]) == 0
    import logging

    for handler in list(logging.getLogger("dltemplate").handlers):
        logging.getLogger("dltemplate").removeHandler(handler)
        handler.close()
    (run,) = run_dirs(out)
    return run


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def train_with(*overrides: str) -> Callable[[Path, Path], list[str]]:
    return lambda home, run: ["train", str(DEMO), f"experiment.output_dir={home / 'out'}",
                              *QUICK_DIGITS, *overrides]  # fmt: skip


# -- the rows' inputs --------------------------------------------------------------------------
def alias_bomb(section: str, key: str, levels: int = 9) -> str:
    """A few hundred bytes of YAML whose ``section.args.key`` expands to 10**levels items."""
    lines = [f"{section}:", "  args:", f"    {key}:", "      - &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    for i in range(1, levels):
        lines.append(f"      - &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]")
    return "\n".join(lines) + "\n"


def bomb_config(home: Path, run: Path) -> list[str]:
    config = write(home / "bomb.yaml", alias_bomb("model", "hidden"))
    return ["train", str(config), f"experiment.output_dir={home / 'o'}"]


def bomb_compare(home: Path, run: Path) -> list[str]:
    a = write(home / "a.yaml", alias_bomb("optimizer", "betas"))
    b = write(home / "b.yaml", alias_bomb("optimizer", "betas", levels=8))
    return ["compare-configs", str(a), str(b)]


def deep_yaml(home: Path, run: Path) -> list[str]:
    depth = 10_000
    text = "model:\n  name: Vanilla\n  args:\n    x: " + "[" * depth + "]" * depth + "\n"
    return ["train", str(write(home / "deep.yaml", text)), f"experiment.output_dir={home / 'o'}"]


def deep_saved_config(home: Path, run: Path) -> list[str]:
    (saved,) = run.glob("config_*.json")
    config = json.loads(saved.read_text())
    depth = 100_000
    text = json.dumps(config)[:-1] + ', "deep": ' + "[" * depth + "]" * depth + "}"
    saved.write_text(text)
    for ckpt in run.glob("*_ckpt.pth"):
        ckpt.unlink()  # resume then reads the saved config JSON
    return ["resume", str(run)]


def duplicate_key(home: Path, run: Path) -> list[str]:
    text = "trainer:\n  epochs: 2\n  monitor: val/loss\n  epochs: 3\n"
    return ["train", str(write(home / "dup.yaml", text)), f"experiment.output_dir={home / 'o'}"]


def resaved(run: Path, **changes: object) -> Path:
    """The run's last checkpoint rewritten with ``changes`` (None: key removed), its digest
    valid: intact, only wrong."""
    path = run / LAST
    state = torch.load(path, weights_only=True)
    for key, value in changes.items():
        if value is None:
            state.pop(key, None)
        else:
            state[key] = value
    save_checkpoint(path, state)
    return path


def wrong_callback_state(run: Path) -> Path:
    """The last checkpoint, not finished, its Checkpoint callback's top-k list a number."""
    callbacks = torch.load(run / LAST, weights_only=True)["callbacks"]
    return resaved(run, finished=False, callbacks={**callbacks, "Checkpoint": {"top": 5}})


def without_digest(home: Path, run: Path) -> list[str]:
    path = run / LAST
    state = torch.load(path, weights_only=True)
    state.pop("digest")
    torch.save(state, path)
    return ["resume", str(path)]


def link_in_run(name: str) -> Callable[[Path, Path], list[str]]:
    def make(home: Path, run: Path) -> list[str]:
        target = home / f"elsewhere_{name}"
        original = run / name
        if original.is_dir():
            shutil.move(str(original), target)
        else:
            target.write_text("not yours\n")
            original.unlink()
        original.symlink_to(target)
        for ckpt in run.glob("*_ckpt.pth"):  # an unfinished run: resume would write
            state = torch.load(ckpt, weights_only=True)
            state["finished"] = False
            save_checkpoint(ckpt, state)
        return ["resume", str(run), "trainer.epochs=2"]

    return make


def predict_out_is_a_folder(home: Path, run: Path) -> list[str]:
    image = home / "x.png"
    image.write_bytes(b"")
    (home / "taken").mkdir()
    return ["predict", str(run), str(image), "--out", str(home / "taken")]


def predict_empty_image(home: Path, run: Path) -> list[str]:
    image = home / "x.png"
    image.write_bytes(b"")
    return ["predict", str(run), str(image), "--out", str(write(home / "taken.json", "mine\n"))]


def under_a_file(*command: str) -> Callable[[Path, Path], list[str]]:
    """``command`` with its last argument a path under a file (``RUN``: the run, ``IMAGE``: a
    picture)."""

    def make(home: Path, run: Path) -> list[str]:
        blocker = write(home / "notes.txt", "mine\n")
        image = home / "x.png"
        Image.new("L", (8, 8)).save(image)
        args = [{"RUN": str(run), "IMAGE": str(image)}.get(a, a) for a in command]
        return [*args, str(blocker / "sub" / "out")]

    return make


CASES = [
    # == hangs and resource exhaustion ========================================================
    Case("yaml alias bomb", bomb_config, ["bomb.yaml", "alias"], subprocess=True),
    Case("alias bomb in compare-configs", bomb_compare, ["a.yaml", "alias"], subprocess=True),
    Case("yaml nested 10,000 deep", deep_yaml, ["deep.yaml", "nested"], subprocess=True),
    Case(
        "saved config nested 100,000 deep",
        deep_saved_config,
        ["config_", "nested"],
        subprocess=True,
    ),  # fmt: skip
    Case(
        "experiment.threads=100000",
        train_with("experiment.threads=100000"),
        ["experiment.threads=100000", "cores"],
        subprocess=True,
    ),  # fmt: skip
    # == writing where it must not ============================================================
    Case("checkpoint without a digest", without_digest, [LAST, "has no digest"]),
    Case(
        "checkpoint with a negative epoch",
        lambda home, run: ["resume", str(resaved(run, epoch=-5))],
        [LAST, "epoch=-5"],
    ),
    Case(
        "checkpoint with a text batch position",
        lambda home, run: ["resume", str(resaved(run, batch_in_epoch="x"))],
        [LAST, "batch_in_epoch='x'"],
    ),  # fmt: skip
    Case(
        "checkpoint with a callback state of the wrong shape",
        lambda home, run: ["resume", str(wrong_callback_state(run))],
        [LAST, "callback Checkpoint", "top"],
    ),  # fmt: skip
    Case(
        "checkpoint with class names that are not a list of names",
        lambda home, run: ["eval", str(resaved(run, class_names=5))],
        [LAST, "class_names=5"],
    ),  # fmt: skip
    Case("symlinked train.log", link_in_run("train.log"), ["train.log", "link"]),
    Case("symlinked summary/", link_in_run("summary"), ["summary", "link"]),
    # == values accepted that should not be ===================================================
    Case("duplicate yaml key", duplicate_key, ["dup.yaml", "trainer.epochs", "lines 2 and 4"]),
    Case(
        "onecycle max_lr inf",
        train_with("scheduler.name=onecycle", "scheduler.args={max_lr: .inf}"),
        ["scheduler.args", "max_lr"],
    ),  # fmt: skip
    Case(
        "step gamma nan",
        train_with("scheduler.name=step", "scheduler.args={gamma: .nan}"),
        ["scheduler.args", "gamma"],
    ),  # fmt: skip
    Case(
        "cosine eta_min nan",
        train_with("scheduler.args={eta_min: .nan}"),
        ["scheduler.args", "eta_min"],
    ),  # fmt: skip
    Case(
        "cosine eta_min negative",
        train_with("scheduler.args={eta_min: -1}"),
        ["scheduler.args", "eta_min"],
    ),  # fmt: skip
    Case("dropout nan", train_with("model.args.dropout=.nan"), ["model.args", "dropout"]),
    Case("dropout negative", train_with("model.args.dropout=-1"), ["model.args", "dropout"]),
    Case(
        "early stopping min_delta nan",
        train_with("trainer.early_stopping_min_delta=.nan"),
        ["trainer.early_stopping_min_delta"],
    ),  # fmt: skip
    Case(
        "early stopping min_delta inf",
        train_with("trainer.early_stopping_min_delta=.inf"),
        ["trainer.early_stopping_min_delta"],
    ),  # fmt: skip
    Case(
        "early stopping min_delta negative",
        train_with("trainer.early_stopping_min_delta=-1"),
        ["trainer.early_stopping_min_delta"],
    ),  # fmt: skip
    Case(
        "max_time hours inf",
        train_with("callbacks=[{name: max_time, args: {hours: .inf}}]"),
        ["callbacks[0]", "max_time", "hours"],
    ),  # fmt: skip
    Case(
        "max_time hours nan",
        train_with("callbacks=[{name: max_time, args: {hours: .nan}}]"),
        ["callbacks[0]", "max_time", "hours"],
    ),  # fmt: skip
    Case(
        "a 300-character experiment.name",
        train_with("experiment.name=" + "n" * 300),
        ["experiment.name", "too long"],
    ),  # fmt: skip
    Case(
        "a model with a 1000-class head",
        train_with("model.args={hidden: [8], num_classes: 1000}"),
        ["model.name=Vanilla", "(2, 1000)", "10 classes"],
    ),
    Case(
        "an empty validation split",
        train_with("data.val_fraction=0.0005"),
        ["validation split is empty", "train", "val 0"],
    ),  # fmt: skip
    # == a run's split is its own =============================================================
    Case(
        "experiment.seed on eval",
        lambda home, run: ["eval", str(run), "experiment.seed=7"],
        ["experiment.seed", "split"],
    ),  # fmt: skip
    Case(
        "experiment.seed on resume",
        lambda home, run: ["resume", str(run), "trainer.epochs=2", "experiment.seed=7"],
        ["experiment.seed", "split"],
    ),  # fmt: skip
    Case(
        "data.val_fraction on resume",
        lambda home, run: ["resume", str(run), "trainer.epochs=2", "data.val_fraction=0.3"],
        ["data.val_fraction", "split"],
    ),  # fmt: skip
    # == messages ==============================================================================
    # A classification run's --out is a JSON file (a segmentation run's, a folder).
    Case("predict --out naming a folder", predict_out_is_a_folder, ["taken", "is a folder"]),
    *[
        Case(
            f"{' '.join(c[:1] + c[2:])} under a file",
            under_a_file(*c),
            [c[-1], "notes.txt is a file, not a folder"],
        )
        for c in [
            ("eval", "RUN", "--out"),
            ("predict", "RUN", "IMAGE", "--out"),
            ("export", "RUN", "--format", "torchscript", "--out"),
        ]
    ],
    Case("predict on an empty file", predict_empty_image, ["x.png", "not a readable image"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_input(case: Case, trained: Path, tmp_path: Path, capsys, monkeypatch):
    check_case(case, trained, tmp_path, capsys, monkeypatch)


def check_case(case: Case, trained: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    """Run one row: its exit status, one error line holding its words, no traceback, nothing
    written but what the row allows (other test files run their own rows through this)."""
    home = tmp_path / "home"
    run = home / "runs" / trained.name
    shutil.copytree(trained, run, symlinks=True)
    args = case.make(home, run)
    before = snapshot(tmp_path)
    if case.subprocess:
        proc = subprocess.run(
            [sys.executable, "-m", "dltemplate", *args],
            cwd=home, capture_output=True, text=True, timeout=60,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        code, err = proc.returncode, proc.stderr
    else:
        from dltemplate.cli import main

        monkeypatch.chdir(home)
        code = main([str(a) for a in args])
        err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line]
    assert code == case.code, err[-3000:]
    assert "Traceback" not in err
    if case.code == 2:
        assert len(lines) == 1, err[-3000:]
    for words in case.says:
        assert words in err, err[-3000:]
    after = snapshot(tmp_path)
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert {k for k in changed if not case.writes(Path(k))} == set()


def test_a_curves_thread_that_cannot_start_never_stops_training(cli, tmp_path, monkeypatch):
    """A machine out of threads: the picture is skipped with one warning; the run goes on."""
    import threading

    from dltemplate.engine import rundir

    real_start = threading.Thread.start

    def start(self):
        if self._target is rundir._plot_quietly:
            raise RuntimeError("can't start new thread")
        return real_start(self)

    monkeypatch.setattr(threading.Thread, "start", start)
    out = tmp_path / "out"
    args = [
        *QUICK_DIGITS,
        "trainer.epochs=3",
        "callbacks=[{name: metrics_table, args: {curves_every_s: 0}}]",
    ]
    assert cli("train", DEMO, f"experiment.output_dir={out}", *args) == 0
    (run,) = run_dirs(out)
    log = (run / "train.log").read_text()
    assert log.count("curves.png not drawn: can't start new thread") == 1
    assert (run / "test_metrics.json").exists() and not (run / "curves.png").exists()


HOLD_LOCK = """
import sys, time
from pathlib import Path
from dltemplate.engine.rundir import RunLock
RunLock(Path(sys.argv[1])).acquire()
print("held", flush=True)
time.sleep(120)
"""


def test_a_run_directory_has_one_writer(cli, trained, tmp_path, capsys):
    """A live writer is named and the second refused, nothing written; once the writer is
    killed (the kernel drops its lock), the next resume takes over."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run)], stdout=subprocess.PIPE,
                              text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        before = snapshot(run)
        capsys.readouterr()
        assert cli("resume", run, "trainer.epochs=2") == 2
        err = capsys.readouterr().err
        assert f"the run is being written by pid {holder.pid} on " in err
        assert snapshot(run) == before
    finally:
        holder.kill()
        holder.wait()
    assert cli("resume", run, "trainer.epochs=2") == 0  # the dead holder's lock is taken over
    assert [int(r["epoch"]) for r in metric_rows(run)] == [1, 2]


def test_the_command_line_gives_sigterm_back_when_it_returns(cli, tmp_path):
    """A SIGTERM just after a run finished must not raise into the interpreter's exit."""
    import signal

    before = signal.getsignal(signal.SIGTERM)
    assert cli("train", DEMO, f"experiment.output_dir={tmp_path / 'out'}", *QUICK_DIGITS) == 0
    assert signal.getsignal(signal.SIGTERM) is before


class FullDiskThread(Callback):
    """A background thread that fails as TensorBoard's writer does on a full disk."""

    def on_fit_start(self, trainer) -> None:
        import errno
        import threading

        def write() -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        thread = threading.Thread(target=write, name="EventWriter")
        thread.start()
        thread.join()


def test_a_background_thread_failing_is_one_line_not_a_traceback(cli, tmp_path, capsys,
                                                                 monkeypatch):  # fmt: skip
    from dltemplate.registry import CALLBACKS

    monkeypatch.setitem(CALLBACKS._items, "test_full_disk_thread", FullDiskThread)
    out = tmp_path / "out"
    args = [*QUICK_DIGITS, "callbacks=[test_full_disk_thread]"]
    assert cli("train", DEMO, f"experiment.output_dir={out}", *args) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "background thread EventWriter failed: OSError: [Errno 28] No space left" in err
