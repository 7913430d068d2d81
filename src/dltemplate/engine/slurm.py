"""SLURM: what a job says of itself in its environment, and requeueing it.

A cluster sends a *notice* (SIGUSR1 by default: ``#SBATCH --signal=USR1@<seconds>``, or a
preemption) before it stops a job. The run then stops at the next step boundary with its
interrupt checkpoint (:mod:`dltemplate.engine.stopping`), and the command line asks SLURM to
requeue the job (:func:`requeue`, rank 0 only, once the checkpoint is on disk). The requeued job
runs the same command again; it finds the run directory it was writing through a marker keyed by
the job (:func:`job_key`, see :mod:`dltemplate.engine.restarts`) and continues it exactly.

``srun --ntasks N dltemplate train ...`` (no torchrun) is a DistributedDataParallel run of N
processes: :func:`srun_ranks` gives the ranks and the rendezvous from SLURM's variables.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

# A distinct exit status for a wrapper: the run stopped on the notice with its checkpoint, but
# could not requeue itself (not under SLURM, or no scontrol in a container): requeue or resume it.
EXIT_NOT_REQUEUED = 75  # sysexits' EX_TEMPFAIL: a temporary failure, worth a retry


def job_id(env: Mapping[str, str] | None = None) -> str | None:
    """The job this process belongs to, as ``scontrol requeue`` wants it: ``<array job>_<task>``
    for a task of a job array (requeue that task, not the whole array), else the job id; None
    outside SLURM."""
    env = os.environ if env is None else env
    array_job, task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        return f"{array_job}_{task}"
    return env.get("SLURM_JOB_ID") or None


def job_key(env: Mapping[str, str] | None = None) -> str | None:
    """A file-name-safe key of this job that stays the same across its requeues."""
    found = job_id(env)
    return None if found is None else re.sub(r"[^0-9A-Za-z_.-]", "-", found)


def restart_count(env: Mapping[str, str] | None = None) -> int:
    """How many times SLURM has requeued this job (0 on its first run)."""
    env = os.environ if env is None else env
    try:
        return int(env.get("SLURM_RESTART_COUNT", "0") or 0)
    except ValueError:
        return 0


def requeue(env: Mapping[str, str] | None = None) -> tuple[bool, str]:
    """Ask SLURM to requeue this job: ``(done, what happened)`` in a line. Not done outside SLURM,
    without ``scontrol`` (a container), or when ``scontrol`` refuses (the job is not
    requeueable: ``sbatch --requeue``)."""
    target = job_id(env)
    if target is None:
        return False, "not a SLURM job (no SLURM_JOB_ID): requeue it yourself"
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        return False, f"scontrol is not on PATH (inside a container?): job {target} not requeued"
    try:
        done = subprocess.run(
            [scontrol, "requeue", target], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"scontrol requeue {target} failed: {exc}"
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip().splitlines()
        return False, f"scontrol requeue {target} failed: {said[0] if said else done.returncode}"
    return True, f"job {target} requeued: it continues this run when it starts again"


@dataclass
class SrunRanks:
    """Where this process stands in an ``srun`` step of several tasks."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def srun_ranks(env: Mapping[str, str] | None = None) -> SrunRanks | None:
    """Ranks and rendezvous for a task of an ``srun`` step of several tasks without torchrun
    (``WORLD_SIZE`` unset); None otherwise. The rendezvous host is the first node of the step,
    the port one derived from the job id (the same for every task, different across jobs)."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" in env or "SLURM_STEP_ID" not in env or "SLURM_PROCID" not in env:
        return None  # torchrun's own variables win; a batch script itself is no srun task
    try:
        world_size = int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or "1")
        rank, local = int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", "0"))
    except ValueError:
        return None
    if world_size <= 1:
        return None
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
    port = 20_000 + int(re.sub(r"\D", "", env.get("SLURM_JOB_ID", "0")) or 0) % 20_000
    return SrunRanks(rank, world_size, local, first_host(nodes), port)


def launch_rank(env: Mapping[str, str] | None = None) -> int:
    """This process's rank as its launcher says, before any process group exists: torchrun's
    ``RANK``, an ``srun`` task's ``SLURM_PROCID``, else 0 (one process)."""
    env = os.environ if env is None else env
    if "RANK" in env:
        return int(env["RANK"])
    ranks = srun_ranks(env)
    return ranks.rank if ranks is not None else 0


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``node[03-05,07],gpu1`` gives ``node03``."""
    head = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if head is None:
        return nodelist
    prefix, ranges = head.group(1), head.group(2)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return f"{prefix}{first}"
