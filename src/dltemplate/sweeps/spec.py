"""The sweep file: what to search, over which base run, how — read and checked like a config.

```yaml
name: lrsweep
base: configs/digits_mlp.yaml          # the run config (relative to this file)
overrides: [trainer.epochs=10]         # applied to every trial
objective: val/accuracy                # a metrics.csv column; default trainer.monitor
direction: maximize                    # default from trainer.monitor_mode
trials: 20
jobs: 2                                # trials at once on this machine
sampler: tpe                           # tpe | random | grid
seed: 0
pruner: median                         # none | median
pruner_args: {n_startup_trials: 5}     # MedianPruner's arguments
params:
  optimizer.lr: {type: float, low: 1.0e-4, high: 1.0e-1, log: true}
  data.batch_size: {type: categorical, choices: [16, 32, 64]}
```

Every problem — an unknown key, a bad range, a param that is not a config key or whose values
the config refuses — is a ConfigError naming the file and key, before anything runs.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from dltemplate.config import Config, config_from_dict
from dltemplate.config.loader import (
    apply_overrides,
    base_path,
    check_value,
    read_config,
    read_yaml,
)
from dltemplate.errors import ConfigError, did_you_mean, short_repr


@dataclass
class ParamSpec:
    """One searched config key: a float or int range (``log``: on a log scale; ``step``: a
    grid step), or ``categorical`` ``choices``."""

    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] | None = None

    def grid(self) -> list[Any]:
        """The values a grid search tries."""
        if self.type == "categorical":
            return list(self.choices or [])
        assert self.low is not None and self.high is not None and self.step is not None
        count = int(math.floor((self.high - self.low) / self.step + 1e-9)) + 1
        values = [self.low + i * self.step for i in range(count)]
        if self.type == "int":
            return [int(round(v)) for v in values]
        # 12 significant digits: 0.1 + 2 * 0.1 is 0.3, not 0.30000000000000004, in the trials'
        # overrides, trials.csv and best.yaml (the step's own precision is far coarser)
        return [float(f"{v:.12g}") for v in values]


@dataclass
class SweepSpec:
    """A sweep file, checked; ``base`` resolved to an absolute path."""

    name: str
    base: str
    overrides: list[str] = field(default_factory=list)
    objective: str | None = None  # a metrics.csv column; None: trainer.monitor
    direction: Literal["maximize", "minimize"] | None = None  # None: from trainer.monitor_mode
    trials: int = 20
    jobs: int = 1
    sampler: Literal["tpe", "random", "grid"] = "tpe"
    seed: int = 0
    pruner: Literal["none", "median"] = "none"
    pruner_args: dict[str, Any] = field(default_factory=dict)  # e.g. {n_startup_trials: 5}
    output_dir: str = "./Results/sweeps"  # the sweep directory is <output_dir>/<name>
    params: dict[str, ParamSpec] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain types, as saved in the sweep directory."""
        return dataclasses.asdict(self)


def load_sweep(path: str | Path, source: str | None = None) -> SweepSpec:
    """Read and check a sweep file (YAML); ``base`` is taken relative to the file."""
    path = Path(path)
    raw = read_yaml(path)
    spec = sweep_from_dict(raw, source or str(path), relative_to=path.parent)
    return spec


def sweep_from_dict(raw: dict[str, Any], source: str, relative_to: Path) -> SweepSpec:
    """A checked :class:`SweepSpec` from a mapping; every error names ``source`` and the key."""
    hints = typing.get_type_hints(SweepSpec)
    for key in raw:
        if key not in hints:
            raise ConfigError(f"{source}: unknown sweep key '{key}'{did_you_mean(key, hints)}")
    for key in ("name", "base", "params"):
        if key not in raw:
            raise ConfigError(f"{source}: '{key}' is missing")
    values = {k: check_value(v, hints[k], k) for k, v in raw.items() if k != "params"}
    if not isinstance(raw["params"], dict) or not raw["params"]:
        raise ConfigError(f"{source}: params: give at least one config key to search")
    params = {key: _param(key, value, source) for key, value in raw["params"].items()}
    spec = SweepSpec(**values, params=params)
    spec.base = str(base_path(spec.base, relative_to).resolve())
    _check(spec, source)
    return spec


def _param(key: str, value: Any, source: str) -> ParamSpec:
    where = f"{source}: params.{key}"
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected {{type: float|int|categorical, ...}}")
    hints = typing.get_type_hints(ParamSpec)
    for name in value:
        if name not in hints:
            raise ConfigError(f"{where}: unknown key '{name}'{did_you_mean(name, hints)}")
    if "type" not in value:
        raise ConfigError(f"{where}: 'type' is missing (float, int or categorical)")
    checked = {k: check_value(v, hints[k], f"params.{key}.{k}") for k, v in value.items()}
    param = ParamSpec(**checked)
    if param.type == "categorical":
        if not param.choices:
            raise ConfigError(f"{where}: a categorical param needs a non-empty 'choices' list")
        return param
    if param.low is None or param.high is None:
        raise ConfigError(f"{where}: a {param.type} param needs 'low' and 'high'")
    numbers = [param.low, param.high] + ([param.step] if param.step is not None else [])
    if not all(math.isfinite(v) for v in numbers):
        raise ConfigError(f"{where}: low, high and step must be finite numbers")
    if not param.low < param.high:
        raise ConfigError(f"{where}: low={param.low} must be below high={param.high}")
    if param.log and param.low <= 0:
        raise ConfigError(f"{where}: log=true needs low > 0 (low={param.low})")
    if param.step is not None and (param.step <= 0 or param.log):
        raise ConfigError(f"{where}: step must be > 0, and not with log=true")
    if param.type == "int" and not (
        float(param.low).is_integer() and float(param.high).is_integer()
    ):
        raise ConfigError(f"{where}: an int param needs integer low and high")
    return param


def _check(spec: SweepSpec, source: str) -> None:
    """The rules types do not say, and that every param is a config key whose values the base
    config accepts (each end of a range, each choice, checked as a trial's config would be)."""
    if spec.trials < 1:
        raise ConfigError(f"{source}: trials={spec.trials}: must be at least 1")
    if spec.jobs < 1:
        raise ConfigError(f"{source}: jobs={spec.jobs}: must be at least 1")
    if not spec.name or any(c in spec.name for c in "/\\") or spec.name in (".", ".."):
        raise ConfigError(f"{source}: name={spec.name!r}: must be a plain name (it names a folder)")
    if spec.sampler == "grid":
        for key, param in spec.params.items():
            if param.type != "categorical" and param.step is None:
                raise ConfigError(
                    f"{source}: params.{key}: the grid sampler needs 'choices' or a 'step'"
                )
    try:
        from dltemplate.sweeps.study import make_pruner

        make_pruner(spec.pruner, spec.pruner_args)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: pruner_args={spec.pruner_args}: {exc}") from exc
    cfg = base_config(spec, source)
    if any(item.name == "mlflow" and item.enabled for item in cfg.callbacks):
        try:  # the sweep itself opens the store (a parent run), before any trial would say it
            import mlflow.tracking  # noqa: F401
        except ImportError as exc:
            from dltemplate.callbacks.mlflow import INSTALL

            raise ConfigError(
                f"{source}: base: callback 'mlflow' needs the mlflow package, which cannot be "
                f"imported ({exc}): {INSTALL}"
            ) from None
    for key, param in spec.params.items():
        if key.count(".") < 1 or key.startswith("callbacks"):
            raise ConfigError(f"{source}: params.{key}: not a config key (section.key)")
        samples = param.choices if param.type == "categorical" else [param.low, param.high]
        for value in samples or []:
            value = int(value) if param.type == "int" else value
            try:
                trial_config(spec, {key: value}, source)
            except ConfigError as exc:
                raise ConfigError(f"{source}: params.{key}={short_repr(value)}: {exc}") from exc
    objective = spec.objective or cfg.trainer.monitor
    if not objective.startswith(("val/", "train/")):
        raise ConfigError(
            f"{source}: objective={objective!r}: a metrics.csv column (val/... or train/...)"
        )
    if objective != cfg.trainer.monitor and spec.direction is None:  # monitor_mode is not its
        raise ConfigError(
            f"{source}: objective={objective!r} is not the base's trainer.monitor "
            f"({cfg.trainer.monitor!r}), whose monitor_mode would say its direction: give "
            "direction: maximize or minimize"
        )


def base_config(spec: SweepSpec, source: str) -> Config:
    """The base run config with the sweep's overrides (no searched values)."""
    raw = read_config(spec.base)
    try:
        apply_overrides(raw, list(spec.overrides))
    except ConfigError as exc:
        raise ConfigError(f"{source}: overrides: {exc}") from exc
    return config_from_dict(raw, f"{source}: base")


def param_override(key: str, value: Any) -> str:
    """``key=value`` as the command line takes it (YAML for the value)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    if text.endswith("\n..."):
        text = text[: -len("\n...")]
    return f"{key}={text.removesuffix('...').strip()}"


def trial_config(spec: SweepSpec, params: dict[str, Any], source: str = "sweep") -> Config:
    """The config a trial with ``params`` runs (checked)."""
    raw = read_config(spec.base)
    overrides = [*spec.overrides, *(param_override(k, v) for k, v in params.items())]
    return config_from_dict(apply_overrides(raw, overrides), f"{source}: trial")


def direction(spec: SweepSpec) -> str:
    """``maximize`` or ``minimize``: as given, else from the base config's monitor mode."""
    if spec.direction is not None:
        return spec.direction
    mode = base_config(spec, "sweep").trainer.monitor_mode
    return "maximize" if mode == "max" else "minimize"


def objective(spec: SweepSpec) -> str:
    """The metrics.csv column the sweep optimises."""
    return spec.objective or base_config(spec, "sweep").trainer.monitor


def _plain(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def stored_choices(param: ParamSpec) -> list[Any]:
    """A categorical param's choices as Optuna stores them: plain values as they are, lists
    and mappings (``[16, 16]``) as YAML text, which :func:`decode_params` reads back."""
    choices = list(param.choices or [])
    if all(_plain(c) for c in choices):
        return choices
    return [yaml.safe_dump(c, default_flow_style=True).strip() for c in choices]


def decode_params(spec: SweepSpec, params: dict[str, Any]) -> dict[str, Any]:
    """A stored trial's params as the config takes them (see :func:`stored_choices`)."""
    out = {}
    for key, value in params.items():
        param = spec.params.get(key)
        encoded = param is not None and param.type == "categorical"
        encoded = encoded and not all(_plain(c) for c in param.choices or [])
        out[key] = yaml.safe_load(value) if encoded and isinstance(value, str) else value
    return out
