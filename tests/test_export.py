"""dltemplate export (ONNX, TorchScript) and dltemplate.load_model: raw inputs in [0, 1] in,
probabilities out, the same numbers as the trained model, metadata inside the file."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import QUICK_DIGITS, REPO, run_dirs

# Under pytest -n, this file's tests share one worker: its module fixtures (trained runs)
# are built once, not once per worker.
pytestmark = pytest.mark.xdist_group("test_export")

DIGITS = REPO / "configs" / "digits_mlp.yaml"
UNET = REPO / "configs" / "unet_carvana.yaml"
HAVE_ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))
NEEDS_ONNX = "onnx and onnxruntime are not installed (pip install 'dltemplate[export]')"
FORMATS = [
    pytest.param("onnx", marks=pytest.mark.skipif(not HAVE_ONNX, reason=NEEDS_ONNX)),
    "torchscript",
]
SUFFIX = {"onnx": ".onnx", "torchscript": ".pt"}
TOLERANCE = {"onnx": 1e-4, "torchscript": 1e-5}
CHECK = 7  # a batch size neither 1 nor the one exported with (2) nor export's own check (5)


def _train(out: Path, config: Path, *overrides: str) -> Path:
    from dltemplate.cli import main
    from dltemplate.engine import rundir

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rundir, "plot_curves", lambda *a, **k: None)  # not what these tests are about
        code = main(["train", str(config), f"experiment.output_dir={out}", *overrides])
    assert code == 0
    (run,) = run_dirs(out)
    return run


@pytest.fixture(scope="session")  # see tests/test_segmentation.py's carvana
def runs(tmp_path_factory) -> dict[str, Path]:
    """One-epoch runs: the digits MLP and a small CNN, and a small UNet on Carvana-layout data."""
    from dltemplate.data.sample_carvana import make_sample_carvana

    top = tmp_path_factory.mktemp("export")
    carvana = make_sample_carvana(top / "carvana", n=32, views=8, image_size=(480, 320))
    cnn = ["data.train_val_sample_rate=0.3", "trainer.epochs=1", "trainer.progress_bar=off",
           "model.name=SmallCNN", "model.args={width: 8}"]  # fmt: skip
    unet = [f"data.root={carvana}", "data.args.scale=0.25", "model.args.base_width=8",
            "model.args.depth=3", "trainer.epochs=1", "trainer.progress_bar=off"]  # fmt: skip
    return {
        "mlp": _train(top / "mlp", DIGITS, *QUICK_DIGITS),
        "cnn": _train(top / "cnn", DIGITS, *cnn),
        "unet": _train(top / "unet", UNET, *unet),
    }


def _reference(run: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """CHECK raw test inputs (uint8 / 255) and what the trained model itself says of them: its
    logits on the task's own prepare_batch, then softmax (classes) or sigmoid (masks)."""
    from dltemplate.assemble import build_evaluator
    from dltemplate.data.base import Batch

    evaluator = build_evaluator(run, ["experiment.device=cpu"])
    test = evaluator.task.load_data().test
    stored, targets = test.gather(torch.arange(CHECK))
    assert stored.dtype == torch.uint8
    batch = evaluator.task.prepare_batch(Batch(stored, targets, CHECK), torch.device("cpu"),
                                         evaluator.info)  # fmt: skip
    with torch.no_grad():
        logits = evaluator.model.eval()(batch.inputs)
    if evaluator.cfg.experiment.task == "classification":
        return stored.float() / 255, torch.softmax(logits, dim=1)
    return stored.float() / 255, torch.sigmoid(logits)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", ["mlp", "cnn", "unet"])
def test_export_gives_the_trained_models_probabilities(cli, runs, name, fmt, capsys):
    import dltemplate

    run = runs[name]
    assert cli("export", run, "--format", fmt) == 0
    said = capsys.readouterr().out
    (ckpt,) = run.glob("*_best_ckpt.pth")
    path = ckpt.with_suffix(SUFFIX[fmt])
    assert path.is_file() and f"wrote {path}" in said and "5 test samples" in said

    raw, expected = _reference(run)
    loaded = dltemplate.load_model(run)
    with torch.no_grad():
        from_api = loaded(raw)
    assert torch.allclose(from_api, expected, atol=1e-6, rtol=0)
    if fmt == "onnx":
        import onnx
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(None, {"input": raw.numpy()})[0])
        meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    else:
        meta = dict.fromkeys(["class_names", "input_shape", "mean", "std", "task",
                              "dltemplate_version", "checkpoint", "model"], "")  # fmt: skip
        with torch.no_grad():
            got = torch.jit.load(str(path), map_location="cpu", _extra_files=meta)(raw)
        meta = {k: v.decode() if isinstance(v, bytes) else v for k, v in meta.items()}
    from dltemplate.export import read_metadata

    assert read_metadata(path) == {**read_metadata(path), **meta}  # the reader finds the same
    assert got.shape == expected.shape
    diff_model = (got - expected).abs().max().item()
    diff_api = (got - from_api).abs().max().item()
    print(f"{name} {fmt}: max |diff| vs model {diff_model:.3g}, vs load_model {diff_api:.3g}")
    assert diff_model <= TOLERANCE[fmt] and diff_api <= TOLERANCE[fmt]

    # What the file says of itself, read back from the file.
    assert meta["class_names"] == json.dumps(loaded.class_names)
    assert json.loads(meta["input_shape"]) == list(raw.shape[1:]) == list(loaded.input_shape)
    assert json.loads(meta["mean"]) == pytest.approx(list(loaded.info.mean))
    assert json.loads(meta["std"]) == pytest.approx(list(loaded.info.std))
    assert meta["task"] == ("segmentation" if name == "unet" else "classification")
    assert meta["checkpoint"] == str(ckpt.absolute())
    assert meta["dltemplate_version"] == dltemplate.__version__
    assert meta["model"] == ("UNet" if name == "unet" else "Vanilla" if name == "mlp" else
                             "SmallCNN")  # fmt: skip


def test_load_model_returns_probabilities_in_eval_mode_on_the_cpu(runs):
    import dltemplate

    model = dltemplate.load_model(runs["mlp"])
    assert isinstance(model, torch.nn.Module) and not model.training
    assert all(p.device.type == "cpu" and not p.requires_grad for p in model.parameters())
    x = torch.rand(3, *model.input_shape)
    with torch.no_grad():
        probs = model(x)
    assert probs.shape == (3, 10) and model.class_names == [str(i) for i in range(10)]
    assert torch.allclose(probs.sum(1), torch.ones(3), atol=1e-6) and (probs >= 0).all()
    masks = dltemplate.load_model(runs["unet"])
    with torch.no_grad():
        out = masks(torch.rand(2, *masks.input_shape))
    assert out.shape == (2, 1, *masks.input_shape[1:]) and ((out >= 0) & (out <= 1)).all()


class _TwoHeads(torch.nn.Module):
    """A stand-in for a deep-supervised model: two heads of per-pixel logits, as a list."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Conv2d(3, 1, 1), torch.nn.Conv2d(3, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.a(x), self.b(x)]


@pytest.mark.parametrize("fmt", FORMATS)
def test_several_heads_give_the_sigmoid_of_their_mean_in_every_format(fmt):
    from dltemplate import export
    from dltemplate.config import Config
    from dltemplate.data.base import DataInfo
    from dltemplate.engine.inference import InferenceModel
    from dltemplate.tasks.segmentation import SegmentationTask

    info = DataInfo((3, 16, 24), 1, ["background", "car"], (0.4, 0.5, 0.6), (0.2, 0.25, 0.3))
    heads = _TwoHeads().eval()
    module = InferenceModel(heads, SegmentationTask(Config()), info, {"task": "segmentation"})
    x = torch.rand(CHECK, *info.input_shape)
    mean, std = torch.tensor(info.mean).view(1, 3, 1, 1), torch.tensor(info.std).view(1, 3, 1, 1)
    with torch.no_grad():
        a, b = heads((x - mean) / std)
        expected = torch.sigmoid((a + b) / 2)
        assert torch.allclose(module(x), expected, atol=1e-6, rtol=0)
    example = torch.rand(2, *info.input_shape)
    write, run = {"onnx": (export.to_onnx, export.run_onnx),
                  "torchscript": (export.to_torchscript, export.run_torchscript)}[fmt]  # fmt: skip
    got = torch.from_numpy(run(write(module, example), x))
    assert (got - expected).abs().max().item() <= TOLERANCE[fmt]


def test_export_to_a_file_of_your_choice_checks_on_random_inputs_without_data(
    cli, runs, tmp_path, capsys, monkeypatch
):
    from dltemplate import export
    from dltemplate.errors import DataError

    def gone(evaluator, count):
        raise DataError("data.root=/nowhere: no such folder")

    monkeypatch.setattr(export, "first_test_samples", gone)
    out = tmp_path / "deep" / "model.pt"
    assert cli("export", runs["mlp"], "--format", "torchscript", "--out", out) == 0
    said = capsys.readouterr().out
    assert out.is_file() and "cannot be loaded (data.root=/nowhere" in said
    assert "5 random inputs" in said


@pytest.mark.parametrize("failure", ["disagrees", "cannot convert"])
def test_an_export_that_fails_writes_nothing_and_exits_1_in_one_line(
    cli, runs, tmp_path, capsys, monkeypatch, failure
):
    from dltemplate import export

    def unsupported(module, example):
        raise RuntimeError("Unsupported operator aten::weird\n(a long trace follows)")

    if failure == "disagrees":
        monkeypatch.setitem(export.TOLERANCE, "torchscript", -1.0)  # any difference is too much
        said = "differs from PyTorch by up to 0 on 5 test samples (tolerance -1): nothing written"
    else:
        monkeypatch.setattr(export, "to_torchscript", unsupported)
        said = "cannot export model Vanilla as torchscript: Unsupported operator aten::weird"
    out = tmp_path / "model.pt"
    assert cli("export", runs["mlp"], "--format", "torchscript", "--out", out) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and said in err, err
    assert not out.exists()


def test_onnx_without_onnxruntime_says_what_to_install(cli, runs, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    assert cli("export", runs["mlp"], "--out", "model.onnx") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install" in err and "onnxruntime" in err
    assert not Path("model.onnx").exists()


@pytest.mark.parametrize("what", ["not a checkpoint", "out is a folder", "no checkpoint"])
def test_bad_targets_exit_2_in_one_line(cli, runs, tmp_path, capsys, what):
    args = {
        "not a checkpoint": [tmp_path / "junk.pth", "--format", "torchscript"],
        "out is a folder": [runs["mlp"], "--format", "torchscript", "--out", tmp_path],
        "no checkpoint": [tmp_path, "--format", "torchscript"],
    }[what]
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    assert cli("export", *args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("dltemplate: error:"), err


@pytest.mark.slow  # trains, exports and runs the README's script in subprocesses (~10 s)
def test_the_readme_example_of_using_a_trained_model_runs(tmp_path):
    """The README's ``use_a_trained_model.py``, run as a user would (it checks ONNX itself)."""
    pytest.importorskip("onnxruntime")
    import shutil
    import subprocess
    import sys

    from conftest import readme_block

    shutil.copytree(REPO / "configs", tmp_path / "configs")
    script = tmp_path / "use_a_trained_model.py"
    script.write_text(readme_block("# use_a_trained_model.py"))
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "predicted" in done.stdout and "max |diff|" in done.stdout


@pytest.mark.slow  # a Jupyter kernel and a training run
def test_the_quickstart_notebook_runs_top_to_bottom(tmp_path):
    """notebooks/quickstart.ipynb, executed as Jupyter would, from a copy of the repository's
    configs: it cannot rot."""
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    import shutil

    shutil.copytree(REPO / "configs", tmp_path / "configs")
    notebook = nbformat.read(REPO / "notebooks" / "quickstart.ipynb", as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})  # fmt: skip
    client.execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert (tmp_path / "Results" / "quickstart").is_dir()
