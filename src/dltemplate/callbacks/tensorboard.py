"""``tensorboard``: the run's TensorBoard events in ``<run>/summary``."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from dltemplate.callbacks.base import Callback, Loop
from dltemplate.config import Config, config_to_dict
from dltemplate.registry import CALLBACKS


def hyperparameters(cfg: Config) -> dict[str, bool | int | float | str]:
    """The config flattened to ``section.key`` (``model.args.width``) -> a value TensorBoard's
    HPARAMS view takes: numbers, booleans and strings as they are (torch's writer shows a
    boolean as 1 or 0), anything else (a list, None) as its JSON text."""
    flat: dict[str, bool | int | float | str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), inner)
        elif isinstance(value, (bool, int, float, str)):
            flat[prefix] = value
        else:
            flat[prefix] = json.dumps(value, default=str)

    walk("", config_to_dict(cfg))
    return flat


def wait_past_event_files(folder: Path) -> None:
    """Sleep into the second after the newest event file in ``folder`` was opened, if it was
    opened this second (well under a second, and only then).

    TensorBoard reads a folder's event files in name order; a name is
    ``events.out.tfevents.<second>.<host>.<pid>.<counter>``, the counter not zero-padded. A
    resume opened in the same second as the stopped session's file (in one process: the
    Python API, a notebook, the tests) could sort before it (``.10`` before ``.9``), and its
    purge of the points logged after the checkpoint would be applied before those points."""
    seconds = []
    for path in folder.glob("events.out.tfevents.*"):
        stamp = path.name.split(".")[3]
        if stamp.isdigit():
            seconds.append(int(stamp))
    now = time.time()
    if seconds and max(seconds) >= int(now):
        time.sleep(max(seconds) + 1 - now)


@CALLBACKS.register("tensorboard")
class TensorBoard(Callback):
    """On rank 0: ``train/loss_step`` and ``train/lr`` whenever the trainer reads the loss
    (every ``trainer.log_every_n_steps`` optimizer steps), every ``train/`` and ``val/`` metric
    and ``lr`` per epoch, ``test/`` metrics at the end, and when the run finishes its
    hyperparameters (the config, flattened by :func:`hyperparameters`) with the final metrics
    (the last epoch's ``train/``, ``val/``, the best ``trainer.monitor`` as ``best/<monitor>``,
    ``test/``), so that TensorBoard's HPARAMS view compares runs. The final metrics are saved
    in checkpoints, so a resume that only re-runs the final test logs them too. It opens
    ``trainer.writer``, which other callbacks and the task's ``log_images`` write to (None when
    this callback is off)."""

    def __init__(self) -> None:
        self.final: dict[str, float] = {}  # the metrics the hyperparameters are logged with

    def on_fit_start(self, trainer: Loop) -> None:
        """Open the writer. A resumed run hides the events a stopped one logged after its
        checkpoint's step (its last logged point, at that step, stays), so curves do not fold."""
        if not trainer.dist.is_main or trainer.run_dir is None:
            return
        from torch.utils.tensorboard import SummaryWriter  # slow import: only where needed

        step = trainer.state.global_step
        summary = trainer.run_dir / "summary"
        if step:
            wait_past_event_files(summary)
        trainer.set_writer(SummaryWriter(str(summary), purge_step=step + 1 if step else None))

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
                self.final[key] = float(value)
        trainer.writer.add_scalar("lr", row["lr"], row["epoch"])
        trainer.writer.flush()

    def on_test_end(self, trainer: Loop, metrics: dict[str, float]) -> None:
        """The test metrics, at the last epoch."""
        if trainer.writer is not None:
            for key, value in metrics.items():
                trainer.writer.add_scalar(f"test/{key}", value, trainer.state.epoch)
                self.final[f"test/{key}"] = float(value)

    def on_fit_end(self, trainer: Loop) -> None:
        """Log the hyperparameters with the final metrics, then close the writer."""
        if trainer.writer is not None:
            self._log_hparams(trainer)
        self._close(trainer)

    def _log_hparams(self, trainer: Loop) -> None:
        from torch.utils.tensorboard.summary import hparams

        best = trainer.state.best
        metrics = dict(self.final)
        if best.score is not None:
            metrics[f"best/{trainer.cfg.trainer.monitor}"] = float(best.score)
            trainer.writer.add_scalar(
                f"best/{trainer.cfg.trainer.monitor}", best.score, trainer.state.epoch
            )
        # The three summaries SummaryWriter.add_hparams writes, but into this run's own event
        # file: add_hparams would open a sub-run and log each metric again at step 0.
        for summary in hparams(hyperparameters(trainer.cfg), metrics):
            trainer.writer.file_writer.add_summary(summary)
        trainer.writer.flush()

    def on_exception(self, trainer: Loop, exc: BaseException) -> None:
        """Close the writer (what was written stays)."""
        self._close(trainer)

    def state_dict(self) -> dict[str, Any]:
        """The final metrics so far (changed only at an epoch's end and after the test)."""
        return {"final": dict(self.final)} if self.final else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.final = {str(k): float(v) for k, v in state.get("final", {}).items()}

    @staticmethod
    def _close(trainer: Loop) -> None:
        if trainer.writer is not None:
            trainer.writer.close()
            trainer.set_writer(None)
