"""Stretching a learning-rate schedule to more steps ("train longer") without jumping back up."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch.optim import lr_scheduler

from dltemplate.config.schema import SchedulerConfig
from dltemplate.optim import build_scheduler, scheduler_interval
from dltemplate.optim.stretch import StretchedSchedule, is_stretched_state, stretch_scheduler


def _optimizer(kind: str = "sgd", lr: float = 0.1) -> torch.optim.Optimizer:
    params = [torch.nn.Parameter(torch.zeros(2))]
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr)
    return torch.optim.SGD(params, lr=lr, momentum=0.9)


def _build(name: str, optimizer: torch.optim.Optimizer, epochs: int, steps: int = 1, **args):
    cfg = SchedulerConfig(name=name, args=args)
    return build_scheduler(cfg, optimizer, epochs=epochs, steps_per_epoch=steps, monitor_mode="max")


def _advance(scheduler, optimizer: torch.optim.Optimizer, n: int) -> None:
    for _ in range(n):
        optimizer.step()  # the order torch expects, so no warnings
        scheduler.step()


def _trace(scheduler, optimizer: torch.optim.Optimizer, n: int, key: str = "lr") -> list:
    """The value of ``key`` now and after each of ``n`` further steps (n + 1 values)."""
    out = [_value(optimizer, key)]
    for _ in range(n):
        _advance(scheduler, optimizer, 1)
        out.append(_value(optimizer, key))
    return out


def _value(optimizer: torch.optim.Optimizer, key: str) -> float:
    value = optimizer.param_groups[0][key]
    return float(value[0]) if key == "betas" else float(value)


def _groups(optimizer: torch.optim.Optimizer) -> list[dict]:
    return [
        {k: copy.deepcopy(v) for k, v in g.items() if k != "params"} for g in optimizer.param_groups
    ]


def _expected(old: list[float], done: int, old_total: int, new_total: int, t: int) -> float:
    """The documented formula; ``old[s]`` is the old value at old step ``s``."""
    t = min(t, new_total)
    u = done + (t - done) * (old_total - done) / (new_total - done)
    i = math.floor(u)
    j = min(i + 1, old_total)
    return old[i] + (old[j] - old[i]) * (u - i)


def _non_increasing(values: list[float]) -> bool:
    return all(b <= a for a, b in zip(values, values[1:]))


def _non_decreasing(values: list[float]) -> bool:
    return all(b >= a for a, b in zip(values, values[1:]))


@pytest.mark.parametrize("eta_min", [0.0, 0.01])
@pytest.mark.parametrize("done", [5, 10])
def test_cosine_stretched_continues_down_to_its_old_end(done: int, eta_min: float) -> None:
    ref_opt = _optimizer()
    ref = _build("cosine", ref_opt, epochs=10, eta_min=eta_min)
    old = _trace(ref, ref_opt, 10)  # the old schedule, steps 0..10
    opt = _optimizer()
    sched = _build("cosine", opt, epochs=10, eta_min=eta_min)
    _advance(sched, opt, done)
    now = _value(opt, "lr")
    assert now == old[done]

    stretched = stretch_scheduler(sched, opt, done=done, old_total=10, new_total=20)
    assert isinstance(stretched, StretchedSchedule)
    assert stretched.last_epoch == done
    assert _value(opt, "lr") == now and stretched.get_last_lr() == [now]
    lrs = _trace(stretched, opt, 20 - done + 3)  # a few steps past the end: it holds
    assert lrs[0] == now
    assert _non_increasing(lrs)
    assert lrs[20 - done] == old[10] and lrs[-1] == old[10]
    assert old[10] == pytest.approx(eta_min, abs=1e-12)
    if done == 10:
        assert all(lr == old[10] for lr in lrs)
    else:  # 5 old steps over 15 new ones: every third new step lands on an old step
        assert lrs[3:16:3] == old[6:11]
        assert all(
            lr == pytest.approx(_expected(old, done, 10, 20, done + k), abs=1e-15)
            for k, lr in enumerate(lrs)
        )


def test_step_lr_stretched_to_twice_the_length() -> None:
    ref_opt = _optimizer()
    ref = _build("step", ref_opt, epochs=40)
    old = _trace(ref, ref_opt, 40)
    opt = _optimizer()
    sched = _build("step", opt, epochs=40)
    _advance(sched, opt, 30)
    stretched = stretch_scheduler(sched, opt, done=30, old_total=40, new_total=80)
    assert _value(opt, "lr") == old[30] and stretched.get_last_lr() == [old[30]]
    assert "momentum" not in stretched.tables[0]  # StepLR never changes it: left alone
    lrs = _trace(stretched, opt, 50)
    assert lrs[0] == old[30] and lrs[-1] == old[40]
    assert _non_increasing(lrs)
    assert lrs == pytest.approx([_expected(old, 30, 40, 80, 30 + k) for k in range(51)])
    assert opt.param_groups[0]["momentum"] == 0.9


def _onecycle(total: int = 40):
    opt = _optimizer("adam")
    cfg = SchedulerConfig(name="onecycle")
    assert scheduler_interval(cfg) == "step"
    sched = build_scheduler(cfg, opt, epochs=4, steps_per_epoch=total // 4, monitor_mode="max")
    return opt, sched


def test_onecycle_stretched_while_annealing() -> None:
    ref_opt, ref = _onecycle()
    old_lr = _trace(ref, ref_opt, 40)
    ref_opt, ref = _onecycle()
    old_beta = _trace(ref, ref_opt, 40, "betas")
    opt, sched = _onecycle()
    _advance(sched, opt, 30)
    at_switch = _value(opt, "lr")
    stretched = stretch_scheduler(sched, opt, done=30, old_total=40, new_total=80)
    assert set(stretched.tables[0]) == {"lr", "betas"}
    assert _value(opt, "lr") == at_switch == old_lr[30]
    assert _value(opt, "betas") == old_beta[30]

    lrs, betas = [at_switch], [_value(opt, "betas")]
    for _ in range(55):  # past the end, where the plain one-cycle would raise
        _advance(stretched, opt, 1)
        lrs.append(_value(opt, "lr"))
        betas.append(_value(opt, "betas"))
    assert max(lrs) == at_switch
    assert lrs[50] == lrs[-1] == old_lr[40]
    assert betas[50] == betas[-1] == old_beta[40]
    for k in range(56):
        assert lrs[k] == pytest.approx(_expected(old_lr, 30, 40, 80, 30 + k), abs=1e-15)
        assert betas[k] == pytest.approx(_expected(old_beta, 30, 40, 80, 30 + k), abs=1e-15)
    assert opt.param_groups[0]["betas"][1] == 0.999


def test_onecycle_stretched_during_warm_up_rises_then_anneals() -> None:
    ref_opt, ref = _onecycle()
    old = _trace(ref, ref_opt, 40)
    opt, sched = _onecycle()
    max_lr = opt.param_groups[0]["max_lr"]
    _advance(sched, opt, 5)
    stretched = stretch_scheduler(sched, opt, done=5, old_total=40, new_total=80)
    lrs = _trace(stretched, opt, 75)
    assert lrs[0] == old[5]
    peak = lrs.index(max(lrs))
    assert peak > 1 and max(lrs) <= max_lr and max(lrs) > 0.9 * max_lr
    assert _non_decreasing(lrs[: peak + 1])
    # torch's one-cycle ends on a tiny rise at step total_steps; the anneal is up to step 39
    last_anneal = 5 + (39 - 5) * 75 // 35
    assert _non_increasing(lrs[peak : last_anneal - 5 + 1])
    assert lrs[-1] == old[40]
    assert lrs == pytest.approx([_expected(old, 5, 40, 80, 5 + k) for k in range(76)])


def test_scheduler_that_cannot_reach_old_total_holds_its_last_values() -> None:
    ref_opt, ref = _onecycle()
    old = _trace(ref, ref_opt, 40)
    opt, sched = _onecycle()  # total_steps 40: stepping to 41 raises
    _advance(sched, opt, 38)
    stretched = stretch_scheduler(sched, opt, done=38, old_total=45, new_total=52)
    lrs = _trace(stretched, opt, 14)  # 7 old steps over 14 new ones: u = 38 + k / 2
    assert lrs[0] == old[38] and lrs[2] == old[39] and lrs[4] == old[40]
    assert lrs[1] == pytest.approx((old[38] + old[39]) / 2, abs=1e-15)
    assert all(lr == old[40] for lr in lrs[4:])  # old steps 40..45 hold step 40's values


def test_interpolation_formula_exact_values() -> None:
    a = [1.0, 0.8, 0.5, 0.4, 0.1]
    b = [2.0, 1.0, 1.0, 0.0, 0.5]
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    opt = torch.optim.SGD([{"params": params[:1]}, {"params": params[1:]}], lr=1.0)
    sched = lr_scheduler.LambdaLR(opt, [lambda e: a[min(e, 4)], lambda e: b[min(e, 4)]])
    _advance(sched, opt, 1)
    stretched = stretch_scheduler(sched, opt, done=1, old_total=4, new_total=5)
    # u = 1 + (t - 1) * 3 / 4: t=2 -> 1.75, t=3 -> 2.5, t=4 -> 3.25, t=5 -> 4, then held
    want_a = [0.8, 0.8 + (0.5 - 0.8) * 0.75, 0.45, 0.4 + (0.1 - 0.4) * 0.25, 0.1, 0.1]
    want_b = [1.0, 1.0, 1.0 + (0.0 - 1.0) * 0.5, 0.0 + (0.5 - 0.0) * 0.25, 0.5, 0.5]
    got_a, got_b = [], []
    for _ in range(6):
        got_a.append(opt.param_groups[0]["lr"])
        got_b.append(opt.param_groups[1]["lr"])
        _advance(stretched, opt, 1)
    assert got_a == pytest.approx(want_a, abs=1e-15) and got_a[0] == 0.8 and got_a[4] == 0.1
    assert got_b == pytest.approx(want_b, abs=1e-15) and got_b[4] == 0.5
    # whole multiples land exactly on old steps: 3 old steps over 6 new ones
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched2 = lr_scheduler.LambdaLR(opt2, lambda e: a[min(e, 4)])
    _advance(sched2, opt2, 1)
    stretched2 = stretch_scheduler(sched2, opt2, done=1, old_total=4, new_total=7)
    assert _trace(stretched2, opt2, 6) == pytest.approx(
        [0.8, 0.65, 0.5, 0.45, 0.4, 0.25, 0.1], abs=1e-15
    )


def test_state_dict_round_trip_through_torch_save(tmp_path) -> None:
    opt, sched = _onecycle()
    _advance(sched, opt, 30)
    stretched = stretch_scheduler(sched, opt, done=30, old_total=40, new_total=80)
    _advance(stretched, opt, 7)
    state = stretched.state_dict()
    assert state["stretched"] is True and is_stretched_state(state)
    assert not is_stretched_state(sched.state_dict())
    path = tmp_path / "sched.pt"
    torch.save({"scheduler": state}, path)
    loaded = torch.load(path, weights_only=True)["scheduler"]

    fresh = _optimizer("adam", lr=123.0)  # nothing of the old run but the saved state
    restored = StretchedSchedule.from_state_dict(fresh, loaded)
    assert restored.last_epoch == stretched.last_epoch == 37
    assert restored.get_last_lr() == stretched.get_last_lr()
    assert fresh.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert fresh.param_groups[0]["betas"] == opt.param_groups[0]["betas"]
    # load_state_dict into an existing one gives the same
    other_opt, other = _onecycle()
    other = stretch_scheduler(other, other_opt, done=0, old_total=40, new_total=50)
    other.load_state_dict(torch.load(io.BytesIO(_saved(state)), weights_only=True))
    for _ in range(50):
        _advance(stretched, opt, 1)
        _advance(restored, fresh, 1)
        _advance(other, other_opt, 1)
        assert fresh.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
        assert other_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
        assert fresh.param_groups[0]["betas"] == opt.param_groups[0]["betas"]
        assert restored.get_last_lr() == stretched.get_last_lr()


def _saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def test_stretching_twice_never_jumps() -> None:
    ref_opt = _optimizer()
    ref = _build("cosine", ref_opt, epochs=10)
    final = _trace(ref, ref_opt, 10)[-1]
    opt = _optimizer()
    sched = _build("cosine", opt, epochs=10)
    lrs = _trace(sched, opt, 5)
    once = stretch_scheduler(sched, opt, done=5, old_total=10, new_total=20)
    assert _value(opt, "lr") == lrs[-1]
    lrs += _trace(once, opt, 7)[1:]  # to step 12 of 20
    # the engine resumes from a checkpoint: stretch a schedule rebuilt from its state
    rebuilt = StretchedSchedule.from_state_dict(
        opt, torch.load(io.BytesIO(_saved(once.state_dict())), weights_only=True)
    )
    twice = stretch_scheduler(rebuilt, opt, done=12, old_total=20, new_total=30)
    assert isinstance(twice, StretchedSchedule)
    assert _value(opt, "lr") == lrs[-1] and twice.get_last_lr() == [lrs[-1]]
    lrs += _trace(twice, opt, 20)[1:]  # to step 32 of 30: holds at the end
    assert len(lrs) == 33
    assert _non_increasing(lrs)
    assert lrs[30] == lrs[-1] == final
    assert lrs[29] > final  # still annealing until the new end


def test_not_stretched_returned_unchanged() -> None:
    opt = _optimizer()
    plateau = _build("plateau", opt, epochs=10)
    assert isinstance(plateau, lr_scheduler.ReduceLROnPlateau)
    assert stretch_scheduler(plateau, opt, done=5, old_total=10, new_total=20) is plateau
    assert _build("none", opt, epochs=10) is None
    assert stretch_scheduler(None, opt, done=5, old_total=10, new_total=20) is None
    cosine = _build("cosine", opt, epochs=10)
    _advance(cosine, opt, 5)
    for new_total in (10, 8):
        assert stretch_scheduler(cosine, opt, done=5, old_total=10, new_total=new_total) is cosine
    with pytest.raises(ValueError):
        stretch_scheduler(cosine, opt, done=11, old_total=10, new_total=20)


@pytest.mark.parametrize("name", ["cosine", "step", "onecycle"])
def test_replay_leaves_no_trace(name: str) -> None:
    def build():
        if name == "onecycle":
            return _onecycle()
        opt = _optimizer()
        return opt, _build(name, opt, epochs=40)

    opt, sched = build()
    twin_opt, twin = build()
    _advance(sched, opt, 30)
    _advance(twin, twin_opt, 30)
    groups, state = _groups(opt), copy.deepcopy(sched.state_dict())
    stretch_scheduler(sched, opt, done=30, old_total=40, new_total=80)
    assert _groups(opt) == groups
    assert sched.state_dict() == state
    # the original goes on exactly as an untouched twin would
    assert _trace(sched, opt, 10) == _trace(twin, twin_opt, 10)
    assert _trace(sched, opt, 0, "betas" if name == "onecycle" else "momentum") == _trace(
        twin, twin_opt, 0, "betas" if name == "onecycle" else "momentum"
    )
