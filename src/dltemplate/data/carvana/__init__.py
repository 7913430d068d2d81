"""Kaggle's Carvana Image Masking Challenge: car photos and their binary masks, for segmentation.

The dataset class here composes three parts, each in its own module:

- :mod:`~dltemplate.data.carvana.layout`: where the files are and which photo goes with which
  mask (``<root>/train/<carid>_<NN>.jpg`` and ``<root>/train_masks/<carid>_<NN>_mask.gif``);
- :mod:`~dltemplate.data.carvana.decode`: decoding and resizing a pair, and the parallel cold pass;
- :mod:`dltemplate.data.image_cache`: the checksummed ``.npy`` cache of the decoded arrays, keyed
  by the files' names, sizes and mtimes and by the output size, so decoding is paid once.

Every car is photographed from 16 angles, so the car id is each sample's group: a car's views
never fall into two of train, validation and test.
"""

from __future__ import annotations

import hashlib
import json
import logging

import torch
from torch.utils.data import Dataset

from dltemplate.data.base import DataInfo, TensorSplit
from dltemplate.data.carvana.decode import (
    BAD_IMAGE_ERRORS,
    Decoded,
    decode_all,
    decode_pair,
    image_size,
    worker_count,
)
from dltemplate.data.carvana.layout import CarvanaLayout, Pair, car_id
from dltemplate.data.image_cache import ArrayCache, Cached, CachedImageDataset, tensor_view
from dltemplate.data.samples import SampleSplit
from dltemplate.errors import ConfigError, DataError
from dltemplate.registry import DATASETS

__all__ = ["MEAN", "STD", "Carvana", "CarvanaLayout", "Decoded", "car_id", "decode_pair"]

log = logging.getLogger("dltemplate")

DECODE_VERSION = 1  # bump when decoding changes: the cache key changes and old caches are ignored
ARRAY_KINDS = ("images", "masks")
# ImageNet statistics: fixed, so training and a later evaluation normalise alike even when
# one of them has no cache (per-dataset means would need a full decode before describe()).
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


@DATASETS.register("Carvana")
class Carvana(CachedImageDataset):
    """Carvana car photos with binary car masks (class 1 = car), read from ``root``.

    ``scale`` resizes by a factor of the first image's size (``None``: keep it); ``size``
    (``[height, width]``) wins over it. ``hq`` reads ``train_hq/``. ``skip_bad`` skips pairs that
    are missing, corrupt or mismatched (with one warning) instead of failing. ``cache_dir``
    holds the decoded arrays (default: a per-user folder outside the data, see
    :func:`~dltemplate.data.image_cache.default_cache_dir`); ``workers`` processes
    decode the first pass (0: up to 4, one per CPU; 1: in this process). ``mode``: ``cache``
    (decode once into the cache, mapped) or ``files`` (decode every epoch, in the loader).
    """

    label = "Carvana"

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
        mode: str = "cache",
    ) -> None:
        super().__init__(root, download, skip_bad, cache_dir, workers, mode)
        if scale is not None and not (isinstance(scale, (int, float)) and scale > 0):
            raise ConfigError(f"Carvana: scale={scale!r}: must be a positive number or null")
        if size is not None and (
            not isinstance(size, (list, tuple))
            or len(size) != 2
            or not all(isinstance(s, int) and s > 0 for s in size)
        ):
            raise ConfigError(f"Carvana: size={size!r}: must be [height, width], both positive")
        self.scale = scale
        self.size = None if size is None else (int(size[0]), int(size[1]))
        self.hq = hq
        self.layout = CarvanaLayout(self.root_path, hq, skip_bad, download)

    def describe(self) -> DataInfo:
        """Shapes and class names; reads the file names and one image header, decodes nothing."""
        pairs, _ = self.layout.scan()
        h, w = self._output_size(pairs)
        return DataInfo(
            input_shape=(3, h, w),
            num_classes=1,
            class_names=["background", "car"],
            mean=MEAN,
            std=STD,
        )

    def load(self) -> tuple[TensorSplit | SampleSplit, None]:
        """Every pair in name order: images uint8 ``[N, 3, h, w]``, masks uint8 ``[N, 1, h, w]``
        (0/1), grouped by car id. There is no official test split (Kaggle's has no masks).

        ``mode: cache`` decodes once into the mapped cache; ``mode: files`` returns a
        :class:`~dltemplate.data.samples.SampleSplit` that decodes each pair when it is read,
        every epoch, in ``data.num_workers`` workers (a pair that fails then stops the run
        naming its file, even with ``skip_bad``, which skips only missing pairs then)."""
        pairs, orphans = self.layout.scan()
        if (self.root_path / "SYNTHETIC_README.txt").exists():  # say so wherever it is used
            log.info("%s is SYNTHETIC sample data (make-sample-data), not Kaggle's", self.root_path)
        size = self._output_size(pairs)
        if self.mode == "files":  # decoded by the loader, sample by sample, every epoch
            self.layout.warn_skipped(orphans, len(pairs) + len(orphans))
            if not pairs:
                raise DataError(f"Carvana: no usable image/mask pair in {self.layout.image_dir}")
            files = CarvanaFiles(pairs, size)
            names = [image.name for image, _ in pairs]
            groups = [car_id(image.stem) for image, _ in pairs]
            return SampleSplit(files, groups=groups, names=names, label="Carvana"), None
        cache = self._cache(pairs, size)
        decoded = self._read_cache(cache, size)
        cold = decoded is None
        try:
            if decoded is None:
                decoded = self._decode(pairs, size, cache)
            if decoded.failed and not self.skip_bad:  # from the cache too: as decoding would say
                raise DataError(self.layout.with_hint(decoded.failed[0]))
            if cold:  # with skip_bad, failures are cached with the arrays
                cache.write(
                    {"images": decoded.images, "masks": decoded.masks},
                    {"names": decoded.names, "failed": decoded.failed},
                )
        finally:
            cache.discard()  # a bad file or Ctrl-C in the cold pass leaves no temporary file
        self.layout.warn_skipped(orphans + decoded.failed, len(pairs) + len(orphans))
        if not decoded.names:
            raise DataError(f"Carvana: no usable image/mask pair in {self.layout.image_dir}")
        files = {image.stem: image.name for image, _ in pairs}
        split = TensorSplit(
            # Mapped read-only when read from the cache (see image_cache.tensor_view).
            tensor_view(decoded.images),
            tensor_view(decoded.masks),
            [car_id(name) for name in decoded.names],
            [files.get(name, name) for name in decoded.names],  # the file, for eval's report
        )
        return split, None

    def _output_size(self, pairs: list[Pair]) -> tuple[int, int]:
        """``size``, or the first readable image's size times ``scale``, as (height, width)."""
        if self.size is not None:
            return self.size
        for image, _ in pairs:
            try:
                height, width = image_size(image)
            except BAD_IMAGE_ERRORS as exc:
                if self.skip_bad:
                    continue  # load() reports it with the other bad pairs
                message = f"{image}: unreadable or corrupt image ({exc})"
                raise DataError(self.layout.with_hint(message)) from exc
            if self.scale is None:
                return height, width
            return max(1, round(height * self.scale)), max(1, round(width * self.scale))
        raise DataError(f"Carvana: no readable image with a mask in {self.layout.image_dir}")

    def _cache(self, pairs: list[Pair], size: tuple[int, int]) -> ArrayCache:
        """The cache entry of these files decoded to ``size``."""
        files = self.layout.file_stamps(pairs)
        blob = json.dumps(
            {
                "version": DECODE_VERSION,
                "root": self.root_identity,
                "size": size,
                "hq": self.hq,
                "files": files,
            }
        )
        key = hashlib.sha256(blob.encode()).hexdigest()
        # One family per flavour and size: they coexist, and a change of the files replaces one.
        family = f"carvana-{'hq' if self.hq else 'std'}-{size[0]}x{size[1]}-"
        return ArrayCache(self.cache_dir, family, key, label="Carvana")

    @staticmethod
    def _read_cache(cache: ArrayCache, size: tuple[int, int]) -> Decoded | None:
        """The cached decoding, or None when there is none (or it does not fit ``size``)."""
        h, w = size

        def fits(cached: Cached) -> None:
            names, failed = cached.fields["names"], cached.fields["failed"]
            if not isinstance(names, list) or not isinstance(failed, list):
                raise ValueError("its names or failures are not lists")
            images, masks = cached.arrays["images"], cached.arrays["masks"]
            if images.shape != (len(names), 3, h, w) or masks.shape != (len(names), 1, h, w):
                raise ValueError(f"arrays of shapes {images.shape} and {masks.shape}")

        # Always mapped: the arrays stay in the page cache, shared by the processes of a node,
        # instead of a private copy in each (the cold pass keeps what it decoded in memory).
        cached = cache.read(ARRAY_KINDS, check=fits, mmap=True)
        if cached is None:
            return None
        arrays, fields = cached.arrays, cached.fields
        return Decoded(arrays["images"], arrays["masks"], fields["names"], fields["failed"])

    def _decode(self, pairs: list[Pair], size: tuple[int, int], cache: ArrayCache) -> Decoded:
        """Decode every pair, in worker processes when ``workers`` allows more than one,
        straight into the cache's files (mapped: the cold pass holds no private copy)."""
        workers = worker_count(self.workers, len(pairs))
        log.info(
            "Carvana: decoding %d image/mask pairs to %dx%d (H x W) in %d process(es); "
            "later loads read the cache in %s",
            len(pairs),
            *size,
            workers,
            self.cache_dir,
        )
        # decode_pair is looked up here, at call time, so that a test can replace it.
        return decode_all(
            pairs,
            size,
            workers,
            keep_going=self.skip_bad,
            decode=decode_pair,
            allocate=cache.allocate,
        )


class CarvanaFiles(Dataset):
    """Carvana's pairs decoded one at a time (``mode: files``): sample i is pair i as uint8
    tensors, image ``[3, h, w]`` and mask ``[1, h, w]`` (0/1)."""

    def __init__(self, pairs: list[Pair], size: tuple[int, int]) -> None:
        self.pairs = [(str(image), str(mask)) for image, mask in pairs]
        self.size = size

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = decode_pair(*self.pairs[i], self.size)
        return torch.from_numpy(image), torch.from_numpy(mask)
