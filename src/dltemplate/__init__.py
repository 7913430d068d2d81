"""dltemplate: a readable, config-driven PyTorch training template.

The Python API (:mod:`dltemplate.api`) is available here: ``dltemplate.train``, ``resume``,
``evaluate``, ``load_config``, ``validate``, ``load_model`` and ``RunResult``. It is imported on
first use, so ``import dltemplate`` stays cheap (no torch).
"""

from __future__ import annotations

from typing import Any

try:  # one source of truth: the version in pyproject.toml, as installed
    from importlib.metadata import version as _version

    __version__ = _version("dltemplate")
except Exception:  # a source tree that was never installed
    __version__ = "unknown"

_API = ("RunResult", "evaluate", "load_config", "load_model", "resume", "train", "validate")
__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        from dltemplate import api

        return getattr(api, name)
    raise AttributeError(f"module 'dltemplate' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
