"""A folder of class sub-folders of images, decoded once into the checksummed array cache.

The layout is the usual one::

    <root>/<class>/<image>          training pool (class names: the sub-folders, sorted)
    <root>/test/<class>/<image>     optional official test split, with the same classes

Any file PIL can open counts as an image (``.png``, ``.jpg``, ``.bmp``, ``.gif``, ``.webp``,
``.tif``...), in a class folder or below it; hidden files and folders are ignored. Every image is
resized (bilinear) to ``size`` and kept as uint8, RGB or grey. The decoded arrays go into
:class:`~dltemplate.data.image_cache.ArrayCache`, keyed by the files' names, sizes and mtimes, the
output size, the colour mode and :data:`DECODE_VERSION`: later loads map the cache read-only
instead of decoding.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from dltemplate.data.base import DataInfo, TensorSplit, check_same_classes
from dltemplate.data.carvana.decode import (
    BAD_IMAGE_ERRORS,
    Allocate,
    strict_truncation,
    worker_count,
)
from dltemplate.data.image_cache import ArrayCache, Cached, CachedImageDataset, tensor_view
from dltemplate.data.samples import SampleSplit
from dltemplate.errors import ConfigError, DataError
from dltemplate.progress import track
from dltemplate.registry import DATASETS

log = logging.getLogger("dltemplate")

DECODE_VERSION = 2  # bump when decoding changes: the cache key changes and old caches are ignored
TEST_FOLDER = "test"
NAMED_IN_WARNING = 3  # bad files named in the skip_bad warning; the rest are counted
# Fixed, not measured: a later evaluation must normalise as training did, even without a cache.
MEAN_STD = 0.5


@functools.cache
def image_suffixes() -> frozenset[str]:
    """File name endings PIL can open (not those it can only write, such as ``.pdf``)."""
    Image.init()
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def convert_image(img: Image.Image, mode: str) -> Image.Image:
    """``img`` in ``mode`` (``"L"`` or ``"RGB"``), as PIL converts it, except 16-bit grey
    (``I;16`` PNG and TIFF; ``I``, as Pillow before 10 opens a 16-bit PNG), which is scaled to
    8 bits: PIL's own conversion clips it at 255, turning nearly every pixel white."""
    if img.mode == "I" or img.mode.startswith("I;16"):
        pixels = np.asarray(img).astype(np.float32) / 257.0  # 65535 -> 255
        img = Image.fromarray(pixels.round().clip(0, 255).astype(np.uint8))
    return img.convert(mode)  # a copy, also in the same mode: it outlives the open file


def decode_image(path: str | Path, size: tuple[int, int], grayscale: bool) -> np.ndarray:
    """One image as uint8 ``[C, h, w]`` (C = 1 grey, 3 RGB), resized bilinearly to ``size =
    (h, w)``; the first frame of an animation; alpha is dropped; 16-bit grey is scaled to 8 bits
    (:func:`convert_image`). DataError names a file that is unreadable, corrupt or truncated."""
    h, w = size
    mode = "L" if grayscale else "RGB"
    with strict_truncation():
        try:
            with Image.open(path) as img:
                img.draft(mode, (w, h))  # JPEG decodes at 1/2, 1/4 or 1/8 scale directly
                img.load()
                picture = convert_image(img, mode)
        except BAD_IMAGE_ERRORS as exc:
            raise DataError(f"{path}: unreadable or corrupt image ({exc})") from exc
    if picture.size != (w, h):
        picture = picture.resize((w, h), Image.BILINEAR)
    pixels = np.asarray(picture)
    return pixels[None].copy() if grayscale else np.ascontiguousarray(pixels.transpose(2, 0, 1))


def check_image(path: str | Path) -> None:
    """Read ``path``'s header (format and size) only: a DataError naming the file when it is
    missing, not an image PIL can read, or too large to decode safely (PIL's decompression-bomb
    limit), so that a bad file among many stops before any is decoded."""
    try:
        with strict_truncation(), Image.open(path):
            pass
    except BAD_IMAGE_ERRORS as exc:
        bomb = isinstance(exc, Image.DecompressionBombError)
        why = f"{type(exc).__name__}: {exc}" if bomb else str(exc)
        raise DataError(f"{path}: not a readable image ({why})") from exc


class Decoded(NamedTuple):
    """The decoded images that could be read, and a message for each that could not."""

    images: np.ndarray  # uint8 [N, C, h, w]
    kept: list[int]  # the index in the file list of each image
    failed: list[str]


def _decode_job(job: tuple[str, tuple[int, int], bool]) -> np.ndarray | str:
    """``decode_image`` for a pool: the array, or the error message (so skip_bad can go on)."""
    try:
        return decode_image(*job)
    except DataError as exc:
        return str(exc)


def decode_all(
    files: list[Path],
    size: tuple[int, int],
    grayscale: bool,
    workers: int,
    keep_going: bool,
    allocate: Allocate | None = None,
) -> Decoded:
    """Decode ``files`` in ``workers`` processes (1: in this one). Without ``keep_going`` the
    first failure ends the decoding. ``allocate`` makes the output array from its shape
    (``{"images": shape}``), e.g. a mapped cache file; default: in memory."""
    channels = 1 if grayscale else 3
    shape = (len(files), channels, *size)
    images = allocate({"images": shape})["images"] if allocate else np.empty(shape, np.uint8)
    kept: list[int] = []
    failed: list[str] = []
    jobs = [(str(path), size, grayscale) for path in files]
    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    try:
        if pool is None:
            results: Iterable = map(_decode_job, jobs)
        else:
            # A few chunks per worker: little pickling overhead, still balanced.
            chunk = max(1, min(64, math.ceil(len(jobs) / (4 * workers))))
            results = pool.map(_decode_job, jobs, chunksize=chunk)
        shown = track(results, len(jobs), f"decoding {len(jobs)} images", "images")
        for i, result in enumerate(shown):
            if isinstance(result, str):
                failed.append(result)
                if not keep_going:
                    break
                continue
            images[len(kept)] = result
            kept.append(i)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)  # after an error, do not decode the rest
    return Decoded(images[: len(kept)], kept, failed)


class Listing(NamedTuple):
    """The image files of a folder of class folders, in order, and the label of each."""

    classes: list[str]
    files: list[Path]
    labels: list[int]


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def scan_classes(folder: Path, skip: Iterable[Path] = (), min_classes: int = 2) -> Listing:
    """The images of each class sub-folder of ``folder`` (name order), leaving out ``skip``.
    DataError when there are fewer than ``min_classes`` classes or a class folder holds no
    image."""
    skipped = {p.resolve() for p in skip}
    try:
        class_dirs = [d for d in _visible_dirs(folder) if d.resolve() not in skipped]
        listing = Listing([d.name for d in class_dirs], [], [])
        suffixes = image_suffixes()
        for label, class_dir in enumerate(class_dirs):
            images = sorted(
                p
                for p in class_dir.rglob("*")
                if p.suffix.lower() in suffixes
                and p.is_file()
                # Hidden names are e.g. macOS "._x.jpg" metadata files, not images.
                and not any(part.startswith(".") for part in p.relative_to(class_dir).parts)
            )
            if not images:
                raise DataError(
                    f"image_folder: class folder {class_dir} holds no images "
                    "(.png, .jpg, .bmp, .gif, .webp, .tif, ...)"
                )
            listing.files.extend(images)
            listing.labels.extend([label] * len(images))
    except OSError as exc:
        raise DataError(f"image_folder: cannot list {folder}: {exc}") from exc
    if len(class_dirs) < min_classes:
        found = f"only the class {class_dirs[0].name!r}" if class_dirs else "no class sub-folders"
        raise DataError(
            f"image_folder: {folder} has {found}; expected <root>/<class>/<image> with at "
            "least two class folders"
        )
    return listing


@DATASETS.register("image_folder")
class ImageFolder(CachedImageDataset):
    """Images in class sub-folders of ``root``, resized to ``size`` (``[height, width]``),
    grey with ``grayscale`` or RGB; ``<root>/test/`` (same classes) is the test split if
    present. ``skip_bad`` skips unreadable images (with one warning) instead of failing.
    ``cache_dir`` (default: a per-user folder outside the data, see
    :func:`~dltemplate.data.image_cache.default_cache_dir`) holds the decoded arrays; ``workers``
    processes decode the first pass (0: up to 4, one per CPU; 1: in this process).
    ``mode``: ``cache`` (decode once into the cache, mapped) or ``files`` (decode every epoch,
    in the loader's ``data.num_workers`` workers; no cache is written). Mean and std are 0.5
    per channel (fixed; see :data:`MEAN_STD`)."""

    label = "image_folder"

    def __init__(
        self,
        root: str = "",
        download: bool = True,
        size: list[int] | None = None,
        grayscale: bool = False,
        skip_bad: bool = False,
        cache_dir: str | None = None,
        workers: int = 0,
        mode: str = "cache",
    ) -> None:
        super().__init__(root, download, skip_bad, cache_dir, workers, mode)
        size = [64, 64] if size is None else size
        if (
            not isinstance(size, (list, tuple))
            or len(size) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)
        ):
            raise ConfigError(
                f"image_folder: size={size!r}: must be [height, width], both positive"
            )
        if not isinstance(grayscale, bool):
            raise ConfigError(f"image_folder: grayscale={grayscale!r}: must be true or false")
        self.size = (int(size[0]), int(size[1]))
        self.grayscale = grayscale

    @property
    def channels(self) -> int:
        """1 for grey images, 3 for RGB."""
        return 1 if self.grayscale else 3

    def scan(self) -> tuple[Listing, Listing | None]:
        """The training pool's files and the test split's (None without ``<root>/test/``)."""
        if not self.root_path.is_dir():
            raise DataError(
                f"image_folder: missing folder {self.root_path}; expected "
                "<root>/<class>/<image> (and optionally <root>/test/<class>/<image>)"
            )
        test_dir = self.root_path / TEST_FOLDER
        # A cache folder inside root must not be mistaken for a class.
        train = scan_classes(self.root_path, skip=(test_dir, self.cache_dir))
        if not test_dir.is_dir():
            return train, None
        try:
            test_classes = [d.name for d in _visible_dirs(test_dir)]
        except OSError as exc:
            raise DataError(f"image_folder: cannot list {test_dir}: {exc}") from exc
        # Compared before the test images are listed: a stray folder is named as such.
        check_same_classes(train.classes, test_classes, f"image_folder: {test_dir}")
        return train, scan_classes(test_dir, min_classes=0)

    def describe(self) -> DataInfo:
        """Shapes and class names from the folder names; decodes nothing."""
        train, _ = self.scan()
        return DataInfo(
            input_shape=(self.channels, *self.size),
            num_classes=len(train.classes),
            class_names=train.classes,
            mean=(MEAN_STD,) * self.channels,
            std=(MEAN_STD,) * self.channels,
        )

    def load(self) -> tuple[TensorSplit | SampleSplit, TensorSplit | SampleSplit | None]:
        """Images uint8 ``[N, C, h, w]`` and labels int64, in folder and name order; the test
        split is ``<root>/test/`` or None (one is then carved out by seed). ``mode: files``
        returns :class:`~dltemplate.data.samples.SampleSplit` s that decode when read."""
        train, test = self.scan()
        if self.mode == "files":
            return self._file_split(train), None if test is None else self._file_split(test)
        files = train.files + (test.files if test else [])
        labels = np.array(train.labels + (test.labels if test else []), np.int64)
        cache = self._cache(files)
        decoded = self._read_cache(cache, len(files))
        cold = decoded is None
        try:
            if decoded is None:
                decoded = self._decode(files, cache)
            if decoded.failed and not self.skip_bad:  # from the cache too: as decoding would say
                raise DataError(f"{decoded.failed[0]}; skip_bad=True skips such files")
            if cold:  # with skip_bad, failures are cached with the arrays
                cache.write(
                    {"images": decoded.images}, {"kept": decoded.kept, "failed": decoded.failed}
                )
        finally:
            cache.discard()  # a bad file or Ctrl-C in the cold pass leaves no temporary file
        self._warn_skipped(decoded.failed, len(files))
        kept = np.array(decoded.kept, np.int64)
        n_train = int(np.searchsorted(kept, len(train.files)))  # kept is in file order
        if n_train == 0:
            raise DataError(f"image_folder: no readable image in {self.root_path}")
        # Slices of the (mapped) array: views, not copies.
        images = tensor_view(decoded.images)
        targets = torch.from_numpy(labels[kept])
        names = [files[i].relative_to(self.root_path).as_posix() for i in decoded.kept]

        def split(part: slice) -> TensorSplit:
            return TensorSplit(images[part], targets[part], None, names[part])

        pool = split(slice(0, n_train))
        return pool, split(slice(n_train, None)) if test is not None else None

    def _file_split(self, listing: Listing) -> SampleSplit:
        """``listing``'s images, decoded when read (``mode: files``). With ``skip_bad``, files
        whose header PIL cannot read are left out first (one warning); a file that fails
        later, while it is decoded, stops the run naming it."""
        files, labels = listing.files, listing.labels
        if self.skip_bad:
            failed, keep = [], []
            for i, path in enumerate(files):
                try:
                    with strict_truncation(), Image.open(path):
                        keep.append(i)
                except BAD_IMAGE_ERRORS as exc:
                    failed.append(f"{path}: unreadable or corrupt image ({exc})")
            self._warn_skipped(failed, len(files))
            files, labels = [files[i] for i in keep], [labels[i] for i in keep]
            if not files:
                raise DataError(f"image_folder: no readable image in {self.root_path}")
        names = [path.relative_to(self.root_path).as_posix() for path in files]
        images = ImageFiles(files, labels, self.size, self.grayscale)
        return SampleSplit(images, names=names, label="image_folder")

    def _cache(self, files: list[Path]) -> ArrayCache:
        """The cache entry of ``files`` decoded to this size and colour mode."""
        try:
            stamps = [
                [path.relative_to(self.root_path).as_posix(), st.st_size, st.st_mtime_ns]
                for path in files
                for st in (path.stat(),)
            ]
        except OSError as exc:
            raise DataError(f"image_folder: cannot read {exc.filename}: {exc.strerror}") from exc
        blob = json.dumps(
            {
                "version": DECODE_VERSION,
                "root": self.root_identity,
                "size": self.size,
                "grayscale": self.grayscale,
                "files": stamps,
            }
        )
        key = hashlib.sha256(blob.encode()).hexdigest()
        # One family per size and mode: they coexist, and a change of the files replaces one.
        mode = "L" if self.grayscale else "RGB"
        family = f"imagefolder-{mode}-{self.size[0]}x{self.size[1]}-"
        return ArrayCache(self.cache_dir, family, key, label="image_folder")

    def _read_cache(self, cache: ArrayCache, n_files: int) -> Decoded | None:
        """The cached decoding (mapped read-only), or None when there is none that fits."""
        shape = (self.channels, *self.size)

        def fits(cached: Cached) -> None:
            kept, failed = cached.fields["kept"], cached.fields["failed"]
            if not isinstance(kept, list) or not isinstance(failed, list):
                raise ValueError("its kept indices or failures are not lists")
            if kept != sorted(set(kept)) or (kept and not 0 <= kept[0] <= kept[-1] < n_files):
                raise ValueError("its kept indices do not fit the files")
            images = cached.arrays["images"]
            if images.shape != (len(kept), *shape):
                raise ValueError(f"images of shape {images.shape}")

        # Always mapped: the arrays stay in the page cache, shared by the processes of a node.
        cached = cache.read(("images",), check=fits, mmap=True)
        if cached is None:
            return None
        fields = cached.fields
        return Decoded(cached.arrays["images"], fields["kept"], fields["failed"])

    def _decode(self, files: list[Path], cache: ArrayCache) -> Decoded:
        """Decode every file, in worker processes when ``workers`` allows more than one,
        straight into the cache's file (mapped: the cold pass holds no private copy)."""
        workers = worker_count(self.workers, len(files))
        log.info(
            "image_folder: decoding %d images to %dx%d (H x W) in %d process(es); "
            "later loads read the cache in %s",
            len(files),
            *self.size,
            workers,
            self.cache_dir,
        )
        return decode_all(
            files,
            self.size,
            self.grayscale,
            workers,
            keep_going=self.skip_bad,
            allocate=cache.allocate,
        )

    @staticmethod
    def _warn_skipped(failed: list[str], total: int) -> None:
        """One warning for all skipped images, naming the first few."""
        if not failed:
            return
        more = len(failed) - NAMED_IN_WARNING
        log.warning(
            "image_folder: skipped %d of %d images (skip_bad=True): %s%s",
            len(failed),
            total,
            "; ".join(failed[:NAMED_IN_WARNING]),
            f"; and {more} more" if more > 0 else "",
        )


class ImageFiles(Dataset):
    """Image files decoded one at a time (``mode: files``): sample i is ``files[i]`` as uint8
    ``[C, h, w]`` and its label."""

    def __init__(
        self, files: list[Path], labels: list[int], size: tuple[int, int], grayscale: bool
    ) -> None:
        self.files = [str(path) for path in files]
        self.labels = labels
        self.size, self.grayscale = size, grayscale

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = decode_image(self.files[i], self.size, self.grayscale)
        return torch.from_numpy(image), self.labels[i]
