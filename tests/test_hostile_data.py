"""Hostile and broken map-style datasets (issue #14): a sample that never returns, a second
Ctrl-C while workers are stuck, a training process killed under its workers, a worker killed
from outside. Each ends the run quickly, in one line, with nothing written outside the run's
output folder; nothing waits forever.

The runs that are signalled or killed are separate processes, so that a regression fails the
test after a bounded wait instead of hanging the suite; every wait is an upper bound only."""

from __future__ import annotations

import contextlib
import faulthandler
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, descendants, run_dirs
from toy_datasets import DictDigits

DIGITS = REPO / "configs" / "digits_mlp.yaml"
WAIT = 60  # seconds: an upper bound for a run to end (a few seconds on a quiet machine)


class Blocking(DictDigits):
    """Reading sample 23 (named ``digit0023.png``) never returns, as a read from a stalled
    network file system would not; it first writes the reading process's pid to ``marker``.
    With ``everywhere``, no sample read in a worker returns."""

    def __init__(
        self, n: int | None = None, marker: str | None = None, everywhere: bool = False
    ) -> None:
        super().__init__(n)
        self.marker, self.everywhere = marker, everywhere

    def __getitem__(self, i: int) -> dict[str, object]:
        in_worker = torch.utils.data.get_worker_info() is not None
        if i == 23 or (self.everywhere and in_worker):
            if self.marker:
                Path(self.marker).write_text(str(os.getpid()))
            threading.Event().wait()  # forever
        return super().__getitem__(i)


def overrides(tmp_path: Path, workers: int, *extra: str, everywhere: bool = False) -> list[str]:
    """A small run of :class:`Blocking` (60 samples: sample 23 comes early) into
    ``tmp_path/out``."""
    return [
        str(DIGITS),
        "data.name=test_hostile_data:Blocking",
        f"data.args={{n: 60, marker: {tmp_path / 'marker'}, everywhere: {everywhere}}}",
        "data.batch_size=8",
        f"data.num_workers={workers}",
        "model.args.hidden=[16]",
        "trainer.epochs=2",
        "trainer.progress_bar=off",
        f"experiment.output_dir={tmp_path / 'out'}",
        *extra,
    ]


def only_the_run_was_written(tmp_path: Path, cwd: Path) -> None:
    """Nothing but the run directory (and the test's own marker and log) was written."""
    assert not list(cwd.iterdir()), list(cwd.iterdir())
    assert {p.name for p in tmp_path.iterdir()} <= {"out", "cwd", "marker", "stderr.txt"}
    assert len(run_dirs(tmp_path / "out")) == 1


def gone(pid: int) -> bool:
    """Whether process ``pid`` has ended (a zombie that no one reaped counts as ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def wait_until(check, seconds: float) -> bool:
    """Poll ``check()`` until it is true or ``seconds`` have passed; return its last value."""
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


class Run:
    """``dltemplate train`` in a process of its own, started in ``tmp_path/cwd``; stderr goes
    to a file (a pipe could be held open by a stray worker). Leaves no process behind."""

    def __init__(self, tmp_path: Path, workers: int, *extra: str, everywhere: bool) -> None:
        self.tmp_path, self.cwd = tmp_path, tmp_path / "cwd"
        self.cwd.mkdir()
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), *sys.path]),
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        self.err_path = tmp_path / "stderr.txt"
        with open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "dltemplate",
                    "train",
                    *overrides(tmp_path, workers, *extra, everywhere=everywhere),
                ],  # fmt: skip
                cwd=self.cwd,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        self.pids: list[int] = []  # its workers, once seen

    def blocked_reader(self) -> int:
        """The pid of the process reading sample 23 (blocked), once it is; also notes the
        run's workers."""
        marker = self.tmp_path / "marker"
        if not wait_until(lambda: marker.exists() or self.proc.poll() is not None, WAIT):
            pytest.fail(f"sample 23 was not read within {WAIT} s:\n{self.stderr()[-3000:]}")
        assert self.proc.poll() is None, self.stderr()[-3000:]
        wait_until(lambda: marker.read_text().strip(), 5)
        self.pids = descendants(self.proc.pid)
        return int(marker.read_text())

    def wait(self) -> int:
        """The exit status, within :data:`WAIT` seconds (else the test fails)."""
        try:
            return self.proc.wait(timeout=WAIT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the run did not end within {WAIT} s:\n{self.stderr()[-3000:]}")

    def stderr(self) -> str:
        return self.err_path.read_text()

    def kill_leftovers(self) -> None:
        for pid in [self.proc.pid, *self.pids]:
            if not gone(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)


@pytest.fixture
def started(tmp_path: Path):
    """Start a :class:`Run` (``started(workers, *overrides, everywhere=False)``); its
    processes are killed afterwards, whatever happened."""
    runs: list[Run] = []

    def start(workers: int, *extra: str, everywhere: bool = False) -> Run:
        runs.append(Run(tmp_path, workers, *extra, everywhere=everywhere))
        return runs[-1]

    yield start
    for run in runs:
        run.kill_leftovers()


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "error:" in line]


# -- 1. a sample that never returns --------------------------------------------------------
@pytest.fixture
def hang_guard():
    """An in-process run that hangs after all fails the suite (tracebacks, exit) instead of
    stalling it."""
    faulthandler.dump_traceback_later(5 * WAIT, exit=True, file=sys.__stderr__)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.mark.parametrize("workers", [0, 2])
def test_a_sample_that_never_returns_stops_the_run(
    workers, cli, tmp_path, capsys, monkeypatch, fast_and_tidy, hang_guard
):
    """``data.timeout`` interrupts the read where it happens (the training process, or a
    worker): the run fails (exit status 1, the interrupt checkpoint written), in one line
    that names the sample and the key."""
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    started = time.monotonic()
    code = cli("train", *overrides(tmp_path, workers, "data.timeout=1"))
    err = capsys.readouterr().err
    assert code == 1, err[-3000:]
    assert time.monotonic() - started < WAIT
    assert "Traceback" not in err
    (line,) = error_lines(err)
    assert re.search(r"sample 23 \(digit0023\.png\): not read within data\.timeout=1 s", line)
    assert "data.name=test_hostile_data:Blocking" in line
    (run,) = run_dirs(tmp_path / "out")
    assert (run / "Vanilla_interrupt_ckpt.pth").exists()  # resume continues the run
    only_the_run_was_written(tmp_path, tmp_path / "cwd")


@pytest.mark.parametrize("value", ["0", "-1", ".inf", ".nan", "soon"])
def test_data_timeout_is_checked(value, cli, tmp_path, capsys):
    code = cli("train", str(DIGITS), "data.name=toy_datasets:DigitSamples",
               "data.train_val_sample_rate=0.1", f"data.timeout={value}",
               f"experiment.output_dir={tmp_path / 'out'}")  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2, err
    (line,) = error_lines(err)
    assert re.search(r"data\.timeout=\S+: (must be a finite number of seconds > 0|expected)", line)
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# -- 2. a second Ctrl-C ends the process, its workers included -------------------------------
def test_a_second_ctrl_c_ends_a_run_whose_workers_are_stuck(started, tmp_path):
    """No worker returns a batch, so the first Ctrl-C cannot stop at a step boundary; the
    second stops the run at once: exit status 130, the workers killed."""
    run = started(2, "data.timeout=null", everywhere=True)
    run.blocked_reader()
    assert len(run.pids) == 2
    run.proc.send_signal(signal.SIGINT)  # asks for a stop at the next step: none comes
    # Send the second once the first is handled (two pending signals would be one).
    wait_until(lambda: not _pending(run.proc.pid, signal.SIGINT), 5)
    time.sleep(0.5)
    run.proc.send_signal(signal.SIGINT)
    with contextlib.suppress(subprocess.TimeoutExpired):  # on a very slow machine, once more
        run.proc.wait(timeout=WAIT / 4)
    if run.proc.poll() is None:
        run.proc.send_signal(signal.SIGINT)
    code = run.wait()
    err = run.stderr()
    assert code == 130, err[-3000:]
    assert "interrupted by SIGINT" in err and "Traceback" not in err
    assert wait_until(lambda: all(gone(pid) for pid in run.pids), 10), run.pids
    (out,) = run_dirs(tmp_path / "out")
    assert (out / "Vanilla_interrupt_ckpt.pth").exists()
    only_the_run_was_written(tmp_path, run.cwd)


def _pending(pid: int, sig: int) -> bool:
    """Whether ``sig`` is pending for process ``pid`` (not yet delivered to it)."""
    status = Path(f"/proc/{pid}/status").read_text()
    masks = re.findall(r"^(?:SigPnd|ShdPnd):\s*([0-9a-f]+)$", status, flags=re.M)
    return any(int(mask, 16) >> (sig - 1) & 1 for mask in masks)


# -- 3. workers die at once, quietly, with the training process -------------------------------
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_workers_end_at_once_when_the_training_process_is_killed(started, tmp_path):
    run = started(2, "data.timeout=null")
    run.blocked_reader()  # one worker is stuck in sample 23, the other is idle
    assert len(run.pids) == 2
    run.proc.kill()
    run.wait()
    assert wait_until(lambda: all(gone(pid) for pid in run.pids), 10), run.pids
    err = run.stderr()  # nothing can write to it any more
    assert "Traceback" not in err and "ConnectionResetError" not in err, err[-3000:]
    only_the_run_was_written(tmp_path, run.cwd)


# -- 4. a worker killed from outside ----------------------------------------------------------
def test_a_worker_killed_from_outside_fails_the_run_naming_it(started, tmp_path):
    run = started(2, "data.timeout=null")
    worker = run.blocked_reader()
    assert worker in run.pids
    os.kill(worker, signal.SIGKILL)  # as the OOM killer would
    code = run.wait()
    err = run.stderr()
    assert code == 1, err[-3000:]
    assert "Traceback" not in err
    (line,) = error_lines(err)
    assert re.search(
        rf"DataLoader worker \d \(pid {worker}\) was killed by SIGKILL while reading sample 23 "
        r"\(digit0023\.png\)",
        line,
    ), line
    assert wait_until(lambda: all(gone(pid) for pid in run.pids), 10), run.pids
    only_the_run_was_written(tmp_path, run.cwd)
