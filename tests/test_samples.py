"""Data beyond memory: splits as views of a mapped cache, any map-style Dataset read through
DataLoader workers (same batches for any worker or process count, exact resumes), per-sample
transforms, files read every epoch, and bad datasets as one clean line."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import torch
from conftest import REPO, assert_identical, mapped_file, run_dirs, run_results

from dltemplate.data.base import TensorSplit, concat_splits, make_splits
from dltemplate.data.carvana import Carvana
from dltemplate.data.image_cache import default_cache_dir
from dltemplate.data.loader import IndexLoader, ReadOptions
from dltemplate.data.sample_carvana import make_sample_carvana
from dltemplate.data.samples import SampleSplit, sample_seed
from dltemplate.data.transforms import HFlip, RandomCrop, build_transforms
from dltemplate.errors import ConfigError

DIGITS = REPO / "configs" / "digits_mlp.yaml"
MAP_STYLE = [
    str(DIGITS),
    "data.name=toy_datasets:DigitSamples",
    "data.train_val_sample_rate=0.15",
    "data.test_sample_rate=0.3",
    "data.batch_size=16",
    "data.train_transform=[hflip, {name: random_crop, args: {padding: 1}}]",
    "model.args.hidden=[32]",
    "model.args.dropout=0.2",
    "optimizer.lr=0.01",
    "trainer.epochs=2",
]


@pytest.fixture(autouse=True)
def no_curves(monkeypatch):
    from dltemplate.engine import rundir

    monkeypatch.setattr(rundir, "plot_curves", lambda *a, **k: None)


def train(cli, tmp_path: Path, name: str, *extra: str) -> dict[str, object]:
    out = tmp_path / name
    assert cli("train", *MAP_STYLE, *extra, f"experiment.output_dir={out}") == 0
    (run,) = run_dirs(out)
    return run_results(run)


# -- splits are views -------------------------------------------------------------------------
def test_subsets_are_views_of_their_source():
    inputs, targets = torch.arange(40).view(20, 2), torch.arange(20)
    whole = TensorSplit(inputs, targets, names=[f"s{i}" for i in range(20)])
    part = whole.subset(torch.tensor([3, 1, 7, 9])).subset(torch.tensor([2, 0]))
    assert part.source_inputs is inputs and part.source_targets is targets
    assert part.targets.tolist() == [7, 3] and part.names == ["s7", "s3"]
    got_x, got_y = part.gather(torch.tensor([1]))
    assert got_x.tolist() == [[6, 7]] and got_y.tolist() == [3]
    joined = concat_splits([part, whole.subset(torch.tensor([0]))])
    assert joined.source_inputs is inputs and joined.targets.tolist() == [7, 3, 0]
    other = TensorSplit(inputs[:2].clone(), targets[:2].clone())
    assert concat_splits([part, other]).targets.tolist() == [7, 3, 0, 1]


def test_carvana_splits_stay_mapped(tmp_path):
    """Train, validation and test index the one mapped cache: nothing is copied per process."""
    root = make_sample_carvana(tmp_path / "carvana", n=16, views=4, image_size=(64, 48))
    Carvana(str(root), scale=0.5, workers=1).load()  # cold: builds the cache
    data = make_splits(
        Carvana(str(root), scale=0.5, workers=1),
        seed=0,
        val_fraction=0.25,
        test_fraction=0.25,
        train_val_sample_rate=1.0,
        test_sample_rate=1.0,
    )
    (images,) = default_cache_dir(root).glob("*.images.npy")
    for split in (data.train, data.val, data.test):
        assert mapped_file(split.source_inputs) == str(images)
        assert split.index is not None
    assert len(data.train) + len(data.val) + len(data.test) == 16


# -- the reader -------------------------------------------------------------------------------
def digits_split(n: int = 50) -> SampleSplit:
    from toy_datasets import DigitSamples

    return SampleSplit(DigitSamples(n), label="digits")


def read_epoch(split, epoch: int, workers: int, rank: int = 0, world: int = 1, skip: int = 0):
    """One epoch's batches, global batches of 8 over ``world`` processes."""
    read = ReadOptions(num_workers=workers, transforms=[HFlip(), RandomCrop(1)])
    batch = 8 // world
    loader = IndexLoader(
        split, batch, training=True, seed=3, rank=rank, world_size=world, read=read
    )
    loader.set_epoch(epoch)
    loader.skip_batches = skip
    try:
        return [(b.inputs.clone(), b.targets.clone(), b.global_size) for b in loader]
    finally:
        loader.close()


def test_batches_do_not_depend_on_workers_processes_or_resumes():
    split = digits_split()
    zero = read_epoch(split, 1, workers=0)
    assert len(zero) == 7 and zero[-1][2] == 2  # 50 = 6 x 8 + a short batch of 2
    assert_identical(read_epoch(split, 1, workers=2), zero, "2 workers")
    # Two processes: each rank's share of a global batch, together, is the global batch.
    shares = [read_epoch(split, 1, workers=2, rank=r, world=2) for r in (0, 1)]
    assert len(shares[0]) == len(shares[1]) == len(zero)
    for (x0, y0, g0), (x1, y1, g1), (x, y, g) in zip(*shares, zero):
        assert g0 == g1 == g
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
    # A resumed epoch reads the batches it had not reached, the same.
    assert_identical(read_epoch(split, 1, workers=2, skip=4), zero[4:], "resumed")
    # Another epoch: another order and other random draws.
    other = read_epoch(split, 2, workers=0)
    assert not torch.equal(other[0][0], zero[0][0])


def test_one_sample_draws_the_same_in_any_batch():
    """The randomness of a sample depends on (seed, epoch, index) only."""
    split = digits_split(20)
    read = ReadOptions(transforms=[HFlip(), RandomCrop(2)])
    by_index = {}
    for shuffle in (True, False):
        loader = IndexLoader(split, 5, training=True, shuffle=shuffle, seed=1, read=read)
        loader.set_epoch(4)
        order = (
            torch.randperm(20, generator=torch.Generator().manual_seed(1 * 1_000_003 + 4))
            if shuffle
            else torch.arange(20)
        )
        seen = torch.cat([b.inputs for b in loader])
        for position, index in enumerate(order.tolist()):
            by_index.setdefault(index, []).append(seen[position])
    assert all(torch.equal(a, b) for a, b in by_index.values())
    assert sample_seed(1, 4, 0) != sample_seed(1, 5, 0) != sample_seed(2, 4, 0)


def test_reading_in_the_training_process_leaves_its_generators_alone():
    import random

    import numpy as np

    split = digits_split(20)
    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    expected = torch.rand(3), np.random.rand(3), random.random()
    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    read_epoch(split, 0, workers=0)
    assert torch.equal(torch.rand(3), expected[0])
    assert (np.random.rand(3) == expected[1]).all() and random.random() == expected[2]


# -- training -----------------------------------------------------------------------------------
def test_a_map_style_dataset_trains_the_same_with_any_workers(cli, tmp_path):
    zero = train(cli, tmp_path, "w0")
    assert_identical(train(cli, tmp_path, "w2", "data.num_workers=2"), zero, "2 workers")
    again = train(cli, tmp_path, "w2np", "data.num_workers=2", "data.persistent_workers=false")
    assert_identical(again, zero, "2 workers, not persistent")
    plain = train(cli, tmp_path, "plain", "data.train_transform=[]")
    first = next(iter(zero["model"]))
    assert not torch.equal(plain["model"][first], zero["model"][first])
    losses = [float(row["train/loss"]) for row in zero["rows"]]
    assert losses[1] < losses[0] and zero["test"]["accuracy"] > 0.15  # it learns (chance 0.1)


def test_map_style_own_test_split_groups_names_and_eval(cli, tmp_path, capsys):
    out = tmp_path / "out"
    args = [*MAP_STYLE, "data.name=toy_datasets:DictDigits", "data.args={n: 300}"]
    args += ["data.test_args={n: 300}", "data.num_workers=1", f"experiment.output_dir={out}"]
    args += ["data.train_val_sample_rate=1", "data.val_fraction=0.3"]  # 2 of the 7 writers
    assert cli("train", *args) == 0
    (run,) = run_dirs(out)
    groups = json.loads((run / "split.json").read_text())
    assert groups["val"] and not set(groups["train"]) & set(groups["val"])  # writers kept whole
    assert cli("eval", str(run)) == 2  # the saved config names code: not without trust
    assert cli("eval", str(run), "--trust-code") == 0
    report = json.loads((run / "eval_test_best.json").read_text())
    assert report["num_samples"] > 0 and report["samples"][0]["file"].startswith("digit")


# -- files read every epoch -----------------------------------------------------------------
def test_image_folder_files_mode_trains_as_the_cache_does(cli, tmp_path):
    from test_image_folder import CONFIG, make_folder

    root = make_folder(tmp_path / "shapes", per_class=12)
    common = [str(CONFIG), f"data.root={root}", "data.args.size=[12,12]", "trainer.epochs=2"]
    runs = {}
    for mode, workers in (("cache", 0), ("files", 0), ("files", 2)):
        out = tmp_path / f"{mode}{workers}"
        assert cli("train", *common, f"data.args.mode={mode}", f"data.num_workers={workers}",
                   f"experiment.output_dir={out}") == 0  # fmt: skip
        runs[mode, workers] = run_results(run_dirs(out)[0])
    assert_identical(runs["files", 0], runs["cache", 0], "files vs cache")
    assert_identical(runs["files", 2], runs["cache", 0], "files, 2 workers")


def test_carvana_files_mode_matches_the_cache(tmp_path):
    root = make_sample_carvana(tmp_path / "carvana", n=8, views=4, image_size=(64, 48))
    cached, _ = Carvana(str(root), scale=0.5, workers=1).load()
    files, _ = Carvana(str(root), scale=0.5, mode="files").load()
    loader = IndexLoader(files, 3, training=False, read=ReadOptions(num_workers=2))
    got = list(loader)
    loader.close()
    assert torch.equal(torch.cat([b.inputs for b in got]), cached.inputs)
    assert torch.equal(torch.cat([b.targets for b in got]), cached.targets)
    assert files.groups == cached.groups and files.names == cached.names


# -- transforms -----------------------------------------------------------------------------
def test_transforms_move_masks_with_images():
    image = torch.arange(2 * 4 * 6).view(2, 4, 6)
    mask = (image[:1] % 5 == 0).to(torch.uint8)
    flipped, flipped_mask = HFlip(p=1.0)(image, mask)
    assert torch.equal(flipped, image.flip(-1)) and torch.equal(flipped_mask, mask.flip(-1))
    _, label = HFlip(p=1.0)(image, 3)
    assert label == 3
    torch.manual_seed(0)
    cropped, cropped_mask = RandomCrop(2)(image, mask)
    assert cropped.shape == image.shape and cropped_mask.shape == mask.shape
    # The mask was cut at the same place: where the image kept a pixel, the mask agrees.
    kept = cropped != 0
    assert torch.equal((cropped % 5 == 0)[:1] & kept[:1], cropped_mask.bool() & kept[:1])


def shift(input, target, by: int = 1):
    """A user's transform: a function with args."""
    return input.roll(by, -1), target


def test_transform_config_errors_name_the_entry():
    mine = {"name": "test_samples:shift", "args": {"by": 2}}
    built = build_transforms(["hflip", mine], "k")
    assert built[1](torch.arange(4), 0)[0].tolist() == [2, 3, 0, 1]
    with pytest.raises(ConfigError, match=r"data.train_transform\[1\]: unknown transform 'hflp'"):
        build_transforms(["vflip", "hflp"], "data.train_transform")
    with pytest.raises(ConfigError, match=r"k\[0\].*p=2"):
        build_transforms([{"name": "hflip", "args": {"p": 2}}], "k")
    with pytest.raises(ConfigError, match=r"k\[0\]: unknown keys \['arg'\]"):
        build_transforms([{"name": "hflip", "arg": {}}], "k")


# -- bad datasets: exit 2, one line, nothing written -----------------------------------------
@pytest.mark.parametrize(
    "name, workers, message",
    [
        ("Ragged", 0, r"sample 37 has input shape \(1, 9, 8\) but sample \d+ has \(1, 8, 8\)"),
        ("Failing", 2, r"sample 23: ValueError: cannot decode digit023.png: truncated"),
        ("Failing", 0, r"sample 23: ValueError: cannot decode digit023.png: truncated"),
        ("Crashing", 2, r"a DataLoader worker died while reading sample (\d+, )?23\b"),
        ("Empty", 0, r"the dataset has no samples \(its length is 0\)"),
        ("Unlabelled", 0, r"does not say how many classes"),
        ("Stream", 0, r"neither a dltemplate dataset .* nor a map-style torch Dataset"),
    ],
)
def test_bad_datasets_stop_with_one_line(name, workers, message, cli, tmp_path, capsys):
    out = tmp_path / "out"
    code = cli("train", *MAP_STYLE, f"data.name=toy_datasets:{name}",
               "data.train_val_sample_rate=1.0", f"data.num_workers={workers}",
               f"experiment.output_dir={out}")  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and re.search(message, errors[0]), err
    assert f"data.name=toy_datasets:{name}" in errors[0]
    if name in ("Empty", "Unlabelled", "Stream"):  # found before the run starts
        assert not out.exists() or not any(out.iterdir())


# -- the README's example -------------------------------------------------------------------
def test_any_dataset_as_the_readme_shows(cli, tmp_path, monkeypatch):
    from conftest import readme_block

    (tmp_path / "my_dataset.py").write_text(readme_block("# my_dataset.py"))
    monkeypatch.syspath_prepend(str(tmp_path))
    first = "dltemplate train configs/digits_mlp.yaml data.name=my_dataset:Noisy"
    command = shlex.split(readme_block(first).replace("\\\n", " "))[1:]
    assert command[1] == "configs/digits_mlp.yaml"
    out = tmp_path / "out"
    assert cli(command[0], DIGITS, *command[2:], f"experiment.output_dir={out}",
               "trainer.epochs=3") == 0  # fmt: skip
    (run,) = run_dirs(out)
    assert json.loads((run / "test_metrics.json").read_text())["accuracy"] > 0.9
    saved = json.loads(next(run.glob("config_*.json")).read_text())["data"]
    assert saved["num_workers"] == 2 and saved["train_transform"][0] == "vflip"


# -- Ctrl-C reaches the workers too -----------------------------------------------------------
@pytest.mark.slow  # ~20 s: two fresh processes
def test_ctrl_c_to_the_process_group_stops_at_a_safe_point_with_workers(tmp_path):
    """A terminal's Ctrl-C sends SIGINT to every process of the group, DataLoader workers
    included: they ignore it, the training process stops at its next step boundary (exit 130,
    interrupt checkpoint) and shuts them down; resume then finishes the run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), *sys.path])}
    args = [*MAP_STYLE, "data.num_workers=2", "trainer.epochs=200", f"experiment.output_dir={out}"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "dltemplate", "train", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's job would be
    )
    deadline = time.monotonic() + 60
    while not list(out.glob("*/metrics.csv")) and time.monotonic() < deadline:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    (run,) = run_dirs(out)
    assert (run / "Vanilla_interrupt_ckpt.pth").exists()
    assert "DataLoader worker" not in err
    resumed = subprocess.run(
        [sys.executable, "-m", "dltemplate", "resume", str(run), "--trust-code",
         "trainer.epochs=3"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]


def test_evaluation_reads_every_sample_once_over_processes():
    split = digits_split(21)
    seen = []
    for rank in (0, 1):
        loader = IndexLoader(split, 4, training=False, rank=rank, world_size=2,
                             read=ReadOptions(num_workers=1))  # fmt: skip
        seen += [y for b in loader for y in b.targets.tolist()]
        loader.close()
    assert sorted(seen) == sorted(split.dataset.labels[:21].tolist())


def test_a_bad_output_dir_stops_before_the_data_is_read(cli, tmp_path, capsys, monkeypatch):
    """A first decode of a large dataset takes minutes: a wrong output_dir is said first."""
    from dltemplate.engine.task import Task

    def no_loading(self):
        raise AssertionError("the data was read before output_dir was checked")

    monkeypatch.setattr(Task, "load_data", no_loading)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert cli("train", *MAP_STYLE, f"experiment.output_dir={blocker / 'runs'}") == 2
    assert "experiment.output_dir=" in capsys.readouterr().err


def test_what_a_dataset_says_of_itself_is_used():
    import numpy as np
    from toy_datasets import DigitSamples

    from dltemplate.data.samples import MapStyleDataset

    dataset = DigitSamples(30)
    dataset.mean, dataset.std = np.array([0.25]), np.array([0.5])  # arrays, as users keep them
    info = MapStyleDataset(dataset, None, "digits").describe()
    assert info.input_shape == (1, 8, 8) and info.num_classes == 10
    assert info.mean == (0.25,) and info.std == (0.5,) and info.class_names[3] == "3"
