"""Issue #18: every CUDA path, on a real GPU (``python -m pytest -m cuda``; skipped without one,
and left out of the default run by the ``cuda`` marker).

The runs are the CPU tests' own (the digits demo, the small CNN, stop-and-resume by an exception
at a chosen training forward), on the GPU: a step and an exact resume in fp32, bf16 and fp16
(the grad scaler's state included), ``compile`` to the end of a run, DataParallel, channels_last,
data kept on the GPU, pinned-memory workers, ``eval``/``predict``/``export``, and determinism.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import REPO, assert_identical, run_dirs, run_results, stop_at_training_forward

from dltemplate.assemble import build_trainer
from dltemplate.config import load_config
from dltemplate.engine.speed import is_channels_last
from dltemplate.tasks.classification import ClassificationTask

# cuBLAS reads it when it starts: before any test's first matmul (experiment.deterministic).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.usefixtures("fast_and_tidy"),
]

DEMO = REPO / "configs" / "digits_mlp.yaml"
SMALL = [
    "data.train_val_sample_rate=0.3",
    "model.args.dropout=0.2",  # random draws on the GPU: the resume must restore its generator
    "trainer.progress_bar=off",
    "trainer.epochs=2",
]
CNN = ["model.name=SmallCNN", "model.args={width: 8}"]
EXACT = ["experiment.deterministic=true"]  # bit-identical on a GPU needs deterministic kernels
STOP_AT = 17  # a training forward in epoch 2 (13 batches an epoch)


@pytest.fixture(autouse=True)
def not_deterministic_after():
    """experiment.deterministic is process-wide: put torch's default back after each test."""
    yield
    torch.use_deterministic_algorithms(False)


def train(cli, out: Path, *overrides: str) -> Path:
    """A finished run of the demo with ``overrides``; its directory."""
    assert cli("train", DEMO, *SMALL, *overrides, f"experiment.output_dir={out}") == 0
    (run,) = run_dirs(out)
    return run


def trainer(tmp_path: Path, *overrides: str):
    cfg = load_config(DEMO, [*SMALL, f"experiment.output_dir={tmp_path / 'out'}", *overrides])
    return build_trainer(cfg, ClassificationTask(cfg))


def last_state(run: Path) -> dict:
    (last,) = run.glob("*_last_ckpt.pth")
    return torch.load(last, map_location="cpu", weights_only=True)


# == a step, and an exact stop/resume, in each precision ========================================
@pytest.mark.parametrize("precision", ["32", "bf16", "fp16"])
def test_a_gpu_run_trains_and_resumes_exactly_in_each_precision(
    cli, tmp_path, monkeypatch, precision
):
    over = [f"trainer.precision={precision}", *EXACT]
    ref = train(cli, tmp_path / "ref", *over)
    log = (ref / "train.log").read_text()
    assert "device cuda" in log and "GPU settings:" in log and "data.device=auto" in log
    assert float(json.loads((ref / "test_metrics.json").read_text())["accuracy"]) > 0.5
    with monkeypatch.context() as mp:
        stop_at_training_forward(mp, STOP_AT)
        assert cli("train", DEMO, *SMALL, *over, f"experiment.output_dir={tmp_path / 'cut'}") == 1
    (cut,) = run_dirs(tmp_path / "cut")
    assert cli("resume", cut) == 0
    assert_identical(run_results(cut), run_results(ref), "resumed")
    scaler = last_state(cut)["scaler"]
    assert_identical(scaler, last_state(ref)["scaler"], "scaler")
    if precision == "fp16":  # the scaler was on, and its scale travelled through the resume
        assert "scale" in scaler and scaler["scale"] > 0


# == compile, DataParallel =====================================================================
def test_compile_runs_to_the_end_and_resumes_on_the_gpu(cli, tmp_path):
    run = train(cli, tmp_path / "out", "trainer.compile=true")
    assert (run / "test_metrics.json").exists()
    assert not any(k.startswith("_orig_mod.") for k in last_state(run)["model"])
    assert cli("resume", run, "trainer.epochs=3") == 0
    rows = (run / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 3


def test_data_parallel_on_the_gpus_present(cli, tmp_path, monkeypatch):
    """Every GPU there is (one GPU: DataParallel over that one, the same wrapper path)."""
    import dltemplate.assemble as assemble

    ids = list(range(torch.cuda.device_count()))
    monkeypatch.setattr(assemble, "select_device", lambda *a: (torch.device("cuda", 0), ids))
    t = trainer(tmp_path, *CNN)
    assert isinstance(t.train_model, torch.nn.DataParallel)
    assert t.train_model.device_ids == ids
    t.fit()
    (run,) = run_dirs(tmp_path / "out")
    assert (run / "test_metrics.json").exists()
    assert not any(k.startswith("module.") for k in last_state(run)["model"])
    assert cli("resume", run, "trainer.epochs=3") == 0


# == the fast defaults ===========================================================================
def test_a_cnn_is_channels_last_on_the_gpu_by_default_and_learns_the_same(cli, tmp_path):
    t = trainer(tmp_path, *CNN)
    try:
        assert is_channels_last(t.model)
        assert t.optimizer.defaults["fused"] is True  # adam on CUDA: fused by default
        assert torch.backends.cudnn.benchmark  # in-memory data: fixed shapes
    finally:
        t.close()
    tests = {}
    for layout in ("true", "false"):
        run = train(cli, tmp_path / layout, *CNN, f"trainer.channels_last={layout}")
        tests[layout] = json.loads((run / "test_metrics.json").read_text())
    assert tests["true"]["accuracy"] == pytest.approx(tests["false"]["accuracy"], abs=0.05)


def test_small_data_lives_on_the_gpu_and_trains_exactly_as_from_the_cpu(cli, tmp_path):
    t = trainer(tmp_path, *EXACT)
    try:
        assert t.data.train.source_inputs.is_cuda
        assert t.data.train.source_inputs is t.data.val.source_inputs  # one copy, views of it
        batch = next(iter(t.train_loader))
        assert batch.inputs.is_cuda and batch.targets.is_cuda
    finally:
        t.close()
    on_gpu = run_results(train(cli, tmp_path / "gpu", *EXACT, "data.device=cuda"))
    on_cpu = run_results(train(cli, tmp_path / "cpu", *EXACT, "data.device=cpu"))
    assert_identical(on_gpu, on_cpu, "data.device")


def test_pinned_memory_workers_feed_the_gpu(cli, tmp_path):
    map_style = ["data.name=toy_datasets:DigitSamples", "data.num_workers=2", "data.batch_size=16"]
    t = trainer(tmp_path, *map_style)
    try:
        assert t.data.train.__class__.__name__ == "SampleSplit"  # read by DataLoader workers
        batch = next(iter(t.train_loader))
        assert batch.inputs.is_pinned() and batch.targets.is_pinned()  # pin_memory: auto
    finally:
        t.close()
    run = train(cli, tmp_path / "run", *map_style)
    assert (run / "test_metrics.json").exists()


# == using a GPU-trained run ====================================================================
def test_eval_predict_and_export_of_a_gpu_run(cli, tmp_path, capsys):
    from PIL import Image

    run = train(cli, tmp_path / "out", *CNN)
    torch.backends.cuda.matmul.fp32_precision = "ieee"  # eval sets the run's (auto) TF32 again
    assert cli("eval", run) == 0  # on the GPU: the saved config's device (auto)
    tf32 = torch.cuda.get_device_capability()[0] >= 8
    assert torch.backends.cuda.matmul.fp32_precision == ("tf32" if tf32 else "ieee")
    capsys.readouterr()
    image = tmp_path / "digit.png"
    Image.fromarray((torch.rand(8, 8) * 255).byte().numpy()).save(image)
    assert cli("predict", run, image) == 0
    assert capsys.readouterr().out.startswith(f"{image}: ")
    assert cli("export", run, "--format", "torchscript") == 0
    (ckpt,) = run.glob("*_best_ckpt.pth")
    assert ckpt.with_suffix(".pt").is_file()


# == determinism ================================================================================
def test_deterministic_gpu_runs_are_bit_identical(cli, tmp_path):
    """Convolutions (cuDNN) and dropout, twice, with experiment.deterministic: the same bits;
    autotuning is off."""
    t = trainer(tmp_path, *CNN, *EXACT)
    try:
        assert not torch.backends.cudnn.benchmark
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        t.close()
    first = run_results(train(cli, tmp_path / "a", *CNN, *EXACT))
    second = run_results(train(cli, tmp_path / "b", *CNN, *EXACT))
    assert_identical(first, second, "deterministic")
