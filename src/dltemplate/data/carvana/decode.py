"""Decoding Carvana's photos and masks into resized uint8 arrays, one pair or all of them.

Decoding thousands of large JPEGs and GIFs is slow, so the first (cold) pass over a dataset
decodes in worker processes; later passes read the decode cache instead.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, ImageFile

from dltemplate.data.carvana.layout import Pair
from dltemplate.errors import DataError
from dltemplate.progress import track

PIL_ERRORS = (OSError, SyntaxError, ValueError, EOFError)  # what PIL raises on a corrupt file
# Errors of a bad file: PIL's, and its refusal of images too large to be safe to decode.
BAD_IMAGE_ERRORS = (*PIL_ERRORS, Image.DecompressionBombError)
MAX_AUTO_WORKERS = 4  # workers=0 uses up to this many processes, one per CPU

DecodeFn = Callable[[str | Path, str | Path, tuple[int, int]], tuple[np.ndarray, np.ndarray]]
Allocate = Callable[[dict[str, tuple[int, ...]]], dict[str, np.ndarray]]


@contextlib.contextmanager
def strict_truncation() -> Iterator[None]:
    """Make PIL raise on truncated files even where other code set LOAD_TRUNCATED_IMAGES."""
    # With the flag on, PIL pads a truncated image with grey and reports nothing.
    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved


def image_size(path: Path) -> tuple[int, int]:
    """``(height, width)`` of an image, from its header alone; BAD_IMAGE_ERRORS when unreadable
    (or too large to decode safely)."""
    with Image.open(path) as img:
        width, height = img.size
    return height, width


def decode_pair(
    image_path: str | Path, mask_path: str | Path, size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Decode one photo and its mask, resized to ``size = (height, width)``.

    Returns the image as uint8 ``[3, h, w]`` (bilinear) and the mask as uint8 ``[1, h, w]``
    holding 0 and 1 (nearest; any value above 0 is car). Raises DataError naming the file when
    either is unreadable, corrupt or truncated, or when the mask's size differs from the image's.
    """
    h, w = size
    with strict_truncation():
        try:
            with Image.open(image_path) as img:
                original = img.size
                # JPEG can decode at 1/2, 1/4 or 1/8 scale directly: far faster than full size.
                img.draft("RGB", (w, h))
                img.load()
                rgb = img.convert("RGB")
        except BAD_IMAGE_ERRORS as exc:
            raise DataError(f"{image_path}: unreadable or corrupt image ({exc})") from exc
        try:
            with Image.open(mask_path) as m:
                m.load()
                # Palette indices (P) are the labels themselves; other modes go through grey.
                mask = np.asarray(m if m.mode in ("P", "L") else m.convert("L"))
        except BAD_IMAGE_ERRORS as exc:
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


class Decoded(NamedTuple):
    """The arrays of every usable pair, their image names, and why the others were dropped."""

    images: np.ndarray  # uint8 [N, 3, h, w]
    masks: np.ndarray  # uint8 [N, 1, h, w], 0/1
    names: list[str]  # image stems, e.g. "0cdf5b5d0ce1_01"
    failed: list[str]  # one message per pair that could not be decoded


def worker_count(requested: int, jobs: int) -> int:
    """The processes to decode ``jobs`` pairs with: ``requested``, or for 0 one per CPU up to
    MAX_AUTO_WORKERS; never more than there are jobs."""
    return min(requested or min(MAX_AUTO_WORKERS, os.cpu_count() or 1), jobs)


def _decode_job(
    decode: DecodeFn, job: tuple[str, str, tuple[int, int]]
) -> tuple[Any, Any, str | None]:
    """``decode`` for a pool: ``(image, mask, None)``, or ``(None, None, error message)``."""
    # Errors come back as values so that skip_bad can go on after one.
    try:
        return (*decode(*job), None)
    except DataError as exc:
        return None, None, str(exc)


def decode_all(
    pairs: list[Pair],
    size: tuple[int, int],
    workers: int,
    keep_going: bool,
    decode: DecodeFn = decode_pair,
    allocate: Allocate | None = None,
) -> Decoded:
    """Decode every pair with ``decode`` (``decode_pair``) in ``workers`` processes (1: in this
    one). A pair that fails is listed in ``failed``; without ``keep_going`` the first failure
    ends the decoding, and the result holds what was decoded before it.

    ``allocate`` makes the output arrays from their shapes (``{"images": ..., "masks": ...}``),
    e.g. mapped cache files (``ArrayCache.allocate``); default: in memory."""
    n, (h, w) = len(pairs), size
    shapes = {"images": (n, 3, h, w), "masks": (n, 1, h, w)}
    out = allocate(shapes) if allocate else {k: np.empty(v, np.uint8) for k, v in shapes.items()}
    images, masks = out["images"], out["masks"]
    names: list[str] = []
    failed: list[str] = []
    jobs = [(str(image), str(mask), size) for image, mask in pairs]
    job = functools.partial(_decode_job, decode)
    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    try:
        if pool is None:
            results: Iterable = map(job, jobs)
        else:
            # A few chunks per worker: little pickling overhead, still balanced.
            chunk = max(1, min(64, math.ceil(n / (4 * workers))))
            results = pool.map(job, jobs, chunksize=chunk)
        shown = track(results, n, f"decoding {n} image/mask pairs", "pairs")
        for (image, _), (img, mask, error) in zip(pairs, shown):
            if error is not None:
                failed.append(error)
                if not keep_going:
                    break
                continue
            images[len(names)], masks[len(names)] = img, mask
            names.append(image.stem)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)  # after an error, do not decode the rest
    k = len(names)
    return Decoded(images[:k], masks[:k], names, failed)
