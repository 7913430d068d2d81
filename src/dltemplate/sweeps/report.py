"""A sweep's results: ``trials.csv`` (rewritten after every trial, so it always agrees with the
study), ``best.yaml`` (a runnable config: base + overrides + the best trial's params), pictures
(optimisation history, parameter importances, slices) and a summary table."""

from __future__ import annotations

import csv
import io
import logging
import warnings
from pathlib import Path
from typing import Any, Protocol

import yaml

from dltemplate.atomic import atomic_write, atomic_write_text
from dltemplate.config import config_to_dict
from dltemplate.engine.rundir import metrics_rows
from dltemplate.sweeps.spec import SweepSpec, decode_params, trial_config


class Sweep(Protocol):
    """What the results need of a sweep (:class:`dltemplate.sweeps.runner.Sweep`)."""

    spec: SweepSpec
    folder: Path
    study: Any
    objective: str
    direction: str


log = logging.getLogger("dltemplate")


def training_seconds(run_dir: str) -> float | None:
    """The seconds a run's epochs took (its ``metrics.csv``), as ``dltemplate runs`` counts
    its duration; None without a readable table."""
    path = Path(run_dir) / "metrics.csv" if run_dir else None
    if path is None or not path.is_file():
        return None
    try:
        table = metrics_rows(path)
    except ValueError:
        return None
    seconds = [float(r["seconds"]) for r in table if r.get("seconds") not in (None, "")]
    return round(sum(seconds), 1) if seconds else None


def rows(sweep: Sweep) -> list[dict[str, Any]]:
    """One row per trial: number, state, value, each param, run directory, seconds (its run's
    epochs; without them, from when the trial was asked to when it was told, which counts any
    time the sweep was stopped), reason."""
    out = []
    for trial in sweep.study.get_trials(deepcopy=False):
        seconds = training_seconds(trial.user_attrs.get("run_dir", ""))
        if seconds is None and trial.datetime_start and trial.datetime_complete:
            seconds = round((trial.datetime_complete - trial.datetime_start).total_seconds(), 1)
        row: dict[str, Any] = {
            "number": trial.number,
            "state": trial.state.name.lower(),
            sweep.objective: trial.value,
        }
        row.update({key: trial.params.get(key) for key in sweep.spec.params})
        row["run_dir"] = trial.user_attrs.get("run_dir", "")
        row["seconds"] = seconds
        row["reason"] = trial.user_attrs.get("reason", "")
        out.append(row)
    return out


def write(sweep: Sweep) -> None:
    """Rewrite ``trials.csv`` and ``best.yaml`` from the study."""
    table = rows(sweep)
    buf = io.StringIO(newline="")
    columns = list(table[0]) if table else ["number", "state", sweep.objective]
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(table)
    atomic_write_text(sweep.folder / "trials.csv", buf.getvalue())
    best = best_trial(sweep)
    if best is not None:
        cfg = trial_config(sweep.spec, decode_params(sweep.spec, best.params))
        saved = config_to_dict(cfg)
        header = (
            f"# The best trial of sweep {sweep.spec.name} (trial {best.number}: "
            f"{sweep.objective} {best.value:.6g}): its base config, the sweep's overrides and its "
            f"params.\n# dltemplate train {sweep.folder / 'best.yaml'} reproduces it.\n"
        )
        atomic_write_text(
            sweep.folder / "best.yaml", header + yaml.safe_dump(saved, sort_keys=False)
        )


def best_trial(sweep: Sweep) -> Any:
    """The best finished trial, or None."""
    from optuna.trial import TrialState

    done = [t for t in sweep.study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if not done:
        return None
    sign = 1 if sweep.direction == "maximize" else -1
    return max(done, key=lambda t: (sign * t.value, -t.number))  # of equals, the first


def summary(sweep: Sweep) -> None:
    """Log the best trials as a table, then draw the pictures."""
    table = [r for r in rows(sweep) if r["state"] == "complete"]
    table.sort(key=lambda r: r[sweep.objective], reverse=sweep.direction == "maximize")
    states: dict[str, int] = {}
    for row in rows(sweep):
        states[row["state"]] = states.get(row["state"], 0) + 1
    log.info(
        "sweep %s done: %s",
        sweep.spec.name,
        ", ".join(f"{n} {state}" for state, n in sorted(states.items())),
    )
    keys = list(sweep.spec.params)
    for row in table[:5]:
        params = " ".join(f"{k}={_short(row[k])}" for k in keys)
        log.info("  trial %3d  %s %.6g  %s", row["number"], sweep.objective, row[sweep.objective],
                 params)  # fmt: skip
    if table:
        log.info("best config: %s (dltemplate train %s)", sweep.folder / "best.yaml",
                 sweep.folder / "best.yaml")  # fmt: skip
    for name, drawn in pictures(sweep).items():
        log.info("%s: %s", name, drawn)


def pictures(sweep: Sweep) -> dict[str, str]:
    """``history.png``, ``importances.png`` and ``slices.png`` in the sweep directory (what each
    became: its path, or why it was not drawn)."""
    import matplotlib

    matplotlib.use("Agg")
    from optuna.visualization import matplotlib as plots

    made = {}
    jobs = {
        "history.png": plots.plot_optimization_history,
        "importances.png": plots.plot_param_importances,
        "slices.png": plots.plot_slice,
    }
    for name, plot in jobs.items():
        path = sweep.folder / name
        try:
            with warnings.catch_warnings():  # Optuna's "experimental", "too few trials"...: noise
                warnings.simplefilter("ignore")
                axes = plot(sweep.study)
            figure = _figure(axes)
            atomic_write(path, lambda fh, f=figure: f.savefig(fh, dpi=80, format="png",
                                                               bbox_inches="tight"))  # fmt: skip
            made[name] = str(path)
        except Exception as exc:  # too few trials, one param...: a picture is never an error
            made[name] = f"not drawn ({type(exc).__name__}: {str(exc)[:120]})"
    return made


def _figure(axes: Any) -> Any:
    first = axes.flat[0] if hasattr(axes, "flat") else axes
    return first.get_figure()


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def read_trials(folder: Path) -> list[dict[str, str]]:
    """The rows of a sweep directory's ``trials.csv``."""
    with open(Path(folder) / "trials.csv", newline="") as fh:
        return list(csv.DictReader(fh))
