"""``checkpoint``: the run's checkpoints — best, last, top-k, every N epochs, interrupt."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dltemplate.callbacks.base import Callback
from dltemplate.engine.checkpoint import checkpoint_name
from dltemplate.registry import CALLBACKS

if TYPE_CHECKING:
    from dltemplate.engine.trainer import TrainerBase


@CALLBACKS.register("checkpoint")
class Checkpoint(Callback):
    """Writes, on rank 0, after every epoch:

    - ``<Model>_last_ckpt.pth`` (``save_last``): the whole training state, to resume from;
    - ``<Model>_best_ckpt.pth``: the best epoch by ``trainer.monitor`` (``save_top_k`` ≥ 1);
    - ``<Model>_best_epoch<E>_ckpt.pth`` for each of the ``save_top_k`` best epochs when
      ``save_top_k`` > 1 (a file that drops out of the top k is deleted);
    - ``<Model>_epoch<E>_ckpt.pth`` every ``every_n_epochs`` epochs, kept;

    and ``<Model>_interrupt_ckpt.pth`` when a signal or an exception stops the run
    (``save_on_exception``, default ``trainer.save_on_exception``) wherever an exact resume
    is possible. At the end it marks the last checkpoint finished. Best files hold the weights
    that were evaluated (an ``ema`` callback's average when it is used for evaluation).
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

    def setup(self, trainer: TrainerBase) -> None:
        """Take ``trainer.save_on_exception`` unless given."""
        if self.save_on_exception is None:
            self.save_on_exception = trainer.cfg.trainer.save_on_exception

    def on_epoch_end(self, trainer: TrainerBase, row: dict[str, float]) -> None:
        """Write this epoch's checkpoints (every rank takes part in gathering the state)."""
        epoch = int(row["epoch"])
        evicted = self._rank(trainer, row.get(trainer.cfg.trainer.monitor, math.nan), epoch)
        state = trainer.checkpoint_state()  # after _rank: it holds the new top-k list
        evaluated = trainer.evaluated_state(state)
        written: dict[int, Path] = {}  # id of a state -> a file holding it: written once
        kinds = [("last", state)] if self.save_last else []
        if self.every_n_epochs is not None and epoch % self.every_n_epochs == 0:
            kinds.append((f"epoch{epoch:03d}", state))
        if trainer.improved and self.save_top_k > 0:
            kinds.append(("best", evaluated))
        if any(e == epoch for _, e in self.top):
            kinds.append((f"best_epoch{epoch:03d}", evaluated))
        for kind, content in kinds:
            if id(content) in written:
                trainer.link(written[id(content)], kind)
            elif (path := trainer.save(kind, content)) is not None:
                written[id(content)] = path
        if trainer.dist.is_main and trainer.run_dir is not None:
            for old in evicted:
                path = trainer.run_dir / checkpoint_name(trainer.cfg.model.name, old)
                path.unlink(missing_ok=True)

    def _rank(self, trainer: TrainerBase, score: float, epoch: int) -> list[str]:
        """Enter this epoch into the top-k list (k > 1); return the kinds that dropped out."""
        if self.save_top_k <= 1 or math.isnan(score):
            return []
        sign = -1.0 if trainer.cfg.trainer.monitor_mode == "max" else 1.0
        ranked = sorted([*self.top, [score, epoch]], key=lambda se: (sign * se[0], se[1]))
        self.top = ranked[: self.save_top_k]
        return [f"best_epoch{e:03d}" for _, e in ranked[self.save_top_k :]]

    def on_exception(self, trainer: TrainerBase, exc: BaseException) -> None:
        """Write the interrupt checkpoint where the state allows an exact resume."""
        if not self.save_on_exception or trainer.fast_dev_run:
            trainer.stop_note = "no interrupt checkpoint written (interrupt checkpoints are off)"
            return
        try:
            state = trainer.interrupt_state(exc)
        except trainer.NotResumable as why:
            trainer.stop_note = f"no interrupt checkpoint written ({why})"
            return
        except Exception as save_exc:  # the original error matters more than this one
            trainer.stop_note = f"saving a checkpoint failed too: {save_exc}"
            return
        path = trainer.save("interrupt", state)
        if path is not None:
            trainer.stop_note = f"checkpoint saved to {path}"

    def on_fit_end(self, trainer: TrainerBase) -> None:
        """Mark the last checkpoint finished: ``resume`` of this run then changes nothing."""
        trainer.mark_finished()

    def state_dict(self) -> dict[str, Any]:
        """The top-k list (score, epoch)."""
        return {"top": [list(se) for se in self.top]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.top = [[float(s), int(e)] for s, e in state.get("top", [])]
