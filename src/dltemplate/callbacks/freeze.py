"""``freeze``: named modules left untouched for the first epochs, then trained."""

from __future__ import annotations

import logging

from torch import nn

from dltemplate.callbacks.base import Callback, Loop
from dltemplate.config import Config
from dltemplate.errors import ConfigError, did_you_mean
from dltemplate.registry import CALLBACKS

log = logging.getLogger("dltemplate")


@CALLBACKS.register("freeze")
class Freeze(Callback):
    """The parameters of ``modules`` (names as in ``model.named_modules()``, e.g. ``net.0``)
    are not updated during the first ``epochs`` epochs.

    Their gradients are dropped before each optimizer step, so the optimizer skips them
    (no momentum, no weight decay) — this also works under DistributedDataParallel, which
    does not allow changing ``requires_grad`` once it wraps the model.
    """

    def __init__(self, modules: list[str], epochs: int = 1) -> None:
        if not modules:
            raise ValueError("modules: name at least one module")
        self.modules = list(modules)
        self.epochs = epochs
        self.params: list[nn.Parameter] = []

    @property
    def state_key(self) -> str:
        """``Freeze{epochs=..., modules=[...]}``."""
        return self.key_with(modules=self.modules, epochs=self.epochs)

    def setup(self, cfg: Config, model: nn.Module) -> None:
        """Find the named modules (a wrong name stops the run before any work)."""
        named = dict(model.named_modules())
        for name in self.modules:
            if name not in named:
                raise ConfigError(
                    f"callbacks: freeze: the model has no module '{name}'"
                    f"{did_you_mean(name, [n for n in named if n])}"
                )
            self.params += list(named[name].parameters())

    def on_train_epoch_start(self, trainer: Loop) -> None:
        """Say when the modules are frozen and when they are released."""
        state = trainer.state
        if state.epoch == 0 and state.batch_in_epoch == 0:
            log.info("freeze: %s frozen for %d epoch(s)", ", ".join(self.modules), self.epochs)
        elif state.epoch == self.epochs and state.batch_in_epoch == 0:
            log.info("freeze: %s released", ", ".join(self.modules))

    def on_before_optimizer_step(self, trainer: Loop) -> None:
        """Drop the frozen parameters' gradients while the epoch is one of the first ones."""
        if trainer.state.epoch < self.epochs:
            for p in self.params:
                p.grad = None
