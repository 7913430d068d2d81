"""How many CPU threads torch uses in this process (``experiment.threads``).

On a shared machine torch's default (one thread per core) makes processes fight over the
cores: a run can be several times slower than with fewer threads. Under ``torchrun`` the
processes of a node share its cores, each taking its part.
"""

from __future__ import annotations

import os

import torch

from dltemplate.errors import ConfigError

# torch's count when this process first ran a run (one per core, or $OMP_NUM_THREADS): what
# ``experiment.threads: null`` gives, also after an earlier run in the process set another.
STARTUP_THREADS = torch.get_num_threads()


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS says, else all)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def thread_count(requested: int | None, local_world_size: int = 1) -> int | None:
    """The thread count to set: ``requested``; else, with several processes on this node, an
    equal share of the cores (at least 1); else None (torch's default)."""
    if requested is not None:
        if requested < 1:
            raise ConfigError(f"experiment.threads={requested}: must be at least 1 (or null)")
        cores = available_cores()
        if requested > cores:  # more threads than cores only waste time; 100,000 exhaust the OS
            raise ConfigError(
                f"experiment.threads={requested}: more than the {cores} cores this process may "
                f"use; give at most {cores} (or null: torch's default)"
            )
        return requested
    if local_world_size > 1:
        return max(1, available_cores() // local_world_size)
    return None


def apply_threads(requested: int | None, distributed: bool = False) -> int:
    """Set torch's intra-op thread count as :func:`thread_count` says, torch's default
    (:data:`STARTUP_THREADS`) where it says None, so that a run in a process that ran others
    (a notebook, the Python API, the tests) does not keep their count; return the count in use.
    ``distributed``: this process is one of several that ``torchrun`` started."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if distributed else 1
    count = thread_count(requested, local)
    if count is None:
        count = STARTUP_THREADS
    if count != torch.get_num_threads():
        torch.set_num_threads(count)
    return torch.get_num_threads()
