"""Files written whole or not at all: a temporary file in the same folder, renamed over the
target once complete, so a crash or a kill mid-write leaves the previous file intact."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from dltemplate.errors import DiskFullError, UsageError

_FULL = (errno.ENOSPC, errno.EDQUOT)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(fh)`` on ``.<name>.<pid>.tmp`` beside ``path``, flush it to disk and rename
    it over ``path``; on any error the temporary file is removed and ``path`` is untouched (a
    full disk is a :class:`~dltemplate.errors.DiskFullError` naming ``path``).

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
    except Exception as exc:
        if _disk_full(exc):  # say it plainly (torch.save reports it as "unexpected pos")
            raise DiskFullError(f"no space left on device while writing {path}") from exc
        if isinstance(exc, OSError):  # name the file meant, not the temporary one
            raise OSError(exc.errno, f"cannot write {path}: {exc.strerror or exc}") from exc
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


def _disk_full(exc: BaseException | None) -> bool:
    """Whether ``exc``, or an exception it arose from, is a full disk or quota."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError) and exc.errno in _FULL:
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically (no newline translation)."""
    atomic_write(path, lambda fh: fh.write(text.encode(encoding)))


def refuse_path_under_a_file(path: str | Path, option: str) -> None:
    """A UsageError naming ``option`` (``--out``) when the nearest existing parent of ``path``
    is a file: nothing could ever be written there (checked before the work, not after)."""
    for parent in Path(path).absolute().parents:  # the nearest first
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"{option} {path}: {parent} is a file, not a folder")
            return
