"""The seed template's own commands, run as its README shows them (on small generated data)."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys

import pytest
import torch
from conftest import REPO, run_dirs

from dltemplate.config import schema


@pytest.mark.slow  # the seed's scripts end to end, in subprocesses (~10 s)
def test_trainer_vanilla_and_eval_vanilla(fashion_root, tmp_path):
    out = tmp_path / "Results" / "Vanilla"
    train = subprocess.run(
        [sys.executable, str(REPO / "trainer_vanilla.py"), "--proj_name", "Vanilla",
         "--model_type", "Vanilla", "--data_type", "FashionMNIST", "--output_dir", f"{out}/",
         "--gpu_devices", "1", "--data_dir", str(fashion_root), "--epochs", "2"],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert train.returncode == 0, train.stderr
    assert "falling back to the CPU" in train.stderr  # there is no GPU 1 here
    (run,) = run_dirs(out)
    assert (run / f"config_Vanilla_{run.name[: len('YYYYmmdd_HHMMSS')]}.json").exists()
    assert run.name.endswith(
        "_fashion_mnist_mlp_experiment=Vanilla_model=Vanilla_data=FashionMNIST_epochs=2"
    )
    best = run / "Vanilla_best_ckpt.pth"
    state = torch.load(best, weights_only=True)
    assert state["model"]["net.1.weight"].shape == (512, 784)  # the seed's 784-512-512-10 MLP

    ev = subprocess.run(
        [sys.executable, str(REPO / "eval_vanilla.py"), "--model_path", str(best)],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert ev.returncode == 0, ev.stderr
    assert "accuracy" in ev.stdout and "confusion matrix" in ev.stdout
    assert re.search(r"label '(T-shirt/top|Trouser|Pullover|Dress|Coat|Sandal|Shirt|Sneaker|Bag"
                     r"|Ankle boot)'", ev.stdout)  # fmt: skip
    assert (run / "eval_test_best.json").exists()


def test_readme_documents_every_config_key():
    readme = (REPO / "README.md").read_text()
    for section in dataclasses.fields(schema.Config):
        default = section.default_factory()
        if isinstance(default, list):  # a list section: its items' keys
            assert f"`{section.name}`" in readme
            default = schema.CallbackConfig(name="x")
        for f in dataclasses.fields(default):
            assert f"`{f.name}`" in readme or f"`{section.name}.{f.name}`" in readme, (
                f"{section.name}.{f.name} is not in the README's config reference"
            )


def test_readme_commands_exist():
    readme = (REPO / "README.md").read_text()
    assert "pip install -e . && dltemplate train configs/digits_mlp.yaml" in readme
    ci = (REPO / ".ci" / "run").read_text()
    assert 'pip install -e ".[dev]" && python -m pytest' in readme
    assert 'pip install -e ".[dev]" && python -m pytest' in ci
