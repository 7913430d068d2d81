"""Optuna's side of a sweep: the storage (a journal file in the sweep directory by default, or a
database URL shared by workers on several machines), the sampler and the pruner."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

JOURNAL = "study.journal"  # the default storage, a file in the sweep directory
# How a sweep describes a trial to the run it starts (the ``sweep_trial`` callback reads it):
# JSON with the storage, study, trial id, objective and pruner.
TRIAL_ENV = "DLTEMPLATE_SWEEP_TRIAL"


def storage_url(sweep_dir: Path, given: str | None) -> str:
    """The storage a sweep uses: ``given`` (a database URL: ``postgresql://...``,
    ``mysql://...``, ``sqlite:///...``), else Optuna's journal file in the sweep directory."""
    return given or f"journal:{(Path(sweep_dir) / JOURNAL).resolve()}"


def open_storage(url: str) -> Any:
    """Optuna's storage object for :func:`storage_url`'s text."""
    import optuna

    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(url[len("journal:") :]))
    return optuna.storages.RDBStorage(url)


def make_pruner(name: str, args: dict[str, Any] | None = None) -> Any:
    """``none`` or ``median`` (Optuna's MedianPruner: a trial whose objective at an epoch is
    worse than the median of the other trials' at that epoch stops; by default the first 5
    trials and the first epoch of each are never pruned; ``args`` are its arguments)."""
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner(**{"n_startup_trials": 5, "n_warmup_steps": 1,
                                             **(args or {})})  # fmt: skip
    return optuna.pruners.NopPruner()


def trial_seed(seed: int, number: int) -> int:
    """The seed of the ``tpe`` or ``random`` sampler that draws trial ``number``: a sweep's
    coordinators each build their own sampler, so one seeded once would draw the same values
    again in a continued sweep or in every worker of a job array; seeded by (``seed``, trial
    number), every draw differs and the same sweep draws the same values. (A grid keeps
    ``seed``: it orders the grid's points, which every trial must see alike.)"""
    import numpy as np

    return int(np.random.SeedSequence([seed, number]).generate_state(1)[0])


def make_sampler(name: str, seed: int, params: dict[str, Any]) -> Any:
    """``tpe``, ``random`` or ``grid`` (over each param's choices or stepped range)."""
    import optuna

    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "grid":

        class Grid(optuna.samplers.GridSampler):
            """Optuna's grid, without its ``study.stop()`` once the grid is done (which works
            only inside ``study.optimize``): the sweep asks no more than :func:`grid_size`."""

            def after_trial(self, *args: Any) -> None:
                pass

        space = {key: spec.grid() for key, spec in params.items()}
        return Grid(space, seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def grid_size(params: dict[str, Any]) -> int:
    """How many points a grid search over ``params`` (name -> ``ParamSpec``) has."""
    return math.prod(len(spec.grid()) for spec in params.values())
