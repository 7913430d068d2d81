"""Train longer: stretch a learning-rate schedule to a new length without jumping back up.

Semantics. When a run that has taken ``done`` scheduler steps of a schedule planned for
``old_total`` steps is continued to ``new_total > old_total`` steps, the part of the schedule
still to come (old steps ``done..old_total``) is stretched linearly in time over the new
remaining steps (``done..new_total``): at new step ``t`` (``done <= t <= new_total``), every
hyper-parameter the scheduler drives takes the old schedule's value at old step
``u = done + (t - done) * (old_total - done) / (new_total - done)``, linearly interpolated
between the two neighbouring integer old steps. So the learning rate continues from its
current value (no jump), keeps the old schedule's shape, and ends where the old one ended; a
schedule that had already reached its end (``done == old_total``) holds its final values.
Past ``new_total`` the final values are held too. If ``new_total <= old_total`` nothing is
stretched (the scheduler is returned unchanged; shortening is not this module's business).

The driven hyper-parameters are ``lr`` always, plus ``momentum`` (SGD, RMSprop) or ``betas``
(Adam: one-cycle cycles beta1) when the old schedule changes them over the remaining steps.
The old schedule's values are found by replaying the scheduler itself from ``done`` to
``old_total`` (then restoring it and the optimizer exactly), so any scheduler with
``state_dict``/``load_state_dict`` works, a stretched one included (stretching twice). A
scheduler that refuses to be stepped that far (one-cycle past its ``total_steps``) is taken to
hold its last reachable values for the rest of the old schedule. ``ReduceLROnPlateau`` has no
length and is never stretched.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import Tensor
from torch.optim import lr_scheduler

_KEYS = ("lr", "momentum", "betas")  # the param-group values a schedule may drive


class StretchedSchedule(lr_scheduler.LRScheduler):
    """The remaining part of an old schedule, stretched in time; see the module docstring.

    ``last_epoch`` counts scheduler steps, as in torch: after construction it is ``done`` and
    each ``step()`` advances it by one and writes the values for that step into the
    optimizer's param groups.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        tables: list[dict[str, Tensor]],
        *,
        done: int,
        old_total: int,
        new_total: int,
        last_epoch: int | None = None,
    ) -> None:
        """Wrap ``optimizer`` with ``tables`` (per group: key -> values at old steps done..).

        Each table has ``old_total - done + 1`` rows (float64; ``betas`` has one column per
        beta). The schedule starts at ``last_epoch`` (default ``done``) and sets the optimizer's
        values for that step, as torch schedulers do when built.
        """
        # The base __init__ would take a step of its own; this one is positioned explicitly.
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"{type(optimizer).__name__} is not an Optimizer")
        if len(tables) != len(optimizer.param_groups):
            raise ValueError(f"{len(tables)} tables for {len(optimizer.param_groups)} param groups")
        rows = old_total - done + 1
        for table in tables:
            if "lr" not in table or any(len(v) != rows for v in table.values()):
                raise ValueError(f"every table needs 'lr' and {rows} rows (steps done..old_total)")
        if not 0 <= done <= old_total < new_total:
            raise ValueError(
                f"need 0 <= done <= old_total < new_total, got {done}, {old_total}, {new_total}"
            )
        self.optimizer = optimizer
        self.tables = [
            {key: value.detach().to(dtype=torch.float64, device="cpu") for key, value in t.items()}
            for t in tables
        ]
        self.done, self.old_total, self.new_total = done, old_total, new_total
        self.base_lrs = [g.get("initial_lr", g["lr"]) for g in optimizer.param_groups]
        self.last_epoch = done if last_epoch is None else last_epoch
        self._step_count = 1  # as a built torch scheduler: its own initial step counts
        self._apply()

    def _row(self, t: int) -> tuple[int, int, float]:
        """Neighbouring table rows and the weight of the second for new step ``t``."""
        n, m = self.old_total - self.done, self.new_total - self.done
        # Integer arithmetic so that steps landing on an old step read it exactly.
        num = min(max(t - self.done, 0), m) * n
        i, rem = divmod(num, m)
        return i, min(i + 1, n), rem / m

    def values_at(self, t: int) -> list[dict[str, float | tuple[float, ...]]]:
        """Per param group, the driven values at new step ``t``."""
        i, j, w = self._row(t)
        out = []
        for table in self.tables:
            group = {}
            for key, column in table.items():
                a, b = column[i].tolist(), column[j].tolist()
                if isinstance(a, list):
                    group[key] = tuple(_lerp(x, y, w) for x, y in zip(a, b))
                else:
                    group[key] = _lerp(a, b, w)
            out.append(group)
        return out

    def _apply(self) -> None:
        """Write the values for ``last_epoch`` into the param groups and remember the lrs."""
        for group, values in zip(self.optimizer.param_groups, self.values_at(self.last_epoch)):
            for key, value in values.items():
                _set(group, key, value)
        self._last_lr = [
            g["lr"].clone() if isinstance(g["lr"], Tensor) else g["lr"]
            for g in self.optimizer.param_groups
        ]

    def get_lr(self) -> list[float | Tensor]:
        """The learning rates for the current ``last_epoch``."""
        return [values["lr"] for values in self.values_at(self.last_epoch)]  # type: ignore[misc]

    def step(self, epoch: int | None = None) -> None:
        """Advance one step (or jump to ``epoch``) and set the optimizer's values."""
        self._step_count += 1
        self.last_epoch = self.last_epoch + 1 if epoch is None else epoch
        self._apply()

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain types only (loads with ``torch.load(weights_only=True)``)."""
        return {
            "stretched": True,  # lets a checkpoint loader tell this from the original scheduler
            "done": self.done,
            "old_total": self.old_total,
            "new_total": self.new_total,
            "last_epoch": self.last_epoch,
            "_step_count": self._step_count,
            "tables": [{key: value.clone() for key, value in t.items()} for t in self.tables],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (the optimizer's values are left as they are, as torch)."""
        if not is_stretched_state(state_dict):
            raise ValueError("not the state of a StretchedSchedule")
        if len(state_dict["tables"]) != len(self.optimizer.param_groups):
            raise ValueError("the saved schedule has a different number of param groups")
        self.done = int(state_dict["done"])
        self.old_total = int(state_dict["old_total"])
        self.new_total = int(state_dict["new_total"])
        self.last_epoch = int(state_dict["last_epoch"])
        self._step_count = int(state_dict.get("_step_count", 1))
        self.tables = [
            {key: value.detach().to(torch.float64).clone() for key, value in t.items()}
            for t in state_dict["tables"]
        ]
        self._last_lr = [values["lr"] for values in self.values_at(self.last_epoch)]

    @classmethod
    def from_state_dict(
        cls, optimizer: torch.optim.Optimizer, state: dict[str, Any]
    ) -> StretchedSchedule:
        """Rebuild from a saved state alone, on ``optimizer``, at the saved step."""
        if not is_stretched_state(state):
            raise ValueError("not the state of a StretchedSchedule")
        schedule = cls(
            optimizer,
            state["tables"],
            done=int(state["done"]),
            old_total=int(state["old_total"]),
            new_total=int(state["new_total"]),
            last_epoch=int(state["last_epoch"]),
        )
        schedule._step_count = int(state.get("_step_count", 1))
        return schedule


def is_stretched_state(state: Any) -> bool:
    """Whether ``state`` is a :meth:`StretchedSchedule.state_dict`."""
    return isinstance(state, dict) and state.get("stretched") is True


def stretch_scheduler(
    scheduler: Any, optimizer: torch.optim.Optimizer, *, done: int, old_total: int, new_total: int
) -> Any:
    """``scheduler`` (at step ``done`` of ``old_total``) stretched to ``new_total`` steps.

    Returns a :class:`StretchedSchedule` at step ``done`` whose current values are the
    optimizer's current ones; ``scheduler`` and the optimizer are left exactly as they were.
    ``scheduler`` itself is returned when it is None, a ``ReduceLROnPlateau``, or when
    ``new_total <= old_total``.
    """
    if scheduler is None or isinstance(scheduler, lr_scheduler.ReduceLROnPlateau):
        return scheduler
    if new_total <= old_total:
        return scheduler
    if not 0 <= done <= old_total:
        raise ValueError(f"done={done} is outside the old schedule's 0..{old_total} steps")

    saved_groups = [
        {key: copy.deepcopy(value) for key, value in g.items() if key != "params"}
        for g in optimizer.param_groups
    ]
    saved_state = copy.deepcopy(scheduler.state_dict())
    keys = [[key for key in _KEYS if key in g] for g in optimizer.param_groups]
    rows = [_snapshot(optimizer, keys)]
    try:
        # Replay warnings (step order, deprecations) are about this replay, not the user's run.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(old_total - done):
                try:
                    scheduler.step()
                except (ValueError, IndexError, RuntimeError):
                    break  # e.g. one-cycle past total_steps: hold its last values (below)
                rows.append(_snapshot(optimizer, keys))
    finally:
        scheduler.load_state_dict(copy.deepcopy(saved_state))
        for group, saved in zip(optimizer.param_groups, saved_groups):
            for key, value in saved.items():
                _restore(group, key, value)
    rows += [rows[-1]] * (old_total - done + 1 - len(rows))  # a scheduler that stopped early

    tables = []
    for g, group_keys in enumerate(keys):
        table = {}
        for key in group_keys:
            column = torch.tensor([row[g][key] for row in rows], dtype=torch.float64)
            # lr is always driven; momentum/betas only when the old schedule changes them.
            if key == "lr" or not torch.equal(column, column[:1].expand_as(column)):
                table[key] = column
        tables.append(table)
    return StretchedSchedule(optimizer, tables, done=done, old_total=old_total, new_total=new_total)


def _snapshot(optimizer: torch.optim.Optimizer, keys: list[list[str]]) -> list[dict[str, Any]]:
    """Per group, the current values of ``keys`` as floats (tuples of floats for betas)."""
    return [
        {key: _as_float(g[key]) for key in group_keys}
        for g, group_keys in zip(optimizer.param_groups, keys)
    ]


def _as_float(value: Any) -> float | tuple[float, ...]:
    if isinstance(value, (tuple, list)):
        return tuple(float(v) for v in value)
    return float(value)


def _lerp(a: float, b: float, w: float) -> float:
    """``a`` to ``b`` at weight ``w``, kept within [a, b] so rounding cannot break monotony."""
    if w == 0.0:
        return a
    return min(max(a + (b - a) * w, min(a, b)), max(a, b))


def _set(group: dict[str, Any], key: str, value: Any) -> None:
    """Set a param-group value, filling tensors in place as torch schedulers do."""
    current = group[key]
    if isinstance(value, tuple):
        group[key] = tuple(
            c.fill_(v) if isinstance(c, Tensor) else v for c, v in zip(current, value)
        )
    elif isinstance(current, Tensor):
        current.fill_(value)
    else:
        group[key] = value


def _restore(group: dict[str, Any], key: str, value: Any) -> None:
    """Put back a saved param-group value, into the same tensor where there is one."""
    current = group.get(key)
    if isinstance(current, Tensor) and isinstance(value, Tensor):
        current.copy_(value)
    else:
        group[key] = value
