"""Issue #15: clusters. The preemption notice, requeueing, a requeued job finding its run, and
ranks from SLURM's variables — here without a cluster (a stand-in ``scontrol`` records what it
is asked); tests/test_slurm_cluster.py runs the same on a real one-node SLURM."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import QUICK_DIGITS, REPO, load_ckpt, metric_rows, run_dirs

from dltemplate.engine import slurm

DEMO = REPO / "configs" / "digits_mlp.yaml"
LAST, INTERRUPT = "Vanilla_last_ckpt.pth", "Vanilla_interrupt_ckpt.pth"
NO_SLURM = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC"))}


# == what a job says of itself ====================================================================
def test_the_job_to_requeue_is_the_array_task_not_the_array():
    assert slurm.job_id({"SLURM_JOB_ID": "17"}) == "17"
    array = {"SLURM_JOB_ID": "21", "SLURM_ARRAY_JOB_ID": "20", "SLURM_ARRAY_TASK_ID": "3"}
    assert slurm.job_id(array) == "20_3" and slurm.job_key(array) == "20_3"
    assert slurm.job_id({}) is None and slurm.restart_count({}) == 0
    assert slurm.restart_count({"SLURM_RESTART_COUNT": "2"}) == 2


@pytest.mark.parametrize(
    ("nodes", "first"),
    [("node07", "node07"), ("node[03-05,07],gpu1", "node03"), ("a1,a2", "a1"),
     ("gpu[12]", "gpu12")],
)  # fmt: skip
def test_the_rendezvous_host_is_the_first_node(nodes, first):
    assert slurm.first_host(nodes) == first


def test_ranks_come_from_an_srun_step_not_from_the_batch_script():
    step = {
        "SLURM_JOB_ID": "1234",
        "SLURM_STEP_ID": "0",
        "SLURM_PROCID": "1",
        "SLURM_STEP_NUM_TASKS": "2",
        "SLURM_LOCALID": "1",
        "SLURM_STEP_NODELIST": "n[1-2]",
    }
    ranks = slurm.srun_ranks(step)
    assert (ranks.rank, ranks.world_size, ranks.local_rank) == (1, 2, 1)
    assert ranks.master_addr == "n1" and ranks.master_port == 20_000 + 1234
    assert slurm.srun_ranks({**step, "WORLD_SIZE": "2"}) is None  # torchrun's own win
    batch = {k: v for k, v in step.items() if k != "SLURM_STEP_ID"}
    assert slurm.srun_ranks(batch) is None  # the batch script is no task of a step
    assert slurm.srun_ranks({**step, "SLURM_STEP_NUM_TASKS": "1"}) is None  # one process


# == the notice, end to end (a stand-in scontrol) =================================================
def fake_scontrol(folder: Path, code: int = 0) -> Path:
    """An ``scontrol`` that appends its arguments to ``calls.txt`` and exits ``code``."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> "{folder}/calls.txt"\nexit {code}\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return folder / "calls.txt"


def start_training(out: Path, env: dict[str, str], *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "dltemplate", "train", str(DEMO), f"experiment.output_dir={out}",
           *QUICK_DIGITS, "trainer.epochs=1000", *extra]  # fmt: skip
    return subprocess.Popen(cmd, cwd=out.parent, env=env, stderr=subprocess.PIPE, text=True)


def notice_after_an_epoch(proc: subprocess.Popen, sig: int = signal.SIGUSR1) -> str:
    """Send the notice once the first epoch has ended; return everything the run said."""
    said = read_until(proc, "epoch 1/1000 train/")
    proc.send_signal(sig)
    return said + proc.communicate(timeout=120)[1]


def read_until(proc: subprocess.Popen, text: str) -> str:
    """What ``proc`` said on stderr up to and including the first line holding ``text``."""
    said = []
    for line in proc.stderr:
        said.append(line)
        if text in line:
            break
    return "".join(said)


@pytest.mark.slow  # a fake SLURM in subprocesses; the real cluster's tests cover it too (~10 s)
def test_a_notice_stops_with_a_checkpoint_requeues_and_the_requeued_job_goes_on(tmp_path):
    bin_dir = tmp_path / "bin"
    calls = fake_scontrol(bin_dir)
    env = {**NO_SLURM, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242"}
    out = tmp_path / "out"
    proc = start_training(out, env)
    said = notice_after_an_epoch(proc)
    assert proc.returncode == 130, said[-2000:]
    assert "Traceback" not in said
    (run,) = run_dirs(out)
    interrupt = load_ckpt(run / INTERRUPT)
    assert interrupt["interrupted_by"] == "SIGUSR1" and interrupt["global_step"] >= 13
    assert calls.read_text().split() == ["requeue", "4242"]
    assert "stopped by SIGUSR1 (a preemption notice); job 4242 requeued" in said
    assert (out / ".slurm_4242.json").exists()
    # SLURM starts the same command again, now as restart 1: the run goes on in its directory
    env["SLURM_RESTART_COUNT"] = "1"
    again = subprocess.run(
        [sys.executable, "-m", "dltemplate", "train", str(DEMO), f"experiment.output_dir={out}",
         *QUICK_DIGITS, "trainer.epochs=3"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-2000:]
    assert run_dirs(out) == [run]
    assert f"resumed from {run / INTERRUPT} (stopped by SIGUSR1)" in (run / "train.log").read_text()
    assert [int(r["epoch"]) for r in metric_rows(run)] == [1, 2, 3]
    assert not (out / ".slurm_4242.json").exists()  # the run is complete: its marker goes


@pytest.mark.slow  # a training process
def test_a_notice_without_scontrol_says_so_and_exits_75(tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    env = {**NO_SLURM, "SLURM_JOB_ID": "77", "PATH": str(empty)}  # no scontrol to be found
    out = tmp_path / "out"
    proc = start_training(out, env)
    said = notice_after_an_epoch(proc)
    assert proc.returncode == slurm.EXIT_NOT_REQUEUED == 75, said[-2000:]
    assert "scontrol is not on PATH (inside a container?): job 77 not requeued" in said
    (run,) = run_dirs(out)
    assert (run / INTERRUPT).exists()


@pytest.mark.slow  # several training processes
def test_the_notice_signal_is_a_setting_and_sigterm_keeps_its_meaning(tmp_path):
    bin_dir = tmp_path / "bin"
    calls = fake_scontrol(bin_dir)
    env = {**NO_SLURM, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "5"}
    out = tmp_path / "usr2"
    proc = start_training(out, env, "trainer.notice_signal=USR2")
    said = notice_after_an_epoch(proc, signal.SIGUSR2)
    assert proc.returncode == 130 and "job 5 requeued" in said, said[-2000:]
    out = tmp_path / "term"
    proc = start_training(out, env)
    said = notice_after_an_epoch(proc, signal.SIGTERM)
    assert proc.returncode == 130 and "interrupted by SIGTERM" in said
    assert calls.read_text().split() == ["requeue", "5"]  # SIGTERM stops; it never requeues


@pytest.mark.slow  # a training process (~8 s)
def test_a_notice_or_sigterm_after_the_run_finished_is_ignored(tmp_path):
    """A notice that reaches a job as its run ends (SLURM's comes up to a minute early): the run
    is finished, so nothing stops or requeues, and the process exits 0. Its default action
    killed the exiting process, and SLURM called the job FAILED (what CI once saw)."""
    bin_dir = tmp_path / "bin"
    calls = fake_scontrol(bin_dir)
    env = {**NO_SLURM, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "6"}
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "dltemplate", "train", str(DEMO), f"experiment.output_dir={out}",
           *QUICK_DIGITS, "data.train_val_sample_rate=0.1"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    said = [read_until(proc, " finished: ")]  # the summary: from here on until the process is gone
    sent = 0
    while proc.poll() is None:  # a notice and a SIGTERM every 2 ms, through the exit
        try:
            proc.send_signal(signal.SIGUSR1 if sent % 2 else signal.SIGTERM)
        except ProcessLookupError:
            break
        sent += 1
        time.sleep(0.002)
    said.append(proc.communicate(timeout=60)[1])
    text = "".join(said)
    assert proc.returncode == 0, text[-2000:]
    assert sent >= 2 and "stopped by" not in text and "interrupted by" not in text
    assert not calls.exists()  # nothing requeued
    (run,) = run_dirs(out)
    assert not (run / INTERRUPT).exists() and (run / "test_metrics.json").exists()


def test_the_stop_handler_ignores_signals_once_the_run_finished():
    from dltemplate import cli
    from dltemplate.engine.stopping import RunStopped, StopSignals, set_run_finished

    set_run_finished(False)  # (as a command starting does: a test before may have finished a run)
    with pytest.raises(RunStopped):  # before (and while) a run: a notice stops it
        cli._stop_on_signal(signal.SIGUSR1, None)
    set_run_finished(True)
    try:
        assert cli._stop_on_signal(signal.SIGUSR1, None) is None  # after: nothing to stop
        assert cli._stop_on_signal(signal.SIGTERM, None) is None
        with StopSignals() as stop:  # the next run in this process is stoppable again
            with pytest.raises(RunStopped):
                cli._stop_on_signal(signal.SIGTERM, None)
            assert stop.requested is None
    finally:
        set_run_finished(False)


def test_the_program_leaves_caught_signals_ignored_as_it_exits(capsys):
    """``python -m dltemplate`` (``main(exiting=True)``): a signal during the interpreter's exit
    no longer kills the process; ``main()`` in a caller's process gives the handlers back."""
    from dltemplate.cli import main

    caught = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
    before = {sig: signal.getsignal(sig) for sig in caught}
    try:
        assert main(["config", str(DEMO)]) == 0
        assert {sig: signal.getsignal(sig) for sig in caught} == before
        assert main(["config", str(DEMO)], exiting=True) == 0
        assert all(signal.getsignal(sig) is signal.SIG_IGN for sig in caught)
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def test_resume_catches_the_runs_own_notice_while_the_run_loads(tmp_path, monkeypatch):
    """``dltemplate resume`` of a run whose notice is SIGUSR2 catches SIGUSR2 from the start
    (a notice while the run loads stops it; SIGUSR1 keeps its default), as ``train`` does."""
    import json

    from dltemplate import api, cli

    run = tmp_path / "run"
    run.mkdir()
    (run / "config_x.json").write_text(json.dumps({"trainer": {"notice_signal": "USR2"}}))
    seen = {}

    def resume(target, overrides, trust_code=False):
        seen.update({sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGUSR2)})

    monkeypatch.setattr(api, "resume", resume)
    assert cli.main(["resume", str(run)]) == 0
    assert seen == {signal.SIGUSR1: signal.SIG_DFL, signal.SIGUSR2: cli._stop_on_signal}
    assert cli._resume_notice(str(run / "Vanilla_last_ckpt.pth"), []) == "SIGUSR2"
    assert cli._resume_notice(str(run), ["trainer.notice_signal=SIGUSR1"]) == "SIGUSR1"
    assert cli._resume_notice(str(run), ["trainer.notice_signal=null"]) is None
    for unreadable in ("{", '{"trainer": {"notice_signal": "SIGKILL"}}', '{"trainer": 3}'):
        (run / "config_x.json").write_text(unreadable)  # resume itself says what is wrong
        assert cli._resume_notice(str(run), []) == "SIGUSR1"
    assert cli._resume_notice(str(tmp_path / "nowhere"), []) == "SIGUSR1"


START_AND_TRAIN = """
import multiprocessing, sys
multiprocessing.set_start_method(sys.argv[1])
from dltemplate.cli import main
sys.exit(main(["train", *sys.argv[2:]], exiting=True))
"""


@pytest.mark.slow  # a training process with workers (~8-20 s)
@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])  # forkserver: 3.14's default
def test_a_notice_to_every_process_of_the_step_stops_a_run_with_workers_once(tmp_path, method):
    """SLURM sends the notice to every process of a job step: the data workers and, under
    ``spawn``/``forkserver``, multiprocessing's helpers too. The run stops once, with its
    checkpoint; before, forked workers each said "stopping" again, and the others died of it
    (under ``forkserver`` every worker had even exited at its start: no run could train)."""
    out = tmp_path / "out"
    args = [str(DEMO), f"experiment.output_dir={out}", "data.name=toy_datasets:DigitSamples",
            "data.num_workers=2", "trainer.epochs=50", "trainer.progress_bar=off",
            "callbacks=[{name: 'slow_epochs:SlowEpochs', args: {seconds: 0.5}}]"]  # fmt: skip
    path = os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])
    proc = subprocess.Popen(
        [sys.executable, "-c", START_AND_TRAIN, method, *args],
        cwd=tmp_path,
        env={**NO_SLURM, "PYTHONPATH": path},
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    said = read_until(proc, "epoch 2/50 train/")
    os.killpg(proc.pid, signal.SIGUSR1)  # as slurmstepd does: every process
    text = said + proc.communicate(timeout=120)[1]
    assert proc.returncode == slurm.EXIT_NOT_REQUEUED, text[-3000:]
    assert text.count("SIGUSR1: stopping after this step") == 1, text[-3000:]
    assert "Traceback" not in text and "died" not in text, text[-3000:]
    (run,) = run_dirs(out)
    assert load_ckpt(run / INTERRUPT)["interrupted_by"] == "SIGUSR1"


def test_processes_started_while_notices_are_held_never_get_one():
    """What the data workers and multiprocessing's helpers start with: the notices blocked. A
    notice meanwhile is not lost: another thread of the process takes it, or this one when the
    hold ends."""
    from dltemplate.data.samples import notices_held

    def blocked() -> int:
        status = subprocess.run(["cat", "/proc/self/status"], capture_output=True, text=True)
        (line,) = [x for x in status.stdout.splitlines() if x.startswith("SigBlk:")]
        return int(line.split()[1], 16)

    usr = (1 << (signal.SIGUSR1 - 1)) | (1 << (signal.SIGUSR2 - 1))
    got: list[int] = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: got.append(signum))
    try:
        assert blocked() & usr == 0
        with notices_held():
            assert blocked() & usr == usr  # a child started now
            signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)  # to this thread
            time.sleep(0.05)
            assert got == []  # pending
        time.sleep(0.05)  # (the handler runs at the next instruction)
        assert got == [signal.SIGUSR1] and blocked() & usr == 0
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_a_bad_notice_signal_is_a_config_error(cli, tmp_path, capsys):
    for bad in ("SIGKILL", "SIGTERM", "NOPE"):
        assert cli("train", DEMO, f"trainer.notice_signal={bad}") == 2
        assert f"trainer.notice_signal='{bad}'" in capsys.readouterr().err


@pytest.mark.slow  # several training processes
def test_a_job_that_is_no_restart_starts_a_new_run(tmp_path):
    env = {**NO_SLURM, "SLURM_JOB_ID": "9"}
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "dltemplate", "train", str(DEMO), f"experiment.output_dir={out}",
           *QUICK_DIGITS]  # fmt: skip
    for _ in range(2):
        done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        time.sleep(1.1)  # run directories are named by the second
    assert len(run_dirs(out)) == 2
