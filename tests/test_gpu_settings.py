"""Issue #18, on the CPU: the GPU's fast settings (data.device, experiment.tf32,
experiment.cudnn_benchmark, trainer.channels_last, optimizer.fused, pinned memory) resolve to
off on a CPU run, which computes as before; each resolves to on for a (pretended) GPU where
it is safe; explicit values that can run on the CPU do, and resume exactly; bad values stop
with one line. The CUDA side is tests/test_cuda.py (``pytest -m cuda``)."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch
from conftest import REPO, assert_identical, run_dirs, run_results, stop_at_training_forward

from dltemplate.assemble import build_trainer
from dltemplate.config import load_config
from dltemplate.config.schema import OptimizerConfig
from dltemplate.data.base import DataInfo, DataSplits, TensorSplit, splits_to
from dltemplate.engine import speed
from dltemplate.engine.build import read_options
from dltemplate.engine.speed import is_channels_last
from dltemplate.errors import ConfigError
from dltemplate.optim import fused_setting
from dltemplate.tasks.classification import ClassificationTask

DEMO = REPO / "configs" / "digits_mlp.yaml"
SMALL = ["data.train_val_sample_rate=0.3", "trainer.progress_bar=off", "trainer.epochs=2"]
CNN = ["model.name=SmallCNN", "model.args={width: 8}"]
CUDA = torch.device("cuda", 0)  # a device object needs no GPU; only its use would


pytestmark = pytest.mark.usefixtures("fast_and_tidy")


@pytest.fixture
def backend_flags():
    """The process-wide backend flags, put back after the test."""
    saved = (
        torch.backends.cuda.matmul.fp32_precision,
        torch.backends.cudnn.conv.fp32_precision,
        torch.backends.cudnn.benchmark,
    )
    yield saved
    (
        torch.backends.cuda.matmul.fp32_precision,
        torch.backends.cudnn.conv.fp32_precision,
        torch.backends.cudnn.benchmark,
    ) = saved


@pytest.fixture
def fake_gpu(monkeypatch):
    """Pretend to be on an Ampere GPU with 1 GiB of memory, for the resolving functions."""
    props = types.SimpleNamespace(total_memory=2**30, name="pretend")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d=None: props)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))
    return props


def trainer(tmp_path: Path, *overrides: str):
    cfg = load_config(DEMO, [f"experiment.output_dir={tmp_path / 'out'}", *SMALL, *overrides])
    return build_trainer(cfg, ClassificationTask(cfg))


def splits(n: int, dtype=torch.uint8) -> DataSplits:
    """Train/val/test views of one source, as make_splits leaves them."""
    whole = TensorSplit(torch.zeros(n, 1, 8, 8, dtype=dtype), torch.zeros(n, dtype=torch.long))
    third = n // 3
    info = DataInfo(input_shape=(1, 8, 8), num_classes=2, class_names=["a", "b"])
    return DataSplits(
        whole.subset(torch.arange(third)),
        whole.subset(torch.arange(third, 2 * third)),
        whole.subset(torch.arange(2 * third, n)),
        info,
    )


# == on the CPU, the defaults change nothing =====================================================
def test_a_cpu_run_by_default_keeps_data_layout_optimizer_and_backends_as_before(
    tmp_path, backend_flags
):
    t = trainer(tmp_path, *CNN)
    try:
        assert t.data.train.source_inputs.device.type == "cpu"
        assert not is_channels_last(t.model)  # conv weights stay NCHW on the CPU
        assert not t.optimizer.defaults["fused"] and not t.optimizer.defaults["foreach"]
        now = (
            torch.backends.cuda.matmul.fp32_precision,
            torch.backends.cudnn.conv.fp32_precision,
            torch.backends.cudnn.benchmark,
        )
        assert now == backend_flags  # nothing process-wide was touched
    finally:
        t.close()


# == each setting resolves to on where it is safe ================================================
def test_data_device_auto_puts_small_in_memory_data_on_the_gpu(fake_gpu):
    where, why = speed.resolve_data_device("auto", splits(300), CUDA)
    assert where == CUDA and "MiB of data lives on the GPU" in why
    assert speed.resolve_data_device("auto", splits(300), torch.device("cpu"))[0].type == "cpu"
    assert speed.resolve_data_device("cpu", splits(300), CUDA)[0].type == "cpu"
    assert speed.resolve_data_device("cuda", splits(300), CUDA)[0] == CUDA


def test_data_device_auto_keeps_data_over_a_quarter_of_the_gpu_on_the_cpu(fake_gpu):
    fake_gpu.total_memory = 4 * speed.data_bytes(splits(300)) - 1  # the budget just too small
    where, why = speed.resolve_data_device("auto", splits(300), CUDA)
    assert where.type == "cpu" and "stays on the CPU" in why
    fake_gpu.total_memory += 1
    assert speed.resolve_data_device("auto", splits(300), CUDA)[0] == CUDA


def test_data_device_auto_leaves_sample_by_sample_data_on_the_cpu(fake_gpu):
    from toy_datasets import DigitSamples

    from dltemplate.data.samples import SampleSplit

    data = splits(30)
    data.train = SampleSplit(DigitSamples(), list(range(10)))
    assert speed.resolve_data_device("auto", data, CUDA)[0].type == "cpu"
    with pytest.raises(ConfigError, match="data.device=cuda: this dataset is read sample by"):
        speed.resolve_data_device("cuda", data, CUDA)


def test_splits_moved_together_stay_views_of_one_source():
    data = splits(30)
    moved = splits_to(data, torch.device("meta"))  # any other device shows the sharing
    assert moved.train.source_inputs.device.type == "meta"
    assert moved.train.source_inputs is moved.val.source_inputs is moved.test.source_inputs
    assert len(moved.train) == len(data.train) == 10


def test_tf32_and_cudnn_benchmark_resolve_for_the_gpu_and_the_data(fake_gpu, monkeypatch):
    cfg = load_config(DEMO, [])
    assert speed.resolve_tf32(None, CUDA) and not speed.resolve_tf32(None, torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (7, 0))  # V100
    assert not speed.resolve_tf32(None, CUDA)
    assert speed.resolve_cudnn_benchmark(cfg, CUDA, fixed_shapes=True)
    assert not speed.resolve_cudnn_benchmark(cfg, CUDA, fixed_shapes=False)  # shapes may vary
    assert not speed.resolve_cudnn_benchmark(cfg, torch.device("cpu"), fixed_shapes=True)
    cfg.experiment.deterministic = True
    assert not speed.resolve_cudnn_benchmark(cfg, CUDA, fixed_shapes=True)


def test_apply_backends_sets_the_flags_on_a_gpu_run(fake_gpu, backend_flags):
    cfg = load_config(DEMO, [])
    assert speed.apply_backends(cfg, CUDA, fixed_shapes=True) == {
        "tf32": True,
        "cudnn_benchmark": True,
    }
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    assert torch.backends.cudnn.conv.fp32_precision == "tf32" and torch.backends.cudnn.benchmark
    cfg.experiment.tf32, cfg.experiment.cudnn_benchmark = False, False
    speed.apply_backends(cfg, CUDA, fixed_shapes=True)
    assert torch.backends.cuda.matmul.fp32_precision == "ieee"
    assert not torch.backends.cudnn.benchmark


def test_eval_applies_the_runs_backend_settings(cli, tmp_path, backend_flags):
    """``eval``/``predict``/``load_model`` (an EvaluatorBase) set TF32 as the run's config says,
    whatever an earlier run in the process left; autotuning only where the config sets it."""
    from dltemplate.engine.evaluator import EvaluatorBase

    out = tmp_path / "out"
    quick = [*SMALL, "trainer.epochs=1", "data.train_val_sample_rate=0.1"]
    assert cli("train", DEMO, *quick, "experiment.tf32=false", f"experiment.output_dir={out}") == 0
    (run,) = run_dirs(out)
    torch.backends.cuda.matmul.fp32_precision = "tf32"  # as a TF32 run would leave it
    EvaluatorBase(run)
    assert torch.backends.cuda.matmul.fp32_precision == "ieee"
    assert torch.backends.cudnn.conv.fp32_precision == "ieee"
    EvaluatorBase(run, ["experiment.tf32=true", "experiment.cudnn_benchmark=true"])
    assert torch.backends.cuda.matmul.fp32_precision == "tf32" and torch.backends.cudnn.benchmark
    EvaluatorBase(run, ["data.device=cuda"])  # a GPU run's checkpoint evaluates on the CPU


def test_channels_last_resolves_on_for_convolutional_models_on_the_gpu():
    cnn = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten())
    mlp = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    assert speed.resolve_channels_last(None, cnn, CUDA)
    assert not speed.resolve_channels_last(None, mlp, CUDA)
    assert not speed.resolve_channels_last(None, cnn, torch.device("cpu"))
    assert speed.resolve_channels_last(True, cnn, torch.device("cpu"))


def test_fused_optimizers_resolve_on_for_sgd_adam_adamw_on_the_gpu():
    for name in ("sgd", "adam", "adamw"):
        assert fused_setting(OptimizerConfig(name=name), CUDA) is True
        assert fused_setting(OptimizerConfig(name=name), torch.device("cpu")) is None
    assert fused_setting(OptimizerConfig(name="rmsprop"), CUDA) is None  # torch has none


def test_pinned_memory_defaults_to_on_when_cuda_is_there(monkeypatch):
    cfg = load_config(DEMO, [])
    assert read_options(cfg, True).pin_memory is False  # this machine: no CUDA
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert read_options(cfg, True).pin_memory is True
    cfg.data.pin_memory = False
    assert read_options(cfg, True).pin_memory is False


# == explicit settings that the CPU can run: they train and resume exactly ======================


@pytest.mark.parametrize(
    "overrides",
    [["optimizer.fused=true"], [*CNN, "trainer.channels_last=true", "model.args.dropout=0.2"]],
    ids=["fused", "channels_last"],
)
def test_explicit_fast_settings_train_on_the_cpu_and_resume_exactly(
    cli, tmp_path, monkeypatch, overrides
):
    args = ["train", DEMO, *SMALL, *overrides]
    assert cli(*args, f"experiment.output_dir={tmp_path / 'ref'}") == 0
    (ref,) = run_dirs(tmp_path / "ref")
    with monkeypatch.context() as mp:
        stop_at_training_forward(mp, 17)  # mid-epoch 2 (13 batches an epoch)
        assert cli(*args, f"experiment.output_dir={tmp_path / 'cut'}") == 1
    (cut,) = run_dirs(tmp_path / "cut")
    assert cli("resume", cut) == 0
    assert_identical(run_results(cut), run_results(ref), "resumed")
    state = torch.load(next(ref.glob("*_last_ckpt.pth")), weights_only=True)
    if "optimizer.fused=true" in overrides:
        assert state["optimizer"]["param_groups"][0]["fused"] is True
    else:
        convs = [v for v in state["model"].values() if v.dim() == 4]
        assert convs and all(v.is_contiguous(memory_format=torch.channels_last) for v in convs)


def test_channels_last_on_the_cpu_computes_what_nchw_does(cli, tmp_path):
    """The same run in either layout: the same test metrics, to float rounding."""
    import json

    results = []
    for layout in ("false", "true"):
        out = tmp_path / layout
        assert cli("train", DEMO, *SMALL, *CNN, f"trainer.channels_last={layout}",
                   f"experiment.output_dir={out}") == 0  # fmt: skip
        (run,) = run_dirs(out)
        results.append(json.loads((run / "test_metrics.json").read_text()))
    assert results[0].keys() == results[1].keys()
    for key in results[0]:
        assert results[1][key] == pytest.approx(results[0][key], abs=1e-3), key


# == bad values: one line, exit status 2 =========================================================
@pytest.mark.parametrize(
    "override, words",
    [
        (["optimizer.name=rmsprop", "optimizer.fused=true"], "optimizer.fused=true: optimizer"
         ".name=rmsprop has no fused kernel"),
        (["experiment.cudnn_benchmark=true", "experiment.deterministic=true"],
         "experiment.cudnn_benchmark=true conflicts with experiment.deterministic=true"),
        (["data.device=cuda"], "data.device=cuda: this run trains on cpu"),
        (["data.device=gpu"], "data.device"),
        (["trainer.channels_last=maybe"], "trainer.channels_last"),
    ],
)  # fmt: skip
def test_bad_fast_settings_stop_with_one_line(cli, tmp_path, capsys, override, words):
    assert cli("train", DEMO, *SMALL, *override, f"experiment.output_dir={tmp_path}") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
    assert not list(tmp_path.iterdir())  # nothing written


def test_small_cnn_pools_by_a_mean_equal_to_adaptive_average_pooling_bit_for_bit():
    """SmallCNN's global pooling has a deterministic CUDA backward (AdaptiveAvgPool2d's has
    none: experiment.deterministic stopped the run) and computes the same bits on the CPU."""
    from dltemplate.models.cnn import GlobalAvgPool

    gen = torch.Generator().manual_seed(0)
    for layout in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(7, 8, 14, 14, generator=gen).contiguous(memory_format=layout)
        x.requires_grad_(True)
        ours, theirs = GlobalAvgPool()(x), torch.nn.AdaptiveAvgPool2d(1)(x)
        grad = torch.randn(ours.shape, generator=gen)
        assert torch.equal(ours, theirs)
        (g_ours,) = torch.autograd.grad(ours, x, grad)
        (g_theirs,) = torch.autograd.grad(theirs, x, grad)
        assert torch.equal(g_ours, g_theirs)
