"""A disk cache of decoded arrays, so that a dataset of image files is decoded once.

One cache entry is a set of named arrays (``.npy`` files) plus JSON-able fields, stored under
``folder`` as ``<family><key[:16]>.<kind>.npy`` and ``<family><key[:16]>.json``. The caller
chooses ``key`` (a hash of everything the arrays depend on: file names, sizes, mtimes, output
size...) and ``family`` (what else the arrays are for, e.g. ``"carvana-std-32x48-"``): entries of
other families coexist, while writing an entry removes the stale entries of its own family.

Every file is written atomically, the JSON meta last; the meta holds each array's shape, dtype and
CRC32, which :meth:`ArrayCache.read` checks, so a half-written or damaged entry is rebuilt, never
trusted.

``read(..., mmap=True)`` maps the ``.npy`` files instead of reading them into private memory: the
arrays are read-only views of the files, their pages live in the OS page cache (shared by every
process of a node that maps the same entry, and given back under memory pressure). The CRC32 is
still checked, over the mapped bytes themselves. :func:`tensor_view` wraps such an array as a
torch tensor without copying it.

Where the cache lives (:func:`default_cache_dir`): outside the data, so that a read-only data
folder works and no scanner of the data folder takes the cache for one more class. By default
a per-user folder (``$DLTEMPLATE_CACHE``, else ``$XDG_CACHE_HOME/dltemplate``, else
``~/.cache/dltemplate``) holds one sub-folder per data root, named after it and a hash of its
resolved path; a dataset's ``cache_dir`` argument (``data.args.cache_dir``) is used as it is.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import tempfile
import warnings
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import numpy as np
import torch

from dltemplate.atomic import atomic_write
from dltemplate.data.base import InMemoryDataset, check_mode
from dltemplate.errors import ConfigError

log = logging.getLogger("dltemplate")

FORMAT_VERSION = 1  # of the meta and file layout; the caller's key covers how arrays are made
_RESERVED = ("version", "key")  # meta fields of the cache itself, not the caller's
CACHE_ENV = "DLTEMPLATE_CACHE"  # the folder of every dataset's cache folder, for this user


def user_cache_base() -> Path:
    """The per-user folder that holds a cache folder per data root: ``$DLTEMPLATE_CACHE``,
    else ``$XDG_CACHE_HOME/dltemplate``, else ``~/.cache/dltemplate``."""
    own = os.environ.get(CACHE_ENV, "")
    if own:
        return Path(own).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if xdg and Path(xdg).is_absolute():  # the XDG spec says to ignore a relative one
        return Path(xdg) / "dltemplate"
    try:
        return Path.home() / ".cache" / "dltemplate"
    except (RuntimeError, KeyError):  # no HOME and no passwd entry (some containers)
        user = os.getuid() if hasattr(os, "getuid") else "user"
        return Path(tempfile.gettempdir()) / f"dltemplate-cache-{user}"


def root_identity(root: Path) -> str:
    """The resolved absolute path of a data root, as cache keys and folder names use it."""
    return str(Path(root).resolve())


def default_cache_dir(root: Path) -> Path:
    """The cache folder of data root ``root`` when no ``cache_dir`` is given: a sub-folder of
    :func:`user_cache_base` named after the root and a hash of its resolved path (two data
    folders of the same name never share one)."""
    resolved = root_identity(root)
    digest = hashlib.sha256(resolved.encode("utf-8", "surrogateescape")).hexdigest()[:12]
    name = (Path(resolved).name or "root")[:40]
    return user_cache_base() / f"{name}-{digest}"


class CachedImageDataset(InMemoryDataset):
    """The arguments every dataset of image files shares (Carvana, image_folder): ``skip_bad``
    (skip unreadable files with one warning instead of failing), ``cache_dir`` (the decoded
    arrays; default :func:`default_cache_dir`, outside the data), ``workers`` (processes of
    the first decode; 0: up to 4, one per CPU; 1: this one) and ``mode`` (``cache``: decode
    once into the mapped cache; ``files``: decode every sample when it is read, in the
    loader's ``data.num_workers`` workers). ``label`` names the dataset in messages."""

    label = "dataset"

    def __init__(
        self,
        root: str = "",
        download: bool = True,
        skip_bad: bool = False,
        cache_dir: str | None = None,
        workers: int = 0,
        mode: str = "cache",
    ) -> None:
        super().__init__(root, download)
        check_mode(mode, self.label)
        if not isinstance(skip_bad, bool):
            raise ConfigError(f"{self.label}: skip_bad={skip_bad!r}: must be true or false")
        if not isinstance(workers, int) or isinstance(workers, bool) or workers < 0:
            raise ConfigError(f"{self.label}: workers={workers!r}: must be 0 (automatic) or more")
        self.skip_bad, self.workers, self.mode = skip_bad, workers, mode
        self.root_path = Path(root or ".")
        self.cache_dir = (
            Path(cache_dir).expanduser() if cache_dir else default_cache_dir(self.root_path)
        )

    @property
    def root_identity(self) -> str:
        """The resolved data root, part of every cache key: two data folders never share an
        entry, even in one ``cache_dir``."""
        return root_identity(self.root_path)


class Cached(NamedTuple):
    """One cache entry as read back: the arrays by kind and the caller's JSON fields."""

    arrays: dict[str, np.ndarray]
    fields: dict[str, Any]


class ArrayCache:
    """The cached arrays of one dataset state in ``folder`` (see the module docstring).

    ``label`` starts the warnings (e.g. ``"Carvana"``) so that a user knows whose cache it is.
    """

    def __init__(self, folder: Path, family: str, key: str, label: str = "dataset") -> None:
        self.folder = Path(folder)
        self.family = family
        self.key = key
        self.label = label
        self.stem = family + key[:16]
        self.meta_path = self.folder / f"{self.stem}.json"

    def array_path(self, kind: str) -> Path:
        """The ``.npy`` file of ``kind`` (e.g. "images")."""
        return self.folder / f"{self.stem}.{kind}.npy"

    def read(
        self,
        kinds: Sequence[str],
        check: Callable[[Cached], None] | None = None,
        mmap: bool = False,
    ) -> Cached | None:
        """The entry's arrays of ``kinds`` and its fields, or None when there is no entry or it
        is corrupt (with a warning). ``check`` may raise ValueError to reject what was read
        (e.g. arrays whose shapes do not fit the fields).

        ``mmap=False`` reads each array into its own writable memory; ``mmap=True`` maps the
        files read-only (see the module docstring), after the same checks."""
        if not self.meta_path.is_file():
            return None
        try:
            meta = json.loads(self.meta_path.read_text(encoding="utf-8"))
            if meta.get("version") != FORMAT_VERSION or meta.get("key") != self.key:
                raise ValueError("its meta is not for this key")
            # The names are fixed by the key: a path read from the meta is never followed.
            read = _map_npy if mmap else _read_npy
            arrays = {kind: read(self.array_path(kind), meta[kind]) for kind in kinds}
            fields = {k: v for k, v in meta.items() if k not in _RESERVED and k not in kinds}
            cached = Cached(arrays, fields)
            if check is not None:
                check(cached)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning(
                "%s: cache %s is corrupt (%s); rebuilding it", self.label, self.meta_path, exc
            )
            return None
        return cached

    def allocate(self, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
        """Arrays (uint8) to decode into, one per kind: ``.npy`` files of the cache folder
        mapped writable, under temporary names, so that a cold pass keeps nothing in private
        memory and :meth:`write` only renames them. Where the folder is unwritable or the
        disk too small, ordinary in-memory arrays instead (``write`` then warns)."""
        self._remove_orphans()
        arrays: dict[str, np.ndarray] = {}
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            for kind, shape in shapes.items():
                tmp = self._allocated_path(kind)
                arrays[kind] = _allocate_npy(tmp, shape)
        except OSError as exc:
            log.info("%s: decoding in memory (%s)", self.label, exc)
            self.discard()
            return {kind: np.empty(shape, np.uint8) for kind, shape in shapes.items()}
        self._allocated = {kind: (self._allocated_path(kind), a) for kind, a in arrays.items()}
        return arrays

    def _allocated_path(self, kind: str) -> Path:
        # Not atomic_write's temporary name: a copy made by write() must not truncate it.
        return self.folder / f".{self.array_path(kind).name}.{os.getpid()}.decoding.tmp"

    def discard(self) -> None:
        """Remove the temporary files of :meth:`allocate` that :meth:`write` has not renamed
        into place (arrays still mapped keep their data); safe to call more than once. Call it
        in a ``finally`` around a cold pass, so that an error or Ctrl-C leaves no file behind."""
        for path, _ in getattr(self, "_allocated", {}).values():
            with contextlib.suppress(OSError):
                path.unlink()
        self._allocated = {}

    def _remove_orphans(self) -> None:
        """Remove temporary files of this family left by processes that no longer run."""
        for tmp in self.folder.glob(f".{self.family}*.decoding.tmp"):
            pid = tmp.name.rsplit(".", 3)[-3]
            if pid.isdigit() and not _running(int(pid)):
                with contextlib.suppress(OSError):
                    tmp.unlink()

    def write(self, arrays: Mapping[str, np.ndarray], fields: Mapping[str, Any]) -> None:
        """Save ``arrays`` and the JSON-able ``fields``, then remove the family's stale entries;
        an unwritable folder only logs a warning. An array of :meth:`allocate` that was filled
        whole is renamed into place, not copied."""
        clash = set(fields) & (set(arrays) | set(_RESERVED))
        if clash:
            raise ValueError(f"cache fields {sorted(clash)} clash with array kinds or meta keys")
        allocated = getattr(self, "_allocated", {})
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            meta: dict[str, Any] = {"version": FORMAT_VERSION, "key": self.key}
            for kind, array in arrays.items():
                path = self.array_path(kind)
                tmp, whole = allocated.get(kind, (None, None))
                if tmp is not None and array.shape == whole.shape:
                    crc = _commit_allocated(tmp, whole, path)
                else:
                    crc = _write_with_crc(path, lambda f, a=array: np.save(f, a))
                meta[kind] = {
                    "file": path.name,
                    "shape": list(array.shape),
                    "dtype": str(array.dtype),
                    "crc32": crc,
                }
            meta |= fields
            text = json.dumps(meta).encode("utf-8")
            atomic_write(self.meta_path, lambda f: f.write(text))  # last: it makes the entry valid
        except OSError as exc:
            log.warning(
                "%s: cannot write the decode cache in %s (%s); continuing without it "
                "(data.args.cache_dir or %s can point it at a writable folder)",
                self.label,
                self.folder,
                exc,
                CACHE_ENV,
            )
            return
        finally:
            self.discard()  # the ones not renamed (still mapped: their data lives)
        # Same family but another key: made stale by a change of the files.
        for old in self.folder.glob(f"{self.family}*"):
            if not old.name.startswith(self.stem):
                with contextlib.suppress(OSError):
                    old.unlink()


def _running(pid: int) -> bool:
    """Whether a process ``pid`` exists (this user's or another's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _allocate_npy(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """A new uint8 ``.npy`` file at ``path`` of ``shape``, its space reserved on disk first (a
    full disk is an OSError now, not a SIGBUS while writing through the map), mapped writable."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "|u1", "fortran_order": False, "shape": tuple(shape)}
    )
    offset = len(header.getvalue())
    size = offset + math.prod(shape)
    with open(path, "wb+") as f:
        f.write(header.getvalue())
        if hasattr(os, "posix_fallocate") and size > offset:
            os.posix_fallocate(f.fileno(), 0, size)
        f.truncate(size)
    return np.memmap(path, np.uint8, mode="r+", offset=offset, shape=tuple(shape))


def _commit_allocated(tmp: Path, array: np.ndarray, path: Path) -> int:
    """Flush the filled map of ``tmp`` to disk and rename it to ``path``; its CRC32."""
    if isinstance(array, np.memmap):
        array.flush()
    crc = 0
    with open(tmp, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return crc


class _CrcWriter:
    """A write-only file that passes data on and keeps the CRC32 of all of it."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.crc = 0

    def write(self, data: bytes) -> int:
        self.crc = zlib.crc32(data, self.crc)
        return self.f.write(data)


def _write_with_crc(path: Path, write: Callable[[_CrcWriter], Any]) -> int:
    """Write ``path`` atomically through ``write``; return the CRC32 of what was written."""
    crc = 0

    def through_crc(f: BinaryIO) -> None:
        nonlocal crc
        out = _CrcWriter(f)
        write(out)
        crc = out.crc

    atomic_write(path, through_crc)
    return crc


def _read_npy(path: Path, spec: dict[str, Any]) -> np.ndarray:
    """Read an ``.npy`` file in one pass, after checking its CRC32, shape and dtype against
    ``spec``; raise ValueError (or OSError) when anything differs."""
    with open(path, "rb", buffering=0) as f:
        data = bytearray(os.fstat(f.fileno()).st_size)
        view, got = memoryview(data), 0
        while got < len(data):  # one read() returns at most ~2 GiB on Linux
            n = f.readinto(view[got:])
            if not n:
                raise ValueError(f"{path.name}: shorter than its size")
            got += n
    if zlib.crc32(data) != spec["crc32"]:
        raise ValueError(f"{path.name}: checksum mismatch")
    offset, shape, dtype = _check_header(path, view, spec)
    # Over the bytearray: no copy, and writable, as torch.from_numpy wants.
    return np.frombuffer(data, dtype, math.prod(shape), offset).reshape(shape)


def _map_npy(path: Path, spec: dict[str, Any]) -> np.ndarray:
    """Map an ``.npy`` file read-only, after checking its CRC32, shape and dtype against
    ``spec``; raise ValueError (or OSError) when anything differs.

    The bytes checked are the mapped bytes: a file replaced after the check cannot slip in,
    since the mapping holds the file that was opened."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise ValueError(f"{path.name}: empty")  # mmap refuses empty files
        whole = np.memmap(f, np.uint8, mode="r")
    view = memoryview(whole)
    # Reading every page once for the checksum puts the file in the page cache, where the
    # epochs that follow find it; it is file-backed memory, shared and reclaimable.
    if zlib.crc32(view) != spec["crc32"]:
        raise ValueError(f"{path.name}: checksum mismatch")
    offset, shape, dtype = _check_header(path, view, spec)
    # A view of the map (header skipped): .npy headers pad the data to 64 bytes, so it is aligned.
    return whole[offset:].view(dtype).reshape(shape)


def _check_header(
    path: Path, data: memoryview, spec: dict[str, Any]
) -> tuple[int, tuple[int, ...], np.dtype]:
    """``(data offset, shape, dtype)`` of the ``.npy`` bytes ``data``, checked against ``spec``
    and against the length of ``data``; ValueError when anything differs."""
    header = io.BytesIO(bytes(data[: 1 << 17]))  # .npy headers are far smaller
    version = np.lib.format.read_magic(header)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(header)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(header)
    if list(shape) != list(spec["shape"]) or dtype != np.dtype(spec["dtype"]) or fortran:
        raise ValueError(
            f"{path.name}: holds {dtype} {shape}, expected {spec['dtype']} {spec['shape']}"
        )
    if len(data) - header.tell() != math.prod(shape) * dtype.itemsize:
        raise ValueError(f"{path.name}: truncated or too long")
    return header.tell(), tuple(shape), dtype


def tensor_view(array: np.ndarray) -> torch.Tensor:
    """``array`` as a CPU tensor sharing its memory (a cache array, mapped or not).

    A mapped array is read-only, and torch.from_numpy warns that writing through the tensor
    would be undefined. It is safe here because the engine never writes into a split's inputs
    or targets: IndexLoader gathers each batch by indexing (a copy), subsets index (copies),
    and tasks scale and augment those copies. Writing into the tensor raises no error but
    fails with SIGSEGV-like "bus errors" or is refused by the OS, so do not.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        # np.asarray drops the np.memmap subclass (a view, no copy), which torch does not know.
        return torch.from_numpy(np.asarray(array))
