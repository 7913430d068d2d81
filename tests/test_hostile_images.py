"""Hostile and broken image inputs (issue #14): the decode cache stays out of the data, train
and test class lists must agree, an interrupted cache build or sample set leaves nothing
half-made, and predict refuses a decompression bomb in one line."""

from __future__ import annotations

import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, run_dirs
from PIL import Image

from dltemplate.data import carvana, image_folder, sample_carvana
from dltemplate.data.carvana import Carvana
from dltemplate.data.image_cache import CACHE_ENV, default_cache_dir
from dltemplate.data.image_folder import ImageFolder
from dltemplate.data.sample_carvana import make_sample_carvana

IMAGE_FOLDER = REPO / "configs" / "image_folder_cnn.yaml"
UNET = REPO / "configs" / "unet_carvana.yaml"
DIGITS = REPO / "configs" / "digits_mlp.yaml"
QUICK_FOLDER = ["data.args.size=[8,8]", "data.args.workers=1", "trainer.epochs=1",
                "model.args.width=4", "data.batch_size=8", "trainer.progress_bar=off"]  # fmt: skip
COLOURS = {"blue": (30, 40, 220), "green": (30, 200, 40), "red": (220, 30, 40)}


@pytest.fixture(autouse=True)
def tidy(fast_and_tidy):
    """No curves picture; the log file of an in-process run closed afterwards."""


def make_folder(root: Path, per_class: int = 4, test_per_class: int = 0) -> Path:
    """Small class folders (PNG, 12x12, a square of the class colour on noise)."""
    rng = np.random.default_rng(0)
    for part, n in (("", per_class), ("test", test_per_class)):
        for name, colour in COLOURS.items() if n else ():
            folder = root / part / name
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(60, 140, (12, 12, 3)).astype(np.uint8)
                pixels[2:8, 2:8] = colour
                Image.fromarray(pixels).save(folder / f"img{i:03d}.png")
    return root


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` (hidden ones too) with its size and mtime."""
    return {
        p.relative_to(folder).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in folder.rglob("*")
        if p.is_file()
    }


def changed(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> set[str]:
    """Files added, removed or modified between two snapshots."""
    return {name for name in before.keys() | after.keys() if before.get(name) != after.get(name)}


def one_error_line(err: str) -> str:
    """The single ``dltemplate:`` line of ``err``; the rest may only be log lines (``HH:MM:SS
    ...``, e.g. "decoding 12 images"), no traceback."""
    lines = [line for line in err.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("dltemplate:")]
    logged = [line for line in lines if re.match(r"\d\d:\d\d:\d\d ", line)]
    assert len(errors) == 1 and len(errors) + len(logged) == len(lines), err[-3000:]
    assert "Traceback" not in err
    return errors[0]


def temporary_files(folder: Path) -> list[Path]:
    """The cache's temporary files under ``folder`` (a cold pass's ``*.decoding.tmp``)."""
    return [p for p in folder.rglob("*") if p.name.endswith((".decoding.tmp", ".tmp"))]


# -- 1. the decode cache lives outside the data --------------------------------------------------
def test_the_decode_cache_stays_out_of_the_data_folder(cli, tmp_path):
    root = make_folder(tmp_path / "data")
    before = snapshot(tmp_path)
    out = tmp_path / "out"
    assert cli("train", IMAGE_FOLDER, f"data.root={root}", f"experiment.output_dir={out}",
               *QUICK_FOLDER) == 0  # fmt: skip
    new = changed(before, snapshot(tmp_path))
    assert new and all(name.startswith("out/") for name in new), sorted(new)
    assert not (root / ".dltemplate_cache").exists()
    folder = default_cache_dir(root)
    assert folder.parent == Path(os.environ[CACHE_ENV]) and folder.name.startswith("data-")
    assert len(list(folder.glob("*.images.npy"))) == 1
    # A second run reads that cache and still writes nothing into the data.
    before = snapshot(root)
    assert cli("train", IMAGE_FOLDER, f"data.root={root}", f"experiment.output_dir={out}",
               *QUICK_FOLDER) == 0  # fmt: skip
    assert snapshot(root) == before and len(run_dirs(out)) == 2


def test_where_the_cache_goes_and_what_moves_it(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "shapes")
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    home = ImageFolder(str(root)).cache_dir
    assert home.parent == tmp_path / "home" / ".cache" / "dltemplate"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/is/ignored")
    assert ImageFolder(str(root)).cache_dir == home
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert ImageFolder(str(root)).cache_dir.parent == tmp_path / "xdg" / "dltemplate"
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "mine"))
    assert ImageFolder(str(root)).cache_dir.parent == tmp_path / "mine"
    given = tmp_path / "given"
    assert ImageFolder(str(root), cache_dir=str(given)).cache_dir == given
    assert Carvana(str(root), cache_dir=str(given)).cache_dir == given
    # The same root named another way is the same folder; another root of that name is not.
    assert ImageFolder(f"{tmp_path}/./shapes/").cache_dir == ImageFolder(str(root)).cache_dir
    other = make_folder(tmp_path / "elsewhere" / "shapes")
    assert ImageFolder(str(other)).cache_dir != ImageFolder(str(root)).cache_dir
    ImageFolder(str(root), size=[8, 8], workers=1).load()
    assert not (tmp_path / "home").exists()  # nothing in the (fake) home once it is moved


def test_two_data_folders_never_share_an_entry_even_in_one_cache_dir(tmp_path, monkeypatch):
    a = make_folder(tmp_path / "a")
    b = tmp_path / "b"
    shutil.copytree(a, b)  # the same names, sizes and modification times
    given = str(tmp_path / "shared")
    ImageFolder(str(a), size=[8, 8], workers=1, cache_dir=given).load()
    calls = []
    decode = image_folder.decode_image
    monkeypatch.setattr(image_folder, "decode_image", lambda *job: calls.append(1) or decode(*job))
    pool, _ = ImageFolder(str(b), size=[8, 8], workers=1, cache_dir=given).load()
    assert len(calls) == len(pool) == 12  # decoded: a's entry is not b's


# -- 2. train and test must list the same classes ------------------------------------------------
def test_a_stray_folder_in_test_names_both_class_lists(cli, tmp_path, capsys):
    root = make_folder(tmp_path / "data", test_per_class=2)
    (root / "test" / "stray").mkdir()  # no images: the list, not its emptiness, is the error
    before = snapshot(tmp_path)
    out = tmp_path / "out"
    assert cli("train", IMAGE_FOLDER, f"data.root={root}", f"experiment.output_dir={out}",
               *QUICK_FOLDER) == 2  # fmt: skip
    line = one_error_line(capsys.readouterr().err)
    assert "only in test ['stray']" in line
    assert "training ['blue', 'green', 'red'], test ['blue', 'green', 'red', 'stray']" in line
    assert str(root / "test") in line
    assert snapshot(tmp_path) == before


MAP_STYLE_MODULE = '''
import torch
from torch.utils.data import Dataset


class Folders(Dataset):
    """Grey 8x8 pictures labelled by class; the test split may list other classes."""

    def __init__(self, n=24, classes=("cat", "dog"), num=None):
        self.n = n
        if num is None:
            self.classes = list(classes)
        else:
            self.num_classes = num

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.full((1, 8, 8), float(i % 2)), i % 2
'''


@pytest.mark.parametrize(
    ("train_args", "test_args", "expected"),
    [
        ("{}", "{classes: [cat, dog, stray]}",
         "training ['cat', 'dog'], test ['cat', 'dog', 'stray']"),
        ("{}", "{classes: [dog, cat]}", "training ['cat', 'dog'], test ['dog', 'cat']"),
        ("{num: 2}", "{num: 3}", "the test split has 3 classes but the training set 2"),
    ],
    ids=["stray", "order", "count"],
)  # fmt: skip
def test_map_style_test_args_with_other_classes_stop_before_training(
    cli, tmp_path, capsys, train_args, test_args, expected
):
    module = f"hostile_folders_{os.getpid()}_{abs(hash(test_args))}"
    (tmp_path / f"{module}.py").write_text(MAP_STYLE_MODULE)
    before = snapshot(tmp_path)
    out = tmp_path / "out"
    args = [f"data.name={module}:Folders", f"data.args={train_args}",
            f"data.test_args={test_args}", "model.args.hidden=[8]", "trainer.epochs=1",
            "trainer.progress_bar=off", f"experiment.output_dir={out}"]  # fmt: skip
    assert cli("train", DIGITS, *args) == 2
    line = one_error_line(capsys.readouterr().err)
    assert expected in line and "data.test_args" in line
    assert changed(before, snapshot(tmp_path)) <= {  # bytecode of the module, nothing else
        p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.pyc")
    }
    assert not out.exists()


# -- 3. nothing half-made on the way out ---------------------------------------------------------
def _interrupt_on_call(real, at: int):
    """``real``, raising KeyboardInterrupt (Ctrl-C) on call number ``at``."""
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == at:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    return wrapped


def test_a_corrupt_image_in_a_cache_build_leaves_no_temporary_file(cli, tmp_path, capsys):
    root = make_folder(tmp_path / "data")
    (root / "green" / "img002.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 30)
    cache = default_cache_dir(root)
    out = tmp_path / "out"
    assert cli("train", IMAGE_FOLDER, f"data.root={root}", f"experiment.output_dir={out}",
               *QUICK_FOLDER) == 2  # fmt: skip
    assert "green/img002.png" in one_error_line(capsys.readouterr().err)
    assert not temporary_files(cache) and not list(cache.glob("*"))
    assert not out.exists()


@pytest.mark.parametrize("dataset", ["image_folder", "Carvana"])
def test_ctrl_c_in_a_cache_build_leaves_no_temporary_file(
    cli, tmp_path, capsys, monkeypatch, dataset
):
    if dataset == "Carvana":
        root = make_sample_carvana(tmp_path / "data", n=8, views=4, image_size=(64, 48))
        monkeypatch.setattr(carvana, "decode_pair", _interrupt_on_call(carvana.decode_pair, 4))
        args = [UNET, "data.args.scale=0.25", "model.args.base_width=4", "model.args.depth=2"]
    else:
        root = make_folder(tmp_path / "data")
        decode = _interrupt_on_call(image_folder.decode_image, 4)
        monkeypatch.setattr(image_folder, "decode_image", decode)
        args = [IMAGE_FOLDER, *QUICK_FOLDER]
    before = snapshot(tmp_path)
    out = tmp_path / "out"
    assert cli("train", *args, f"data.root={root}", "data.args.workers=1",
               f"experiment.output_dir={out}") == 130  # fmt: skip
    assert "interrupted by SIGINT" in one_error_line(capsys.readouterr().err)
    cache = default_cache_dir(root)
    assert not temporary_files(cache) and not list(cache.glob("*"))
    assert snapshot(tmp_path) == before


def test_sample_data_stopped_midway_leaves_nothing(cli, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(
        sample_carvana, "_draw_view", _interrupt_on_call(sample_carvana._draw_view, 3)
    )
    assert cli("make-sample-data", "carvana", tmp_path / "sample", "--n", "8") == 130
    assert "interrupted by SIGINT" in one_error_line(capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


def test_sample_data_into_an_existing_folder_keeps_its_other_files(tmp_path):
    target = tmp_path / "sample"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    make_sample_carvana(target, n=3, views=3, image_size=(40, 30))
    first = snapshot(target)
    make_sample_carvana(target, n=3, views=3, image_size=(40, 30), seed=1)
    assert (target / "notes.txt").read_text() == "mine"
    assert (target / "SYNTHETIC_README.txt").exists()
    assert len(list((target / "train").glob("*.jpg"))) == 6 and snapshot(target) != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sample"]  # no staging left


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_during_make_sample_data_leaves_nothing(tmp_path, sig):
    """A real signal while the set is being drawn (full size, far more images than it can
    draw before the signal): exit 130, no target folder, no staging folder."""
    target = tmp_path / "Carvana"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dltemplate", "make-sample-data", "carvana", str(target),
         "--n", "2000"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(".Carvana.partial-*/train/*.jpg")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err[-3000:]
    assert f"interrupted by {sig.name}" in one_error_line(err)
    assert list(tmp_path.iterdir()) == []


# -- 4. predict on a decompression bomb ----------------------------------------------------------
def write_bomb_png(path: Path, side: int = 20000) -> Path:
    """A valid 1-bit grey PNG of ``side`` x ``side`` zeros: a few tens of KB on disk,
    ``side``² pixels once decoded (20000² = 400 M, beyond PIL's 2 x MAX_IMAGE_PIXELS)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    row = b"\0" * (1 + (side + 7) // 8)  # filter byte, then the packed bits
    packer = zlib.compressobj(9)
    data = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data)
    path.write_bytes(png + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def bomb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = write_bomb_png(tmp_path_factory.mktemp("bomb") / "huge.png")
    assert path.stat().st_size < 1_000_000
    with pytest.raises(Image.DecompressionBombError):
        Image.open(path)
    return path


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny segmentation run: one epoch of a small UNet on 12 generated 64x48 photos."""
    from dltemplate.cli import main

    data = make_sample_carvana(tmp_path_factory.mktemp("carvana"), n=12, views=4,
                               image_size=(64, 48))  # fmt: skip
    out = tmp_path_factory.mktemp("seg")
    assert main(["train", str(UNET), f"data.root={data}", f"experiment.output_dir={out}",
                 "data.args.scale=0.25", "data.args.workers=1", "model.args.base_width=4",
                 "model.args.depth=2", "trainer.epochs=1", "trainer.progress_bar=off",
                 "data.batch_size=4", "data.val_fraction=0.5"]) == 0  # fmt: skip
    (run,) = run_dirs(out)
    return run


def test_predict_on_a_decompression_bomb_is_one_line_and_writes_nothing(
    cli, tmp_path, capsys, seg_run, bomb
):
    good = tmp_path / "photo.jpg"
    Image.new("RGB", (40, 30), (120, 80, 40)).save(good)
    before, run_before = snapshot(tmp_path), snapshot(seg_run)
    for images in ([bomb], [good, bomb]):  # a good file first: still nothing written
        assert cli("predict", seg_run, *images, "--out", tmp_path / "masks") == 2
        line = one_error_line(capsys.readouterr().err)
        assert str(bomb) in line and "DecompressionBombError" in line
    assert snapshot(tmp_path) == before and snapshot(seg_run) == run_before
    assert cli("predict", seg_run, good, "--out", tmp_path / "masks") == 0  # the run works
    assert (tmp_path / "masks" / "photo_mask.png").exists()


def test_segmentation_predict_writes_into_a_folder_and_takes_no_top_k(
    cli, tmp_path, capsys, seg_run
):
    """--out is a folder for segmentation (default <run>/predictions/; classification: an
    optional JSON file)."""
    good = tmp_path / "photo.jpg"
    Image.new("RGB", (40, 30), (120, 80, 40)).save(good)
    taken = tmp_path / "taken"
    taken.write_text("mine\n")
    for extra, words in (
        (["--out", str(taken)], ["taken", "not a folder"]),
        (["--out", str(tmp_path / "masks"), "--top-k", "2"], ["--top-k", "classification"]),
    ):
        assert cli("predict", seg_run, good, *extra) == 2
        line = one_error_line(capsys.readouterr().err)
        assert all(w in line for w in words), line
    assert taken.read_text() == "mine\n" and not (tmp_path / "masks").exists()


def test_a_decompression_bomb_in_carvana_is_one_line(cli, tmp_path, capsys, bomb):
    root = make_sample_carvana(tmp_path / "data", n=4, views=4, image_size=(64, 48))
    first = sorted((root / "train").glob("*.jpg"))[0]
    shutil.copyfile(bomb, first)  # PIL reads the content, whatever the name says
    before = snapshot(tmp_path)
    out = tmp_path / "out"
    assert cli("train", UNET, f"data.root={root}", "data.args.workers=1",
               f"experiment.output_dir={out}") == 2  # fmt: skip
    line = one_error_line(capsys.readouterr().err)
    assert first.name in line and "exceeds limit" in line
    assert snapshot(tmp_path) == before
