"""Files written whole or not at all: a temporary file in the same folder, renamed over the
target once complete, so a crash or a kill mid-write leaves the previous file intact."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(fh)`` on ``.<name>.<pid>.tmp`` beside ``path``, flush it to disk and rename
    it over ``path``; on any error the temporary file is removed and ``path`` is untouched.

    A process killed mid-write leaves its temporary file behind:
    :func:`dltemplate.engine.rundir.remove_stale_temp_files` removes it later.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)  # atomic on POSIX and Windows
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically (no newline translation)."""
    atomic_write(path, lambda fh: fh.write(text.encode(encoding)))
