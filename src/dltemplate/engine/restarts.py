"""Restarts: a restarted job goes on with the run directory it was writing.

Two launchers start the same command again after a failure: ``torchrun --max-restarts N``
restarts every worker of a job when one fails, and SLURM requeues a job (after a preemption
notice, see :mod:`dltemplate.engine.slurm`). Rank 0 leaves a marker in ``experiment.output_dir``
naming its run directory, keyed by what stays the same across restarts — torchrun's run id, host
and agent process id; SLURM's job id (an array task's own) — and a restarted job
(``TORCHELASTIC_RESTART_COUNT`` or ``SLURM_RESTART_COUNT`` > 0) resumes that run directory
instead of starting a new one. A job that is no restart starts a new run.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from dltemplate.atomic import atomic_write_text
from dltemplate.engine import slurm


def _markers(output_dir: str | Path) -> list[tuple[Path, bool]]:
    """This job's markers, each with whether the job is a restart for its launcher."""
    found = []
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if run_id is not None:  # under torchrun
        safe = "".join(c if c.isalnum() else "-" for c in f"{run_id}_{socket.gethostname()}")
        restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
        found.append((Path(output_dir) / f".torchrun_{safe}_{os.getppid()}.json", restarted))
    key = slurm.job_key()
    if key is not None:  # under SLURM
        found.append((Path(output_dir) / f".slurm_{key}.json", slurm.restart_count() > 0))
    return found


def remember_run_dir(output_dir: str | Path, run_dir: Path) -> None:
    """Under torchrun or SLURM, note which run directory this job writes (rank 0, at the run's
    start)."""
    for marker, _ in _markers(output_dir):
        atomic_write_text(marker, json.dumps({"run_dir": str(run_dir)}))


def restarted_run_dir(output_dir: str | Path) -> Path | None:
    """The run directory a restarted job should go on with, or None."""
    for marker, restarted in _markers(output_dir):
        if not restarted:
            continue
        try:
            run_dir = Path(json.loads(marker.read_text())["run_dir"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if run_dir.is_dir():
            return run_dir
    return None


def forget_restart_marker(output_dir: str | Path) -> None:
    """Remove the markers once the run is complete."""
    for marker, _ in _markers(output_dir):
        marker.unlink(missing_ok=True)
