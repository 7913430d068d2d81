"""Kaggle's Carvana Image Masking Challenge: car photos and their binary masks, for segmentation.

The folder layout is the one Kaggle's zips unpack to::

    <root>/train/<carid>_<NN>.jpg             (1918x1280 photos; <root>/train_hq/ with hq=True)
    <root>/train_masks/<carid>_<NN>_mask.gif  (palette masks: 0 background, 1 car)

Every car is photographed from 16 angles (NN = 01..16), so the car id is each sample's group:
a car's views never fall into two of train, validation and test.

Decoding thousands of large JPEGs and GIFs is slow, so it is paid once: the resized arrays are
saved as ``.npy`` files under ``cache_dir``, keyed by the files' names, sizes and mtimes and by the
output size, and checked against a CRC32 before they are trusted. The first (cold) pass decodes
in worker processes.
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
import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple, NoReturn

import numpy as np
import torch
from PIL import Image, ImageFile

from dltemplate.data.base import DataInfo, InMemoryDataset, TensorSplit
from dltemplate.errors import ConfigError, DataError
from dltemplate.registry import DATASETS

log = logging.getLogger("dltemplate")

CACHE_VERSION = 1  # bump when decoding or the cache layout changes: old caches are then ignored
IMAGE_SUFFIXES = (".jpg", ".jpeg")
# ImageNet statistics: fixed, so training and a later evaluation normalise alike even when
# one of them has no cache (per-dataset means would need a full decode before describe()).
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
NAMED_IN_WARNING = 3  # bad files named in the skip_bad warning; the rest are counted
PIL_ERRORS = (OSError, SyntaxError, ValueError, EOFError)  # what PIL raises on a corrupt file


def car_id(name: str) -> str:
    """The car of an image name: ``"0cdf5b5d0ce1_01"`` -> ``"0cdf5b5d0ce1"``."""
    return name.rsplit("_", 1)[0]


@contextlib.contextmanager
def _strict_truncation() -> Iterator[None]:
    """Make PIL raise on truncated files even where other code set LOAD_TRUNCATED_IMAGES."""
    # With the flag on, PIL pads a truncated image with grey and reports nothing.
    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved


def decode_pair(
    image_path: str | Path, mask_path: str | Path, size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Decode one photo and its mask, resized to ``size = (height, width)``.

    Returns the image as uint8 ``[3, h, w]`` (bilinear) and the mask as uint8 ``[1, h, w]``
    holding 0 and 1 (nearest; any value above 0 is car). Raises DataError naming the file when
    either is unreadable, corrupt or truncated, or when the mask's size differs from the image's.
    """
    h, w = size
    with _strict_truncation():
        try:
            with Image.open(image_path) as img:
                original = img.size
                # JPEG can decode at 1/2, 1/4 or 1/8 scale directly: far faster than full size.
                img.draft("RGB", (w, h))
                img.load()
                rgb = img.convert("RGB")
        except PIL_ERRORS as exc:
            raise DataError(f"{image_path}: unreadable or corrupt image ({exc})") from exc
        try:
            with Image.open(mask_path) as m:
                m.load()
                # Palette indices (P) are the labels themselves; other modes go through grey.
                mask = np.asarray(m if m.mode in ("P", "L") else m.convert("L"))
        except PIL_ERRORS as exc:
            raise DataError(f"{mask_path}: unreadable or corrupt mask ({exc})") from exc
    mask_size = (mask.shape[1], mask.shape[0])
    if mask_size != original:
        raise DataError(
            f"{mask_path}: mask is {mask_size[0]}x{mask_size[1]} (W x H) but its image "
            f"{image_path} is {original[0]}x{original[1]}"
        )
    if rgb.size != (w, h):
        rgb = rgb.resize((w, h), Image.BILINEAR)
    binary = Image.fromarray((mask > 0).astype(np.uint8))
    if binary.size != (w, h):
        binary = binary.resize((w, h), Image.NEAREST)
    image = np.ascontiguousarray(np.asarray(rgb).transpose(2, 0, 1))  # HWC -> CHW
    return image, np.asarray(binary)[None].copy()


def _decode_job(job: tuple[str, str, tuple[int, int]]) -> tuple[Any, Any, str | None]:
    """``decode_pair`` for a pool: ``(image, mask, None)``, or ``(None, None, error message)``."""
    # Errors come back as values so that skip_bad can go on after one.
    try:
        return (*decode_pair(*job), None)
    except DataError as exc:
        return None, None, str(exc)


class Decoded(NamedTuple):
    """The arrays of every usable pair, their image names, and why the others were dropped."""

    images: np.ndarray  # uint8 [N, 3, h, w]
    masks: np.ndarray  # uint8 [N, 1, h, w], 0/1
    names: list[str]  # image stems, e.g. "0cdf5b5d0ce1_01"
    failed: list[str]  # one message per pair that could not be decoded


@DATASETS.register("Carvana")
class Carvana(InMemoryDataset):
    """Carvana car photos with binary car masks (class 1 = car), read from ``root``.

    ``scale`` resizes by a factor of the first image's size (``None``: keep it); ``size``
    (``[height, width]``) wins over it. ``hq`` reads ``train_hq/``. ``skip_bad`` skips pairs that
    are missing, corrupt or mismatched (with one warning) instead of failing. ``cache_dir``
    (default ``<root>/.dltemplate_cache``) holds the decoded arrays; ``workers`` processes
    decode the first pass (0: up to 4, one per CPU; 1: in this process).
    """

    def __init__(
        self,
        root: str = "",
        download: bool = True,
        scale: float | None = 0.125,
        size: list[int] | None = None,
        hq: bool = False,
        skip_bad: bool = False,
        cache_dir: str | None = None,
        workers: int = 0,
    ) -> None:
        super().__init__(root, download)
        if scale is not None and not (isinstance(scale, (int, float)) and scale > 0):
            raise ConfigError(f"Carvana: scale={scale!r}: must be a positive number or null")
        if size is not None and (
            not isinstance(size, (list, tuple))
            or len(size) != 2
            or not all(isinstance(s, int) and s > 0 for s in size)
        ):
            raise ConfigError(f"Carvana: size={size!r}: must be [height, width], both positive")
        if not isinstance(workers, int) or workers < 0:
            raise ConfigError(f"Carvana: workers={workers!r}: must be 0 (automatic) or more")
        self.scale = scale
        self.size = None if size is None else (int(size[0]), int(size[1]))
        self.hq = hq
        self.skip_bad = skip_bad
        self.workers = workers
        self.root_path = Path(root or ".")
        self.cache_dir = Path(cache_dir) if cache_dir else self.root_path / ".dltemplate_cache"
        self.image_dir = self.root_path / ("train_hq" if hq else "train")
        self.mask_dir = self.root_path / "train_masks"

    # -- public ------------------------------------------------------------------------------
    def describe(self) -> DataInfo:
        """Shapes and class names; reads the file names and one image header, decodes nothing."""
        pairs, _ = self._scan()
        h, w = self._output_size(pairs)
        return DataInfo(
            input_shape=(3, h, w),
            num_classes=1,
            class_names=["background", "car"],
            mean=MEAN,
            std=STD,
        )

    def load(self) -> tuple[TensorSplit, TensorSplit | None]:
        """Every pair in name order: images uint8 ``[N, 3, h, w]``, masks uint8 ``[N, 1, h, w]``
        (0/1), grouped by car id. There is no official test split (Kaggle's has no masks)."""
        pairs, orphans = self._scan()
        if (self.root_path / "SYNTHETIC_README.txt").exists():  # say so wherever it is used
            log.info("%s is SYNTHETIC sample data (make-sample-data), not Kaggle's", self.root_path)
        size = self._output_size(pairs)
        cache = DecodeCache(self.cache_dir, self._cache_key(pairs, size), size, self.hq)
        decoded = cache.read()
        if decoded is None:
            decoded = self._decode_all(pairs, size)
            cache.write(decoded)
        elif decoded.failed and not self.skip_bad:  # as the decoding would have said
            raise DataError(self._with_hint(decoded.failed[0]))
        skipped = orphans + decoded.failed
        if skipped:
            named = "; ".join(skipped[:NAMED_IN_WARNING])
            more = len(skipped) - NAMED_IN_WARNING
            log.warning(
                "Carvana: skipped %d of %d image/mask pairs (skip_bad=True): %s%s",
                len(skipped),
                len(pairs) + len(orphans),
                named,
                f"; and {more} more" if more > 0 else "",
            )
        if not decoded.names:
            raise DataError(f"Carvana: no usable image/mask pair in {self.image_dir}")
        split = TensorSplit(
            torch.from_numpy(decoded.images),
            torch.from_numpy(decoded.masks),
            [car_id(name) for name in decoded.names],
        )
        return split, None

    # -- files -------------------------------------------------------------------------------
    def _scan(self) -> tuple[list[tuple[Path, Path]], list[str]]:
        """``(image, mask)`` pairs in name order, and a message per image without a mask
        (only with skip_bad; otherwise the first such image raises DataError)."""
        for folder in (self.image_dir, self.mask_dir):
            if not folder.is_dir():
                self._raise_missing(folder)
        try:
            images = sorted(
                p
                for p in self.image_dir.iterdir()
                # Hidden names are macOS "._x.jpg" metadata files, not photos.
                if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
            )
            mask_names = {p.name for p in self.mask_dir.iterdir()}
        except OSError as exc:
            folders = f"{self.image_dir} or {self.mask_dir}"
            raise DataError(f"Carvana: cannot list {folders}: {exc}") from exc
        if not images:
            self._raise_missing(self.image_dir, f"no .jpg images in {self.image_dir}")
        pairs, orphans = [], []
        for image in images:
            mask = self.mask_dir / f"{image.stem}_mask.gif"
            if mask.name in mask_names:
                pairs.append((image, mask))
            else:
                orphans.append(f"{image}: no mask (expected {mask})")
        if orphans and not self.skip_bad:
            more = (
                f" (and {len(orphans) - 1} more images without a mask)" if len(orphans) > 1 else ""
            )
            raise DataError(self._with_hint(f"Carvana: {orphans[0]}{more}"))
        return pairs, orphans

    def _raise_missing(self, folder: Path, what: str = "") -> NoReturn:
        zips = "train_hq.zip" if self.hq else "train.zip"
        why = " Carvana cannot be downloaded automatically (Kaggle needs a login)."
        raise DataError(
            f"Carvana: {what or f'missing folder {folder}'}.{why if self.download else ''} "
            "Download the data from Kaggle's 'carvana-image-masking-challenge' "
            "(https://www.kaggle.com/c/carvana-image-masking-challenge/data) and unzip "
            f"{zips} and train_masks.zip into {self.root_path.resolve()}, or run "
            f"`dltemplate make-sample-data carvana {self.root_path}` for a synthetic sample."
        )

    def _with_hint(self, message: str) -> str:
        return f"{message}; skip_bad=True skips such pairs" if not self.skip_bad else message

    def _output_size(self, pairs: list[tuple[Path, Path]]) -> tuple[int, int]:
        """``size``, or the first readable image's size times ``scale``, as (height, width)."""
        if self.size is not None:
            return self.size
        for image, _ in pairs:
            try:
                with Image.open(image) as img:  # reads the header only
                    width, height = img.size
            except PIL_ERRORS as exc:
                if self.skip_bad:
                    continue  # load() reports it with the other bad pairs
                message = f"{image}: unreadable or corrupt image ({exc})"
                raise DataError(self._with_hint(message)) from exc
            if self.scale is None:
                return height, width
            return max(1, round(height * self.scale)), max(1, round(width * self.scale))
        raise DataError(f"Carvana: no readable image with a mask in {self.image_dir}")

    def _cache_key(self, pairs: list[tuple[Path, Path]], size: tuple[int, int]) -> str:
        """A hash of everything the decoded arrays depend on."""
        files = []
        try:
            for path in (p for pair in pairs for p in pair):
                st = path.stat()
                rel = path.relative_to(self.root_path).as_posix()
                files.append([rel, st.st_size, st.st_mtime_ns])
        except OSError as exc:
            raise DataError(f"Carvana: cannot read {exc.filename}: {exc.strerror}") from exc
        blob = json.dumps({"version": CACHE_VERSION, "size": size, "hq": self.hq, "files": files})
        return hashlib.sha256(blob.encode()).hexdigest()

    # -- decoding ----------------------------------------------------------------------------
    def _decode_all(self, pairs: list[tuple[Path, Path]], size: tuple[int, int]) -> Decoded:
        """Decode every pair, in worker processes when ``workers`` allows more than one."""
        n, (h, w) = len(pairs), size
        images = np.empty((n, 3, h, w), np.uint8)
        masks = np.empty((n, 1, h, w), np.uint8)
        names: list[str] = []
        failed: list[str] = []
        workers = min(self.workers or min(4, os.cpu_count() or 1), n)
        jobs = [(str(image), str(mask), size) for image, mask in pairs]
        log.info(
            "Carvana: decoding %d image/mask pairs to %dx%d (H x W) in %d process(es); "
            "later loads read the cache in %s",
            n,
            h,
            w,
            workers,
            self.cache_dir,
        )
        pool = ProcessPoolExecutor(workers) if workers > 1 else None
        try:
            if pool is None:
                results: Iterable = map(_decode_job, jobs)
            else:
                # A few chunks per worker: little pickling overhead, still balanced.
                chunk = max(1, min(64, math.ceil(n / (4 * workers))))
                results = pool.map(_decode_job, jobs, chunksize=chunk)
            for (image, _), (img, mask, error) in zip(pairs, results):
                if error is not None:
                    if not self.skip_bad:
                        raise DataError(self._with_hint(error))
                    failed.append(error)
                    continue
                images[len(names)], masks[len(names)] = img, mask
                names.append(image.stem)
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)  # after an error, do not decode the rest
        k = len(names)
        return Decoded(images[:k], masks[:k], names, failed)


class DecodeCache:
    """The decoded arrays of one dataset state, as ``.npy`` files and a JSON meta in ``folder``.

    Files are named by the output size, ``hq`` and the key, so different sizes coexist while a
    cache made stale by a change of the files is replaced. Every file is written to a temporary
    name and renamed, the meta last; the meta holds each array's shape, dtype and CRC32, which
    :meth:`read` checks, so a half-written or damaged cache is rebuilt, never trusted.
    """

    def __init__(self, folder: Path, key: str, size: tuple[int, int], hq: bool) -> None:
        self.folder = folder
        self.key = key
        self.size = size
        self.family = f"carvana-{'hq' if hq else 'std'}-{size[0]}x{size[1]}-"
        self.stem = self.family + key[:16]
        self.meta_path = folder / f"{self.stem}.json"

    def array_path(self, kind: str) -> Path:
        """The ``.npy`` file of ``kind`` ("images" or "masks")."""
        return self.folder / f"{self.stem}.{kind}.npy"

    def read(self) -> Decoded | None:
        """The cached arrays, or None when there is no cache or it is corrupt (with a warning)."""
        if not self.meta_path.is_file():
            return None
        try:
            meta = json.loads(self.meta_path.read_text(encoding="utf-8"))
            if meta.get("version") != CACHE_VERSION or meta.get("key") != self.key:
                raise ValueError("its meta is not for this key")
            # The names are fixed by the key: a path read from the meta is never followed.
            images = _read_npy(self.array_path("images"), meta["images"])
            masks = _read_npy(self.array_path("masks"), meta["masks"])
            names, failed = list(meta["names"]), list(meta["failed"])
            h, w = self.size
            if images.shape != (len(names), 3, h, w) or masks.shape != (len(names), 1, h, w):
                raise ValueError(f"arrays of shapes {images.shape} and {masks.shape}")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("Carvana: cache %s is corrupt (%s); rebuilding it", self.meta_path, exc)
            return None
        return Decoded(images, masks, names, failed)

    def write(self, decoded: Decoded) -> None:
        """Save ``decoded``; an unwritable folder only logs a warning."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            meta: dict[str, Any] = {"version": CACHE_VERSION, "key": self.key}
            for kind, array in (("images", decoded.images), ("masks", decoded.masks)):
                path = self.array_path(kind)
                crc = _atomic_write(path, lambda f, a=array: np.save(f, a))
                meta[kind] = {
                    "file": path.name,
                    "shape": list(array.shape),
                    "dtype": str(array.dtype),
                    "crc32": crc,
                }
            meta |= {"names": decoded.names, "failed": decoded.failed}
            text = json.dumps(meta).encode("utf-8")
            _atomic_write(self.meta_path, lambda f: f.write(text))  # last: it makes the cache valid
        except OSError as exc:
            log.warning(
                "Carvana: cannot write the decode cache in %s (%s); continuing without it",
                self.folder,
                exc,
            )
            return
        # Same size and flavour but another key: made stale by a change of the files.
        for old in self.folder.glob(f"{self.family}*"):
            if not old.name.startswith(self.stem):
                with contextlib.suppress(OSError):
                    old.unlink()


class _CrcWriter:
    """A write-only file that passes data on and keeps the CRC32 of all of it."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.crc = 0

    def write(self, data: bytes) -> int:
        self.crc = zlib.crc32(data, self.crc)
        return self.f.write(data)


def _atomic_write(path: Path, write: Callable[[_CrcWriter], Any]) -> int:
    """Write ``path`` through ``write`` into a temporary file, then rename; return the CRC32."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            out = _CrcWriter(f)
            write(out)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return out.crc


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
    header = io.BytesIO(bytes(view[: 1 << 17]))  # .npy headers are far smaller
    version = np.lib.format.read_magic(header)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(header)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(header)
    if list(shape) != list(spec["shape"]) or dtype != np.dtype(spec["dtype"]) or fortran:
        raise ValueError(
            f"{path.name}: holds {dtype} {shape}, expected {spec['dtype']} {spec['shape']}"
        )
    count = math.prod(shape)
    if len(data) - header.tell() != count * dtype.itemsize:
        raise ValueError(f"{path.name}: truncated or too long")
    # Over the bytearray: no copy, and writable, as torch.from_numpy wants.
    return np.frombuffer(data, dtype, count, header.tell()).reshape(shape)
