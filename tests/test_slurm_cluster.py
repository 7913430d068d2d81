"""Issue #15 on a real one-node SLURM (``scripts/slurm/start_local_cluster.sh``; CI starts it):
a preemption notice, a time limit, and ``srun`` ranks, through the shipped job scripts.

Each test compares with a run never stopped: final weights, optimizer, scheduler, counters,
callback states, every metrics row and the test metrics, bit for bit (``run_results``). Tests
skip, saying why, where no cluster answers.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import (
    REPO,
    assert_identical,
    free_port,
    metric_rows,
    run_dirs,
    run_results,
)
from slurm_cluster import cancel, job_info, requeue_now, signal_job, slurm_available, wait_state

# CI starts a cluster and sets DLTEMPLATE_REQUIRE_SLURM=1: there a missing cluster fails the
# tests instead of skipping them unseen.
_MISSING = slurm_available()
if _MISSING is not None and os.environ.get("DLTEMPLATE_REQUIRE_SLURM") == "1":
    raise RuntimeError(f"DLTEMPLATE_REQUIRE_SLURM=1 but no SLURM cluster: {_MISSING}")

pytestmark = [
    pytest.mark.skipif(_MISSING is not None, reason=str(_MISSING)),
    pytest.mark.xdist_group("slurm"),  # under pytest -n: one worker, one job at a time on the node
]

DEMO = REPO / "configs" / "digits_mlp.yaml"
TRAIN = REPO / "scripts" / "slurm" / "train.sbatch"
MULTINODE = REPO / "scripts" / "slurm" / "multinode.sbatch"
TESTS = Path(__file__).parent
RUN = ["model.args.hidden=[32]", "model.args.dropout=0.2", "scheduler.name=onecycle",
       "trainer.progress_bar=off", "trainer.log_every_n_steps=5"]  # fmt: skip
SLOW = "callbacks=[{name: 'slow_epochs:SlowEpochs', args: {seconds: %s}}]"


def env() -> dict[str, str]:
    """The jobs' environment (sbatch exports it): this Python, tests/ importable."""
    path = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]).strip(os.pathsep)
    return {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def sbatch(cwd: Path, *args: str, script: Path = TRAIN, extra_env: dict | None = None) -> int:
    """``sbatch scripts/slurm/train.sbatch`` with ``args`` (``--`` sbatch options; the rest,
    overrides of the digits demo config, go to ``dltemplate train``); the job id."""
    options = [a for a in args if a.startswith("--")]
    rest = [str(DEMO), *(a for a in args if not a.startswith("--"))]
    done = subprocess.run(
        ["sbatch", "--parsable", f"--chdir={cwd}", "--output=slurm-%j.out", "--cpus-per-task=1",
         *options, str(script), *rest],
        cwd=cwd, env={**env(), **(extra_env or {})}, capture_output=True, text=True, timeout=60,
        check=True,
    )  # fmt: skip
    return int(done.stdout.strip().split(";")[0])


def reference(tmp_path: Path, *args: str, processes: int = 1) -> dict[str, object]:
    """The results of the same run, never stopped, outside SLURM (torchrun for 2 processes)."""
    out = tmp_path / "reference"
    launch = [sys.executable, "-m", "dltemplate"]
    if processes > 1:
        port = str(free_port())
        launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                  str(processes), "--master_port", port, "-m", "dltemplate"]  # fmt: skip
    clean = {k: v for k, v in env().items() if not k.startswith("SLURM_")}
    command = [*launch, "train", str(DEMO), *args, f"experiment.output_dir={out}"]
    done = subprocess.run(
        command, cwd=tmp_path, env=clean, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = run_dirs(out)
    return run_results(run)


def wait_for(path: Path, text: str, timeout: float = 120) -> None:
    """Until ``path`` holds ``text``."""
    deadline = time.monotonic() + timeout
    while not (path.exists() and text in path.read_text(errors="replace")):
        assert time.monotonic() < deadline, f"{path} never said {text!r}"
        time.sleep(0.3)


def finish(job: int, folder: Path, timeout: float = 600) -> int:
    """Wait for ``job`` (its output in ``folder``) to complete, letting each of its requeues
    start at once; its restarts. A job that ends otherwise fails the test with its output."""
    deadline = time.monotonic() + timeout
    while True:
        info = job_info(job)
        state, restarts = info["JobState"], int(info.get("Restarts", "0"))
        if state == "COMPLETED":
            return restarts
        if state in ("FAILED", "CANCELLED", "TIMEOUT"):
            output = folder / f"slurm-{job}.out"
            said = output.read_text(errors="replace")[-4000:] if output.exists() else "(none)"
            why = ", ".join(f"{k}={info.get(k)}" for k in ("Reason", "ExitCode", "Restarts"))
            pytest.fail(f"job {job} ended {state} ({why}); its output ends:\n{said}")
        if state == "PENDING" and restarts:
            requeue_now(job, restarts)
        assert time.monotonic() < deadline, f"job {job} still {state} after {timeout} s"
        time.sleep(0.5)


@pytest.mark.slow  # a real SLURM job and its requeue
def test_a_notice_mid_run_requeues_and_the_job_ends_exact(tmp_path):
    """``scancel --signal=USR1`` (what a preemption sends): the run stops at a step boundary with
    its checkpoint, requeues its own job, and the requeued job goes on in the same directory."""
    args = [*RUN, "trainer.epochs=4", SLOW % 1.0]
    out = tmp_path / "out"
    job = sbatch(tmp_path, *args, f"experiment.output_dir={out}")
    try:
        wait_state(job, "RUNNING", 120)
        wait_for(tmp_path / f"slurm-{job}.out", "epoch 1/4 train/")
        signal_job(job, "USR1")
        assert finish(job, tmp_path) == 1
    finally:
        cancel(job)
    (run,) = run_dirs(out)
    said = (tmp_path / f"slurm-{job}.out").read_text()
    assert f"stopped by SIGUSR1 (a preemption notice); job {job} requeued" in said
    assert said.count(f"job {job} on ") == 2  # one output file, appended across the requeue
    assert "(stopped by SIGUSR1)" in (run / "train.log").read_text()
    assert [int(r["epoch"]) for r in metric_rows(run)] == [1, 2, 3, 4]  # every row once
    assert_identical(run_results(run), reference(tmp_path, *RUN, "trainer.epochs=4"), "notice")


@pytest.mark.slow
def test_a_time_limit_with_a_notice_requeues_until_the_run_is_done(tmp_path):
    """The real path: ``--time=2 --signal=USR1@60`` — SLURM sends the notice before the limit,
    the run requeues itself, as often as it takes, and ends exact."""
    args = [*RUN, "trainer.epochs=12", SLOW % 10.0]  # 120 s of sleep: past one 2-minute limit
    out = tmp_path / "out"
    job = sbatch(tmp_path, "--time=2", "--signal=USR1@60", *args, f"experiment.output_dir={out}")
    try:
        assert finish(job, tmp_path, timeout=900) >= 1
    finally:
        cancel(job)
    (run,) = run_dirs(out)
    log = (run / "train.log").read_text()
    assert "(stopped by SIGUSR1)" in log  # resumed from the notice's checkpoint
    assert not (run / "Vanilla_interrupt_ckpt.pth").exists()  # stale once finished: removed
    assert [int(r["epoch"]) for r in metric_rows(run)] == list(range(1, 13))
    assert_identical(run_results(run), reference(tmp_path, *RUN, "trainer.epochs=12"), "limit")


@pytest.mark.slow
def test_a_notice_to_two_srun_tasks_stops_both_at_one_step_and_requeues_once(tmp_path):
    args = [*RUN, "trainer.epochs=4", "data.batch_size=16", SLOW % 1.0]
    out = tmp_path / "out"
    job = sbatch(tmp_path, "--ntasks=2", *args, f"experiment.output_dir={out}")
    try:
        wait_state(job, "RUNNING", 120)
        wait_for(tmp_path / f"slurm-{job}.out", "epoch 1/4 train/")
        signal_job(job, "USR1")
        assert finish(job, tmp_path) == 1
    finally:
        cancel(job)
    (run,) = run_dirs(out)
    log = (run / "train.log").read_text()
    assert "device cpu x 2 process(es)" in log and log.count("(stopped by SIGUSR1)") == 1
    # both ranks stopped at the same step (or the resumed run could not be identical):
    expected = reference(tmp_path, *RUN, "trainer.epochs=4", "data.batch_size=16", processes=2)
    assert_identical(run_results(run), expected, "two srun tasks")


@pytest.mark.slow
def test_srun_with_two_tasks_equals_one_process_with_the_global_batch(tmp_path):
    out = tmp_path / "out"
    job = sbatch(tmp_path, "--ntasks=2", *RUN, "trainer.epochs=2", "data.batch_size=16",
                 "model.args.dropout=0.0", f"experiment.output_dir={out}")  # fmt: skip
    try:
        finish(job, tmp_path)
    finally:
        cancel(job)
    (run,) = run_dirs(out)
    two = run_results(run)["model"]
    one = reference(tmp_path, *RUN, "trainer.epochs=2", "data.batch_size=32",
                    "model.args.dropout=0.0")["model"]  # fmt: skip
    assert max(float((two[k] - one[k]).abs().max()) for k in one) <= 1e-5


@pytest.mark.slow
def test_the_multinode_script_stops_its_torchrun_workers_on_a_notice_and_ends_exact(tmp_path):
    """``multinode.sbatch`` on one node with 2 workers under one torchrun agent: the agent
    ignores the notice, its workers stop at one step, rank 0 requeues the job."""
    args = [*RUN, "trainer.epochs=4", "data.batch_size=16", SLOW % 1.0]
    out = tmp_path / "out"
    job = sbatch(tmp_path, "--nodes=1", "--cpus-per-task=2", *args, f"experiment.output_dir={out}",
                 script=MULTINODE, extra_env={"GPUS_PER_NODE": "2"})  # fmt: skip
    try:
        wait_state(job, "RUNNING", 120)
        wait_for(tmp_path / f"slurm-{job}.out", "epoch 1/4 train/")
        signal_job(job, "USR1")
        assert finish(job, tmp_path) == 1
    finally:
        cancel(job)
    (run,) = run_dirs(out)
    said = (tmp_path / f"slurm-{job}.out").read_text()
    assert f"job {job} requeued" in said
    expected = reference(tmp_path, *RUN, "trainer.epochs=4", "data.batch_size=16", processes=2)
    assert_identical(run_results(run), expected, "multinode script")


SWEEP = REPO / "scripts" / "slurm" / "sweep.sbatch"


@pytest.mark.slow
def test_a_sweep_job_array_is_preempted_requeued_and_ends_with_its_trials(tmp_path):
    """Two sweep workers (a job array) share one study; a notice stops both, each requeues
    itself, and the sweep ends with exactly its trials, each one run directory."""
    import yaml

    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump({
        "name": "arr", "base": str(DEMO), "trials": 4, "sampler": "random",
        "output_dir": str(tmp_path / "sweeps"),
        "overrides": [*RUN, "trainer.epochs=4", "data.train_val_sample_rate=0.3", SLOW % 1.0],
        "params": {"optimizer.lr": {"type": "float", "low": 1e-3, "high": 1e-1, "log": True}},
    }))  # fmt: skip
    done = subprocess.run(
        ["sbatch", "--parsable", f"--chdir={tmp_path}", "--array=0-1", "--cpus-per-task=1",
         str(SWEEP), str(sweep_file)],
        cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    array = done.stdout.strip().split(";")[0]
    tasks = [f"{array}_0", f"{array}_1"]
    folder = tmp_path / "sweeps" / "arr"
    try:
        deadline = time.monotonic() + 300
        while not list(folder.glob("trials/*/*/*_last_ckpt.pth")):
            assert time.monotonic() < deadline, "no trial got going"
            time.sleep(0.5)
        signal_job(array, "USR1")
        for task in tasks:
            finish(task, tmp_path, timeout=900)
    finally:
        cancel(array)
    rows = list(csv.DictReader(open(folder / "trials.csv")))
    assert sorted(int(r["number"]) for r in rows) == [0, 1, 2, 3]
    assert {r["state"] for r in rows} == {"complete"}
    for trial in (folder / "trials").iterdir():
        assert len([p for p in trial.iterdir() if p.is_dir()]) == 1, trial
    said = "".join(p.read_text() for p in tmp_path.glob("slurm-*.out"))
    assert "requeued" in said
