"""Using a trained model as a lab user would: segmentation runs on datasets of one's own (grey
or float images) through eval --viz, TensorBoard, load_model and predict; predict on image
files of every kind PIL opens."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import test_export
import test_predict_api
import torch
from conftest import REPO
from PIL import Image
from test_predict_api import one_error_line
from torch.utils.data import Dataset

import dltemplate

# One worker under pytest -n, with test_predict_api: their session fixture is built once.
pytestmark = pytest.mark.xdist_group("test_predict_api")
UNET = REPO / "configs" / "unet_carvana.yaml"
folder_run = test_predict_api.folder_run  # its session fixture: one image-folder run for both
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


@pytest.fixture(scope="session")  # session: a worker leaving the module would end it
def grey_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small UNet trained on grey uint8 squares given in Python (it finds them: dice > 0.9)."""
    out = tmp_path_factory.mktemp("grey")
    try:
        result = dltemplate.train(UNET, seg_overrides(out, 3), dataset=Squares())
    finally:
        close_run_logs()
    assert result.test_metrics["dice"] > 0.9
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


class FlatMasks(Squares):
    """:class:`Squares` with (H, W) masks, without a channel axis (the losses accept them)."""

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = super().__getitem__(i)
        return image, mask[0]


def test_masks_without_a_channel_axis_are_drawn_whole(tmp_path):
    """eval --viz of (H, W) masks: each <n>_mask.png is its sample's whole mask (it was the
    mask's first row, a 1-pixel-high picture)."""
    try:
        result = dltemplate.train(UNET, seg_overrides(tmp_path / "run", 1), dataset=FlatMasks())
    finally:
        close_run_logs()
    viz = tmp_path / "viz"
    report = dltemplate.evaluate(result.run_dir, dataset=FlatMasks(), viz_dir=viz, viz_freq=1)
    data = FlatMasks()
    by_image = {bytes(data[i][0][0].numpy()): data[i][1].numpy() for i in range(len(data))}
    for n in range(report["pictures"]["count"] // 4):
        image = np.asarray(Image.open(viz / f"{n:05d}_image.png"))[..., 0]
        mask = np.asarray(Image.open(viz / f"{n:05d}_mask.png"))
        assert mask.shape == (SIDE, SIDE) and (mask == by_image[bytes(image)] * 255).all()
        assert Image.open(viz / f"{n:05d}_pred.png").size == (SIDE, SIDE)


def test_float_segmentation_inputs_are_taken_as_they_are(tmp_path):
    """Float inputs in [0, 1] are not divided by 255 again: the run learns the squares, and
    load_model (which takes [0, 1] inputs) agrees with eval."""
    try:
        result = dltemplate.train(UNET, seg_overrides(tmp_path, 3), dataset=Squares(dtype="float"))
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


class NumpyDigits(Dataset):
    """8 x 8 NumPy float64 pictures (NumPy's default type) in [0, 1] of two classes: a bright
    top half or a bright bottom half, on noise."""

    classes = ["top", "bottom"]

    def __len__(self) -> int:
        return 256

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        image = np.random.default_rng(i).random((1, 8, 8)) * 0.5
        label = i % 2
        image[:, 4 * label : 4 * label + 4, :] += 0.5
        return image, label


def test_float64_numpy_inputs_train_and_predict_as_float32(tmp_path):
    """A dataset of NumPy float64 arrays trains (float64 met the float32 model: 'mat1 and mat2
    must have the same dtype'), and load_model takes float64 tensors too."""
    overrides = [f"experiment.output_dir={tmp_path}", "trainer.epochs=3", "experiment.threads=1",
                 "trainer.progress_bar=off", "model.args.hidden=[16]", "optimizer.lr=0.01",
                 "data.batch_size=16"]  # fmt: skip
    try:
        result = dltemplate.train(REPO / "configs" / "digits_mlp.yaml", overrides,
                                  dataset=NumpyDigits())  # fmt: skip
    finally:
        close_run_logs()
    assert result.test_metrics["accuracy"] > 0.9
    model = dltemplate.load_model(result.run_dir, dataset=NumpyDigits())
    images = torch.from_numpy(np.stack([NumpyDigits()[i][0] for i in range(8)]))
    with torch.no_grad():
        as_64, as_32 = model(images), model(images.float())
    assert as_64.dtype == torch.float32
    assert torch.equal(as_64, as_32)


# == predict on image files of every kind ========================================================
def save_grey(pixels: np.ndarray, folder: Path) -> dict[str, Path]:
    """``pixels`` (uint8, H x W) as the files a lab has: grey PNG, 16-bit grey PNG (the same
    levels x 257), RGB PNG, RGBA PNG and a palette PNG, all of the same grey picture."""
    folder.mkdir(parents=True, exist_ok=True)
    grey = Image.fromarray(pixels)
    files = {
        "grey": folder / "grey.png",
        "grey16": folder / "grey16.png",
        "rgb": folder / "rgb.png",
        "rgba": folder / "rgba.png",
        "palette": folder / "palette.png",
    }
    grey.save(files["grey"])
    Image.fromarray(pixels.astype(np.uint16) * 257).save(files["grey16"])
    assert Image.open(files["grey16"]).mode == "I;16"
    grey.convert("RGB").save(files["rgb"])
    grey.convert("RGBA").save(files["rgba"])
    grey.convert("P").save(files["palette"])
    return files


def test_segmentation_predict_reads_every_kind_of_image_as_the_run_did(grey_run, cli, tmp_path):
    """A grey run predicts on grey, 16-bit, RGB, RGBA and palette files of one grey picture: the
    same mask for each, the mask load_model gives the picture; a JPEG of another size gets a
    mask at its own size. The run's dataset came from code: predict names it by its module."""
    pixels = Squares()[3][0][0].numpy()
    files = save_grey(pixels, tmp_path / "photos")
    Image.new("RGB", (50, 40), (200, 200, 200)).save(tmp_path / "photos" / "big.jpg")
    out = tmp_path / "masks"
    names = ["data.name=test_using_a_model:Squares"]
    assert cli("predict", grey_run, *files.values(), tmp_path / "photos" / "big.jpg", *names,
               "--out", out) == 0  # fmt: skip
    model = dltemplate.load_model(grey_run, dataset=Squares())
    with torch.no_grad():
        expected = model(torch.from_numpy(pixels).float()[None, None] / 255)[0, 0] > 0.5
    assert expected.any() and not expected.all()
    for name in files:
        mask = np.asarray(Image.open(out / f"{name}_mask.png")) > 0
        assert (mask == expected.numpy()).all(), name
        assert Image.open(out / f"{name}_overlay.png").mode == "RGB"
    assert Image.open(out / "big_mask.png").size == (50, 40)


def test_segmentation_predict_refuses_two_files_of_one_name(grey_run, cli, tmp_path, capsys):
    """``a/x.png`` and ``b/x.png`` would write the same ``x_mask.png``: one line naming both,
    exit status 2, nothing written."""
    first = save_grey(np.zeros((8, 8), np.uint8), tmp_path / "a")["grey"]
    second = save_grey(np.zeros((8, 8), np.uint8), tmp_path / "b")["grey"]
    out = tmp_path / "masks"
    names = ["data.name=test_using_a_model:Squares"]
    assert cli("predict", grey_run, first, second, *names, "--out", out) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(first) in line and str(second) in line and "grey_mask.png" in line
    assert not out.exists()


def test_classification_predict_reads_16_bit_grey_as_its_8_bit_levels(
    folder_run, cli, tmp_path, capsys
):
    """A 16-bit PNG is scaled to 8 bits, not clipped at 255 (nearly all white): its
    probabilities are those of the same picture saved in 8 bits."""
    run, _ = folder_run
    pixels = np.random.default_rng(0).integers(0, 120, (16, 16)).astype(np.uint8)
    files = save_grey(pixels, tmp_path)
    capsys.readouterr()
    assert cli("predict", run, files["grey"], files["grey16"], "--top-k", "3") == 0
    eight, sixteen = (line.split(": ")[1] for line in capsys.readouterr().out.splitlines())
    assert eight == sixteen


def test_predict_takes_overrides_such_as_a_moved_data_root(folder_run, cli, tmp_path, capsys):
    """Like eval and export, predict takes section.key=value overrides after the files: the
    run's data moved (the image folder says the class names) is data.root=NEW."""
    import shutil

    run, root = folder_run
    photo = root / "red" / "img000.png"
    capsys.readouterr()
    assert cli("predict", run, photo) == 0
    before = capsys.readouterr().out
    moved = shutil.copytree(root, tmp_path / "moved")
    assert cli("predict", run, photo, f"data.root={moved}") == 0
    assert capsys.readouterr().out == before
    assert cli("predict", run, photo, f"data.root={tmp_path / 'gone'}") == 2
    assert str(tmp_path / "gone") in one_error_line(capsys.readouterr().err)
    assert cli("predict", run, root / "red") == 2  # a folder is not an image file
    line = one_error_line(capsys.readouterr().err)
    assert "a folder, not an image file" in line and str(root / "red") in line


# == load_model on what a notebook has at hand ===================================================
def test_load_model_says_what_it_takes_instead_of_wrong_probabilities(grey_run):
    """uint8 pixels (0..255) would saturate every probability without an error; an image
    without its batch axis, channels last, a NumPy array or a PIL image fail deep in the model
    or in torch: each is a DataError saying what the model takes. Another size passes (a UNet
    takes any)."""
    from dltemplate.errors import DataError

    model = dltemplate.load_model(grey_run, dataset=Squares())
    image = Squares()[3][0]  # uint8 (1, 32, 32)
    wanted = f"the model takes a float32 tensor N x 1 x {SIDE} x {SIDE} in [0, 1]"
    for given, said in [
        (
            image[None],
            "got a uint8 tensor (1, 1, 32, 32): convert it (x.float() / 255 for 0..255 pixels)",
        ),
        (image.float() / 255, "got a float32 tensor (1, 32, 32) (x[None] adds the batch axis)"),
        ((image.float() / 255).permute(1, 2, 0)[None], "got a float32 tensor (1, 32, 32, 1)"),
        (image.numpy(), "got ndarray: pass torch.from_numpy(array)"),
        (Image.fromarray(image[0].numpy()), "got Image: pass a tensor"),
    ]:
        with pytest.raises(DataError) as caught:
            model(given)
        assert str(caught.value) == f"{wanted}; {said}"
    with torch.no_grad():
        right = model(image[None].float() / 255)
        larger = model(torch.rand(2, 1, 48, 40))
    assert right.shape == (1, 1, SIDE, SIDE) and larger.shape == (2, 1, 48, 40)


def test_a_device_this_machine_lacks_says_which_override_runs_here(folder_run, cli, capsys):
    """A run saved with a device this machine lacks (trained on a GPU, evaluated on a laptop):
    one line naming the device and the override that runs it here."""
    run, root = folder_run
    for command in (["eval", run], ["predict", run, root / "red" / "img000.png"]):
        assert cli(*command, "experiment.device=cuda:99") == 2
        line = one_error_line(capsys.readouterr().err)
        assert "experiment.device=cuda:99" in line and "experiment.device=auto" in line


def test_viz_dir_naming_a_file_is_one_line_exit_2(grey_run, cli, tmp_path, capsys):
    """--viz-dir must be a folder (or one that can be made): a file there is kept, and no
    report is written."""
    taken = tmp_path / "taken"
    taken.write_text("mine\n")
    names = ["data.name=test_using_a_model:Squares"]
    assert (
        cli("eval", grey_run, *names, "--viz", "--viz-dir", taken, "--out", tmp_path / "r.json")
        == 2
    )
    line = one_error_line(capsys.readouterr().err)
    assert f"--viz-dir {taken}: exists and is not a folder" in line
    assert taken.read_text() == "mine\n" and not (tmp_path / "r.json").exists()
    under = taken / "viz"  # a folder that could never be made: said before evaluating
    viz = ["--viz", "--viz-dir", under, "--out", tmp_path / "r.json"]
    assert cli("eval", grey_run, *names, *viz) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"--viz-dir {under}: {taken} is a file, not a folder" in line
    assert taken.read_text() == "mine\n" and not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("mode", ["I;16", "I"])  # I: how Pillow before 10 opens a 16-bit PNG
def test_16_bit_grey_is_scaled_to_8_bits_in_either_mode(mode):
    from dltemplate.data.image_folder import convert_image

    levels = np.array([[0, 257, 32896, 65535]])
    image = Image.fromarray(levels.astype(np.uint16 if mode == "I;16" else np.int32))
    assert image.mode == mode
    for target in ("L", "RGB"):
        got = np.asarray(convert_image(image, target)).reshape(4, -1)
        assert (got == np.array([[0], [1], [128], [255]])).all()


# == a checkpoint and data that changed ==========================================================
def test_data_whose_classes_changed_is_refused_naming_both_lists(folder_run, cli, tmp_path, capsys):
    """An image folder renamed, or given another class folder, since the run trained: eval,
    predict, export and resume say so instead of naming the model's outputs after other classes (a
    renamed 'red' sorting first made every 'red' picture a 'blue' one, without an error)."""
    import shutil

    from dltemplate.engine.checkpoint import load_checkpoint, save_checkpoint

    run, root = folder_run
    changed = shutil.copytree(root, tmp_path / "changed")
    (changed / "red").rename(changed / "aaa")
    photo = root / "red" / "img000.png"
    export = ["export", run, "--format", "torchscript", "--out", tmp_path / "m.pt"]
    copy = shutil.copytree(run, tmp_path / "run")  # resume, refused, must leave it intact
    before = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    resume = ["resume", copy, "trainer.epochs=9"]
    for command in (["eval", run], ["predict", run, photo], export, resume):
        assert cli(*command, f"data.root={changed}") == 2
        line = one_error_line(capsys.readouterr().err)
        assert "trained on classes ['blue', 'green', 'red']" in line, line
        assert "now has ['aaa', 'blue', 'green']" in line and "new in the data ['aaa']" in line
    assert {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()} == before
    # A checkpoint written before checkpoints held their classes is read as it was.
    state = load_checkpoint(next(run.glob("*_best_ckpt.pth")))
    assert state["class_names"] == ["blue", "green", "red"]
    save_checkpoint(tmp_path / "older.pth", {k: v for k, v in state.items() if k != "class_names"})
    assert cli("predict", tmp_path / "older.pth", photo, f"data.root={changed}") == 0
    shutil.copytree(root / "red", changed / "zebra")  # a 4th class: not 'does not match' layers
    assert cli("predict", run, photo, f"data.root={changed}") == 2
    assert "['aaa', 'blue', 'green', 'zebra']" in one_error_line(capsys.readouterr().err)


def test_out_never_overwrites_a_checkpoint_or_an_input(folder_run, cli, tmp_path, capsys):
    """eval, export and predict with --out naming a run's checkpoint (the one read or
    another) or one of predict's own images: one line, exit status 2, every file intact (the
    export replaced the best checkpoint with TorchScript, eval the last one with JSON)."""
    import shutil

    run, root = folder_run
    copy = shutil.copytree(run, tmp_path / "run")
    best, last = next(copy.glob("*_best_ckpt.pth")), next(copy.glob("*_last_ckpt.pth"))
    photo = shutil.copy(root / "red" / "img000.png", tmp_path / "photo.png")
    before = {p: p.read_bytes() for p in (best, last, Path(photo))}
    for command, out in [
        (["export", copy, "--format", "torchscript"], best),
        (["export", copy, "--format", "torchscript"], last),
        (["eval", last], last),
        (["eval", copy], last),
        (["predict", copy, photo], last),
    ]:
        assert cli(*command, "--out", out) == 2
        assert f"--out {out}: is a checkpoint" in one_error_line(capsys.readouterr().err)
    assert cli("predict", copy, photo, "--out", photo) == 2
    assert "is one of the input files" in one_error_line(capsys.readouterr().err)
    assert all(p.read_bytes() == data for p, data in before.items())


# == export of the models the README's tests do not train ========================================
@pytest.fixture(scope="session")
def unetpp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One epoch of a small deep-supervised UNet++ on the grey squares, named by module path
    (the command line can rebuild it: no objects needed)."""
    out = tmp_path_factory.mktemp("unetpp")
    config = REPO / "configs" / "unetpp_carvana.yaml"
    names = ["data.name=test_using_a_model:Squares", "data.args={}"]
    try:
        result = dltemplate.train(config, [*seg_overrides(out, 1), *names])
    finally:
        close_run_logs()
    return result.run_dir


@pytest.mark.parametrize("fmt", test_export.FORMATS)
@pytest.mark.parametrize("which", ["ImageCNN", "UNet++"])
def test_export_of_image_cnn_and_unet_pp_gives_load_models_probabilities(
    folder_run, unetpp_run, cli, tmp_path, fmt, which
):
    """The exported file, run by onnxruntime or torch.jit, agrees with load_model on a batch
    of another size than export traced and checked, and names the model and its classes."""
    from dltemplate.export import load_torchscript, read_metadata, run_onnx

    run = folder_run[0] if which == "ImageCNN" else unetpp_run
    out = tmp_path / f"model{test_export.SUFFIX[fmt]}"
    assert cli("export", run, "--format", fmt, "--out", out, "--trust-code") == 0
    model = dltemplate.load_model(run, trust_code=True)
    x = torch.rand(
        (test_export.CHECK, *model.input_shape), generator=torch.Generator().manual_seed(3)
    )
    with torch.no_grad():
        expected = model(x)
        got = (torch.from_numpy(run_onnx(out.read_bytes(), x)) if fmt == "onnx"
               else load_torchscript(str(out))(x))  # fmt: skip
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= test_export.TOLERANCE[fmt]
    meta = read_metadata(out)
    assert meta["model"] == which and json.loads(meta["class_names"]) == model.class_names


def test_inputs_that_are_numbers_are_checked_by_their_rank_only():
    """A dataset of numbers (input shape ()): N numbers pass, (N, 1) is refused."""
    from dltemplate.config import Config
    from dltemplate.data.base import DataInfo
    from dltemplate.engine.inference import InferenceModel
    from dltemplate.engine.task import Task
    from dltemplate.errors import DataError

    info = DataInfo((), 1, [], (0.0,), (1.0,))
    model = InferenceModel(torch.nn.Identity(), Task(Config()), info, {})
    x = torch.rand(4)
    assert torch.equal(model(x), x)
    with pytest.raises(DataError, match=r"takes a float32 tensor N in \[0, 1\]; got a float32"):
        model(x[:, None])
