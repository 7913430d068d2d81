"""Where a run lives and where it continues from: the run directory (new, reopened or
restarted under torchrun), the checkpoint to resume, and restoring its state exactly —
including "train longer", which stretches the rest of the learning-rate schedule.

A mixin of :class:`~dltemplate.engine.trainer.TrainerBase`: it reads and sets the trainer's
attributes, and keeps the loop's file free of set-up detail.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from dltemplate.atomic import atomic_write_text
from dltemplate.config import config_to_dict
from dltemplate.engine import distributed as D
from dltemplate.engine.checkpoint import (
    load_checkpoint,
    load_model_weights,
    newest_intact_checkpoint,
)
from dltemplate.engine.restarts import remember_run_dir, restarted_run_dir
from dltemplate.engine.rundir import (
    find_config,
    new_run_dir,
    read_saved_config,
    remove_stale_temp_files,
    save_config,
)
from dltemplate.engine.runlog import attach_log_file
from dltemplate.engine.seeding import set_rng_state
from dltemplate.errors import CheckpointError
from dltemplate.optim.stretch import StretchedSchedule, is_stretched_state, stretch_scheduler

log = logging.getLogger("dltemplate")


class ResumeMixin:
    """The run directory and resuming, for :class:`~dltemplate.engine.trainer.TrainerBase`."""

    cfg: Any
    dist: Any

    def _find_resume(self) -> tuple[dict[str, Any], Path] | None:
        """The checkpoint state to continue from and its path, if this run resumes one."""
        self._restart_dir = self._restarted_run_dir()
        return self._resume_checkpoint() if self.cfg.trainer.resume else None

    def _restarted_run_dir(self) -> Path | None:
        """The run directory to start over in, if any: one given to resume that holds no
        checkpoint yet (killed early), or under ``torchrun --max-restarts`` the one a restarted
        worker was writing (resumed from its newest checkpoint if it has one)."""
        resume = self.cfg.trainer.resume
        if resume:
            if Path(resume).is_dir() and not any(Path(resume).glob("*_ckpt.pth")):
                self.cfg.trainer.resume = None  # stopped before its first checkpoint
                return Path(resume)
            return None
        found = restarted_run_dir(self.cfg.experiment.output_dir) if self.dist.is_main else None
        found = D.broadcast_object(str(found) if found else None)
        if found is None:
            return None
        if any(Path(found).glob("*_ckpt.pth")):
            self.cfg.trainer.resume = found
            return None
        return Path(found)

    def _resume_checkpoint(self) -> tuple[dict[str, Any], Path]:
        path = Path(self.cfg.trainer.resume)
        if path.is_dir():
            if self.dist.is_main:
                remove_stale_temp_files(path)  # a killed writer's leftovers
            ckpt_path, skipped = newest_intact_checkpoint(path)
            for bad, why in skipped:
                log.warning("skipping damaged checkpoint %s (%s)", bad, why)
            if skipped:
                log.warning("resuming from the newest intact checkpoint: %s", ckpt_path)
        else:
            ckpt_path = path
        state = load_checkpoint(ckpt_path)
        load_model_weights(self.model, state["model"], str(ckpt_path))  # fails before any write
        return state, ckpt_path

    def _is_finished(self, state: dict[str, Any]) -> bool:
        """Whether the checkpoint's run is complete for this config (``resume`` of it is a
        no-op); a larger ``trainer.epochs`` (train longer), or a larger patience after early
        stopping, makes it unfinished again."""
        if not state.get("finished"):
            return False
        stopped_early = self._stopped_early(state)
        if not (state["epoch"] >= self.epochs or stopped_early):
            return False
        self.run_dir = Path(self.cfg.trainer.resume)
        if self.run_dir.is_file():
            self.run_dir = self.run_dir.parent
        self.finished_already = (
            f"run {self.run_dir} is finished (epoch {state['epoch']}, step "
            f"{state['global_step']}"
            + "): nothing to do; "
            + (
                "early stopping ended it (a larger trainer.early_stopping_patience continues it)"
                if stopped_early
                else "resume with a larger trainer.epochs to train longer"
            )
        )
        return True

    def _stopped_early(self, state: dict[str, Any]) -> bool:
        """Whether the checkpoint's run had ended its training early (a callback set
        ``should_stop``). A callback that can judge it again with today's config (early
        stopping, given a larger patience) may take that back."""
        self.best.load_state_dict(state["early_stopping"])
        if not state.get("stopped_early"):
            return False
        judges = [cb for cb in self.callbacks.callbacks if hasattr(cb, "stops")]
        return all(cb.stops(self) for cb in judges)

    def _saved_test_metrics(self) -> dict[str, float]:
        path = self.run_dir / "test_metrics.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def _restore(self, state: dict[str, Any], path: Path) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        saved = state["scheduler"]
        if (saved is None) != (self.scheduler is None):
            raise CheckpointError(f"{path}: the checkpoint's scheduler does not match the config")
        if self.scheduler is not None:
            if is_stretched_state(saved):
                self.scheduler = StretchedSchedule.from_state_dict(self.optimizer, saved)
            else:
                self.scheduler.load_state_dict(saved)
        self.precision.scaler.load_state_dict(state["scaler"])
        self.epoch, self.global_step = state["epoch"], state["global_step"]
        self.best_epoch = state.get("best_epoch")  # absent from older checkpoints
        self.batch_in_epoch = state["batch_in_epoch"]
        self.should_stop = self._stopped_early(state)  # stopped early: on to the final test
        progress = state["train_progress"]
        if progress and isinstance(progress[0], torch.Tensor):  # written by an older version
            progress = [progress]
        if len(progress) == self.dist.world_size:
            for mine, kept in zip(self._train_state(), progress[self.dist.rank]):
                mine.copy_(kept)
        self._train_longer(state)
        for name in self.callbacks.load_state_dict(state.get("callbacks", [])):
            log.warning("callback %s has no saved state in %s: it starts afresh", name, path)
        rng = state["rng"]
        if len(rng) == self.dist.world_size:
            set_rng_state(rng[self.dist.rank])
        else:  # another number of processes: the stream cannot continue exactly anyway
            log.warning(
                "%s was written by %d process(es), this run has %d: random streams start afresh",
                path,
                len(rng),
                self.dist.world_size,
            )

    def _train_longer(self, state: dict[str, Any]) -> None:
        """A resume asking for more epochs stretches what was left of the schedule over the new
        length (see :mod:`dltemplate.optim.stretch`): no jump, no stepping past its end."""
        old_total = state.get("schedule_total")
        if old_total is None:  # an older checkpoint: recompute from its config
            saved = state["config"]["trainer"]
            old_total = saved["epochs"] * (
                self.steps_per_epoch if self.step_scheduler_per_batch else 1
            )
        if self.scheduler is None or self.schedule_total <= old_total:
            return
        done = self.global_step if self.step_scheduler_per_batch else self.epoch
        self.scheduler = stretch_scheduler(
            self.scheduler, self.optimizer, done=done, old_total=old_total,
            new_total=self.schedule_total,
        )  # fmt: skip
        log.info(
            "training longer: the rest of the learning-rate schedule (scheduler steps %d-%d) is "
            "stretched over steps %d-%d",
            done,
            old_total,
            done,
            self.schedule_total,
        )

    def _open_run_dir(self, resumed_from: Path | None) -> None:
        """Create (rank 0) or reopen the run directory; log to it; save the config."""
        output_dir = self.cfg.experiment.output_dir
        if resumed_from is not None:
            run_dir = resumed_from.parent
        elif self._restart_dir is not None:  # torchrun restarted us before any checkpoint
            run_dir = self._restart_dir
        else:
            made = new_run_dir(output_dir) if self.dist.is_main else None
            run_dir = Path(D.broadcast_object(str(made) if made else None))
        self.run_dir = run_dir
        if not self.dist.is_main:
            return
        remove_stale_temp_files(run_dir)  # a killed writer's leftovers
        attach_log_file(run_dir / "train.log")
        if resumed_from is None:
            save_config(run_dir, self.cfg.experiment.name, config_to_dict(self.cfg))
            remember_run_dir(output_dir, run_dir)
            if self._restart_dir is None:
                log.info("run %s started: %s", run_dir.name, run_dir)
            else:
                log.info("run %s had no checkpoint yet: started over in %s", run_dir.name, run_dir)
        else:
            log.info(
                "run %s resumed from %s at epoch %d, step %d",
                run_dir.name,
                resumed_from,
                self.epoch + 1,
                self.global_step,
            )
            self._update_saved_config(run_dir)
        log.info("command: %s", " ".join(sys.argv))
        n_params = sum(p.numel() for p in self.model.parameters())
        log.info(
            "device %s x %d process(es), %d CPU thread(s) each; model %s (%d parameters); "
            "train %d, val %d, test %d samples",
            self.device,
            self.dist.world_size,
            self.threads,
            self.cfg.model.name,
            n_params,
            len(self.data.train),
            len(self.data.val),
            len(self.data.test),
        )
        for note in self.data.notes:
            log.info("data: %s", note)
        groups = self.data.group_record()
        if groups is not None and resumed_from is None:
            atomic_write_text(run_dir / "split.json", json.dumps(groups, indent=1))

    def _update_saved_config(self, run_dir: Path) -> None:
        """A resume that changes the config (train longer) rewrites the saved config, so that
        the run directory alone says how the run goes on."""
        path = find_config(run_dir)
        saved, meta = read_saved_config(run_dir)
        now = config_to_dict(self.cfg)
        now["trainer"]["resume"] = saved.get("trainer", {}).get("resume")
        changed = []
        for section, values in now.items():
            if not isinstance(values, dict):  # a list section (callbacks): compared whole
                if saved.get(section, []) != values:
                    changed.append(f"{section}: {saved.get(section)!r} -> {values!r}")
                continue
            changed += [
                f"{section}.{key}: {saved.get(section, {}).get(key)!r} -> {value!r}"
                for key, value in values.items()
                if saved.get(section, {}).get(key) != value
            ]
        if changed:
            log.info("config changed on resume: %s", "; ".join(changed))
            atomic_write_text(path, json.dumps({**now, "_meta": meta}, indent=2))
