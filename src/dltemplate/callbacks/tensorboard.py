"""``tensorboard``: the run's TensorBoard events in ``<run>/summary``."""

from __future__ import annotations

import torch

from dltemplate.callbacks.base import Callback, Loop
from dltemplate.registry import CALLBACKS


@CALLBACKS.register("tensorboard")
class TensorBoard(Callback):
    """On rank 0: ``train/loss_step`` and ``train/lr`` whenever the trainer reads the loss
    (every ``trainer.log_every_n_steps`` optimizer steps), every ``train/`` and ``val/`` metric
    and ``lr`` per epoch, ``test/`` metrics at the end. It opens ``trainer.writer``, which other
    callbacks and the task's ``log_images`` write to (None when this callback is off)."""

    def on_fit_start(self, trainer: Loop) -> None:
        """Open the writer. A resumed run hides the events a stopped one logged after its
        checkpoint's step (its last logged point, at that step, stays), so curves do not fold."""
        if not trainer.dist.is_main or trainer.run_dir is None:
            return
        from torch.utils.tensorboard import SummaryWriter  # slow import: only where needed

        step = trainer.state.global_step
        summary = str(trainer.run_dir / "summary")
        trainer.set_writer(SummaryWriter(summary, purge_step=step + 1 if step else None))

    def on_train_batch_end(self, trainer: Loop, batch_index: int, loss: torch.Tensor):
        """The loss the trainer has just read, and the learning rate."""
        loss, step = trainer.state.logged_loss, trainer.state.global_step
        if loss is not None and trainer.writer is not None:
            trainer.writer.add_scalar("train/loss_step", loss, step)
            trainer.writer.add_scalar("train/lr", trainer.lr, step)

    def on_epoch_end(self, trainer: Loop, row: dict[str, float]) -> None:
        """The epoch's metrics and learning rate, by epoch."""
        if trainer.writer is None:
            return
        for key, value in row.items():
            if "/" in key:
                trainer.writer.add_scalar(key, value, row["epoch"])
        trainer.writer.add_scalar("lr", row["lr"], row["epoch"])
        trainer.writer.flush()

    def on_test_end(self, trainer: Loop, metrics: dict[str, float]) -> None:
        """The test metrics, at the last epoch."""
        if trainer.writer is not None:
            for key, value in metrics.items():
                trainer.writer.add_scalar(f"test/{key}", value, trainer.state.epoch)

    def on_fit_end(self, trainer: Loop) -> None:
        """Close the writer."""
        self._close(trainer)

    def on_exception(self, trainer: Loop, exc: BaseException) -> None:
        """Close the writer (what was written stays)."""
        self._close(trainer)

    @staticmethod
    def _close(trainer: Loop) -> None:
        if trainer.writer is not None:
            trainer.writer.close()
            trainer.set_writer(None)
