"""Carvana: the reader (pairing, resizing, errors, skip_bad), its decode cache, the sample set."""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import mapped_file
from PIL import Image, ImageFile

from dltemplate.data import carvana
from dltemplate.data.base import TensorSplit
from dltemplate.data.carvana import Carvana, decode_pair
from dltemplate.data.image_cache import default_cache_dir
from dltemplate.data.sample_carvana import make_sample_carvana
from dltemplate.errors import ConfigError, DataError, UsageError
from dltemplate.registry import DATASETS

N, VIEWS, SIZE = 20, 4, (96, 64)  # 5 cars of 4 views, 96x64 (W x H) photos


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A small synthetic Carvana folder: 20 photos of 96x64 (5 cars x 4 views) and masks."""
    return make_sample_carvana(tmp_path / "carvana", n=N, views=VIEWS, image_size=SIZE)


@pytest.fixture
def logged(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch):
    """caplog on the ``dltemplate`` logger, even after the CLI set it not to propagate."""
    logger = logging.getLogger("dltemplate")
    monkeypatch.setattr(logger, "propagate", False)  # so each record is captured once
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="dltemplate")
    yield caplog
    logger.removeHandler(caplog.handler)


def warnings_in(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def stems(root: Path) -> list[str]:
    return sorted(p.stem for p in (root / "train").glob("*.jpg"))


def nth(root: Path, i: int) -> tuple[Path, Path]:
    """The i-th photo (name order) and its mask."""
    stem = stems(root)[i]
    return root / "train" / f"{stem}.jpg", root / "train_masks" / f"{stem}_mask.gif"


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def no_decoding(*args, **kwargs):
    raise AssertionError("decoded although the cache is valid")


def cache_files(root: Path, suffix: str) -> list[Path]:
    return sorted(default_cache_dir(root).glob(f"*{suffix}"))


# -- reading ---------------------------------------------------------------------------------
def test_load_gives_uint8_images_binary_masks_and_car_groups(root):
    split, test = Carvana(str(root), scale=0.5, workers=1).load()
    assert test is None
    assert split.inputs.shape == (N, 3, 32, 48) and split.inputs.dtype == torch.uint8
    assert split.targets.shape == (N, 1, 32, 48) and split.targets.dtype == torch.uint8
    assert set(split.targets.unique().tolist()) == {0, 1}
    # Groups are the car ids, in sorted name order; every car's views share one id.
    assert split.groups == [s.rsplit("_", 1)[0] for s in stems(root)]
    counts = Counter(split.groups)
    assert len(counts) == N // VIEWS and set(counts.values()) == {VIEWS}
    assert all(re.fullmatch(r"[0-9a-f]{12}", g) for g in counts)
    assert DATASETS.get("Carvana") is Carvana


def test_masks_line_up_with_the_cars(root):
    split, _ = Carvana(str(root), scale=0.5, workers=1).load()
    for image, mask in zip(split.inputs.float(), split.targets.bool()):
        assert 0.02 < mask.float().mean() < 0.8  # a car, not the whole picture
        car = image[:, mask[0]].mean(1)
        background = image[:, ~mask[0]].mean(1)
        assert (car - background).abs().sum() > 15


def test_describe_matches_load_without_decoding(root, monkeypatch):
    dataset = Carvana(str(root), scale=0.5, workers=1)
    monkeypatch.setattr(carvana, "decode_pair", no_decoding)
    info = dataset.describe()
    assert info.input_shape == (3, 32, 48)
    assert info.num_classes == 1 and info.class_names == ["background", "car"]
    assert len(info.mean) == len(info.std) == 3
    monkeypatch.undo()
    split, _ = dataset.load()
    assert tuple(split.inputs.shape[1:]) == info.input_shape


def test_size_wins_over_scale(root):
    dataset = Carvana(str(root), scale=0.25, size=[32, 48], workers=1)
    split, _ = dataset.load()
    assert split.inputs.shape[2:] == (32, 48) and split.targets.shape[2:] == (32, 48)
    assert dataset.describe().input_shape == (3, 32, 48)
    split, _ = Carvana(str(root), size=[20, 50], workers=1).load()  # not proportional
    assert split.inputs.shape[2:] == (20, 50)
    assert Carvana(str(root), scale=None, workers=1).describe().input_shape == (3, 64, 96)


def test_hq_reads_train_hq(root):
    (root / "train").rename(root / "train_hq")
    split, _ = Carvana(str(root), scale=0.5, hq=True, workers=1).load()
    assert len(split) == N
    with pytest.raises(DataError, match="train"):
        Carvana(str(root), scale=0.5, workers=1).load()


def test_masks_with_255_are_binarised(root):
    image, mask = nth(root, 3)
    with Image.open(mask) as m:
        labels = np.asarray(m)
    Image.fromarray((labels * 255).astype(np.uint8)).save(mask, optimize=False)
    with Image.open(mask) as m:  # 0/255, as some real masks are
        assert set(np.unique(np.asarray(m)).tolist()) == {0, 255}
    img, m = decode_pair(image, mask, (32, 48))
    assert img.shape == (3, 32, 48) and m.shape == (1, 32, 48)
    assert set(np.unique(m).tolist()) == {0, 1}


def test_bad_arguments_are_config_errors(root):
    for kwargs in ({"scale": 0}, {"size": [32]}, {"size": [0, 4]}, {"workers": -1}):
        with pytest.raises(ConfigError):
            Carvana(str(root), **kwargs)


# -- the process pool ------------------------------------------------------------------------
def test_process_pool_gives_the_same_arrays_and_reports_bad_files(root, tmp_path):
    one, _ = Carvana(str(root), scale=0.5, workers=1, cache_dir=str(tmp_path / "c1")).load()
    two, _ = Carvana(str(root), scale=0.5, workers=2, cache_dir=str(tmp_path / "c2")).load()
    assert torch.equal(one.inputs, two.inputs) and torch.equal(one.targets, two.targets)
    assert one.groups == two.groups
    image, _ = nth(root, 7)
    truncate(image)
    with pytest.raises(DataError, match=re.escape(str(image))):
        Carvana(str(root), scale=0.5, workers=2, cache_dir=str(tmp_path / "c3")).load()


# -- the cache -------------------------------------------------------------------------------
def test_second_load_reads_the_cache(root, monkeypatch):
    first, _ = Carvana(str(root), scale=0.5, workers=1).load()
    assert len(cache_files(root, ".npy")) == 2 and len(cache_files(root, ".json")) == 1
    monkeypatch.setattr(carvana, "decode_pair", no_decoding)
    second, _ = Carvana(str(root), scale=0.5, workers=1).load()
    assert torch.equal(first.inputs, second.inputs) and torch.equal(first.targets, second.targets)
    assert first.groups == second.groups
    with pytest.raises(AssertionError, match="decoded"):  # another size: another cache
        Carvana(str(root), scale=0.25, workers=1).load()


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux's /proc")
def test_loads_map_the_cache_instead_of_copying_it(root):
    """The cached arrays are read in place (shared through the page cache), not copied into
    each process: the tensors' memory is the mapped cache file. The cold pass decodes straight
    into that file, so it holds no private copy either, and leaves no temporary file."""
    cold, _ = Carvana(str(root), scale=0.5, workers=1).load()
    (images,) = cache_files(root, ".images.npy")
    (masks,) = cache_files(root, ".masks.npy")
    assert mapped_file(cold.source_inputs) == str(images)
    assert mapped_file(cold.source_targets) == str(masks)
    assert not list(default_cache_dir(root).glob(".*"))
    warm, _ = Carvana(str(root), scale=0.5, workers=1).load()
    assert mapped_file(warm.inputs) == str(images) and mapped_file(warm.targets) == str(masks)
    assert torch.equal(cold.inputs, warm.inputs) and torch.equal(cold.targets, warm.targets)


def test_a_cold_pass_cut_short_leaves_a_file_the_next_one_removes(root, monkeypatch):
    """A cold pass killed mid-way leaves its half-filled temporary file; the next cold pass
    (another process) removes it and builds the cache."""
    folder = default_cache_dir(root)
    folder.mkdir()
    dead = 2**22 + 12345  # beyond Linux's default pid_max: no such process
    left = folder / f".carvana-std-32x48-0123456789abcdef.images.npy.{dead}.decoding.tmp"
    left.write_bytes(b"half")
    alive = folder / f".carvana-std-32x48-0123456789abcdef.images.npy.{os.getpid()}.decoding.tmp"
    alive.write_bytes(b"busy")  # another process still decoding: left alone
    split, _ = Carvana(str(root), scale=0.5, workers=1).load()
    assert len(split) == N and not left.exists() and alive.exists()


def test_cache_dir_is_used(root, tmp_path, monkeypatch):
    folder = tmp_path / "elsewhere"
    Carvana(str(root), scale=0.5, workers=1, cache_dir=str(folder)).load()
    assert len(list(folder.glob("*.npy"))) == 2 and not default_cache_dir(root).exists()
    monkeypatch.setattr(carvana, "decode_pair", no_decoding)
    Carvana(str(root), scale=0.5, workers=1, cache_dir=str(folder)).load()


def test_touching_an_image_invalidates_the_cache(root, monkeypatch):
    Carvana(str(root), scale=0.5, workers=1).load()
    old_meta = cache_files(root, ".json")
    image, _ = nth(root, 5)
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    calls = []

    def counting(*args):
        calls.append(args[0])
        return decode_pair(*args)

    monkeypatch.setattr(carvana, "decode_pair", counting)
    split, _ = Carvana(str(root), scale=0.5, workers=1).load()
    assert len(calls) == N and len(split) == N
    new_meta = cache_files(root, ".json")
    assert len(new_meta) == 1 and new_meta != old_meta  # the stale cache was replaced


@pytest.mark.parametrize("damage", ["truncate", "flip", "meta", "missing"])
def test_corrupt_cache_is_detected_and_rebuilt(root, logged, monkeypatch, damage):
    loaded, _ = Carvana(str(root), scale=0.5, workers=1).load()
    # A copy: what was loaded maps the cache file that is damaged below, in place (a rebuild
    # replaces files by renaming, which leaves maps alone; damage in place does not).
    first = TensorSplit(loaded.inputs.clone(), loaded.targets.clone())
    del loaded
    images_npy = next(p for p in cache_files(root, ".npy") if ".images." in p.name)
    if damage == "truncate":
        truncate(images_npy)
    elif damage == "flip":
        data = bytearray(images_npy.read_bytes())
        data[len(data) // 2] ^= 0xFF  # one pixel off: only the checksum can tell
        images_npy.write_bytes(bytes(data))
    elif damage == "meta":
        cache_files(root, ".json")[0].write_text("{not json")
    else:
        images_npy.unlink()
    logged.clear()
    again, _ = Carvana(str(root), scale=0.5, workers=1).load()
    assert any("corrupt" in w for w in warnings_in(logged))
    assert torch.equal(first.inputs, again.inputs) and torch.equal(first.targets, again.targets)
    # Rebuilt: the next load reads it without a warning and without decoding.
    logged.clear()
    monkeypatch.setattr(carvana, "decode_pair", no_decoding)
    third, _ = Carvana(str(root), scale=0.5, workers=1).load()
    assert not warnings_in(logged) and torch.equal(first.inputs, third.inputs)


def test_unwritable_cache_folder_only_warns(root, tmp_path, logged):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    split, _ = Carvana(str(root), scale=0.5, workers=1, cache_dir=str(blocker / "cache")).load()
    assert len(split) == N
    assert any("cannot write" in w for w in warnings_in(logged))


# -- errors ----------------------------------------------------------------------------------
@pytest.mark.parametrize("folder", ["train", "train_masks"])
def test_missing_folder(root, folder):
    shutil.rmtree(root / folder)
    dataset = Carvana(str(root), scale=0.5, workers=1)
    for call in (dataset.load, dataset.describe):
        with pytest.raises(DataError) as exc:
            call()
        message = str(exc.value)
        assert str(root / folder) in message
        assert "carvana-image-masking-challenge" in message and "make-sample-data" in message


def test_no_images(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train_masks").mkdir()
    with pytest.raises(DataError, match="no .jpg images"):
        Carvana(str(tmp_path), workers=1).load()


def test_image_without_mask(root):
    image, mask = nth(root, 2)
    mask.unlink()
    with pytest.raises(DataError) as exc:
        Carvana(str(root), scale=0.5, workers=1).load()
    assert str(image) in str(exc.value) and str(mask) in str(exc.value)


def test_mask_of_another_size(root):
    image, mask = nth(root, 4)
    small = Image.fromarray(np.zeros((30, 50), np.uint8))
    small.putpalette([0, 0, 0, 255, 255, 255])
    small.save(mask)
    with pytest.raises(DataError) as exc:
        Carvana(str(root), scale=0.5, workers=1).load()
    message = str(exc.value)
    assert str(image) in message and str(mask) in message
    assert "50x30" in message and "96x64" in message


@pytest.mark.parametrize("lenient_pil", [False, True])
def test_truncated_jpeg(root, monkeypatch, lenient_pil):
    # Detected even where other code told PIL to pad truncated images silently.
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", lenient_pil)
    image, _ = nth(root, 6)
    truncate(image)
    with pytest.raises(DataError, match=re.escape(str(image))):
        Carvana(str(root), scale=0.5, workers=1).load()
    assert ImageFile.LOAD_TRUNCATED_IMAGES is lenient_pil  # put back as it was


def test_corrupt_gif(root):
    _, mask = nth(root, 9)
    truncate(mask)
    with pytest.raises(DataError, match=re.escape(str(mask))):
        Carvana(str(root), scale=0.5, workers=1).load()


def test_skip_bad_skips_and_warns_once(root, logged, monkeypatch):
    orphan, orphan_mask = nth(root, 1)
    orphan_mask.unlink()
    truncate(nth(root, 8)[0])
    truncate(nth(root, 13)[1])
    split, _ = Carvana(str(root), scale=0.5, workers=1, skip_bad=True).load()
    assert len(split) == N - 3 and len(split.groups) == N - 3
    warned = warnings_in(logged)
    assert len(warned) == 1 and "skipped 3 of 20" in warned[0] and str(orphan) in warned[0]
    # From the cache: the same samples and the same warning.
    logged.clear()
    monkeypatch.setattr(carvana, "decode_pair", no_decoding)
    again, _ = Carvana(str(root), scale=0.5, workers=1, skip_bad=True).load()
    assert torch.equal(split.inputs, again.inputs) and split.groups == again.groups
    assert len(warnings_in(logged)) == 1 and "skipped 3 of 20" in warnings_in(logged)[0]


def test_cached_failures_still_raise_without_skip_bad(root, monkeypatch):
    image, _ = nth(root, 8)
    truncate(image)
    Carvana(str(root), scale=0.5, workers=1, skip_bad=True).load()  # caches the failure
    monkeypatch.setattr(carvana, "decode_pair", no_decoding)
    with pytest.raises(DataError, match=re.escape(str(image))):
        Carvana(str(root), scale=0.5, workers=1).load()


# -- the synthetic sample set ----------------------------------------------------------------
def test_make_sample_carvana_layout(tmp_path):
    out = tmp_path / "sample"
    assert make_sample_carvana(out, n=10, views=4, image_size=(72, 48)) == out
    images = sorted((out / "train").iterdir())
    masks = sorted((out / "train_masks").iterdir())
    assert len(images) == len(masks) == 10
    names = [p.name for p in images]
    assert all(re.fullmatch(r"[0-9a-f]{12}_\d\d\.jpg", name) for name in names)
    views = Counter(name[:12] for name in names)
    assert sorted(views.values()) == [2, 4, 4]  # the last car has fewer views
    assert {name[13:15] for name in names} == {"01", "02", "03", "04"}
    for image in images:
        mask = out / "train_masks" / f"{image.stem}_mask.gif"
        with Image.open(image) as img, Image.open(mask) as m:
            assert img.format == "JPEG" and img.mode == "RGB" and img.size == (72, 48)
            assert m.format == "GIF" and m.mode in ("P", "L") and m.size == img.size
            assert set(np.unique(np.asarray(m)).tolist()) == {0, 1}
    readme = (out / "SYNTHETIC_README.txt").read_text()
    assert "synthetic" in readme.lower() and "Kaggle" in readme


def test_make_sample_carvana_rejects_bad_counts(tmp_path):
    for kwargs in ({"n": 0}, {"views": 0}, {"views": 100}):
        with pytest.raises(UsageError):
            make_sample_carvana(tmp_path / "bad", **kwargs)


def test_make_sample_carvana_is_reproducible(tmp_path):
    a = make_sample_carvana(tmp_path / "a", n=3, views=3, image_size=(40, 30), seed=5)
    b = make_sample_carvana(tmp_path / "b", n=3, views=3, image_size=(40, 30), seed=5)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
