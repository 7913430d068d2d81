"""``checkpoint``: which of the run's checkpoints are written when — best, last, top-k, every N
epochs, interrupt. What a checkpoint holds and how it is written is the run's saved state
(:class:`~dltemplate.engine.run_state.RunState`, ``trainer.run_state``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from dltemplate.callbacks.base import Callback, Loop
from dltemplate.config import Config
from dltemplate.registry import CALLBACKS


@CALLBACKS.register("checkpoint")
class Checkpoint(Callback):
    """Writes, on rank 0, after every epoch:

    - ``<Model>_last_ckpt.pth`` (``save_last``): the whole training state, to resume from;
    - ``<Model>_best_ckpt.pth``: the best epoch by ``trainer.monitor`` (``save_top_k`` ≥ 1),
      when the epoch improved on the best so far (``trainer.state.improved``);
    - ``<Model>_best_epoch<E>_ckpt.pth`` for each of the ``save_top_k`` best epochs when
      ``save_top_k`` > 1 (a file that drops out of the top k is deleted);
    - ``<Model>_epoch<E>_ckpt.pth`` every ``every_n_epochs`` epochs, kept;

    and ``<Model>_interrupt_ckpt.pth`` when a signal or an exception stops the run
    (``save_on_exception``, default ``trainer.save_on_exception``) wherever an exact resume
    is possible. At the end it marks the run finished. Best files hold the weights that were
    evaluated (an ``ema`` callback's average when it is used for evaluation).
    """

    def __init__(
        self,
        save_top_k: int = 1,
        every_n_epochs: int | None = None,
        save_last: bool = True,
        save_on_exception: bool | None = None,
    ) -> None:
        if save_top_k < 0:
            raise ValueError(f"save_top_k={save_top_k}: must be 0 or more")
        if every_n_epochs is not None and every_n_epochs < 1:
            raise ValueError(f"every_n_epochs={every_n_epochs}: must be at least 1")
        self.save_top_k = save_top_k
        self.every_n_epochs = every_n_epochs
        self.save_last = save_last
        self.save_on_exception = save_on_exception
        self.top: list[list[Any]] = []  # [score, epoch] of the kept best epochs, best first

    def setup(self, cfg: Config, model: Any) -> None:
        """Take ``trainer.save_on_exception`` unless given."""
        if self.save_on_exception is None:
            self.save_on_exception = cfg.trainer.save_on_exception

    def on_epoch_end(self, trainer: Loop, row: dict[str, float]) -> None:
        """Write this epoch's checkpoints (every rank takes part in gathering the state)."""
        saver = trainer.run_state
        epoch = int(row["epoch"])
        monitor, mode = trainer.cfg.trainer.monitor, trainer.cfg.trainer.monitor_mode
        evicted = self._rank(row.get(monitor, math.nan), epoch, mode)
        state = saver.state_dict()  # after _rank: it holds the new top-k list
        evaluated = saver.evaluated_state(state, trainer.evaluated_model)
        kinds = [("last", state)] if self.save_last else []
        if self.every_n_epochs is not None and epoch % self.every_n_epochs == 0:
            kinds.append((f"epoch{epoch:03d}", state))
        if trainer.state.improved and self.save_top_k > 0:
            kinds.append(("best", evaluated))
        if any(e == epoch for _, e in self.top):
            kinds.append((f"best_epoch{epoch:03d}", evaluated))
        written: dict[int, Path] = {}  # id of a state -> a file holding it: written once
        for kind, content in kinds:
            if id(content) in written:
                saver.link(written[id(content)], kind)
            elif (path := saver.save(kind, content)) is not None:
                written[id(content)] = path
        for old in evicted:
            saver.remove(old)

    def _rank(self, score: float, epoch: int, mode: str) -> list[str]:
        """Enter this epoch into the top-k list (k > 1); return the kinds that dropped out."""
        if self.save_top_k <= 1 or math.isnan(score):
            return []
        sign = -1.0 if mode == "max" else 1.0
        ranked = sorted([*self.top, [score, epoch]], key=lambda se: (sign * se[0], se[1]))
        self.top = ranked[: self.save_top_k]
        return [f"best_epoch{e:03d}" for _, e in ranked[self.save_top_k :]]

    def on_exception(self, trainer: Loop, exc: BaseException) -> None:
        """Write the interrupt checkpoint where the state allows an exact resume."""
        if not self.save_on_exception:
            trainer.run_state.skip_interrupt("interrupt checkpoints are off")
        elif trainer.cfg.trainer.fast_dev_run:
            trainer.run_state.skip_interrupt("fast_dev_run writes no checkpoints")
        else:
            trainer.run_state.save_interrupt(exc)

    def on_fit_end(self, trainer: Loop) -> None:
        """Mark the run finished: ``resume`` of it then changes nothing."""
        trainer.run_state.mark_finished()

    def state_dict(self) -> dict[str, Any]:
        """The top-k list (score, epoch)."""
        return {"top": [list(se) for se in self.top]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.top = [[float(s), int(e)] for s, e in state.get("top", [])]
