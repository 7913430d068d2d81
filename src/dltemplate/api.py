"""The Python API: load and validate a config, train, resume and evaluate runs from code.

The ``dltemplate`` command goes through these same functions; they raise the project's
exceptions (:class:`~dltemplate.errors.ConfigError`, ``DataError``, ``CheckpointError``, all
``UsageError``) where the command prints a message and exits with status 2.

>>> result = train("configs/digits_mlp.yaml", ["trainer.epochs=3"])  # doctest: +SKIP
>>> result.test_metrics["accuracy"], result.history[-1]["val/loss"]  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import csv
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dltemplate.assemble import build_evaluator, build_trainer, validate_names
from dltemplate.config import Config, config_from_dict, config_to_raw
from dltemplate.config import load_config as _load_yaml
from dltemplate.config.loader import apply_overrides
from dltemplate.config.trust import refuse_untrusted_code
from dltemplate.engine.checkpoint import find_checkpoint, keep_for_next_load, load_checkpoint
from dltemplate.engine.given import use_objects
from dltemplate.engine.inference import ON_CPU, InferenceModel, inference_model
from dltemplate.engine.rundir import find_config, latest_run_dir, read_saved_config
from dltemplate.errors import CheckpointError, UsageError
from dltemplate.registry import refuse_objects_not_given

__all__ = [
    "RunResult",
    "config_of_run",
    "evaluate",
    "load_config",
    "load_model",
    "read_history",
    "resume",
    "run",
    "train",
    "validate",
]

SPLITS = ("train", "val", "test")


@dataclass
class RunResult:
    """What a run left behind: its directory, its per-epoch metrics and its test metrics."""

    run_dir: Path  # <output_dir>/<timestamp>/, absolute
    history: list[dict[str, float]]  # the rows of metrics.csv, oldest first ("epoch" an int)
    test_metrics: dict[str, float]  # the best checkpoint on the test split ({} if not tested)
    best_checkpoint: Path | None = None  # <Model>_best_ckpt.pth, if the run wrote one

    @classmethod
    def from_run_dir(
        cls, run_dir: str | Path, test_metrics: dict[str, float] | None = None
    ) -> RunResult:
        """The result of the run in ``run_dir``, read from its files (``test_metrics`` as given,
        else from ``test_metrics.json``)."""
        run_dir = Path(run_dir).absolute()  # still right after a chdir
        if test_metrics is None:
            path = run_dir / "test_metrics.json"
            test_metrics = json.loads(path.read_text()) if path.exists() else {}
        try:
            best: Path | None = find_checkpoint(run_dir, ("best",))
        except CheckpointError:
            best = None
        return cls(run_dir, read_history(run_dir / "metrics.csv"), dict(test_metrics), best)


def read_history(path: str | Path) -> list[dict[str, float]]:
    """The rows of a ``metrics.csv`` as numbers (``epoch`` an int); cells a row lacks (a
    column that appeared later) are left out, text that is not a number is kept as it is."""
    path = Path(path)
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        return [
            {k: _number(k, v) for k, v in row.items() if k is not None and v not in ("", None)}
            for row in csv.DictReader(fh)
        ]


def _number(key: str, text: str) -> Any:
    try:
        return int(float(text)) if key == "epoch" else float(text)
    except ValueError:
        return text


def load_config(
    source: str | Path | Mapping[str, Any] | Config | None,
    overrides: Sequence[str] | None = None,
) -> Config:
    """A typed, checked :class:`Config` from a YAML/JSON file, a dict of sections, or a Config,
    with ``section.key=value`` ``overrides`` applied (unknown keys and wrong types are a
    ConfigError; registry names are checked by :func:`validate`)."""
    if isinstance(source, Config):
        raw, where = config_to_raw(source), "config"
    elif isinstance(source, Mapping):
        raw, where = copy.deepcopy(dict(source)), "config"
    else:
        return _load_yaml(source, list(overrides or []))
    return config_from_dict(apply_overrides(raw, list(overrides or [])), where)


def validate(cfg: Config) -> Config:
    """Check ``cfg`` as a YAML file is checked, and return it typed (``lr=1`` becomes ``1.0``).

    A Config built or changed in code gets the same ConfigError as the same mistake in YAML:
    unknown keys (``cfg.trainer.epoch = 3``), wrong types (``epochs="3"``), values out of
    choices, unknown registry names and class paths (with a "did you mean").
    """
    checked = config_from_dict(config_to_raw(cfg), "config")
    validate_names(checked)
    return checked


def train(
    config: Config | str | Path | Mapping[str, Any],
    overrides: Sequence[str] | None = None,
    *,
    dataset: Any | None = None,
    test_dataset: Any | None = None,
    model: Any | None = None,
) -> RunResult:
    """Train (and test) the run ``config`` describes: a Config, a YAML path or a dict, with
    ``overrides`` applied. ``trainer.resume`` (a run, a checkpoint or ``last``) continues a run.

    ``dataset`` (a map-style torch Dataset, with ``test_dataset`` its own test split) and
    ``model`` (an ``nn.Module``, or a class or function taking ``input_shape``/``num_classes``/
    ``in_channels`` as it accepts) are objects built in code: they replace ``data.name`` and
    ``data.args`` (``model.name`` and ``model.args``), and the saved config names them
    ``<code ClassName>`` (see :mod:`dltemplate.engine.given`).

    Everything is checked before any work: a bad config raises before anything is written.
    """
    cfg = load_config(config, overrides)
    if cfg.trainer.resume == "last":
        cfg.trainer.resume = str(latest_run_dir(cfg.experiment.output_dir))
    with use_objects(cfg, dataset, test_dataset, model):
        return run(cfg)


def resume(
    run_dir_or_checkpoint: str | Path,
    overrides: Sequence[str] | None = None,
    *,
    trust_code: bool = False,
    dataset: Any | None = None,
    test_dataset: Any | None = None,
    model: Any | None = None,
) -> RunResult:
    """Continue a stopped run in its own directory, from the config saved with it (plus
    ``overrides``, e.g. ``trainer.epochs=30`` to train longer). A finished run is not trained
    again: its result is returned as it is.

    ``dataset``, ``test_dataset`` and ``model`` stand in for the run's own (as in
    :func:`train`): a run trained on objects given in Python needs them again.
    The saved config may name only registered components unless ``trust_code`` (a
    ConfigError otherwise, before anything is imported; see :mod:`dltemplate.config.trust`).
    """
    raw, path = config_of_run(run_dir_or_checkpoint, keep_checkpoint=True, trust_code=trust_code)
    raw = apply_overrides(raw, list(overrides or []))
    raw.setdefault("trainer", {})["resume"] = str(path)
    cfg = config_from_dict(raw, f"{run_dir_or_checkpoint} (saved config)")
    with use_objects(cfg, dataset, test_dataset, model, new_run=False):
        refuse_objects_not_given(raw, f"{run_dir_or_checkpoint} (saved config)")
        return run(cfg)


def run(cfg: Config) -> RunResult:
    """Check ``cfg``'s names, build the trainer ``experiment.trainer`` names, fit, and return
    the result (the one path behind :func:`train`, :func:`resume` and the command line)."""
    validate_names(cfg)
    trainer = build_trainer(cfg)
    test_metrics = trainer.fit()
    return RunResult.from_run_dir(trainer.run_dir, test_metrics)


def evaluate(
    run_dir_or_checkpoint: str | Path,
    split: str = "test",
    overrides: Sequence[str] | None = None,
    *,
    limit_batches: int | None = None,
    viz_dir: str | Path | None = None,
    viz_freq: int | None = None,
    trust_code: bool = False,
    dataset: Any | None = None,
    test_dataset: Any | None = None,
    model: Any | None = None,
) -> dict[str, Any]:
    """Evaluate a run's best (else last) checkpoint, or a checkpoint file, on ``split`` with the
    config saved in it; return the report ``dltemplate eval`` writes (``metrics``, ``report``,
    ``samples``, ...). ``overrides`` may change what does not change the model (``data.root``).
    The saved config may name only registered components unless ``trust_code``.

    ``dataset`` (``test_dataset``) and ``model`` stand in for the run's own: a run trained on
    objects given in Python needs them again (``model`` only if its architecture came from
    code: the weights always come from the checkpoint).
    """
    if split not in SPLITS:
        raise UsageError(f"split={split!r}: must be one of {', '.join(SPLITS)}")
    names = Config()
    if dataset is not None or model is not None:  # given under the run's own names
        raw, _ = config_of_run(run_dir_or_checkpoint, keep_checkpoint=True, trust_code=trust_code)
        names = config_from_dict(apply_overrides(raw, list(overrides or [])), "saved config")
    with use_objects(names, dataset, test_dataset, model, new_run=False):
        evaluator = build_evaluator(run_dir_or_checkpoint, list(overrides or []), trust_code)
        return evaluator.run(
            split,
            limit=limit_batches,
            viz_dir=Path(viz_dir) if viz_dir is not None else None,
            viz_freq=viz_freq,
        )


def load_model(
    run_dir_or_checkpoint: str | Path,
    *,
    overrides: Sequence[str] | None = None,
    trust_code: bool = False,
    dataset: Any | None = None,
    model: Any | None = None,
) -> InferenceModel:
    """A run's best (else last) checkpoint, or a checkpoint file, as a module that takes raw
    inputs and returns probabilities, on the CPU, in eval mode: what ``dltemplate export``
    writes (:class:`~dltemplate.engine.inference.InferenceModel`).

    It takes float32 inputs in [0, 1], ``(N, *model.input_shape)`` (the dataset's
    normalisation is inside), and returns class probabilities (classification) or mask
    probabilities (segmentation); ``model.class_names`` and ``model.metadata`` say the rest.
    ``overrides`` may change what does not change the model (``data.root``: the data's
    description gives the input shape). The saved config may name only registered
    components unless ``trust_code``. A run trained on objects given in Python needs them
    again (``dataset`` for its shapes, ``model`` if its architecture came from code).
    """
    over = [*ON_CPU, *(overrides or [])]
    names = Config()
    if dataset is not None or model is not None:  # given under the run's own names
        raw, _ = config_of_run(run_dir_or_checkpoint, keep_checkpoint=True, trust_code=trust_code)
        names = config_from_dict(apply_overrides(raw, list(overrides or [])), "saved config")
    with use_objects(names, dataset, None, model, new_run=False):
        return inference_model(build_evaluator(run_dir_or_checkpoint, over, trust_code))


def config_of_run(
    target: str | Path, keep_checkpoint: bool = False, trust_code: bool = False
) -> tuple[dict[str, Any], Path]:
    """The saved config (as a dict) of a run directory or checkpoint, and the path to resume.

    The config may name only registered components unless ``trust_code``: a ConfigError
    naming the key otherwise (see :mod:`dltemplate.config.trust`). With ``keep_checkpoint``, a
    checkpoint read for its config is kept for the next load of that file (the resume that
    follows), so it is not read twice.
    """
    path = Path(target)
    if path.is_dir():
        config_file = find_config(path)
        raw = read_saved_config(path)[0]
        refuse_untrusted_code(raw, str(config_file), trust_code)
        return raw, path
    state = load_checkpoint(path)
    refuse_untrusted_code(state["config"], str(path), trust_code)
    if keep_checkpoint:
        keep_for_next_load(path, state)
    return copy.deepcopy(state["config"]), path
