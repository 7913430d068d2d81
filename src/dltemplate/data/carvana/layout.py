"""Where Carvana's files are and which photo goes with which mask.

The folder layout is the one Kaggle's zips unpack to::

    <root>/train/<carid>_<NN>.jpg             (1918x1280 photos; <root>/train_hq/ with hq=True)
    <root>/train_masks/<carid>_<NN>_mask.gif  (palette masks: 0 background, 1 car)

Every car is photographed from 16 angles (NN = 01..16), so the car id is each sample's group.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from dltemplate.errors import DataError

log = logging.getLogger("dltemplate")

IMAGE_SUFFIXES = (".jpg", ".jpeg")
NAMED_IN_WARNING = 3  # bad files named in the skip_bad warning; the rest are counted

Pair = tuple[Path, Path]  # (photo, its mask)


def car_id(name: str) -> str:
    """The car of an image name: ``"0cdf5b5d0ce1_01"`` -> ``"0cdf5b5d0ce1"``."""
    return name.rsplit("_", 1)[0]


@dataclass(frozen=True)
class CarvanaLayout:
    """Carvana's folders under ``root``: ``train/`` (``train_hq/`` with ``hq``) and
    ``train_masks/``. With ``skip_bad`` a bad pair is reported and skipped, otherwise it raises
    DataError; ``download`` only changes what the missing-data message says."""

    root: Path
    hq: bool = False
    skip_bad: bool = False
    download: bool = True

    @property
    def image_dir(self) -> Path:
        """The photos' folder."""
        return self.root / ("train_hq" if self.hq else "train")

    @property
    def mask_dir(self) -> Path:
        """The masks' folder."""
        return self.root / "train_masks"

    def scan(self) -> tuple[list[Pair], list[str]]:
        """``(image, mask)`` pairs in name order, and a message per image without a mask
        (only with skip_bad; otherwise the first such image raises DataError)."""
        for folder in (self.image_dir, self.mask_dir):
            if not folder.is_dir():
                self.raise_missing(folder)
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
            self.raise_missing(self.image_dir, f"no .jpg images in {self.image_dir}")
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
            raise DataError(self.with_hint(f"Carvana: {orphans[0]}{more}"))
        return pairs, orphans

    def file_stamps(self, pairs: list[Pair]) -> list[list[str | int]]:
        """``[path relative to root, size, mtime in ns]`` of every file of ``pairs``, in order:
        what tells a cache that the files changed."""
        stamps: list[list[str | int]] = []
        try:
            for path in (p for pair in pairs for p in pair):
                st = path.stat()
                rel = path.relative_to(self.root).as_posix()
                stamps.append([rel, st.st_size, st.st_mtime_ns])
        except OSError as exc:
            raise DataError(f"Carvana: cannot read {exc.filename}: {exc.strerror}") from exc
        return stamps

    def raise_missing(self, folder: Path, what: str = "") -> NoReturn:
        """Raise DataError for missing data, saying where to get it and where to put it."""
        zips = "train_hq.zip" if self.hq else "train.zip"
        why = " Carvana cannot be downloaded automatically (Kaggle needs a login)."
        raise DataError(
            f"Carvana: {what or f'missing folder {folder}'}.{why if self.download else ''} "
            "Download the data from Kaggle's 'carvana-image-masking-challenge' "
            "(https://www.kaggle.com/c/carvana-image-masking-challenge/data) and unzip "
            f"{zips} and train_masks.zip into {self.root.resolve()}, or run "
            f"`dltemplate make-sample-data carvana {self.root}` for a synthetic sample."
        )

    def with_hint(self, message: str) -> str:
        """``message``, telling how to go on when skip_bad is off."""
        return f"{message}; skip_bad=True skips such pairs" if not self.skip_bad else message

    def warn_skipped(self, skipped: list[str], total: int) -> None:
        """One warning for all skipped pairs of ``total``, naming the first few."""
        if not skipped:
            return
        named = "; ".join(skipped[:NAMED_IN_WARNING])
        more = len(skipped) - NAMED_IN_WARNING
        log.warning(
            "Carvana: skipped %d of %d image/mask pairs (skip_bad=True): %s%s",
            len(skipped),
            total,
            named,
            f"; and {more} more" if more > 0 else "",
        )
