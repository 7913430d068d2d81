"""Fashion-MNIST (Zalando): 70,000 grey 28x28 images of clothing in 10 classes.

The four official IDX files, gzipped or not, are read from ``root`` or from torchvision's layout
``root/FashionMNIST/raw/``. Missing files are downloaded into the latter and checked by MD5.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import threading
import time
import urllib.request
import zlib
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch

from dltemplate.atomic import atomic_write
from dltemplate.data.base import DataInfo, InMemoryDataset, TensorSplit
from dltemplate.errors import DataError
from dltemplate.registry import DATASETS

# Fashion-MNIST mirrors only (ossci-datasets and cvdf serve the *digit* MNIST under the same names).
MIRRORS: list[str] = [
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion/",
]
TIMEOUT_S: float = 10.0  # a request gives up when nothing arrives for this long
FETCH_LIMIT_S: float = 600.0  # and when the whole file has not arrived after this long
MD5SUMS: dict[str, str] = {  # of the .gz files, as torchvision checks them
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
SPLITS = {  # split -> (images, labels), names without ".gz"
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat"]  # label 0-4
CLASS_NAMES += ["Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]  # label 5-9
FILES = [name for pair in SPLITS.values() for name in pair]


def read_idx(path: Path) -> np.ndarray:
    """Parse an uint8 IDX file (gzipped if its name ends in ``.gz``) into an array.

    The header is two zero bytes, the type byte 0x08 (uint8), the number of dimensions, then
    each dimension as a big-endian int32; the data follows. Malformed files raise DataError.
    """
    path = Path(path)
    try:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: corrupt gzip file ({exc})") from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc})") from exc
    if len(data) < 4:
        raise DataError(f"{path}: truncated: expected at least 4 bytes, found {len(data)}")
    if data[:3] != b"\x00\x00\x08" or data[3] == 0:
        magic = int.from_bytes(data[:4], "big")
        raise DataError(
            f"{path}: bad magic number 0x{magic:08x} (expected 0x0000080N: uint8 IDX, "
            "e.g. 0x00000803 for images, 0x00000801 for labels); not an IDX file?"
        )
    ndim = data[3]
    offset = 4 + 4 * ndim
    if len(data) < offset:
        raise DataError(f"{path}: truncated: expected {offset} header bytes, found {len(data)}")
    shape = tuple(int(d) for d in np.frombuffer(data, ">i4", ndim, 4))
    expected = offset + int(np.prod(shape))
    if len(data) < expected:
        raise DataError(f"{path}: truncated: expected {expected} bytes, found {len(data)}")
    if len(data) > expected:
        extra = len(data) - expected
        raise DataError(f"{path}: expected {expected} bytes, found {len(data)} ({extra} trailing)")
    # Copy, since torch wants a writable array and frombuffer over bytes is read-only.
    return np.frombuffer(data, np.uint8, offset=offset).reshape(shape).copy()


def fetch_url(url: str, timeout: float | None = None) -> bytes:
    """Return the body at ``url``; raise OSError if nothing arrives for ``timeout`` seconds.

    The request runs in a daemon thread watched from here, because the socket timeout does not
    cover name resolution: a stalled DNS lookup is abandoned rather than waited for.
    """
    timeout = TIMEOUT_S if timeout is None else timeout
    state: dict = {"last": time.monotonic()}

    def run() -> None:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                chunks = []
                while chunk := resp.read(1 << 20):
                    chunks.append(chunk)
                    state["last"] = time.monotonic()
                state["data"] = b"".join(chunks)
        except BaseException as exc:  # handed to the caller's thread below
            state["error"] = exc

    start = time.monotonic()
    thread = threading.Thread(target=run, name=f"fetch {url}", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(min(0.1, timeout))
        now = time.monotonic()
        if thread.is_alive() and now - state["last"] > timeout:
            raise TimeoutError(f"no data for {timeout:g} s")
        if thread.is_alive() and now - start > FETCH_LIMIT_S:
            raise TimeoutError(f"not complete after {FETCH_LIMIT_S:g} s")
    if "error" in state:
        raise state["error"]
    return state["data"]


def download_file(name: str, folder: Path) -> Path:
    """Download ``name`` (a key of MD5SUMS) into ``folder`` from the first mirror that works.

    The file appears under its real name only once its MD5 matches (written to a temporary
    file, then renamed), so concurrent or interrupted downloads never leave a partial file.
    """
    reasons = []
    for mirror in MIRRORS:
        url = mirror + name
        try:
            data = fetch_url(url)
        except (OSError, ValueError, http.client.HTTPException) as exc:
            reasons.append(f"{url}: {type(exc).__name__}: {exc}")
            continue
        md5 = hashlib.md5(data).hexdigest()
        if md5 != MD5SUMS[name]:
            reasons.append(f"{url}: MD5 mismatch (got {md5}, expected {MD5SUMS[name]})")
            continue
        try:
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write(folder / name, lambda fh, data=data: fh.write(data))
        except OSError as exc:
            raise DataError(f"cannot write {folder / name}: {exc}") from exc
        return folder / name
    raise DataError(f"could not download {name}: " + "; ".join(reasons or ["no mirrors"]))


@DATASETS.register("FashionMNIST")
class FashionMNIST(InMemoryDataset):
    """Zalando's Fashion-MNIST: 60,000 training and 10,000 test images, uint8 28x28."""

    info = DataInfo(
        input_shape=(1, 28, 28),
        num_classes=10,
        class_names=list(CLASS_NAMES),
        mean=(0.2860,),
        std=(0.3530,),
    )

    def _folders(self) -> list[Path]:
        root = Path(self.root)
        return [root, root / "FashionMNIST" / "raw"]

    def _find(self, name: str) -> Path | None:
        for folder in self._folders():
            for path in (folder / name, folder / f"{name}.gz"):
                if path.is_file():
                    return path
        return None

    def load(self) -> tuple[TensorSplit, TensorSplit | None]:
        """The official training set as the pool and the official (t10k) test set."""
        missing = [name for name in FILES if self._find(name) is None]
        if missing:
            why = "downloading is off (download=False)"
            if self.download:
                try:
                    for name in missing:
                        download_file(f"{name}.gz", self._folders()[1])
                    why = ""
                except DataError as exc:
                    why = str(exc)
            if why:
                self._raise_missing(why)
        train, test = (self._load_split(*SPLITS[s]) for s in ("train", "test"))
        return train, test

    def _raise_missing(self, why: str) -> NoReturn:
        missing = [name for name in FILES if self._find(name) is None]
        here, raw = (str(folder.resolve()) for folder in self._folders())
        raise DataError(
            f"Fashion-MNIST: missing {', '.join(missing)} (plain or .gz); looked in {here} "
            f"and {raw}. Put the four official files from "
            "https://github.com/zalandoresearch/fashion-mnist in either folder. "
            f"Not downloaded: {why}"
        )

    def _load_split(self, images_name: str, labels_name: str) -> TensorSplit:
        images_path, labels_path = self._find(images_name), self._find(labels_name)
        assert images_path is not None and labels_path is not None  # checked in load()
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.ndim != 3 or images.shape[1:] != (28, 28):
            raise DataError(f"{images_path}: images of shape {images.shape}, expected (N, 28, 28)")
        if labels.ndim != 1 or (labels.size and labels.max() >= 10):
            raise DataError(f"{labels_path}: expected one label in 0-9 per image")
        if len(images) != len(labels):
            raise DataError(
                f"{images_path} holds {len(images)} images but {labels_path} "
                f"holds {len(labels)} labels"
            )
        inputs = torch.from_numpy(images).unsqueeze(1)  # N, 1, 28, 28
        return TensorSplit(inputs, torch.from_numpy(labels.astype(np.int64)))
