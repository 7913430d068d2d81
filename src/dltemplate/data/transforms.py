"""Per-sample transforms of map-style datasets (``data.train_transform``, ``data.eval_transform``).

A transform is called on one sample as ``transform(input, target)`` and returns the new
``(input, target)``, so that a flip of an image flips its mask too. It runs where the sample
is read (a DataLoader worker, or the training process), after the sample's generators were
seeded (see :mod:`dltemplate.data.samples`): draw from torch's, NumPy's or Python's global
generator and the draws are reproducible and resumable.

The built-in ones work on tensors ``[C, H, W]`` (any dtype); a target with the input's height
and width (a mask) is moved with it, any other target is left alone. Your own: a class (built
with the ``args`` of its config entry) or a function ``f(input, target, **args)``, registered
with ``@TRANSFORMS.register("name")`` or named ``package.module:name``::

    data:
      train_transform: [hflip, {name: random_crop, args: {padding: 4}}]
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from dltemplate.errors import ConfigError
from dltemplate.registry import TRANSFORMS

Transform = Callable[[Any, Any], tuple[Any, Any]]


def _spatial(input: torch.Tensor, target: Any) -> bool:
    """Whether ``target`` is a map over ``input``'s pixels (moves with it)."""
    return (
        isinstance(target, torch.Tensor)
        and target.dim() >= 2
        and target.shape[-2:] == input.shape[-2:]
    )


def _check_probability(p: float, name: str) -> None:
    if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= p <= 1.0:
        raise ConfigError(f"transform {name}: p={p!r}: must be a number in [0, 1]")


class _Flip:
    """Flip along ``dim`` with probability ``p`` (the target too, when it is a mask)."""

    dim = -1
    name = "flip"

    def __init__(self, p: float = 0.5) -> None:
        _check_probability(p, self.name)
        self.p = p

    def __call__(self, input: torch.Tensor, target: Any) -> tuple[torch.Tensor, Any]:
        if torch.rand(()) < self.p:
            if _spatial(input, target):
                target = target.flip(self.dim)
            input = input.flip(self.dim)
        return input, target


@TRANSFORMS.register("hflip")
class HFlip(_Flip):
    """Flip left-right with probability ``p`` (the target too, when it is a mask)."""

    dim, name = -1, "hflip"


@TRANSFORMS.register("vflip")
class VFlip(_Flip):
    """Flip upside down with probability ``p`` (the target too, when it is a mask)."""

    dim, name = -2, "vflip"


@TRANSFORMS.register("random_crop")
class RandomCrop:
    """Pad by ``padding`` pixels on every side (zeros), then crop back to the input's size at
    a random place: a random shift of up to ``padding`` pixels (the mask shifts alike)."""

    def __init__(self, padding: int = 4) -> None:
        if not isinstance(padding, int) or isinstance(padding, bool) or padding < 0:
            raise ConfigError(f"transform random_crop: padding={padding!r}: must be 0 or more")
        self.padding = padding

    def __call__(self, input: torch.Tensor, target: Any) -> tuple[torch.Tensor, Any]:
        p = self.padding
        if p == 0:
            return input, target
        h, w = input.shape[-2:]
        top, left = (int(v) for v in torch.randint(0, 2 * p + 1, (2,)))

        def crop(t: torch.Tensor) -> torch.Tensor:
            return F.pad(t, (p, p, p, p))[..., top : top + h, left : left + w]

        if _spatial(input, target):
            target = crop(target)
        return crop(input), target


def build_transforms(specs: list[Any], key: str) -> list[Transform]:
    """The transforms of a config list (names, or ``{name, args}`` mappings) in order;
    a ConfigError names ``key[i]`` of a bad entry."""
    if not isinstance(specs, list):
        raise ConfigError(f"{key}={specs!r}: must be a list of transform names or {{name, args}}")
    built = []
    for i, spec in enumerate(specs):
        where = f"{key}[{i}]"
        if isinstance(spec, str):
            spec = {"name": spec}
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise ConfigError(f"{where}={spec!r}: must be a name or a mapping with 'name'")
        unknown = set(spec) - {"name", "args"}
        if unknown:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown)}; use name and args")
        args = spec.get("args") or {}
        if not isinstance(args, dict):
            raise ConfigError(f"{where}.args={args!r}: must be a mapping")
        factory = TRANSFORMS.get(spec["name"], where)
        if isinstance(factory, type):  # a class: built with the args
            try:
                transform = TRANSFORMS.build(spec["name"], where, **args)
            except ConfigError as exc:
                message = str(exc)
                raise ConfigError(message if where in message else f"{where}: {message}") from exc
        elif callable(factory):  # a function (input, target, **args)
            transform = functools.partial(factory, **args) if args else factory
        else:
            raise ConfigError(f"{where}: '{spec['name']}' is not a class or function")
        built.append(transform)
    return built
