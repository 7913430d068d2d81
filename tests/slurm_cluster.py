"""Helpers for tests that drive a real SLURM cluster (not a test file).

The cluster is the one-node cluster of ``scripts/slurm/start_local_cluster.sh``; tests call
:func:`slurm_available` and skip with its reason when it returns one. Everything goes through the
SLURM command-line tools (``sbatch``, ``scontrol``, ``scancel``, ``sinfo``); there is no
accounting daemon, so ``sacct`` is not used: finished jobs stay visible to ``scontrol`` for
``MinJobAge`` (3600 s in the generated slurm.conf).

Facts measured on that cluster (Slurm 22.05):
* ``scancel --signal=USR1 J`` reaches the ``srun`` steps only, not the batch shell or its plain
  children; ``--batch`` reaches the batch shell only; ``--full`` reaches the batch shell, its
  children and the steps.
* ``scontrol requeue J`` (also from inside J) keeps the job id, sends CONT+TERM to the whole job
  at once (SIGKILL after KillWait), bumps ``Restarts``; ``SLURM_RESTART_COUNT`` is unset in the
  first run and 1, 2, ... after. The job then pends (Reason=BeginTime) about 2 minutes (the
  ``cred_expire`` of slurm.conf's AuthInfo); :func:`requeue_now` lifts that wait.
* ``--open-mode=append`` keeps earlier runs' output across a requeue; the default truncates.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

#: States a job does not leave on its own (other than by a requeue); waiting past them is futile.
FINAL_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
)
#: Node states (``sinfo %T``) in which the node can run jobs (``allocated``: busy, jobs queue).
USABLE_NODE_STATES = frozenset({"idle", "mixed", "allocated", "completing"})


def _run(*cmd: str, timeout: float = 30, **kwargs) -> subprocess.CompletedProcess[str]:
    """Run a SLURM command, capturing text output; raise with its stderr if it fails."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def slurm_available() -> str | None:
    """None when a usable cluster answers (``sinfo`` works, a node is idle, mixed or allocated);
    otherwise a one-line reason to skip."""
    for tool in ("sinfo", "sbatch", "scontrol", "scancel", "srun"):
        if shutil.which(tool) is None:
            return f"SLURM tool {tool!r} not on PATH (run scripts/slurm/start_local_cluster.sh)"
    try:
        proc = subprocess.run(
            ["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=15
        )
    except subprocess.TimeoutExpired:
        return "sinfo timed out: slurmctld not answering"
    if proc.returncode != 0:
        lines = (proc.stderr.strip() or "no output").splitlines()
        return f"sinfo failed: {lines[-1]}"
    states = proc.stdout.split()
    if not USABLE_NODE_STATES.intersection(states):
        return f"no usable SLURM node (node states: {', '.join(states) or 'none'})"
    # slurmctld notices a dead slurmd only after SlurmdTimeout (300 s) and still shows the node
    # idle meanwhile; on the local one-node cluster, look for the daemon itself.
    local = subprocess.run(
        ["sinfo", "-h", "-n", socket.gethostname().split(".")[0], "-o", "%N"],
        capture_output=True,
        text=True,
        timeout=15,
    ).stdout.strip()
    if local and not _daemon_alive("slurmd"):
        return "this host is a SLURM node but no slurmd runs here"
    return None


def _daemon_alive(name: str) -> bool:
    """A process named ``name`` runs here (zombies, which may linger in containers, excluded)."""
    proc = subprocess.run(["ps", "-C", name, "-o", "stat="], capture_output=True, text=True)
    return any(not stat.startswith("Z") for stat in proc.stdout.split())


def submit(script_text: str, cwd: Path, *sbatch_args: str) -> int:
    """Submit ``script_text`` (a whole batch script, shebang first) with ``sbatch`` run in
    ``cwd`` (also the job's working directory); return the job id."""
    proc = _run("sbatch", "--parsable", f"--chdir={cwd}", *sbatch_args, input=script_text, cwd=cwd)
    return int(proc.stdout.strip().split(";")[0])


def job_info(job_id: int | str) -> dict[str, str]:
    """``scontrol show job -o`` as a dict (``JobState``, ``Restarts``, ``BeginTime``, ...).

    For an array job's id this is the first record scontrol prints (one of its tasks; each
    task has its own ``JobId``, with ``ArrayJobId``/``ArrayTaskId``). Raises ``RuntimeError``
    for an unknown job (never submitted, or purged after ``MinJobAge``)."""
    line = _run("scontrol", "show", "job", "-o", str(job_id)).stdout.splitlines()[0]
    # Values may hold spaces; a new field starts at " Key=" (Key: letters, digits, :/_).
    pairs = re.findall(r"([A-Za-z][\w:/]*)=(.*?)(?= [A-Za-z][\w:/]*=|$)", line.strip())
    return dict(pairs)


def wait_state(job_id: int | str, states: str | Iterable[str], timeout: float = 60) -> str:
    """Poll until the job's ``JobState`` is one of ``states``; return it.

    Raises ``TimeoutError`` after ``timeout`` seconds, or at once (``RuntimeError``) when the
    job reaches a final state not in ``states``."""
    wanted = {states} if isinstance(states, str) else set(states)
    deadline = time.monotonic() + timeout
    info: dict[str, str] = {}
    while True:
        info = job_info(job_id)
        state = info.get("JobState", "")
        if state in wanted:
            return state
        if state in FINAL_STATES:
            raise RuntimeError(f"job {job_id} ended {state} while waiting for {sorted(wanted)}")
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"job {job_id} still {state} (Reason={info.get('Reason')}) after {timeout} s;"
                f" wanted {sorted(wanted)}"
            )
        time.sleep(0.5)


def requeue_now(job_id: int | str, restarts: int = 1, timeout: float = 90) -> None:
    """Let a requeued job start again at once instead of after its ~2 minute ``BeginTime`` hold.

    Waits until the job has been requeued ``restarts`` times in all and is PENDING again (a
    ``StartTime`` set while it is still COMPLETING is overwritten by the hold), then sets
    ``StartTime=now``, at least 2 s after the requeue. Does nothing if it is already running
    again."""
    deadline = time.monotonic() + timeout
    while True:
        info = job_info(job_id)
        state, done = info.get("JobState", ""), int(info.get("Restarts", "0")) >= restarts
        if done and state == "PENDING":
            # slurmd revoked the job's credentials at the requeue, and refuses ("Job credential
            # revoked": the job FAILS) a credential made in the same second as the revocation
            time.sleep(2)
            try:
                _run("scontrol", "update", f"JobId={job_id}", "StartTime=now")
                return
            except RuntimeError as err:  # it started between the look and the update
                if "no longer pending" not in str(err):
                    raise
                continue
        if done and state == "RUNNING":
            return
        if state in FINAL_STATES:
            raise RuntimeError(f"job {job_id} ended {state} before its requeue #{restarts}")
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"job {job_id} not pending after requeue #{restarts} within {timeout} s"
                f" (JobState={state}, Restarts={info.get('Restarts')})"
            )
        time.sleep(0.5)


def signal_job(
    job_id: int | str, sig: str = "USR1", *, batch: bool = False, full: bool = False
) -> None:
    """``scancel --signal=sig``. By default only the job's ``srun`` steps get it; ``batch``:
    only the batch shell; ``full``: the batch shell, its child processes and the steps."""
    extra = ["--batch"] if batch else ["--full"] if full else []
    _run("scancel", f"--signal={sig}", *extra, str(job_id))


def cancel(*job_ids: int | str) -> None:
    """``scancel`` the jobs (ignored when already gone); use in test teardown."""
    if job_ids:
        subprocess.run(["scancel", *map(str, job_ids)], capture_output=True, timeout=30)
