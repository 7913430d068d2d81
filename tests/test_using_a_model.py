"""Using a trained model as a lab user would: segmentation runs on datasets of one's own (grey
or float images) through eval --viz, TensorBoard, load_model and predict; predict on image
files of every kind PIL opens."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO
from PIL import Image
from torch.utils.data import Dataset

import dltemplate

UNET = REPO / "configs" / "unet_carvana.yaml"
SIDE = 32


class Squares(Dataset):
    """Grey ``SIDE`` x ``SIDE`` pictures, a bright square on noise, with its mask; inputs are
    uint8 (as photos decode) or float in [0, 1] (``dtype="float"``)."""

    def __init__(self, n: int = 48, dtype: str = "uint8") -> None:
        self.n, self.dtype = n, dtype

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(i)
        y, x = (i * 5) % 20, (i * 7) % 20
        mask = torch.zeros(1, SIDE, SIDE)
        mask[:, y : y + 10, x : x + 10] = 1
        image = torch.rand(1, SIDE, SIDE, generator=g) * 0.3 + 0.6 * mask
        if self.dtype == "uint8":
            return (image * 255).round().to(torch.uint8), mask
        return image, mask


def seg_overrides(out: Path, epochs: int) -> list[str]:
    """A small UNet trained quickly on :class:`Squares` (TensorBoard on, as by default)."""
    return [
        "model.args.base_width=4", "model.args.depth=2", f"trainer.epochs={epochs}",
        "trainer.progress_bar=off", "experiment.threads=1", f"experiment.output_dir={out}",
        "data.batch_size=4", "data.augment=false", "optimizer.lr=0.01", "scheduler.name=none",
    ]  # fmt: skip


def close_run_logs() -> None:
    """Close the train.log that in-process runs leave the logger writing to."""
    log = logging.getLogger("dltemplate")
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()


@pytest.fixture(scope="module")
def grey_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One epoch of a small UNet on grey uint8 squares given in Python."""
    out = tmp_path_factory.mktemp("grey")
    try:
        result = dltemplate.train(UNET, seg_overrides(out, 1), dataset=Squares())
    finally:
        close_run_logs()
    return result.run_dir


def test_a_grey_segmentation_dataset_draws_its_pictures(grey_run, tmp_path):
    """A 1-channel dataset: TensorBoard's grid at each validation (the run above finished) and
    eval --viz's triplets and overlays, in grey, the image the very sample's pixels."""
    assert list((grey_run / "summary").glob("events.out.tfevents.*"))
    viz = tmp_path / "viz"
    report = dltemplate.evaluate(grey_run, dataset=Squares(), viz_dir=viz, viz_freq=1)
    tested = report["pictures"]["count"] // 4
    assert tested >= 5 and report["pictures"]["count"] == len(list(viz.glob("*.png")))
    samples = {bytes(Squares()[i][0][0].numpy()) for i in range(len(Squares()))}
    for n in range(tested):
        image = np.asarray(Image.open(viz / f"{n:05d}_image.png"))
        assert image.shape == (SIDE, SIDE, 3)
        assert (image == image[..., :1]).all()  # grey: the three channels equal
        assert bytes(image[..., 0]) in samples  # a sample's own grey levels
        overlay = Image.open(viz / f"{n:05d}_overlay.png")
        assert overlay.mode == "RGB" and overlay.width == SIDE


def test_float_segmentation_inputs_are_taken_as_they_are(tmp_path):
    """Float inputs in [0, 1] are not divided by 255 again: the run learns the squares, and
    load_model (which takes [0, 1] inputs) agrees with eval."""
    try:
        result = dltemplate.train(UNET, seg_overrides(tmp_path, 6), dataset=Squares(dtype="float"))
    finally:
        close_run_logs()
    assert result.test_metrics["dice"] > 0.9
    report = dltemplate.evaluate(result.run_dir, dataset=Squares(dtype="float"))
    assert report["metrics"]["dice"] == pytest.approx(result.test_metrics["dice"])
    model = dltemplate.load_model(result.run_dir, dataset=Squares(dtype="float"))
    data = Squares(dtype="float")
    images = torch.stack([data[i][0] for i in range(len(data))])
    masks = torch.stack([data[i][1] for i in range(len(data))]) > 0
    with torch.no_grad():
        pred = model(images) > 0.5
    dice = 2 * (pred & masks).sum((1, 2, 3)) / (pred.sum((1, 2, 3)) + masks.sum((1, 2, 3)))
    assert dice.mean() > 0.9
