"""Datasets and models built in Python, handed to ``train``/``evaluate``/``resume`` as objects.

``dltemplate.train(cfg, dataset=MyDataset(), model=MyNet)`` needs no registered names: for the
duration of the call the objects are *given* to the registries (:func:`use_objects`, through
:func:`dltemplate.registry.given_objects`) under a reserved name, ``<code MyDataset>``, which the
run's config keeps. So the saved config says that they came from code, and a later command that
cannot have them (``dltemplate eval RUN``) says in one line what to pass instead
(:func:`dltemplate.registry.refuse_objects_not_given`). ``evaluate`` and ``resume`` give the
objects under the run's own names: they stand in for the run's dataset and model.

An object replaces its section's name *and* ``args`` (they described the component it
replaces): a dataset instance is used as it is; a model is an ``nn.Module`` instance (used as it
is, trained in place) or a factory (a class or function) called with the keyword arguments a
registered model gets, ``input_shape``, ``num_classes``, ``in_channels``, as it accepts them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import PurePath
from typing import Any

from torch import nn

from dltemplate.config import Config
from dltemplate.data.base import InMemoryDataset
from dltemplate.data.samples import is_map_style
from dltemplate.errors import ConfigError
from dltemplate.registry import (
    DATASETS,
    MODELS,
    Registry,
    accepted_kwargs,
    code_name,
    given_objects,
)


class GivenDataset:
    """A dataset given in Python (``dataset=``) and its own test split (``test_dataset=``) or
    None, as the registry holds it for a call; :func:`~dltemplate.engine.task.build_dataset`
    wraps it instead of calling a factory, ignoring ``data.args``."""

    def __init__(self, dataset: Any, test: Any | None = None) -> None:
        if isinstance(dataset, InMemoryDataset):
            if test is not None:
                raise ConfigError(
                    f"test_dataset=: dataset= is a dltemplate dataset "
                    f"({type(dataset).__name__}), whose load() gives its own test split"
                )
        elif not _is_dataset(dataset):
            raise ConfigError(_not_a_dataset("dataset=", dataset))
        if test is not None and not _is_dataset(test):
            raise ConfigError(_not_a_dataset("test_dataset=", test))
        self.dataset, self.test = dataset, test

    def __call__(self) -> Any:  # a registry entry is a factory
        return self.dataset


def _is_dataset(obj: Any) -> bool:
    """Map-style, and not a path given where a Dataset object was meant."""
    return is_map_style(obj) and not isinstance(obj, (str, bytes, PurePath))


def _not_a_dataset(arg: str, obj: Any) -> str:
    """The message for an object that cannot be read as a dataset."""
    return (
        f"{arg} got a {type(obj).__name__}, which is neither a map-style torch Dataset "
        "(__getitem__ and __len__; iterable datasets cannot be split or resumed exactly) nor a "
        "dltemplate dataset (describe/load); a folder is named by the config (data.root)"
    )


class GivenModel:
    """A model given in Python (``model=``) as the registry holds it for a call: an
    ``nn.Module`` instance is returned as it is; a factory is called with the data's
    ``input_shape``, ``num_classes`` and ``in_channels``, those it accepts. ``model.args``
    (they described the model this one replaces) are ignored."""

    def __init__(self, model: nn.Module | Callable[..., nn.Module]) -> None:
        if not isinstance(model, nn.Module) and not callable(model):
            raise ConfigError(
                f"model= got a {type(model).__name__}: give an nn.Module instance, or a class "
                "or function that builds one"
            )
        self.model = model

    def __call__(
        self,
        input_shape: tuple[int, ...] | None = None,
        num_classes: int | None = None,
        in_channels: int | None = None,
        **ignored: Any,
    ) -> nn.Module:
        """The instance, or the factory's model built for the data's shape."""
        if isinstance(self.model, nn.Module):
            return self.model
        offered = {
            "input_shape": input_shape,
            "num_classes": num_classes,
            "in_channels": in_channels,
        }
        offered = {k: v for k, v in offered.items() if v is not None}
        built = self.model(**accepted_kwargs(self.model, offered))
        if not isinstance(built, nn.Module):
            raise ConfigError(f"model=: {code_name(self.model)} returned a {type(built).__name__}, "
                              "not an nn.Module")  # fmt: skip
        return built


@contextlib.contextmanager
def use_objects(
    cfg: Config,
    dataset: Any | None = None,
    test_dataset: Any | None = None,
    model: nn.Module | Callable[..., nn.Module] | None = None,
    *,
    new_run: bool = True,
) -> Iterator[Config]:
    """Give ``dataset`` (with ``test_dataset``) and ``model`` to the registries for the block.

    ``new_run`` (``train``): ``cfg``'s ``data.name`` / ``model.name`` become the objects'
    reserved names (``<code MyDataset>``), their ``args`` are emptied, and ``data.test_args``
    says whether a test split was given (``{}``) or is carved out (None). Otherwise
    (``evaluate``, ``resume``) the objects stand in for the names ``cfg`` already has.
    Objects are checked before anything is built (a ConfigError).
    """
    if test_dataset is not None and dataset is None:
        raise ConfigError("test_dataset= needs dataset= (the training set it is the test split of)")
    entries: dict[tuple[Registry, str], Any] = {}
    if dataset is not None:
        given = GivenDataset(dataset, test_dataset)
        if new_run:
            cfg.data.name, cfg.data.args = code_name(dataset), {}
            cfg.data.test_args = None if test_dataset is None else {}
        entries[(DATASETS, cfg.data.name)] = given
    if model is not None:
        made = GivenModel(model)
        if new_run:
            cfg.model.name, cfg.model.args = code_name(model), {}
        entries[(MODELS, cfg.model.name)] = made
    with given_objects(entries):
        yield cfg
