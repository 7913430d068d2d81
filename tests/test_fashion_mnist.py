"""Fashion-MNIST: IDX parsing, both folder layouts, errors, and downloads (served locally)."""

from __future__ import annotations

import gzip
import hashlib
import io
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from dltemplate.data import fashion_mnist as fm
from dltemplate.data.fashion_mnist import FashionMNIST, read_idx
from dltemplate.errors import DataError
from dltemplate.registry import DATASETS

REAL_FETCH = fm.fetch_url


def idx_bytes(array: np.ndarray) -> bytes:
    """``array`` (uint8) as an IDX file: magic 0x0000080N, big-endian dims, data."""
    dims = np.array(array.shape, dtype=">i4").tobytes()
    return bytes([0, 0, 8, array.ndim]) + dims + array.astype(np.uint8).tobytes()


def synthetic(n_train: int = 50, n_test: int = 20) -> dict[str, np.ndarray]:
    """Four small arrays under the official names, with known pixel values and labels."""
    rng = np.random.default_rng(0)
    return {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) * 3 % 10).astype(np.uint8),
    }


def gz_bytes(array: np.ndarray) -> bytes:
    # mtime=0 so the same array always gives the same bytes (and MD5).
    return gzip.compress(idx_bytes(array), mtime=0)


def write(folder: Path, arrays: dict[str, np.ndarray], gz: bool | None = None) -> None:
    """Write each array as an IDX file; ``gz=None`` gzips the images only (a mixed set)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        zipped = "images" in name if gz is None else gz
        if zipped:
            (folder / f"{name}.gz").write_bytes(gz_bytes(array))
        else:
            (folder / name).write_bytes(idx_bytes(array))


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail any test that would reach a real mirror."""

    def refuse(url: str, timeout: float | None = None) -> bytes:
        raise AssertionError(f"test tried to download {url}")

    monkeypatch.setattr(fm, "fetch_url", refuse)


def test_registered_and_described() -> None:
    assert DATASETS.get("FashionMNIST") is FashionMNIST
    info = FashionMNIST().describe()
    assert info.input_shape == (1, 28, 28) and info.num_classes == 10
    assert info.class_names[0] == "T-shirt/top" and info.class_names[9] == "Ankle boot"
    assert len(info.class_names) == 10


@pytest.mark.parametrize("layout", ["plain", "torchvision"])
@pytest.mark.parametrize("gz", [True, False, None])
def test_load_layouts(tmp_path: Path, layout: str, gz: bool | None) -> None:
    arrays = synthetic()
    write(tmp_path if layout == "plain" else tmp_path / "FashionMNIST" / "raw", arrays, gz)
    train, test = FashionMNIST(root=str(tmp_path), download=False).load()
    assert test is not None
    assert train.inputs.shape == (50, 1, 28, 28) and test.inputs.shape == (20, 1, 28, 28)
    assert train.inputs.dtype == torch.uint8 and train.targets.dtype == torch.int64
    assert test.inputs.dtype == torch.uint8 and test.targets.dtype == torch.int64
    assert torch.equal(train.inputs[:, 0], torch.from_numpy(arrays["train-images-idx3-ubyte"]))
    assert torch.equal(train.targets, torch.from_numpy(arrays["train-labels-idx1-ubyte"]).long())
    assert torch.equal(test.inputs[:, 0], torch.from_numpy(arrays["t10k-images-idx3-ubyte"]))
    assert torch.equal(test.targets, torch.from_numpy(arrays["t10k-labels-idx1-ubyte"]).long())


def test_read_idx_truncated_names_file_and_sizes(tmp_path: Path) -> None:
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(idx_bytes(np.zeros((2, 28, 28), np.uint8))[:-100])
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte") as err:
        read_idx(path)
    assert "expected 1584 bytes, found 1484" in str(err.value)


def test_load_truncated_image_file(tmp_path: Path) -> None:
    write(tmp_path, synthetic())
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-1]))
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz.*truncated"):
        FashionMNIST(root=str(tmp_path), download=False).load()


def test_bad_magic(tmp_path: Path) -> None:
    path = tmp_path / "labels"
    path.write_bytes(b"\x00\x00\x0c\x01" + idx_bytes(np.zeros(3, np.uint8))[4:])  # int32 type
    with pytest.raises(DataError, match="labels: bad magic number 0x00000c01"):
        read_idx(path)
    path.write_bytes(b"<html>Not found</html>")
    with pytest.raises(DataError, match="bad magic"):
        read_idx(path)


def test_trailing_garbage_and_corrupt_gzip(tmp_path: Path) -> None:
    path = tmp_path / "labels"
    path.write_bytes(idx_bytes(np.zeros(3, np.uint8)) + b"xx")
    with pytest.raises(DataError, match="2 trailing"):
        read_idx(path)
    path = tmp_path / "labels.gz"
    path.write_bytes(gz_bytes(np.zeros(3, np.uint8))[:-5])
    with pytest.raises(DataError, match="labels.gz: corrupt gzip"):
        read_idx(path)
    path.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="labels.gz: corrupt gzip"):
        read_idx(path)


def test_count_mismatch_names_both_files(tmp_path: Path) -> None:
    arrays = synthetic()
    arrays["t10k-labels-idx1-ubyte"] = arrays["t10k-labels-idx1-ubyte"][:19]
    write(tmp_path, arrays, gz=False)
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.*t10k-labels-idx1-ubyte"):
        FashionMNIST(root=str(tmp_path), download=False).load()


def test_missing_without_download(tmp_path: Path) -> None:
    arrays = synthetic()
    del arrays["train-labels-idx1-ubyte"], arrays["t10k-images-idx3-ubyte"]
    write(tmp_path, arrays)
    with pytest.raises(DataError) as err:
        FashionMNIST(root=str(tmp_path), download=False).load()
    msg = str(err.value)
    assert "missing train-labels-idx1-ubyte, t10k-images-idx3-ubyte" in msg
    assert str(tmp_path.resolve()) in msg and str(tmp_path / "FashionMNIST" / "raw") in msg
    assert "download=False" in msg


def test_unreachable_mirror_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fm, "fetch_url", REAL_FETCH)  # against a closed local port
    monkeypatch.setattr(fm, "MIRRORS", ["http://127.0.0.1:9/"])
    monkeypatch.setattr(fm, "TIMEOUT_S", 2.0)
    with pytest.raises(DataError, match="could not download train-images-idx3-ubyte.gz"):
        FashionMNIST(root=str(tmp_path), download=True).load()
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_fetch_url_gives_up_on_a_stalled_request(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fm, "fetch_url", REAL_FETCH)
    release = threading.Event()

    def stall(url: str, timeout: float) -> io.BytesIO:  # like a DNS lookup that never returns
        release.wait()
        return io.BytesIO(b"")

    monkeypatch.setattr(fm.urllib.request, "urlopen", stall)
    try:
        with pytest.raises(TimeoutError):
            fm.fetch_url("http://example.invalid/x", timeout=0.2)
    finally:
        release.set()


def test_fetch_url_returns_body(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fm, "fetch_url", REAL_FETCH)
    body = bytes(range(256)) * 10_000  # several read chunks
    monkeypatch.setattr(fm.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(body))
    assert fm.fetch_url("http://example.invalid/x", timeout=5) == body


def serve(monkeypatch: pytest.MonkeyPatch, files: dict[str, bytes], log: list[str]) -> None:
    """Make every mirror but the first serve ``files`` by name; the first one is down."""
    monkeypatch.setattr(fm, "MIRRORS", ["http://down.invalid/", "http://up.invalid/"])

    def fake_fetch(url: str, timeout: float | None = None) -> bytes:
        log.append(url)
        if url.startswith("http://down.invalid/"):
            raise ConnectionRefusedError("mirror down")
        return files[url.rsplit("/", 1)[1]]

    monkeypatch.setattr(fm, "fetch_url", fake_fetch)


def test_md5_mismatch_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = {f"{name}.gz": gz_bytes(a) for name, a in synthetic().items()}
    serve(monkeypatch, files, [])  # the real MD5SUMS: synthetic bytes do not match
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz.*MD5 mismatch"):
        FashionMNIST(root=str(tmp_path), download=True).load()
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []  # no partial or temp file


def test_download_lands_and_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    arrays = synthetic()
    files = {f"{name}.gz": gz_bytes(a) for name, a in arrays.items()}
    sums = {name: hashlib.md5(data).hexdigest() for name, data in files.items()}
    monkeypatch.setattr(fm, "MD5SUMS", sums)
    write(tmp_path, {"t10k-labels-idx1-ubyte": arrays["t10k-labels-idx1-ubyte"]}, gz=False)
    log: list[str] = []
    serve(monkeypatch, files, log)
    train, test = FashionMNIST(root=str(tmp_path), download=True).load()
    raw = tmp_path / "FashionMNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(
        set(files) - {"t10k-labels-idx1-ubyte.gz"}
    )
    assert not any("t10k-labels" in url for url in log)  # present files are not fetched
    assert torch.equal(train.inputs[:, 0], torch.from_numpy(arrays["train-images-idx3-ubyte"]))
    assert test is not None and len(test) == 20
    # A second load finds everything and downloads nothing.
    log.clear()
    FashionMNIST(root=str(tmp_path), download=True).load()
    assert log == []
