"""Terminal + file logging (progress bars and lines: :mod:`dltemplate.progress`)."""

from __future__ import annotations

import logging
import sys
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


def format_duration(seconds: float) -> str:
    """A duration as people read it: ``8.2 s``, ``3 min 05 s``, ``2 h 07 min``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"
