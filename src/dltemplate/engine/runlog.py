"""Terminal + file logging (progress bars and lines: :mod:`dltemplate.progress`)."""

from __future__ import annotations

import logging
import os
import shlex
import sys
from collections.abc import Mapping
from pathlib import Path

LOGGER_NAME = "dltemplate"
_FORMAT = "%(asctime)s %(levelname)s %(message)s"


class _Buffer(logging.Handler):
    """Keeps the records logged before the run directory exists, for the log file."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def setup_logging(log_file: Path | None = None, is_main: bool = True) -> logging.Logger:
    """Configure the ``dltemplate`` logger: terminal always, ``log_file`` (appended) on rank 0.

    Without ``log_file``, records are also kept until :func:`attach_log_file` writes them out,
    so that warnings from before the run directory existed reach its log. Other ranks log
    warnings and errors only, so a run under torchrun prints each line once.
    """
    log = logging.getLogger(LOGGER_NAME)
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    log.setLevel(logging.INFO if is_main else logging.WARNING)
    log.propagate = False
    terminal = logging.StreamHandler(sys.stderr)
    terminal.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    log.addHandler(terminal)
    if log_file is not None and is_main:
        attach_log_file(log_file)
    elif log_file is None:
        log.addHandler(_Buffer())
    return log


def attach_log_file(log_file: Path) -> None:
    """Log to ``log_file`` (appending) from now on, after the records buffered so far."""
    log = logging.getLogger(LOGGER_NAME)
    file_handler = logging.FileHandler(log_file, mode="a", encoding="utf-8")
    file_handler.setFormatter(logging.Formatter(_FORMAT))
    for handler in list(log.handlers):
        if isinstance(handler, _Buffer):
            log.removeHandler(handler)
            for record in handler.records:
                file_handler.handle(record)
    log.addHandler(file_handler)


def format_duration(seconds: float, compact: bool = False) -> str:
    """A duration as people read it: ``8.2 s``, ``3 min 05 s``, ``2 h 07 min``; ``compact``
    for table cells: ``8.2s``, ``3m05s``, ``2h07m``."""
    sec, mins, hrs = ("s", "m", "h") if compact else (" s", " min", " h")
    gap = "" if compact else " "
    if seconds < 60:
        return f"{seconds:.1f}{sec}"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}{mins}{gap}{secs:02d}{sec}"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}{hrs}{gap}{minutes:02d}{mins}"


def rerun_command(argv: list[str] | None = None, env: Mapping[str, str] | None = None) -> str:
    """The command line that started this process, as one that runs it again: ``python -m
    dltemplate`` for the package's ``__main__.py`` (which is what ``sys.argv[0]`` holds under
    ``python -m`` and torchrun), and under torchrun the ``torchrun`` call that started every
    process, rebuilt from its environment (``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``,
    ``TORCHELASTIC_MAX_RESTARTS``)."""
    argv = list(sys.argv if argv is None else argv)
    env = os.environ if env is None else env
    program, args = (argv[0] if argv else "dltemplate"), argv[1:]
    path = Path(program)
    is_main = path.name == "__main__.py" and path.parent.name == "dltemplate"
    torchrun = "TORCHELASTIC_RUN_ID" in env
    if is_main or (torchrun and path.name == "dltemplate"):
        start = ["-m", "dltemplate"] if torchrun else ["python", "-m", "dltemplate"]
    elif path.suffix == ".py":  # a script (the seed's trainer_vanilla.py): run by Python
        start = [program] if torchrun else ["python", program]
    else:
        start = [program]
    if torchrun:
        world = int(env.get("WORLD_SIZE", "1"))
        per_node = int(env.get("LOCAL_WORLD_SIZE", str(world)))
        launcher = ["torchrun"]
        if world > per_node:
            launcher += ["--nnodes", str(max(1, world // per_node))]
        launcher += ["--nproc_per_node", str(per_node)]
        if int(env.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0:
            launcher += ["--max_restarts", env["TORCHELASTIC_MAX_RESTARTS"]]
        start = launcher + start
    return shlex.join([*start, *args])
