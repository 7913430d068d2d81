"""Feedback on long work: progress on every long step (a bar on a terminal, plain lines
elsewhere, a 0x0 terminal included) and Ctrl-C saying at once that the run stops.

Plain lines come every DLTEMPLATE_PROGRESS_SECONDS; the tests set it to 0 (a line per step),
so that nothing depends on the machine's speed."""

from __future__ import annotations

import fcntl
import logging
import os
import re
import signal
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest
from conftest import QUICK_DIGITS, REPO, run_dirs
from PIL import Image

from dltemplate.data import image_folder
from dltemplate.engine.stopping import StopSignals
from dltemplate.progress import PROGRESS_SECONDS_ENV, progress_seconds

DEMO = REPO / "configs" / "digits_mlp.yaml"

pytestmark = pytest.mark.usefixtures("fast_and_tidy")

PTY_SCRIPT = """
import sys
from dltemplate.engine.runlog import setup_logging
from dltemplate.progress import track, use_progress_bar
setup_logging()
print("bar" if use_progress_bar("auto") else "plain", file=sys.stderr)
for _ in track(range(3), 3, "work", "items"):
    pass
"""


def on_a_terminal(rows: int, cols: int) -> str:
    """What PTY_SCRIPT writes to stderr when stderr is a pseudo-terminal of that size."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    env = {**os.environ, PROGRESS_SECONDS_ENV: "0"}
    proc = subprocess.Popen([sys.executable, "-c", PTY_SCRIPT], stderr=slave, env=env)
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    proc.wait(timeout=60)
    os.close(master)
    return out.decode("utf-8", "replace")


def test_a_zero_by_zero_terminal_gets_plain_lines_a_real_one_a_bar():
    zero = on_a_terminal(0, 0)
    assert zero.startswith("plain")
    for done, pct in ((1, 33), (2, 66), (3, 100)):
        assert re.search(rf"work \[{done}/3\] {pct}%, [\d.]+ items/s", zero), zero
    wide = on_a_terminal(24, 80)
    assert wide.startswith("bar") and "work:" in wide and "|" in wide and "[" not in wide[:40]


def test_training_and_eval_print_lines_by_time_without_a_loss_read(
    cli, tmp_path, monkeypatch, capsys
):
    """log_every_n_steps above the epoch's 13 steps: no loss is read during the epoch, yet
    lines come (every DLTEMPLATE_PROGRESS_SECONDS: here 0, a line per step)."""
    monkeypatch.setenv(PROGRESS_SECONDS_ENV, "0")
    args = [DEMO, f"experiment.output_dir={tmp_path}", *QUICK_DIGITS]
    assert cli("train", *args, "trainer.log_every_n_steps=1000") == 0
    (run,) = run_dirs(tmp_path)
    log = (run / "train.log").read_text()
    assert re.search(r"epoch 1/1 \[1/13\] 7%, [\d.]+ samples/s", log), log
    assert re.search(r"epoch 1/1 \[13/13\] 100%, ", log)
    assert re.search(r"validation \[1/1\] 100%, [\d.]+ batches/s", log)  # 43 samples: 1 batch
    assert re.search(r"test \[1/6\] 16%, [\d.]+ batches/s", log)  # 359 samples, 64 a batch
    assert re.search(r"test \[6/6\] 100%, ", log)
    capsys.readouterr()
    assert cli("eval", run, "data.eval_batch_size=100") == 0  # 359 test samples: 4 batches
    err = capsys.readouterr().err
    assert re.search(r"eval test \[1/4\] 25%, [\d.]+ samples/s", err), err
    assert "eval test [4/4] 100%" in err


def test_make_sample_data_shows_progress(cli, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(PROGRESS_SECONDS_ENV, "0")
    assert cli("make-sample-data", "carvana", tmp_path / "cars", "--n", "2") == 0
    err = capsys.readouterr().err
    assert "drawing 2 image/mask pairs [1/2] 50%" in err
    assert "drawing 2 image/mask pairs [2/2] 100%" in err


@pytest.fixture
def dltemplate_lines():
    """The messages the dltemplate logger emits while the test runs."""
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    log = logging.getLogger("dltemplate")
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    yield lines
    log.removeHandler(handler)
    log.setLevel(level)


def test_building_a_decode_cache_shows_progress(tmp_path, monkeypatch, dltemplate_lines):
    monkeypatch.setenv(PROGRESS_SECONDS_ENV, "0")
    files = []
    for i in range(3):
        files.append(tmp_path / f"{i}.png")
        Image.new("RGB", (12, 10), (i * 80, 0, 0)).save(files[-1])
    decoded = image_folder.decode_all(files, (8, 8), False, workers=1, keep_going=False)
    assert len(decoded.kept) == 3
    assert [line.split(",")[0] for line in dltemplate_lines] == [
        "decoding 3 images [1/3] 33%",
        "decoding 3 images [2/3] 66%",
        "decoding 3 images [3/3] 100%",
    ]


def test_a_bad_progress_interval_is_named_and_the_default_used(monkeypatch, dltemplate_lines):
    monkeypatch.setenv(PROGRESS_SECONDS_ENV, "soon")
    assert progress_seconds() == 10.0
    assert dltemplate_lines == [f"{PROGRESS_SECONDS_ENV}='soon': not a number of seconds >= 0; "
                                "progress lines every 10 s"]  # fmt: skip
    monkeypatch.setenv(PROGRESS_SECONDS_ENV, "2.5")
    assert progress_seconds() == 2.5


@pytest.mark.parametrize("say", [True, False])
def test_ctrl_c_says_at_once_that_the_run_stops_after_this_step(capfd, say):
    with StopSignals(say=say) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(1000):  # the handler runs between two bytecodes, right away
            if stop.requested:
                break
    assert stop.requested == "SIGINT"
    err = capfd.readouterr().err
    said = "dltemplate: SIGINT: stopping after this step, then writing the interrupt checkpoint"
    assert (said in err) is say
    if say:
        assert "(Ctrl-C again stops at once)" in err


def test_readme_documents_the_progress_interval():
    readme = Path(REPO / "README.md").read_text()
    assert PROGRESS_SECONDS_ENV in readme
