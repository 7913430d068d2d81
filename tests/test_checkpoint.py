"""Checkpoints: weights_only loading, atomic writes, RNG state, unwrapping, weight loading."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

import dltemplate.engine.checkpoint as ckpt_module
from dltemplate.config import OptimizerConfig, SchedulerConfig
from dltemplate.engine import seeding
from dltemplate.engine.checkpoint import (
    FORMAT,
    load_checkpoint,
    load_model_weights,
    save_checkpoint,
    strip_prefixes,
    unwrap_model,
)
from dltemplate.errors import CheckpointError
from dltemplate.optim import build_optimizer, build_scheduler, is_plateau
from dltemplate.registry import SCHEDULERS


def tiny_model(hidden: int = 6) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 3))


def adam(model: nn.Module) -> torch.optim.Optimizer:
    return build_optimizer(OptimizerConfig(name="adam", lr=0.01), model.parameters())


def one_step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    model(torch.randn(5, 4)).square().mean().backward()
    opt.step()
    opt.zero_grad()


def scheduler_states() -> dict[str, object]:
    """Every registered scheduler, built by name and stepped once, as state dicts."""
    states = {}
    for name in SCHEDULERS.names():
        model = tiny_model()
        opt = adam(model)
        sched = build_scheduler(
            SchedulerConfig(name=name), opt, epochs=3, steps_per_epoch=4, monitor_mode="max"
        )
        one_step(model, opt)
        if sched is None:
            states[name] = None
            continue
        sched.step(0.5) if is_plateau(sched) else sched.step()
        states[name] = sched.state_dict()
    return states


def test_registered_schedulers_are_the_expected_ones():
    import dltemplate.optim  # noqa: F401

    assert {"none", "step", "cosine", "plateau", "onecycle"} <= set(SCHEDULERS.names())


def test_checkpoint_loads_with_weights_only(tmp_path):
    model = tiny_model()
    opt = adam(model)
    one_step(model, opt)
    state = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "schedulers": scheduler_states(),
        "rng": seeding.rng_state(),
        "epoch": 2,
        "global_step": 17,
        "config": {"trainer": {"epochs": 3}, "model": {"name": "Vanilla"}},
        "best": None,
    }
    path = tmp_path / "Tiny_last_ckpt.pth"
    save_checkpoint(path, state)

    loaded = torch.load(path, weights_only=True)
    assert loaded["format"] == FORMAT
    assert loaded["digest"].startswith("blake2b:")  # a string: weights_only loads it
    assert loaded["epoch"] == 2 and loaded["global_step"] == 17
    assert loaded["config"] == state["config"]
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded["model"][key], tensor)
    assert loaded["optimizer"]["state"][0]["step"] == 1
    assert set(loaded["schedulers"]) == set(SCHEDULERS.names())
    assert loaded["schedulers"]["none"] is None
    assert loaded["schedulers"]["step"]["last_epoch"] == 1

    # and the pieces restore into fresh objects
    fresh = tiny_model(6)
    fresh.load_state_dict(loaded["model"])
    fresh_opt = adam(fresh)
    fresh_opt.load_state_dict(loaded["optimizer"])
    assert fresh_opt.state_dict()["state"][0]["step"] == 1
    assert load_checkpoint(path)["global_step"] == 17


def _draws() -> tuple[list[float], np.ndarray, torch.Tensor]:
    return [random.random() for _ in range(3)], np.random.rand(3), torch.rand(3)


def test_rng_state_round_trip_through_a_checkpoint(tmp_path):
    seeding.seed_everything(123)
    random.random(), np.random.rand(), np.random.randn(), torch.rand(1)  # move every generator
    path = tmp_path / "rng.pth"
    save_checkpoint(path, {"rng": seeding.rng_state()})
    expected = _draws()
    _draws()  # move on further
    seeding.set_rng_state(load_checkpoint(path)["rng"])
    got = _draws()
    assert got[0] == expected[0]
    np.testing.assert_array_equal(got[1], expected[1])
    assert torch.equal(got[2], expected[2])


def test_numpy_cached_gaussian_survives_the_round_trip():
    np.random.seed(1)
    np.random.randn()  # leaves a cached Gaussian behind
    state = seeding.rng_state()
    expected = np.random.randn(3)
    seeding.set_rng_state(state)
    np.testing.assert_array_equal(np.random.randn(3), expected)


def test_atomic_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "Net_best_ckpt.pth"
    save_checkpoint(path, {"epoch": 1, "w": torch.arange(4.0)})
    good_bytes = path.read_bytes()

    def broken_save(obj, fh, *args, **kwargs):
        fh.write(b"PK\x03\x04 partial checkpoint bytes")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_module.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"epoch": 2, "w": torch.zeros(4)})
    monkeypatch.undo()

    assert path.read_bytes() == good_bytes
    assert load_checkpoint(path)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temp file left


def test_save_replaces_an_existing_checkpoint(tmp_path):
    path = tmp_path / "x.pth"
    save_checkpoint(path, {"epoch": 1})
    save_checkpoint(path, {"epoch": 2})
    assert load_checkpoint(path)["epoch"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["x.pth"]


@pytest.mark.parametrize("text", ["not a checkpoint", '{"a": 1}\n'])
def test_load_checkpoint_of_a_text_file_names_the_path(tmp_path, text):
    path = tmp_path / "notes.pth"
    path.write_text(text)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path)
    assert str(path) in str(exc.value)


@pytest.mark.parametrize("text", ["hello world\n", "experiment:\n  name: x\n"])
def test_load_checkpoint_of_any_text_file_is_a_checkpoint_error(tmp_path, text):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path)
    assert str(path) in str(exc.value)


def test_load_checkpoint_of_foreign_torch_files(tmp_path):
    tensor_file = tmp_path / "tensor.pt"
    torch.save(torch.arange(3), tensor_file)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(tensor_file)
    assert str(tensor_file) in str(exc.value)
    assert "not a dltemplate checkpoint" in str(exc.value)

    dict_file = tmp_path / "plain_dict.pt"
    torch.save({"model": tiny_model().state_dict()}, dict_file)
    with pytest.raises(CheckpointError, match="not a dltemplate checkpoint"):
        load_checkpoint(dict_file)

    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.pth"):
        load_checkpoint(empty)

    missing = tmp_path / "missing.pth"
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(missing)


def test_unwrap_model_and_strip_prefixes():
    model = tiny_model()
    wrapped = nn.DataParallel(model)  # on the CPU: no device ids, it just wraps
    assert unwrap_model(wrapped) is model
    assert unwrap_model(nn.DataParallel(wrapped)) is model
    assert unwrap_model(model) is model

    wrapped_keys = list(wrapped.state_dict())
    assert all(k.startswith("module.") for k in wrapped_keys)
    assert list(strip_prefixes(wrapped.state_dict())) == list(model.state_dict())

    state = {"_orig_mod.0.weight": 1, "module._orig_mod.2.bias": 2, "modules.x": 3, "a.module.b": 4}
    assert strip_prefixes(state) == {"0.weight": 1, "2.bias": 2, "modules.x": 3, "a.module.b": 4}


def test_unwrap_model_of_a_compile_style_wrapper():
    model = tiny_model()

    class FakeCompiled(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self._orig_mod = inner

    assert unwrap_model(FakeCompiled(model)) is model
    assert unwrap_model(nn.DataParallel(FakeCompiled(model))) is model


def test_load_model_weights_accepts_prefixed_keys():
    source = tiny_model()
    with torch.no_grad():
        for p in source.parameters():
            p.add_(1.0)
    target = tiny_model()
    prefixed = {f"module._orig_mod.{k}": v for k, v in source.state_dict().items()}
    load_model_weights(target, prefixed, "best.pth")
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value)


def test_load_model_weights_of_another_model_says_it_does_not_match():
    source, target = tiny_model(hidden=6), tiny_model(hidden=9)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointError) as exc:
        load_model_weights(target, source.state_dict(), "run/Net_best_ckpt.pth")
    msg = str(exc.value)
    assert "does not match" in msg
    assert "run/Net_best_ckpt.pth" in msg
    assert "0.weight" in msg and "(6, 4)" in msg and "(9, 4)" in msg
    for key, value in target.state_dict().items():  # nothing half-loaded
        assert torch.equal(value, before[key])

    other = nn.Sequential(nn.Linear(4, 6))
    with pytest.raises(CheckpointError, match="missing keys: 0.weight"):
        load_model_weights(tiny_model(), {"2.weight": torch.zeros(3, 6)}, "x")
    with pytest.raises(CheckpointError, match="unexpected keys: 2.weight"):
        load_model_weights(other, tiny_model().state_dict(), "x")
