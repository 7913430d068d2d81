"""The checksummed array cache on its own, as any image-folder dataset would use it."""

from __future__ import annotations

import logging
import warnings

import numpy as np

from dltemplate.data.image_cache import ArrayCache, Cached


def test_round_trip_families_and_stale_entries(tmp_path):
    x = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    y = np.ones((2, 5), np.float32)
    ArrayCache(tmp_path, "faces-64-", "a" * 64).write({"x": x, "y": y}, {"names": ["p", "q"]})
    ArrayCache(tmp_path, "faces-32-", "b" * 64).write({"x": x}, {})  # another family stays
    got = ArrayCache(tmp_path, "faces-64-", "a" * 64).read(("x", "y"))
    assert got is not None and got.fields == {"names": ["p", "q"]}
    assert np.array_equal(got.arrays["x"], x) and np.array_equal(got.arrays["y"], y)
    assert got.arrays["x"].flags.writeable  # torch.from_numpy wants a writable array
    # Files changed: a new key replaces the family's old entry, and the old key reads nothing.
    ArrayCache(tmp_path, "faces-64-", "c" * 64).write({"x": x, "y": y}, {"names": []})
    assert ArrayCache(tmp_path, "faces-64-", "a" * 64).read(("x", "y")) is None
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "faces-32-bbbbbbbbbbbbbbbb.json",
        "faces-32-bbbbbbbbbbbbbbbb.x.npy",
        "faces-64-cccccccccccccccc.json",
        "faces-64-cccccccccccccccc.x.npy",
        "faces-64-cccccccccccccccc.y.npy",
    ]


def test_damage_and_rejection_are_warned_misses(tmp_path, caplog, monkeypatch):
    # The CLI, run by other tests, stops the logger from propagating to caplog's handler.
    monkeypatch.setattr(logging.getLogger("dltemplate"), "propagate", True)
    caplog.set_level(logging.WARNING, logger="dltemplate")
    cache = ArrayCache(tmp_path, "set-", "d" * 64, label="MySet")
    cache.write({"x": np.zeros((3, 2), np.int16)}, {"n": 3})

    def wants_four(cached: Cached) -> None:
        if len(cached.arrays["x"]) != cached.fields["n"] + 1:
            raise ValueError("wrong length")

    assert cache.read(("x",), check=wants_four) is None
    assert "MySet: cache" in caplog.text and "wrong length" in caplog.text
    data = bytearray(cache.array_path("x").read_bytes())
    data[-1] ^= 1
    cache.array_path("x").write_bytes(bytes(data))
    assert cache.read(("x",)) is None and "checksum mismatch" in caplog.text
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporary files


def test_a_full_disk_while_writing_the_cache_names_the_file(tmp_path, monkeypatch):
    """Issue #8: a full disk is one clear error naming the file, and nothing half-written stays
    (the previous entry of the cache, if any, is still valid)."""
    import errno
    import io

    import pytest

    from dltemplate import atomic
    from dltemplate.errors import DiskFullError

    x = np.arange(4096, dtype=np.uint8)
    ArrayCache(tmp_path, "set-", "a" * 64).write({"x": x}, {})
    real_open = open

    class FullDisk(io.FileIO):
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    def fake_open(path, mode="r", *args, **kwargs):
        if "w" in mode and str(path).endswith(".tmp"):
            return FullDisk(path, "wb")
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(atomic, "open", fake_open, raising=False)
    cache = ArrayCache(tmp_path, "set-", "b" * 64)
    with pytest.raises(DiskFullError, match="no space left on device while writing .*set-b"):
        cache.write({"x": x}, {})
    monkeypatch.undo()
    assert not list(tmp_path.glob(".*.tmp"))
    old = ArrayCache(tmp_path, "set-", "a" * 64).read(("x",))
    assert old is not None and np.array_equal(old.arrays["x"], x)


def test_mapped_read_gives_the_same_arrays_backed_by_the_file(tmp_path):
    """mmap=True: equal arrays, read-only views of the cache file (no private copy), and a
    tensor over them that shares that memory."""
    from dltemplate.data.image_cache import tensor_view

    x = np.arange(2 * 3 * 8 * 8, dtype=np.uint8).reshape(2, 3, 8, 8)
    y = np.array([3, 1], np.int64)
    cache = ArrayCache(tmp_path, "imgs-", "e" * 64)
    cache.write({"x": x, "y": y}, {"n": 2})
    got = cache.read(("x", "y"), mmap=True)
    assert got is not None and got.fields == {"n": 2}
    assert np.array_equal(got.arrays["x"], x) and np.array_equal(got.arrays["y"], y)
    for kind in ("x", "y"):
        mapped = got.arrays[kind]
        assert isinstance(mapped, np.memmap) and not mapped.flags.writeable
        assert mapped.filename == str(cache.array_path(kind).resolve())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the not-writable warning is deliberately silenced
        tensor = tensor_view(got.arrays["x"])
    assert tensor.data_ptr() == got.arrays["x"].ctypes.data  # the mapped memory, not a copy
    assert tensor[1].sum().item() == int(x[1].sum())


def test_mapped_read_still_detects_damage(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("dltemplate"), "propagate", True)
    caplog.set_level(logging.WARNING, logger="dltemplate")
    cache = ArrayCache(tmp_path, "imgs-", "f" * 64, label="MySet")
    x = np.arange(100, dtype=np.uint8).reshape(4, 25)
    cache.write({"x": x}, {})
    path = cache.array_path("x")
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10  # one flipped bit in the pixels
    path.write_bytes(bytes(data))
    assert cache.read(("x",), mmap=True) is None and "checksum mismatch" in caplog.text
    path.write_bytes(b"")  # an empty file cannot even be mapped: still a warned miss
    assert cache.read(("x",), mmap=True) is None and "x.npy: empty" in caplog.text
    cache.write({"x": x}, {})  # rebuilt: read again, mapped
    got = cache.read(("x",), mmap=True)
    assert got is not None and np.array_equal(got.arrays["x"], x)
