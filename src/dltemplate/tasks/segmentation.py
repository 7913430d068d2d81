"""Binary segmentation: uint8 images normalised on the device, logits per pixel, dice and IoU.

Models may return several heads (UNet++ deep supervision) as a list while training; the losses
average their per-head values and everything else sees the mean of the heads
(:mod:`dltemplate.models.heads`). Pictures: an image / ground truth / prediction grid in
TensorBoard at each validation; with ``eval --viz`` the seed's triplets and an overlay (the
prediction over the image, captioned with the file name and dice); with ``predict`` the mask
and an overlay.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn

from dltemplate.data.base import Batch, DataInfo, channel_stats
from dltemplate.data.carvana.decode import BAD_IMAGE_ERRORS
from dltemplate.data.image_folder import convert_image
from dltemplate.engine.task import Task
from dltemplate.errors import DataError, UsageError
from dltemplate.metrics.base import MetricCollection
from dltemplate.metrics.overlap import dice_coefficient
from dltemplate.models.heads import merged_prediction
from dltemplate.registry import TASKS


def _to_uint8_image(x: torch.Tensor, info: DataInfo) -> np.ndarray:
    """A normalised (C, H, W) tensor back to an (H, W, 3) uint8 RGB picture: 3 channels as
    they are, any other number as the grey levels of the first (a 1-channel dataset)."""
    mean, std = channel_stats(info, x.device)
    pixels = ((x.float() * std[0] + mean[0]).clamp(0, 1) * 255).round().byte()
    if pixels.shape[0] != 3:
        pixels = pixels[:1].expand(3, -1, -1)
    return pixels.permute(1, 2, 0).cpu().numpy()


def _mask_png(mask: torch.Tensor) -> np.ndarray:
    """A (1, H, W) or (H, W) 0/1 mask as an (H, W) uint8 picture, 0 or 255."""
    return (mask.reshape(mask.shape[-2:]).cpu().numpy() > 0).astype(np.uint8) * 255


OVERLAY_COLOUR = np.array([255, 40, 40], dtype=np.float32)  # the predicted pixels, tinted red
CAPTION_LINE = 14  # pixels per caption line, in a strip above the picture: it hides no pixel


def overlay(image: np.ndarray, pred: np.ndarray, caption: str) -> Image.Image:
    """The (H, W, 3) uint8 ``image`` with the (H, W) boolean ``pred`` tinted red over it and
    its outline drawn, under a strip holding ``caption`` (its parts, split at double spaces,
    on lines of their own when the picture is too narrow for one)."""
    pixels = image.astype(np.float32)
    pixels[pred] = 0.55 * pixels[pred] + 0.45 * OVERLAY_COLOUR
    inner = pred.copy()  # the outline: predicted pixels with a neighbour that is not
    inner[1:, :] &= pred[:-1, :]
    inner[:-1, :] &= pred[1:, :]
    inner[:, 1:] &= pred[:, :-1]
    inner[:, :-1] &= pred[:, 1:]
    pixels[pred & ~inner] = OVERLAY_COLOUR
    height, width = pred.shape
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines = [caption] if draw.textlength(caption) + 4 <= width else caption.split("  ")
    strip = CAPTION_LINE * len(lines)
    picture = Image.new("RGB", (width, height + strip), (0, 0, 0))
    picture.paste(Image.fromarray(pixels.round().astype(np.uint8)), (0, strip))
    draw = ImageDraw.Draw(picture)
    for k, line in enumerate(lines):
        draw.text((2, 1 + CAPTION_LINE * k), line, fill=(255, 255, 255))
    return picture


@contextlib.contextmanager
def _readable(path: Path) -> Iterator[None]:
    """Turn PIL's errors on a bad image file into a DataError naming it (exit status 2)."""
    try:
        yield
    except BAD_IMAGE_ERRORS as exc:
        kind = type(exc).__name__ if isinstance(exc, Image.DecompressionBombError) else ""
        why = f"{kind}: {exc}" if kind else str(exc)
        raise DataError(f"{path}: not a readable image ({why})") from exc


@TASKS.register("segmentation")
class SegmentationTask(Task):
    """Binary masks from per-pixel logits; dice and IoU; pictures of the predictions."""

    def default_metrics(self, info: DataInfo) -> list[str]:
        """Every segmentation run logs these."""
        return ["dice", "iou"]

    def prepare_batch(self, batch: Batch, device: torch.device, info: DataInfo) -> Batch:
        """Move images and masks to ``device``, then scale uint8 images to [0, 1] (float
        images are on that scale already, as in classification) and normalise them."""
        x = batch.inputs.to(device, non_blocking=True)
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
        masks = batch.targets.to(device, non_blocking=True)
        return Batch(self.normalize_inputs(x.float(), info), masks, batch.global_size)

    def normalize_inputs(self, x: torch.Tensor, info: DataInfo) -> torch.Tensor:
        """Images on the [0, 1] scale minus the dataset's mean, over its std, per channel;
        float64 (NumPy's default) as float32, the models' type."""
        if x.dtype == torch.float64:
            x = x.float()
        mean, std = channel_stats(info, x.device)
        return (x - mean) / std

    def predictions(self, outputs: Any) -> torch.Tensor:
        """Mask probabilities: the sigmoid of the per-pixel logits (the mean of the heads')."""
        return torch.sigmoid(merged_prediction(outputs).float())

    def augment(self, batch: Batch, info: DataInfo) -> Batch:
        """Per image: a horizontal flip (half the time), a random order of the colour channels,
        a saturation change (down to grey) and a brightness/contrast change, so that a few cars
        teach shape rather than colour."""
        x, masks = batch.inputs, batch.targets
        n = len(x)
        flip = torch.rand(n, device=x.device) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        masks = torch.where(flip.view(-1, 1, 1, 1), masks.flip(-1), masks)
        # A random shift of up to an eighth of the picture (wrapping round), image and mask alike.
        h, w = x.shape[-2:]
        dy = torch.randint(-h // 8, h // 8 + 1, (n,)).tolist()
        dx = torch.randint(-w // 8, w // 8 + 1, (n,)).tolist()
        x = torch.stack([xi.roll((a, b), (-2, -1)) for xi, a, b in zip(x, dy, dx)])
        masks = torch.stack([m.roll((a, b), (-2, -1)) for m, a, b in zip(masks, dy, dx)])
        mean, std = channel_stats(info, x.device)
        pixels = x * std + mean  # back to [0, 1] to jitter colours
        order = torch.argsort(torch.rand(n, pixels.shape[1], device=x.device), dim=1)
        pixels = torch.gather(pixels, 1, order.view(n, -1, 1, 1).expand_as(pixels))
        grey = pixels.mean(1, keepdim=True)
        saturation = torch.empty(n, 1, 1, 1, device=x.device).uniform_(0.0, 1.5)
        pixels = grey + saturation * (pixels - grey)
        gain = torch.empty(n, 1, 1, 1, device=x.device).uniform_(0.6, 1.4)
        shift = torch.empty(n, 1, 1, 1, device=x.device).uniform_(-0.25, 0.25)
        pixels = ((pixels - 0.5) * gain + 0.5 + shift).clamp(0, 1)
        return Batch((pixels - mean) / std, masks, batch.global_size)

    def update_metrics(self, metrics: MetricCollection, outputs: Any, batch: Batch) -> None:
        """Metrics see the mean of the heads."""
        metrics.update(merged_prediction(outputs).float(), batch.targets)

    def log_images(self, writer: Any, tag: str, batch: Batch, outputs: Any, step: int) -> None:
        """A grid of up to 4 rows: image | ground truth | prediction."""
        info = self.data_info()
        pred = (merged_prediction(outputs) > 0).float()
        rows = []
        for i in range(min(4, len(batch.targets))):
            image = torch.from_numpy(_to_uint8_image(batch.inputs[i], info)).permute(2, 0, 1)
            truth = batch.targets[i].float().cpu().expand(3, -1, -1) * 255
            guess = pred[i].cpu().expand(3, -1, -1) * 255
            rows.append(torch.cat([image.float(), truth, guess], dim=2))
        grid = torch.cat(rows, dim=1).byte()
        writer.add_image(f"{tag}/image_truth_prediction", grid, step)

    def save_visuals(
        self,
        batch: Batch,
        outputs: Any,
        first_index: int,
        out_dir: Path,
        every: int,
        info: DataInfo,
        names: Sequence[str] | None = None,
    ) -> int:
        """The seed's triplets, ``<n>_image.png``, ``<n>_mask.png``, ``<n>_pred.png``, and
        ``<n>_overlay.png``: the prediction over the image, captioned with the file name (from
        ``names``, else the index) and the dice. Returns the number of files written."""
        pred = merged_prediction(outputs) > 0
        dice = dice_coefficient(pred, batch.targets > 0, dtype=torch.float64)
        written = 0
        for i in range(len(batch.targets)):
            n = first_index + i
            if n % max(1, every):
                continue
            image = _to_uint8_image(batch.inputs[i], info)
            Image.fromarray(image).save(out_dir / f"{n:05d}_image.png")
            Image.fromarray(_mask_png(batch.targets[i])).save(out_dir / f"{n:05d}_mask.png")
            Image.fromarray(_mask_png(pred[i].byte())).save(out_dir / f"{n:05d}_pred.png")
            name = names[i] if names is not None else f"sample {n}"
            caption = f"{name}  dice {float(dice[i]):.3f}"
            overlay(image, pred[i, 0].cpu().numpy(), caption).save(out_dir / f"{n:05d}_overlay.png")
            written += 4
        return written

    def describe_predictions(
        self, batch: Batch, outputs: Any, info: DataInfo, limit: int = 10
    ) -> list[dict[str, Any]]:
        """Per-image dice of the first ``limit`` images of a batch."""
        pred = merged_prediction(outputs)[:limit] > 0
        truth = batch.targets[:limit] > 0
        dice = dice_coefficient(pred, truth, dtype=torch.float64)
        return [{"dice": round(float(d), 4)} for d in dice]

    @torch.no_grad()
    def predict_files(
        self,
        model: nn.Module,
        paths: list[Path],
        out_dir: Path,
        device: torch.device,
        info: DataInfo,
    ) -> list[Path]:
        """Predict a mask for each image at its own size; write ``<stem>_mask.png`` (0/255)
        and ``<stem>_overlay.png`` (the mask over the image, captioned with the file name).

        Every image's header is read first, so that a file that is not an image, or one too
        large to decode safely (PIL's decompression-bomb limit), stops with a DataError
        naming it before anything is written; a file whose pixels turn out corrupt stops
        the same way when it is reached. Images are read grey or RGB as the run's inputs are
        (16-bit grey scaled to 8 bits, as image_folder decodes); two files of one name
        (``a/x.jpg``, ``b/x.png``) would write the same mask: a DataError naming both."""
        shape = tuple(info.input_shape)
        if len(shape) != 3 or shape[0] not in (1, 3):
            raise UsageError(
                f"predict reads image files, but the run's inputs have shape {shape}, not "
                "(channels, height, width) with 1 (grey) or 3 (RGB) channels"
            )
        model.eval()
        stems: dict[str, Path] = {}
        for path in paths:
            with _readable(path), Image.open(path):
                pass  # the header: format and size (where PIL refuses a bomb)
            first = stems.setdefault(Path(path).stem, Path(path))
            if first.resolve() != Path(path).resolve():
                raise DataError(
                    f"{first} and {path} would both write {Path(path).stem}_mask.png into "
                    f"{out_dir}: predict them into different --out folders"
                )
        out_dir.mkdir(parents=True, exist_ok=True)
        height, width = shape[1:]
        mode = "L" if shape[0] == 1 else "RGB"
        written = []
        for path in paths:
            with _readable(path), Image.open(path) as img:
                img.load()
                original = convert_image(img, mode)
            resized = np.asarray(original.resize((width, height), Image.BILINEAR))
            x = torch.from_numpy(resized.reshape(height, width, -1).copy()).permute(2, 0, 1)[None]
            batch = self.prepare_batch(Batch(x, torch.zeros(1), 1), device, info)
            logits = merged_prediction(self.forward(model, batch))
            full = F.interpolate(logits.float(), size=original.size[::-1], mode="bilinear")
            pred = (full[0, 0] > 0).cpu().numpy()
            target = out_dir / f"{Path(path).stem}_mask.png"
            Image.fromarray(pred.astype(np.uint8) * 255).save(target)
            picture = overlay(np.asarray(original.convert("RGB")), pred, Path(path).name)
            picture.save(out_dir / f"{Path(path).stem}_overlay.png")
            written += [target, out_dir / f"{Path(path).stem}_overlay.png"]
        return written
