"""EvaluatorBase: a trained model on a split, from a checkpoint alone."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from dltemplate.atomic import atomic_write_text
from dltemplate.config import Config, config_from_dict
from dltemplate.data.base import Batch, DataSplits, concat_splits
from dltemplate.data.loader import IndexLoader
from dltemplate.engine.build import build_components, read_options
from dltemplate.engine.checkpoint import (
    check_trained_classes,
    find_checkpoint,
    load_checkpoint,
    load_model_weights,
)
from dltemplate.engine.device import select_device
from dltemplate.engine.speed import apply_backends
from dltemplate.engine.task import Task, import_plugins, make_task
from dltemplate.engine.threads import apply_threads
from dltemplate.errors import DataError, UsageError
from dltemplate.progress import EpochProgress, use_progress_bar

log = logging.getLogger("dltemplate")


def resolve_eval_target(target: str | Path) -> Path:
    """A checkpoint path as given, or the best (else last) checkpoint of a run directory."""
    target = Path(target)
    return find_checkpoint(target) if target.is_dir() else target


class EvaluatorBase:
    """Evaluates a checkpoint on the test split with the config saved inside it.

    ``overrides`` (``section.key=value``) may change what does not change the model, such as
    ``data.root`` or ``data.eval_batch_size``.
    """

    def __init__(
        self, checkpoint: str | Path, overrides: list[str] | None = None, task: Task | None = None
    ) -> None:
        from dltemplate.config.loader import apply_overrides

        self.checkpoint_path = resolve_eval_target(checkpoint)
        state = load_checkpoint(self.checkpoint_path)
        raw = apply_overrides(state["config"], list(overrides or []))
        self.cfg: Config = config_from_dict(raw, f"{self.checkpoint_path} (saved config)")
        import_plugins(self.cfg)
        self.task = task or make_task(self.cfg)
        apply_threads(self.cfg.experiment.threads)
        self.device, _ = select_device(self.cfg.experiment.device, self.cfg.experiment.gpu_devices)
        # The run's TF32 setting (on by default on GPUs that have it); cuDNN autotuning only
        # where the config sets it: evaluated batches need not share a shape.
        apply_backends(self.cfg, self.device, fixed_shapes=False)
        parts = build_components(self.cfg, self.task, self.device)
        self.info, self.model, self.evaluation = parts.info, parts.model, parts.evaluation
        check_trained_classes(state.get("class_names"), self.info.class_names, self.checkpoint_path)
        load_model_weights(self.model, state["model"], str(self.checkpoint_path))
        self.epoch = state["epoch"]

    def run(
        self,
        split: str = "test",
        limit: int | None = None,
        viz_dir: Path | None = None,
        viz_freq: int | None = None,
    ) -> dict[str, Any]:
        """Evaluate on ``split``; return metrics, the full metric report and sample predictions.

        With ``viz_dir``, the task also draws every ``viz_freq``-th sample into that folder
        (None: :func:`default_viz_freq` of the split's size); the report counts the files.
        """
        if viz_dir is not None and not self.task.draws_pictures:  # (the CLI says so itself)
            log.warning("task '%s' draws no pictures: viz_dir ignored", self.cfg.experiment.task)
            viz_dir = None
        if viz_dir is not None and viz_dir.exists() and not viz_dir.is_dir():
            raise UsageError(f"--viz-dir {viz_dir}: exists and is not a folder (give a folder)")
        data = self.task.load_data()
        evaluated = self._same_groups_as_the_run(data, split)
        batch_size = self.cfg.data.eval_batch_size or 2 * self.cfg.data.batch_size
        loader = IndexLoader(
            evaluated,
            batch_size,
            training=False,
            seed=self.cfg.experiment.seed,
            limit_batches=limit,
            read=read_options(self.cfg, training=False),
        )
        samples: list[dict[str, Any]] = []
        seen = [0, 0]  # samples so far, picture files written
        every = viz_freq if viz_freq is not None else default_viz_freq(len(evaluated))
        names = evaluated.names
        progress = EpochProgress(
            len(loader), f"eval {split}", bar=use_progress_bar("auto"), enabled=True
        )

        def per_batch(i: int, batch: Batch, outputs: torch.Tensor) -> None:
            if i == 0:
                described = self.task.describe_predictions(batch, outputs, self.info)
                samples.extend(_with_names(described, evaluated.names))
            if viz_dir is not None:
                batch_names = names[seen[0] : seen[0] + len(batch.targets)] if names else None
                seen[1] += self.task.save_visuals(
                    batch, outputs, seen[0], viz_dir, every, self.info, names=batch_names
                )
            seen[0] += len(batch.targets)
            progress.update(len(batch.targets))

        if viz_dir is not None:
            viz_dir.mkdir(parents=True, exist_ok=True)
        try:
            metrics = self.evaluation.run(self.model, loader, on_batch=per_batch)
        finally:
            progress.close()
            loader.close()  # its DataLoader workers, if any
        report = {
            "checkpoint": str(self.checkpoint_path),
            "split": split,
            "num_samples": len(evaluated),
            "epoch": self.epoch,
            "metrics": metrics,
            "report": self.evaluation.metrics.report(),
            "samples": samples,
        }
        if viz_dir is not None:
            report["pictures"] = {"folder": str(viz_dir), "count": seen[1]}
        return report

    def _same_groups_as_the_run(self, data: DataSplits, split: str) -> Any:
        """The split's samples; when the run saved its groups (split.json), exactly those."""
        saved = self.checkpoint_path.parent / "split.json"
        if not saved.exists() or data.train.groups is None:
            return getattr(data, split)
        wanted = set(json.loads(saved.read_text())[split])
        everything = [data.train, data.val, data.test]
        found = {g for part in everything for g in (part.groups or [])}
        if wanted - found:
            missing = ", ".join(sorted(wanted - found)[:5])
            raise DataError(f"{saved}: the run's {split} groups are not in the data ({missing})")
        parts = []
        for part in everything:
            keep = [i for i, g in enumerate(part.groups or []) if g in wanted]
            if keep:
                parts.append(part.subset(torch.tensor(keep, dtype=torch.long)))
        return concat_splits(parts)

    @staticmethod
    def write_report(report: dict[str, Any], path: Path) -> Path:
        """Save the report as JSON (tensors and NumPy values as lists or numbers, anything
        else that JSON cannot hold as its ``str``)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(report, indent=2, default=_jsonable))
        return path


def default_viz_freq(num_samples: int) -> int:
    """``eval --viz`` without ``--viz-freq``: every 50th sample, as the seed drew, but close
    enough on a small split for about 8 samples to be drawn."""
    return max(1, min(50, num_samples // 8))


def _with_names(samples: list[Any], names: list[str] | None) -> list[Any]:
    """The first batch's sample predictions, each (a dict) led by its sample's name (its file)
    when the dataset names its samples: the i-th entry describes the i-th sample."""
    if names is None:
        return samples
    return [
        {"file": name, **s} if isinstance(s, dict) and "file" not in s else s
        for name, s in zip(names, samples)
    ]


def _jsonable(value: Any) -> Any:
    """``value`` (which :mod:`json` cannot write) as something it can."""
    if hasattr(value, "tolist"):  # torch tensors, NumPy arrays and scalars
        return value.tolist()
    return str(value)
