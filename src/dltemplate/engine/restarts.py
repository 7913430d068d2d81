"""torchrun restarts: a restarted worker goes on with the run directory it was writing.

``torchrun --max-restarts N`` restarts every worker of a job when one fails, with the same
command line. Rank 0 leaves a marker in ``experiment.output_dir`` naming its run directory, keyed
by the launcher (its run id, host and process id, the same across restarts); a restarted worker
(``TORCHELASTIC_RESTART_COUNT > 0``) resumes that run directory instead of starting a new one.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from dltemplate.atomic import atomic_write_text


def _marker(output_dir: str | Path) -> Path | None:
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if run_id is None:  # not under torchrun
        return None
    safe = "".join(c if c.isalnum() else "-" for c in f"{run_id}_{socket.gethostname()}")
    return Path(output_dir) / f".torchrun_{safe}_{os.getppid()}.json"


def remember_run_dir(output_dir: str | Path, run_dir: Path) -> None:
    """Under torchrun, note which run directory this job writes (rank 0, at the run's start)."""
    marker = _marker(output_dir)
    if marker is not None:
        atomic_write_text(marker, json.dumps({"run_dir": str(run_dir)}))


def restarted_run_dir(output_dir: str | Path) -> Path | None:
    """The run directory a restarted torchrun worker should go on with, or None."""
    marker = _marker(output_dir)
    if marker is None or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0:
        return None
    try:
        run_dir = Path(json.loads(marker.read_text())["run_dir"])
    except (OSError, ValueError, KeyError):
        return None
    return run_dir if run_dir.is_dir() else None


def forget_restart_marker(output_dir: str | Path) -> None:
    """Remove the marker once the run is complete."""
    marker = _marker(output_dir)
    if marker is not None and marker.exists():
        marker.unlink()
