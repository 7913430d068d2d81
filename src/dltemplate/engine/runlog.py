"""Terminal + file logging, and per-epoch progress (a bar on a terminal, plain lines elsewhere)."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from tqdm import tqdm

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


def use_progress_bar(setting: str) -> bool:
    """'on', 'off', or 'auto' (a bar only when stderr is a terminal)."""
    return setting == "on" or (setting == "auto" and sys.stderr.isatty())


class EpochProgress:
    """Reports loss and throughput during an epoch: a tqdm bar (redrawn by time, at most ten
    times a second), or a log line whenever a loss is given."""

    def __init__(self, total: int, desc: str, *, bar: bool, enabled: bool, initial: int = 0):
        self.total, self.desc, self.enabled = total, desc, enabled
        self.done = initial
        self.samples = 0
        self.start = time.perf_counter()
        self.bar = (
            tqdm(
                total=total,
                initial=initial,
                desc=desc,
                leave=False,
                dynamic_ncols=True,
                file=sys.stderr,
                mininterval=0.1,
            )
            if (bar and enabled)
            else None
        )

    def update(self, samples: int, loss: float | None = None) -> None:
        """One batch done; ``loss`` is shown when given (the trainer gives it every
        ``trainer.log_every_n_steps`` optimizer steps)."""
        self.done += 1
        self.samples += samples
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.4f}", samples_s=_rate(self.rate))
        elif loss is not None:
            logging.getLogger(LOGGER_NAME).info(
                "%s [%d/%d] loss %.4f, %s samples/s",
                self.desc,
                self.done,
                self.total,
                loss,
                _rate(self.rate),
            )

    @property
    def rate(self) -> float:
        """Samples per second so far in this epoch."""
        return self.samples / max(time.perf_counter() - self.start, 1e-9)

    def close(self) -> None:
        """Remove the bar."""
        if self.bar is not None:
            self.bar.close()


def _rate(rate: float) -> str:
    """A rate as people read it: ``1234``, ``12.3``, ``0.42``."""
    return f"{rate:.0f}" if rate >= 100 else f"{rate:.3g}"


def format_duration(seconds: float) -> str:
    """A duration as people read it: ``8.2 s``, ``3 min 05 s``, ``2 h 07 min``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"
