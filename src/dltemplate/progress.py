"""Progress on long steps: a tqdm bar on a terminal, plain log lines elsewhere.

Where no bar is drawn (output to a file or pipe, ``progress_bar: off``, or a terminal that
says it is 0 columns wide), a line is logged every ``DLTEMPLATE_PROGRESS_SECONDS`` seconds (10
by default), so that no step that takes longer is silent: training epochs, ``eval``, decoding
an image cache, writing a sample set.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

LOGGER_NAME = "dltemplate"


PROGRESS_SECONDS_ENV = "DLTEMPLATE_PROGRESS_SECONDS"  # seconds between plain progress lines
DEFAULT_PROGRESS_SECONDS = 10.0


def progress_seconds() -> float:
    """Seconds between two plain progress lines (where no bar is drawn): the environment's
    ``DLTEMPLATE_PROGRESS_SECONDS`` (a number >= 0), else 10."""
    text = os.environ.get(PROGRESS_SECONDS_ENV)
    if text is None:
        return DEFAULT_PROGRESS_SECONDS
    try:
        value = float(text)
        if not value >= 0:  # NaN too
            raise ValueError
    except ValueError:
        logging.getLogger(LOGGER_NAME).warning(
            "%s=%r: not a number of seconds >= 0; progress lines every %g s",
            PROGRESS_SECONDS_ENV,
            text,
            DEFAULT_PROGRESS_SECONDS,
        )
        return DEFAULT_PROGRESS_SECONDS
    return value


def terminal_columns() -> int:
    """The width of the terminal stderr writes to; 0 when it is none or says 0 (a pseudo-
    terminal whose size was never set, as some CI runners and ``docker exec`` give)."""
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns
    except (AttributeError, OSError, ValueError):  # not a terminal, or no file descriptor
        return 0


def use_progress_bar(setting: str) -> bool:
    """'on', 'off', or 'auto': a bar only when stderr is a terminal with a width (a 0x0 one
    would draw nothing: plain lines then)."""
    if setting == "on":
        return True
    return setting == "auto" and sys.stderr.isatty() and terminal_columns() > 0


class EpochProgress:
    """Reports progress through ``total`` steps (an epoch's batches, images decoded, ...): a
    tqdm bar (redrawn by time, at most ten times a second), or plain log lines: one whenever a
    loss is given, and one every ``every`` seconds (default :func:`progress_seconds`) without
    one, so that a long step is never silent."""

    def __init__(
        self,
        total: int,
        desc: str,
        *,
        bar: bool,
        enabled: bool,
        initial: int = 0,
        every: float | None = None,
        unit: str = "samples",
    ) -> None:
        self.total, self.desc, self.enabled = total, desc, enabled
        self.unit = unit
        self.done = initial
        self.samples = 0
        self.start = self.said = time.perf_counter()
        self.every = progress_seconds() if every is None else every
        self.loss: float | None = None
        # A terminal that says it is 0 columns wide gets a bar of a fixed width ("on").
        width = {} if terminal_columns() > 0 else {"ncols": 100}
        self.bar = (
            tqdm(
                total=total,
                initial=initial,
                desc=desc,
                leave=False,
                dynamic_ncols=not width,
                file=sys.stderr,
                mininterval=0.1,
                **width,
            )
            if (bar and enabled)
            else None
        )

    def update(self, samples: int, loss: float | None = None) -> None:
        """One step done (``samples`` of them); ``loss`` is shown when given (the trainer gives
        it every ``trainer.log_every_n_steps`` optimizer steps)."""
        self.done += 1
        self.samples += samples
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.4f}", samples_s=_rate(self.rate))
            return
        self.loss = loss if loss is not None else self.loss
        now = time.perf_counter()
        if loss is None and now - self.said < self.every:
            return
        self.said = now
        shown = f"loss {self.loss:.4f}, " if self.loss is not None else ""
        logging.getLogger(LOGGER_NAME).info(
            "%s [%d/%d] %d%%, %s%s %s/s",
            self.desc,
            self.done,
            self.total,
            100 * self.done // max(self.total, 1),
            shown,
            _rate(self.rate),
            self.unit,
        )

    @property
    def rate(self) -> float:
        """Samples per second so far in this epoch."""
        return self.samples / max(time.perf_counter() - self.start, 1e-9)

    def close(self) -> None:
        """Remove the bar."""
        if self.bar is not None:
            self.bar.close()


T = TypeVar("T")


def track(items: Iterable[T], total: int, desc: str, unit: str) -> Iterator[T]:
    """``items``, reporting progress as they come (a bar on a terminal, else a line every
    :func:`progress_seconds`): for the long steps outside training (decoding, evaluating,
    writing a sample set)."""
    progress = EpochProgress(total, desc, bar=use_progress_bar("auto"), enabled=True, unit=unit)
    try:
        for item in items:
            yield item
            progress.update(1)
    finally:
        progress.close()


def _rate(rate: float) -> str:
    """A rate as people read it: ``1234``, ``12.3``, ``0.42``."""
    return f"{rate:.0f}" if rate >= 100 else f"{rate:.3g}"
