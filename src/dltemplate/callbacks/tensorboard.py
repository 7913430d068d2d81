"""``tensorboard``: the run's TensorBoard events in ``<run>/summary``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from dltemplate.callbacks.base import Callback
from dltemplate.registry import CALLBACKS

if TYPE_CHECKING:
    from dltemplate.engine.trainer import TrainerBase


@CALLBACKS.register("tensorboard")
class TensorBoard(Callback):
    """On rank 0: ``train/loss_step`` and ``train/lr`` whenever the trainer reads the loss
    (every ``trainer.log_every_n_steps`` optimizer steps), every ``train/`` and ``val/`` metric
    and ``lr`` per epoch, ``test/`` metrics at the end. It opens ``trainer.writer``, which other
    callbacks and the task's ``log_images`` write to (None when this callback is off)."""

    def on_fit_start(self, trainer: TrainerBase) -> None:
        """Open the writer; a resumed run drops events past its step, so curves do not fold."""
        if not trainer.dist.is_main or trainer.run_dir is None:
            return
        from torch.utils.tensorboard import SummaryWriter  # slow import: only where needed

        trainer.writer = SummaryWriter(
            str(trainer.run_dir / "summary"), purge_step=trainer.global_step or None
        )

    def on_train_batch_end(self, trainer: TrainerBase, batch_index: int, loss: torch.Tensor):
        """The loss the trainer has just read, and the learning rate."""
        if trainer.logged_loss is not None and trainer.writer is not None:
            trainer.writer.add_scalar("train/loss_step", trainer.logged_loss, trainer.global_step)
            trainer.writer.add_scalar("train/lr", trainer.lr, trainer.global_step)

    def on_epoch_end(self, trainer: TrainerBase, row: dict[str, float]) -> None:
        """The epoch's metrics and learning rate, by epoch."""
        if trainer.writer is None:
            return
        for key, value in row.items():
            if "/" in key:
                trainer.writer.add_scalar(key, value, row["epoch"])
        trainer.writer.add_scalar("lr", row["lr"], row["epoch"])
        trainer.writer.flush()

    def on_test_end(self, trainer: TrainerBase, metrics: dict[str, float]) -> None:
        """The test metrics, at the last epoch."""
        if trainer.writer is not None:
            for key, value in metrics.items():
                trainer.writer.add_scalar(f"test/{key}", value, trainer.epoch)

    def on_fit_end(self, trainer: TrainerBase) -> None:
        """Close the writer."""
        self._close(trainer)

    def on_exception(self, trainer: TrainerBase, exc: BaseException) -> None:
        """Close the writer (what was written stays)."""
        self._close(trainer)

    @staticmethod
    def _close(trainer: TrainerBase) -> None:
        if trainer.writer is not None:
            trainer.writer.close()
            trainer.writer = None
