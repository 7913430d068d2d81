"""Any stop, anywhere, is exact: a run stopped at any point of the loop, in any way, and resumed
ends bit-identical to the run never stopped (weights, optimizer, scheduler, every metrics.csv
row but `seconds`, test_metrics.json).

The default suite covers every point for the dropout + one-cycle configuration with an
exception, plus a sample of the other cells; `-m slow` runs the whole campaign
(points x ways x configurations, 2 processes under torchrun included).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, assert_identical, free_port, run_dirs
from conftest import run_results as results
from stop_injection import EXIT, POINTS, WAYS, install

from dltemplate.cli import main
from dltemplate.data.sample_carvana import make_sample_carvana

DIGITS = REPO / "configs" / "digits_mlp.yaml"
UNET = REPO / "configs" / "unet_carvana.yaml"
INJECT = REPO / "tests" / "stop_injection.py"
SMALL_DIGITS = [
    "data.train_val_sample_rate=0.15",  # 194 training samples: a short last batch
    "data.test_sample_rate=0.2",
    "model.args.hidden=[32]",
    "model.args.dropout=0.2",
    "trainer.epochs=3",
    "trainer.log_every_n_steps=4",
]
CONFIGS = {
    # dropout, one-cycle stepped per optimizer step
    "dropout_onecycle": [str(DIGITS), *SMALL_DIGITS, "data.batch_size=16",
                         "scheduler.name=onecycle"],
    # accumulation: 25 micro-batches of 8 in windows of 3, the last window one short batch;
    # cosine stepped per epoch; a callback with state (ema, which validation and test use)
    "accumulation": [str(DIGITS), *SMALL_DIGITS, "data.batch_size=8",
                     "trainer.grad_accum_steps=3", "scheduler.name=cosine",
                     "callbacks=[{name: ema, args: {decay: 0.9}}]"],
    # a map-style Dataset (random noise per sample) with per-sample transforms, read by 2
    # DataLoader workers: the sampler position and every random draw must resume exactly
    "workers": [str(DIGITS), *SMALL_DIGITS, "data.batch_size=16", "scheduler.name=onecycle",
                "data.name=toy_datasets:DigitSamples", "data.num_workers=2",
                "data.train_transform=[hflip, {name: random_crop, args: {padding: 1}}]"],
}  # fmt: skip
# The stop comes at the NTH occurrence of the point after the first epoch ended.
NTH = {"validation": 1, "final_test": 1, "epoch_end": 1, "checkpoint_write": 1}


def segmentation_config(data: Path) -> list[str]:
    """UNet with BatchNorm and random augmentation on 16 small generated photos of 4 cars."""
    return [str(UNET), f"data.root={data}", "data.batch_size=2", "data.args.scale=0.25",
            "data.args.workers=1", "model.args.base_width=4", "model.args.depth=2",
            "trainer.epochs=3", "trainer.log_every_n_steps=2"]  # fmt: skip


@pytest.fixture(autouse=True)
def no_curves(monkeypatch):
    """curves.png is not part of what must be identical; drawing it is half of a tiny run."""
    from dltemplate.engine import rundir

    monkeypatch.setattr(rundir, "plot_curves", lambda *a, **k: None)


@pytest.fixture(autouse=True)
def tests_importable(monkeypatch):
    """The map-style dataset of the "workers" cells lives in tests/toy_datasets.py; stops by
    SIGKILL and torchrun run in fresh processes."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO / "tests"), *sys.path]))


@pytest.fixture(scope="module")
def carvana(tmp_path_factory) -> Path:
    return make_sample_carvana(tmp_path_factory.mktemp("carvana"), n=16, views=4,
                               image_size=(160, 96))  # fmt: skip


def config_args(name: str, carvana: Path | None) -> list[str]:
    return segmentation_config(carvana) if name == "segmentation" else CONFIGS[name]


_references: dict[str, dict[str, object]] = {}


def reference(name: str, args: list[str], tmp_path_factory) -> dict[str, object]:
    """The run never stopped (once per configuration)."""
    if name not in _references:
        out = tmp_path_factory.mktemp(f"reference_{name}")
        assert main(["train", *args, f"experiment.output_dir={out}"]) == 0
        (run,) = run_dirs(out)
        _references[name] = results(run)
    return _references[name]


def nth_for(name: str, point: str) -> int:
    if point == "after_scheduler_step" and name != "dropout_onecycle":
        return 1  # cosine steps once an epoch: the first step after the first epoch
    return NTH.get(point, 3)


def stop_and_resume(name: str, args: list[str], point: str, way: str, out: Path) -> Path:
    nth = nth_for(name, point)
    command = ["train", *args, f"experiment.output_dir={out}"]
    if way == "sigkill":  # cannot be survived in-process
        cmd = [sys.executable, str(INJECT), point, way, str(nth), "--", *command]
        proc = subprocess.run(cmd, cwd=out.parent, capture_output=True, text=True, timeout=300)
        assert proc.returncode == EXIT[way], proc.stderr[-2000:]
    else:
        undo = install(point, way, nth)
        try:
            code = main(command)
        finally:
            undo()
        assert code == EXIT[way]
    (run,) = run_dirs(out)
    trust = ["--trust-code"] if name == "workers" else []  # it names toy_datasets:...
    assert main(["resume", str(run), *trust]) == 0
    assert run_dirs(out) == [run]
    assert not list(run.glob(".*.tmp")), "temporary files left behind"
    return run


def check_cell(name, point, way, tmp_path, tmp_path_factory, carvana=None):
    args = config_args(name, carvana)
    expected = reference(name, args, tmp_path_factory)
    run = stop_and_resume(name, args, point, way, tmp_path / "out")
    assert_identical(results(run), expected, f"{name}/{point}/{way}")


@pytest.mark.parametrize("point", POINTS)
def test_every_point_is_exact(point, tmp_path, tmp_path_factory):
    check_cell("dropout_onecycle", point, "exception", tmp_path, tmp_path_factory)


@pytest.mark.parametrize(
    "name, point, way",
    [
        ("dropout_onecycle", "after_backward", "sigint"),
        ("dropout_onecycle", "inside_optimizer_step", "sigterm"),
        ("dropout_onecycle", "validation", "sigterm"),
        ("dropout_onecycle", "checkpoint_write", "sigterm"),
        ("dropout_onecycle", "after_forward", "sigkill"),
        ("accumulation", "after_forward", "exception"),
        ("accumulation", "after_optimizer_step", "sigterm"),
        ("accumulation", "epoch_end", "exception"),
        ("segmentation", "after_forward", "exception"),
        ("segmentation", "after_backward", "sigterm"),
        ("workers", "after_forward", "exception"),
        ("workers", "inside_optimizer_step", "sigint"),
        ("workers", "validation", "sigterm"),
    ],
)
def test_sample_of_other_cells_is_exact(name, point, way, tmp_path, tmp_path_factory, carvana):
    check_cell(name, point, way, tmp_path, tmp_path_factory, carvana)


@pytest.mark.slow
@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("point", POINTS)
@pytest.mark.parametrize("name", ["dropout_onecycle", "accumulation", "segmentation", "workers"])
def test_campaign(name, point, way, tmp_path, tmp_path_factory, carvana):
    check_cell(name, point, way, tmp_path, tmp_path_factory, carvana)


# == two processes under torchrun ===============================================================
def torchrun(args: list[str], cwd: Path, port: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(port), *args]  # fmt: skip
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


DDP = [*CONFIGS["dropout_onecycle"], "data.batch_size=8"]
_ddp_reference: list[dict[str, object]] = []


def ddp_cell(point: str, way: str, tmp_path: Path, tmp_path_factory) -> None:

    if not _ddp_reference:
        out = tmp_path_factory.mktemp("ddp_reference")
        done = torchrun(["-m", "dltemplate", "train", *DDP, f"experiment.output_dir={out}"],
                        out, free_port())  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        _ddp_reference.append(results(run_dirs(out)[0]))
    out = tmp_path / "out"
    # Signals reach one process (rank 1); an exception or SIGKILL fails that process alone.
    nth = str(nth_for("dropout_onecycle", point))
    command = [
        str(INJECT),
        point,
        way,
        nth,
        "1",
        "--",
        "train",
        *DDP,
        f"experiment.output_dir={out}",
    ]
    stopped = torchrun(command, tmp_path, free_port())
    assert stopped.returncode != 0
    (run,) = run_dirs(out)
    if way in ("sigint", "sigterm"):  # the command that goes on exactly: as many processes
        said = f"torchrun --nproc_per_node 2 -m dltemplate resume {run}"
        assert said in (run / "train.log").read_text()
    resumed = torchrun(["-m", "dltemplate", "resume", str(run)], tmp_path, free_port())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert run_dirs(out) == [run]
    assert_identical(results(run), _ddp_reference[0], f"ddp/{point}/{way}")


@pytest.mark.slow
@pytest.mark.parametrize("point, way", [("after_backward", "sigterm")])
def test_two_processes_stop_exactly(point, way, tmp_path, tmp_path_factory):
    ddp_cell(point, way, tmp_path, tmp_path_factory)


@pytest.mark.slow
@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("point", POINTS)
def test_two_processes_campaign(point, way, tmp_path, tmp_path_factory):
    ddp_cell(point, way, tmp_path, tmp_path_factory)


@pytest.mark.parametrize("stop_in_epoch", [1, 2])
def test_a_task_drawing_from_numpy_resumes_exactly(stop_in_epoch, tmp_path, monkeypatch):
    """NumPy's generator is read at every step once an epoch showed the task uses it; before
    that, a stop part-way through a step writes no interrupt checkpoint rather than a wrong one."""
    import numpy as np

    from dltemplate.data.base import Batch
    from dltemplate.tasks.classification import ClassificationTask

    def augment(self, batch, info):
        noise = torch.from_numpy(np.random.normal(0, 0.1, tuple(batch.inputs.shape)))
        return Batch(batch.inputs + noise.float(), batch.targets, batch.global_size)

    monkeypatch.setattr(ClassificationTask, "augment", augment)
    args = [*CONFIGS["dropout_onecycle"], "data.augment=true"]
    assert main(["train", *args, f"experiment.output_dir={tmp_path / 'ref'}"]) == 0
    expected = results(run_dirs(tmp_path / "ref")[0])
    out = tmp_path / "out"
    calls = {"n": 0}
    original = ClassificationTask.forward

    def forward(self, model, batch):
        if model.training:
            calls["n"] += 1
            if calls["n"] == 13 * (stop_in_epoch - 1) + 5:  # 13 steps an epoch
                raise RuntimeError("injected")
        return original(self, model, batch)

    monkeypatch.setattr(ClassificationTask, "forward", forward)
    assert main(["train", *args, f"experiment.output_dir={out}"]) == 1
    (run,) = run_dirs(out)
    assert (run / "Vanilla_interrupt_ckpt.pth").exists() == (stop_in_epoch == 2)
    monkeypatch.setattr(ClassificationTask, "forward", original)
    assert main(["resume", str(run)]) == 0
    assert_identical(results(run), expected)
