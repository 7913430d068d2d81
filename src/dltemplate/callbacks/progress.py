"""``progress``: the progress bar (or plain log lines) during an epoch, and the epoch's line."""

from __future__ import annotations

import logging
from typing import Literal

import torch

from dltemplate.callbacks.base import Callback, Loop
from dltemplate.progress import EpochProgress, use_progress_bar
from dltemplate.registry import CALLBACKS

log = logging.getLogger("dltemplate")


@CALLBACKS.register("progress")
class Progress(Callback):
    """A tqdm bar on a terminal (``bar``: ``auto``/``on``/``off``; default
    ``trainer.progress_bar``), else a log line whenever the trainer reads the loss (every
    ``trainer.log_every_n_steps`` optimizer steps) and every ``DLTEMPLATE_PROGRESS_SECONDS``
    (:mod:`dltemplate.progress`), for training, validation and the final test; and one log line
    per epoch. Rank 0 only.

    The loss it shows is the one the trainer read anyway: the bar costs no synchronisation.
    """

    def __init__(self, bar: Literal["auto", "on", "off"] | None = None) -> None:
        if bar not in (None, "auto", "on", "off"):
            raise ValueError(f"bar={bar!r}: expected auto, on or off")
        self.bar = bar
        self.progress: EpochProgress | None = None
        self.eval_progress: EpochProgress | None = None
        self.sizes: list[int] = []

    def on_train_epoch_start(self, trainer: Loop) -> None:
        """Open the epoch's bar, at the batch the epoch resumes from."""
        loader = trainer.train_loader
        self.sizes = loader.global_batch_sizes()
        self.progress = EpochProgress(
            len(loader),
            f"epoch {trainer.state.epoch + 1}/{trainer.state.epochs}",
            bar=use_progress_bar(self.bar or trainer.cfg.trainer.progress_bar),
            enabled=trainer.dist.is_main,
            initial=trainer.state.batch_in_epoch,
        )

    def on_train_batch_end(self, trainer: Loop, batch_index: int, loss: torch.Tensor):
        """Count the batch; show the loss when the trainer has just read it."""
        self.progress.update(self.sizes[batch_index], trainer.state.logged_loss)

    def on_train_epoch_end(self, trainer: Loop, metrics: dict[str, float]) -> None:
        """Remove the bar."""
        self.progress.close()

    def on_eval_batch_end(self, trainer: Loop, split: str, batch_index: int, batches: int) -> None:
        """Count a validation or test batch (a bar opened at the split's first batch)."""
        if batch_index == 0:
            self.eval_progress = EpochProgress(
                batches,
                "validation" if split == "val" else split,
                bar=use_progress_bar(self.bar or trainer.cfg.trainer.progress_bar),
                enabled=trainer.dist.is_main,
                unit="batches",
            )
        self.eval_progress.update(1)
        if batch_index == batches - 1:
            self.eval_progress.close()

    def on_epoch_end(self, trainer: Loop, row: dict[str, float]) -> None:
        """One line: the epoch's loss and monitored metric, the learning rate, the time."""
        shown = {"loss", trainer.cfg.trainer.monitor.split("/", 1)[-1]}
        values = [f"{k} {v:.4f}" for k, v in row.items() if "/" in k and k.split("/")[-1] in shown]
        log.info(
            "epoch %d/%d %s | lr %.3g | %.1fs%s",
            row["epoch"],
            trainer.state.epochs,
            " ".join(values),
            row["lr"],
            row["seconds"],
            " *best" if trainer.state.improved else "",
        )

    def on_exception(self, trainer: Loop, exc: BaseException) -> None:
        """Remove a bar left open."""
        for progress in (self.progress, self.eval_progress):
            if progress is not None:
                progress.close()
