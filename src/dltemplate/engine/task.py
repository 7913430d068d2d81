"""The hooks through which a task (classification, segmentation, yours) plugs into the engine.

The trainer and the evaluator own the loop; a :class:`Task` says what the data is, which model,
loss and metrics to build, and how a batch becomes outputs and a loss. Override what differs.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dltemplate.config import Config
from dltemplate.data.base import (
    Batch,
    DataInfo,
    DataSplits,
    InMemoryDataset,
    check_same_classes,
    make_splits,
)
from dltemplate.data.samples import MapStyleDataset, is_map_style
from dltemplate.engine.given import GivenDataset
from dltemplate.errors import ConfigError, DataError, UsageError
from dltemplate.metrics.base import MetricCollection
from dltemplate.models.heads import merged_prediction
from dltemplate.registry import DATASETS, LOSSES, METRICS, MODELS, TASKS, accepted_kwargs


def import_plugins(cfg: Config) -> None:
    """Import ``experiment.imports`` so that their ``@REGISTRY.register`` lines run.

    The working directory is searched too, so a ``my_models.py`` beside the config just works.
    """
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    for module in cfg.experiment.imports:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ConfigError(f"experiment.imports: cannot import '{module}': {exc}") from exc


def _shape_mismatch(loss_name: str, outputs: torch.Size, targets: torch.Size) -> ConfigError:
    """The error of :meth:`Task.compute_loss` for outputs and targets of different shapes."""
    out, tgt = tuple(outputs), tuple(targets)
    try:
        effect = f"they would broadcast to {tuple(torch.broadcast_shapes(out, tgt))}"
    except RuntimeError:
        effect = "they do not broadcast"
    return ConfigError(
        f"loss.name={loss_name}: the model's outputs have shape {out} but the targets {tgt}; "
        f"{effect} — make the model return {tgt} or reshape in the task's compute_loss"
    )


class Task:
    """Default hooks: a registered in-memory dataset, a model fed the dataset's shape, a loss
    applied to ``model(inputs)`` and ``targets``, and the metrics named in the config."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self._dataset: InMemoryDataset | MapStyleDataset | None = None

    # -- data -------------------------------------------------------------------------------
    def dataset(self) -> InMemoryDataset | MapStyleDataset:
        """The configured dataset object (not loaded yet).

        ``data.name`` names a dltemplate dataset (an :class:`InMemoryDataset`: ``describe`` and
        ``load``) or any map-style ``torch.utils.data.Dataset``, which is read sample by sample
        (see :mod:`dltemplate.data.samples`); ``data.test_args`` then builds its test split.
        """
        if self._dataset is None:
            self._dataset = build_dataset(self.cfg)
        return self._dataset

    def data_info(self) -> DataInfo:
        """Shapes and class names, without loading the data."""
        return self.dataset().describe()

    def load_data(self) -> DataSplits:
        """Load and split the dataset (train / val / test)."""
        d = self.cfg.data
        return make_splits(
            self.dataset(),
            seed=self.cfg.experiment.seed,
            val_fraction=d.val_fraction,
            test_fraction=d.test_fraction,
            train_val_sample_rate=d.train_val_sample_rate,
            test_sample_rate=d.test_sample_rate,
        )

    # -- components -------------------------------------------------------------------------
    def build_model(self, info: DataInfo) -> nn.Module:
        """The configured model; ``input_shape``/``num_classes`` come from the data if accepted."""
        factory = MODELS.get(self.cfg.model.name, "model.name")
        offered = {
            "input_shape": tuple(info.input_shape),
            "num_classes": info.num_classes,
            "in_channels": info.input_shape[0],
        }
        kwargs = {**accepted_kwargs(factory, offered), **self.cfg.model.args}
        return MODELS.build(self.cfg.model.name, "model.name", **kwargs)

    def check_model(self, model: nn.Module, info: DataInfo, device: torch.device) -> None:
        """Check the built model against the task before any data is read (raise ConfigError):
        nothing by default; classification runs one forward pass and checks the logits'
        width against the number of classes."""

    def build_loss(self) -> nn.Module:
        """The configured loss."""
        return LOSSES.build(self.cfg.loss.name, "loss.name", **self.cfg.loss.args)

    def default_metrics(self, info: DataInfo) -> list[str]:
        """Metric names this task always computes (besides ``trainer.metrics``)."""
        return []

    def build_metrics(self, info: DataInfo) -> MetricCollection:
        """The task's metrics plus ``trainer.metrics``, given the class info they accept."""
        offered = {"num_classes": info.num_classes, "class_names": info.class_names}
        metrics = []
        names = self.default_metrics(info)
        names += [n for n in self.cfg.trainer.metrics if n not in names]
        for name in names:
            factory = METRICS.get(name, "trainer.metrics")
            metrics.append(factory(**accepted_kwargs(factory, offered)))
        return MetricCollection(metrics)

    # -- one batch --------------------------------------------------------------------------
    def prepare_batch(self, batch: Batch, device: torch.device, info: DataInfo) -> Batch:
        """Move the batch to ``device`` and turn stored inputs into what the model eats."""
        return Batch(batch.inputs.to(device), batch.targets.to(device), batch.global_size)

    def augment(self, batch: Batch, info: DataInfo) -> Batch:
        """Random changes to a prepared training batch (when ``data.augment``); none by default.

        Use torch's global generator: it is seeded and saved in checkpoints, so resumed runs
        draw the same augmentations.
        """
        return batch

    def forward(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The model's outputs for a batch."""
        return model(batch.inputs)

    def compute_loss(self, criterion: nn.Module, outputs: torch.Tensor, batch: Batch) -> Any:
        """The loss of a batch (a mean over its samples).

        For torch's own losses (``mse``, ``bce_with_logits``...), floating-point outputs and
        targets of different shapes are a :class:`~dltemplate.errors.ConfigError` naming both
        shapes, not a loss silently taken over their broadcast: a ``(N, 1)`` output against
        ``(N,)`` targets would compare every sample with every target. Integer targets
        (classification), other losses (the segmentation losses add a missing mask channel
        themselves) and multi-head outputs (lists, tuples) are passed on unchecked; override
        this hook to reshape them yourself.
        """
        targets = batch.targets
        if (
            isinstance(outputs, torch.Tensor)
            and isinstance(targets, torch.Tensor)
            and outputs.shape != targets.shape
            and outputs.is_floating_point()
            and targets.is_floating_point()
            and isinstance(criterion, nn.modules.loss._Loss)
        ):
            raise _shape_mismatch(self.cfg.loss.name, outputs.shape, targets.shape)
        return criterion(outputs, targets)

    def update_metrics(self, metrics: MetricCollection, outputs: Any, batch: Batch) -> None:
        """Feed one batch's outputs to the metrics (outputs are detached already)."""
        metrics.update(outputs.float(), batch.targets)

    # -- a trained model on its own (load_model, export) -------------------------------------
    def normalize_inputs(self, x: torch.Tensor, info: DataInfo) -> torch.Tensor:
        """Float inputs ``(N, *input_shape)`` on the [0, 1] scale (uint8 data divided by 255,
        as ``predict`` reads images) as the model eats them: unchanged by default.

        :class:`~dltemplate.engine.inference.InferenceModel` runs it inside the module that
        ``load_model`` returns and ``export`` writes; override it with :meth:`prepare_batch`.
        """
        return x

    def predictions(self, outputs: Any) -> torch.Tensor:
        """What a trained model reports for a batch (``load_model``, ``export``), from the
        model's outputs: by default the one prediction of its heads, as it is."""
        return merged_prediction(outputs)

    # -- reporting --------------------------------------------------------------------------
    def log_images(self, writer: Any, tag: str, batch: Batch, outputs: torch.Tensor, step: int):
        """Optional pictures for TensorBoard after validation (first batch); none by default."""
        return None

    def save_visuals(
        self,
        batch: Batch,
        outputs: Any,
        first_index: int,
        out_dir: Path,
        every: int,
        info: DataInfo,
        names: Sequence[str] | None = None,
    ) -> int:
        """Write pictures of samples ``first_index + i`` where that index is a multiple of
        ``every`` (``eval --viz``; ``names`` are the batch's samples' names, e.g. their files,
        when the dataset names them); return how many files were written. None by default."""
        return 0

    @property
    def draws_pictures(self) -> bool:
        """Whether this task writes pictures for ``eval --viz`` (it overrides
        :meth:`save_visuals`)."""
        return type(self).save_visuals is not Task.save_visuals

    def predict_files(
        self,
        model: nn.Module,
        paths: list[Path],
        out_dir: Path,
        device: torch.device,
        info: DataInfo,
    ) -> list[Path]:
        """Predict on files (``dltemplate predict``) and write the results into ``out_dir``
        (segmentation: a mask per image); return the files written. Not supported by default;
        a task overrides this hook or :meth:`predict`."""
        raise UsageError(f"task '{self.cfg.experiment.task}' does not support predict")

    def predict(
        self,
        model: nn.Module,
        paths: list[Path],
        device: torch.device,
        info: DataInfo,
        top_k: int = 1,
    ) -> list[dict[str, Any]]:
        """Predict on files (``dltemplate predict``) and return one JSON-able record per file,
        writing nothing: ``{"file": ..., "predictions": [{"class": ..., "probability": ...}]}``
        (classification: the ``top_k`` most probable classes). The command line prints a line
        per record and writes them all to ``--out FILE.json``. Not supported by default."""
        raise UsageError(f"task '{self.cfg.experiment.task}' does not support predict")

    @property
    def predict_output(self) -> str | None:
        """What ``dltemplate predict`` gets from this task: ``"records"`` (it overrides
        :meth:`predict`; ``--out`` is an optional JSON file), ``"files"`` (it overrides
        :meth:`predict_files`; ``--out`` is the folder to write into), or None."""
        if type(self).predict is not Task.predict:
            return "records"
        return "files" if type(self).predict_files is not Task.predict_files else None

    def describe_predictions(
        self, batch: Batch, outputs: torch.Tensor, info: DataInfo, limit: int = 10
    ) -> list[dict[str, Any]]:
        """A few sample predictions of the first batch for the evaluation report (``eval``
        prints them and writes them into its JSON report); none by default.

        Return a list of JSON-able dicts, one per sample, at most ``limit``. The keys
        ``prediction``, ``label`` and optionally ``correct`` (bool) are printed as a
        classification line (``predicted 'cat'  label 'dog'  (wrong)``); any other keys as
        ``key value`` pairs (``x0 0.31, predicted 1.2, target 1.25``). Round floats yourself:
        values are printed as they are.
        """
        return []


def build_dataset(cfg: Config) -> InMemoryDataset | MapStyleDataset:
    """The dataset ``data.name`` names, built with ``data.args`` (see :meth:`Task.dataset`)."""
    d = cfg.data
    factory = DATASETS.get(d.name, "data.name")
    if isinstance(factory, GivenDataset):  # an object given in Python: data.args do not apply
        return _given_dataset(cfg, factory)
    if isinstance(factory, type) and issubclass(factory, InMemoryDataset):
        if d.test_args is not None:
            raise ConfigError(
                f"data.test_args: {d.name} is a dltemplate dataset, which finds its own test "
                "split; data.test_args is for map-style datasets"
            )
        return DATASETS.build(d.name, "data.name", root=d.root, download=d.download, **d.args)
    # Any other dataset gets root and download only if it asks for them.
    offered = accepted_kwargs(factory, {"root": d.root, "download": d.download})
    label = f"data.name={d.name}"

    def build(args: dict[str, Any]) -> Any:
        try:
            built = DATASETS.build(d.name, "data.name", **{**offered, **args})
        except OSError as exc:  # its files are missing or unreadable
            raise DataError(f"{label}: {exc}") from exc
        if not is_map_style(built):
            raise ConfigError(
                f"{label}: built a {type(built).__name__}, which is neither a dltemplate "
                "dataset (describe/load) nor a map-style torch Dataset (__getitem__ and "
                "__len__; iterable datasets cannot be split or resumed exactly)"
            )
        return built

    dataset = build(d.args)
    test = None if d.test_args is None else build({**d.args, **d.test_args})
    if test is not None:
        _check_test_classes(dataset, test, label)
    return MapStyleDataset(dataset, test, label, cfg.experiment.seed, cfg.data.timeout)


def _given_dataset(cfg: Config, given: GivenDataset) -> InMemoryDataset | MapStyleDataset:
    """The dataset given in Python (``dataset=``, ``test_dataset=``) as a dltemplate dataset.

    A run tested on a test split of its own (``data.test_args`` not null) needs that split
    given again: carved out of ``dataset=`` instead, its test samples would be others."""
    label = f"data.name={cfg.data.name}"
    if cfg.data.test_args is not None and given.test is None:
        raise ConfigError(
            f"{label}: the run was tested on a test split of its own (test_dataset=); pass "
            "test_dataset= again, or its test split would be carved out of dataset= instead"
        )
    if isinstance(given.dataset, InMemoryDataset):
        return given.dataset
    if given.test is not None:
        _check_test_classes(given.dataset, given.test, label)
    return MapStyleDataset(given.dataset, given.test, label, cfg.experiment.seed, cfg.data.timeout)


def _class_list(dataset: Any) -> tuple[list[str] | None, int | None]:
    """A map-style dataset's class names (``classes``) and class count (``len(classes)`` or
    ``num_classes``), each None where it does not state it."""
    try:
        classes = getattr(dataset, "classes", None)
        if classes is not None:
            names = [str(c) for c in classes]
            return names, len(names)
        count = getattr(dataset, "num_classes", None)
        return None, None if count is None else int(count)
    except (TypeError, ValueError):
        return None, None  # neither a list nor a count: describe() says what it can


def _check_test_classes(dataset: Any, test: Any, label: str) -> None:
    """DataError naming both lists (or counts) when the training set and its
    ``data.test_args`` split state different classes (e.g. a stray folder in one of two
    class-folder trees): every test label would be scored against another class."""
    where = f"{label} with data.test_args"
    (train_names, train_count), (test_names, test_count) = _class_list(dataset), _class_list(test)
    if train_names is not None and test_names is not None:
        check_same_classes(train_names, test_names, where)
    elif train_count is not None and test_count is not None and train_count != test_count:
        raise DataError(
            f"{where}: the test split has {test_count} classes but the training set {train_count}"
        )


def make_task(cfg: Config) -> Task:
    """The task registered under ``experiment.task`` (see :data:`dltemplate.registry.TASKS`)."""
    return TASKS.build(cfg.experiment.task, "experiment.task", cfg=cfg)
