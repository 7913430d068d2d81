"""Segmentation end to end on generated Carvana-layout data: train, eval --viz, predict."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, run_dirs
from PIL import Image

from dltemplate.data.carvana.layout import car_id
from dltemplate.data.sample_carvana import make_sample_carvana

# Under pytest -n, this file's tests share one worker: its module fixtures (trained runs)
# are built once, not once per worker.
pytestmark = pytest.mark.xdist_group("test_segmentation")

UNET = REPO / "configs" / "unet_carvana.yaml"
UNETPP = REPO / "configs" / "unetpp_carvana.yaml"


# Session scope, not module: under pytest -n a worker may run other files' tests between these,
# and pytest ends module fixtures whenever it leaves the module (the run was trained twice).
@pytest.fixture(scope="session")
def carvana(tmp_path_factory) -> Path:
    """32 synthetic pairs (4 cars x 8 views) at 480x320: quick to train at 1/4 scale."""
    return make_sample_carvana(tmp_path_factory.mktemp("carvana"), n=32, views=8,
                               image_size=(480, 320))  # fmt: skip


def small(data: Path, out: Path, *extra: str) -> list[str]:
    return [f"data.root={data}", f"experiment.output_dir={out}", "data.args.scale=0.25",
            "model.args.base_width=8", "model.args.depth=3", "trainer.log_every_n_steps=2",
            *extra]  # fmt: skip


@pytest.fixture(scope="session")
def unet_run(carvana, tmp_path_factory) -> Path:
    from dltemplate.cli import main

    out = tmp_path_factory.mktemp("unet")
    # Two training cars of 8 small views: a short version of the demo (which reaches ~0.89).
    extra = ["trainer.epochs=20", "optimizer.lr=0.005"]
    code = main(["train", str(UNET), *small(carvana, out, *extra)])

    assert code == 0
    (run,) = run_dirs(out)
    return run


def test_unet_learns_the_cars_and_keeps_them_whole_in_splits(unet_run):
    split = json.loads((unet_run / "split.json").read_text())
    cars = [set(split[k]) for k in ("train", "val", "test")]
    assert cars[0] and cars[1] and cars[2]
    assert not (cars[0] & cars[1] or cars[0] & cars[2] or cars[1] & cars[2])
    best = max(float(r.split(",")[header_index(unet_run, "val/dice")])
               for r in (unet_run / "metrics.csv").read_text().splitlines()[1:])  # fmt: skip
    assert "SYNTHETIC sample data" in (unet_run / "train.log").read_text()
    assert best > 0.65  # marking half the pixels at random scores about 0.3
    assert (unet_run / "UNet_best_ckpt.pth").exists()


def header_index(run: Path, column: str) -> int:
    return (run / "metrics.csv").read_text().splitlines()[0].split(",").index(column)


def test_tensorboard_gets_an_image_truth_prediction_grid(unet_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(unet_run / "summary"), size_guidance={"images": 0})
    acc.Reload()
    assert "val/image_truth_prediction" in acc.Tags()["images"]
    first = acc.Images("val/image_truth_prediction")[0]
    assert first.width == 3 * 120 and first.height % 80 == 0  # image | truth | prediction


def test_eval_viz_writes_triplets_and_overlays_of_the_run_test_cars(
    cli, unet_run, tmp_path, capsys, monkeypatch
):
    from dltemplate.tasks import segmentation

    captions, draw = [], segmentation.overlay

    def spy(image, pred, caption):
        captions.append(caption)
        return draw(image, pred, caption)

    monkeypatch.setattr(segmentation, "overlay", spy)
    viz = tmp_path / "viz"
    assert cli("eval", unet_run, "--viz", "--viz-dir", viz, "--viz-freq", "3") == 0
    out = capsys.readouterr().out
    assert "dice" in out and "iou" in out
    report = json.loads((unet_run / "eval_test_best.json").read_text())
    test_cars = json.loads((unet_run / "split.json").read_text())["test"]
    assert report["num_samples"] == 8 * len(test_cars)
    drawn = len(range(0, report["num_samples"], 3))
    assert report["pictures"]["count"] == 4 * drawn  # files, as the message says
    assert f"{4 * drawn} pictures written to {viz}" in out
    for kind in ("image", "mask", "pred", "overlay"):
        files = sorted(viz.glob(f"*_{kind}.png"))
        assert len(files) == drawn
    mask = np.asarray(Image.open(viz / "00000_mask.png"))
    assert set(np.unique(mask)) <= {0, 255}
    # each overlay: the image under a caption strip, red where predicted, captioned with the
    # test photo's file name and its dice
    for n, caption in zip(range(0, report["num_samples"], 3), captions):
        image = np.asarray(Image.open(viz / f"{n:05d}_image.png")).astype(int)
        pred = np.asarray(Image.open(viz / f"{n:05d}_pred.png")) > 0
        truth = np.asarray(Image.open(viz / f"{n:05d}_mask.png")) > 0
        picture = np.asarray(Image.open(viz / f"{n:05d}_overlay.png")).astype(int)
        below = picture[picture.shape[0] - image.shape[0] :]  # under the caption
        assert below.shape == image.shape
        assert (below[~pred] == image[~pred]).all()
        red = np.array([255, 40, 40])  # predicted pixels: tinted red, or the red outline
        tinted = (np.abs(below - (0.55 * image + 0.45 * red)) <= 1).all(-1)
        assert pred.any() and (tinted | (below == red).all(-1))[pred].all()
        name, dice = caption.split("  dice ")
        assert car_id(Path(name).stem) in test_cars
        want = 2 * (pred & truth).sum() / (pred.sum() + truth.sum())
        assert float(dice) == pytest.approx(want, abs=1e-3)
    assert len(captions) == drawn and len({c.split()[0] for c in captions}) == drawn


def test_eval_viz_by_default_draws_several_samples_of_a_small_test_split(
    cli, unet_run, tmp_path, capsys
):
    viz = tmp_path / "viz"
    assert cli("eval", unet_run, "--viz", "--viz-dir", viz) == 0
    report = json.loads((unet_run / "eval_test_best.json").read_text())
    assert report["num_samples"] == 8  # one test car: every 50th would draw one sample
    assert len(list(viz.glob("*_overlay.png"))) == 8
    assert report["pictures"]["count"] == len(list(viz.iterdir())) == 32


def test_eval_names_the_file_of_each_sample_and_counts_picture_files(
    cli, unet_run, carvana, tmp_path, capsys
):
    viz = tmp_path / "viz"
    assert cli("eval", unet_run, "--viz", "--viz-dir", viz, "--viz-freq", "1000") == 0
    out = capsys.readouterr().out
    assert f"4 pictures written to {viz}" in out  # one sample: a triplet and its overlay
    assert len(list(viz.iterdir())) == 4
    report = json.loads((unet_run / "eval_test_best.json").read_text())
    test_cars = set(json.loads((unet_run / "split.json").read_text())["test"])
    files = [sample["file"] for sample in report["samples"]]
    assert files and len(set(files)) == len(files)
    for name, sample in zip(files, report["samples"]):
        assert (carvana / "train" / name).is_file() and car_id(Path(name).stem) in test_cars
        assert f"file {name}, dice {sample['dice']}" in out


def test_predict_writes_masks_and_overlays_at_each_image_size(
    cli, unet_run, carvana, tmp_path, capsys
):
    image = next((carvana / "train").glob("*.jpg"))
    other = tmp_path / "other.png"
    Image.open(image).resize((200, 150)).save(other)
    assert cli("predict", unet_run, image, other, "--out", tmp_path / "pred") == 0
    pred_dir = tmp_path / "pred"
    printed = capsys.readouterr().out.split()
    assert sorted(printed) == sorted(str(p) for p in pred_dir.iterdir())
    assert len(printed) == 4
    first = Image.open(pred_dir / f"{image.stem}_mask.png")
    assert first.size == Image.open(image).size
    assert Image.open(pred_dir / "other_mask.png").size == (200, 150)
    truth = np.asarray(Image.open(carvana / "train_masks" / f"{image.stem}_mask.gif")) > 0
    pred = np.asarray(first) > 0
    assert 2 * (pred & truth).sum() / (pred.sum() + truth.sum()) > 0.6
    from dltemplate.tasks.segmentation import CAPTION_LINE

    picture = np.asarray(Image.open(pred_dir / f"{image.stem}_overlay.png")).astype(int)
    photo = np.asarray(Image.open(image).convert("RGB")).astype(int)
    below = picture[CAPTION_LINE:]  # one caption line: the picture is wide enough
    assert below.shape == photo.shape
    assert (below[~pred] == photo[~pred]).all()
    red = np.array([255, 40, 40])  # predicted pixels: tinted red, or the red outline
    tinted = (np.abs(below - (0.55 * photo + 0.45 * red)) <= 1).all(-1)
    assert (tinted | (below == red).all(-1))[pred].all()
    assert Image.open(pred_dir / "other_overlay.png").size == (200, 150 + CAPTION_LINE)


def test_predict_without_out_writes_masks_inside_the_run(cli, unet_run, carvana, tmp_path):
    image = next((carvana / "train").glob("*.jpg"))
    assert cli("predict", unet_run, image) == 0
    assert (unet_run / "predictions" / f"{image.stem}_mask.png").is_file()
    assert not (tmp_path / "predictions").exists() and not (tmp_path / "masks").exists()


def test_predict_on_a_broken_image_exits_2(cli, unet_run, tmp_path, capsys):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not really a jpeg")
    assert cli("predict", unet_run, broken, "--out", tmp_path / "pred") == 2
    assert "broken.jpg" in capsys.readouterr().err


def test_unetpp_with_deep_supervision_trains(cli, carvana, tmp_path):
    assert cli("train", UNETPP, *small(carvana, tmp_path, "trainer.epochs=2")) == 0
    (run,) = run_dirs(tmp_path)
    assert (run / "UNet++_best_ckpt.pth").exists()
    assert cli("eval", run) == 0


def test_count_params_reports_unet_and_unetpp(cli, capsys):
    assert cli("count-params", UNET) == 0
    assert cli("count-params", UNETPP) == 0
    out = capsys.readouterr().out
    assert "model UNet" in out and "model UNet++" in out and "total" in out


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["data.args.scale=0.01"], "depth"),  # 3x5 pixels cannot go 3 levels down
        (["data.root=/nonexistent/carvana"], "/nonexistent/carvana"),
    ],
)
def test_bad_segmentation_input_exits_2(cli, carvana, tmp_path, capsys, extra, expected):
    assert cli("train", UNET, *small(carvana, tmp_path / "out"), *extra) == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # the seed's scripts end to end, in subprocesses (~10 s)
def test_seed_segmentation_commands(carvana, tmp_path):
    out = tmp_path / "Results"
    train = subprocess.run(
        [sys.executable, str(REPO / "trainer_seg_on_carvana.py"), "--proj_name", "SegOnCarvana",
         "--model_type", "UNet", "--data_type", "Carvana", "--output_dir", f"{out}/",
         "--gpu_devices", "0", "--data_dir", str(carvana), "--epochs", "1",
         "data.args.scale=0.25", "model.args.base_width=8"],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert train.returncode == 0, train.stderr
    (run,) = run_dirs(out)
    viz = tmp_path / "test_viz"
    ev = subprocess.run(
        [sys.executable, str(REPO / "eval_seg_on_carvana.py"), "--model_path",
         str(run / "UNet_best_ckpt.pth"), "--save_path", f"{viz}/", "--data_dir", str(carvana),
         "--model_type", "UNet", "--data_type", "Carvana", "--viz", "True"],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert ev.returncode == 0, ev.stderr
    assert "dice" in ev.stdout
    assert list(viz.glob("*_pred.png")) and (viz / "eval_test.json").exists()


def test_augmentation_moves_masks_with_images_and_varies_colour():
    """Flips and shifts move image and mask alike; colours change per image."""
    import torch

    from dltemplate.config import load_config
    from dltemplate.data.base import Batch, DataInfo
    from dltemplate.tasks.segmentation import SegmentationTask

    info = DataInfo((3, 8, 16), 1, ["background", "car"], (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    task = SegmentationTask(load_config(None, ["experiment.task=segmentation"]))
    images = torch.zeros(64, 3, 8, 16)
    images[:, 0] = 1.0  # red background
    images[:, :, :, 3] = 2.0  # a bright grey bar at column 3 (normalised units)
    masks = torch.zeros(64, 1, 8, 16, dtype=torch.uint8)
    masks[:, :, :, 3] = 1
    torch.manual_seed(0)
    out = task.augment(Batch(images, masks, 64), info)
    bar = out.inputs.mean(dim=(1, 2)).argmax(dim=1)  # brightest column of each image
    assert torch.equal(bar, out.targets[:, 0, 0].argmax(dim=1))  # the mask moved alike
    assert len(set(bar.tolist())) > 4  # flipped and shifted by various amounts
    background = out.inputs[:, :, 0, 0]
    assert len({tuple(c.round(decimals=2).tolist()) for c in background}) > 10  # colours vary
