"""A run's saved state, in one owner: what a checkpoint holds, writing it, linking best to
last, marking the run finished, finding the checkpoint to resume and restoring it exactly.

:class:`RunState` holds the run's live objects (model, optimizer and scheduler, grad scaler,
loop counters, the epoch's running sums, callbacks, random generators) and turns them into a
checkpoint (:meth:`RunState.state_dict`) and back (:meth:`RunState.load_state_dict`), strictly:
a checkpoint that lacks what restoring needs is refused in one line before anything is written.
Which checkpoints are written when is the ``checkpoint`` callback's choice; how the file itself
is written (atomic, with a digest) is :mod:`dltemplate.engine.checkpoint`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from dltemplate.config import Config, config_to_dict
from dltemplate.engine import distributed as D
from dltemplate.engine.build import Schedule
from dltemplate.engine.checkpoint import (
    check_trained_classes,
    checkpoint_name,
    link_checkpoint,
    load_checkpoint,
    load_model_weights,
    newest_intact_checkpoint,
    save_checkpoint,
    unwrap_model,
)
from dltemplate.engine.loop_state import LoopState
from dltemplate.engine.precision import Precision
from dltemplate.engine.restarts import restarted_run_dir
from dltemplate.engine.rundir import RunLock, find_config, remove_stale_temp_files
from dltemplate.engine.seeding import rng_state, set_rng_state
from dltemplate.engine.stopping import BoundarySnapshot, RunStopped
from dltemplate.errors import (
    CheckpointError,
    ConfigError,
    NonFiniteLossError,
    UsageError,
    short_repr,
)
from dltemplate.optim import is_plateau
from dltemplate.optim.stretch import StretchedSchedule, is_stretched_state, stretch_scheduler

log = logging.getLogger("dltemplate")

# What a checkpoint must hold to continue a run; restoring refuses a file that lacks any.
TRAINING_KEYS = (
    "model",
    "optimizer",
    "scheduler",
    "schedule_total",
    "scaler",
    "epoch",
    "global_step",
    "batch_in_epoch",
    "world_size",
    "train_progress",
    "best_score",
    "best_epoch",
    "stopped_by",
    "stop_reason",
    "rng",
    "callbacks",
    "finished",
    "config",
)


class NotResumable(Exception):
    """The state of the last step boundary is not known: no interrupt checkpoint then."""


class Callbacks(Protocol):
    """What the run's state needs of the callbacks (a ``CallbackList``)."""

    def state_dict(self) -> dict[str, dict[str, Any]]: ...

    def load_state_dict(self, saved: dict[str, dict[str, Any]], source: str = "") -> None: ...

    def find(self, key: str) -> Any: ...


@dataclass
class ResumePoint:
    """A checkpoint to continue from: its content (keys checked) and where it lies."""

    state: dict[str, Any]
    path: Path

    @property
    def run_dir(self) -> Path:
        """The run directory the checkpoint belongs to."""
        return self.path.parent


@dataclass
class Interrupt:
    """What became of the interrupt checkpoint when a run stopped."""

    path: Path | None = None  # the file written, if one was
    note: str = "no interrupt checkpoint written (checkpointing is off)"


# == finding where a run continues from ==========================================================
def restart_dir(cfg: Config, dist: D.DistContext) -> Path | None:
    """The run directory to start over in, if any: one given to resume that holds no checkpoint
    yet (killed early), or under ``torchrun --max-restarts`` the one a restarted worker was
    writing. ``cfg.trainer.resume`` is set to the latter when it holds a checkpoint."""
    resume = cfg.trainer.resume
    if resume:
        if Path(resume).is_dir() and not any(Path(resume).glob("*_ckpt.pth")):
            # a run directory (its config is saved first) stopped before its first checkpoint;
            # any other folder (the output_dir, a data folder) is refused, not written into
            find_config(Path(resume))
            cfg.trainer.resume = None
            return Path(resume)
        return None
    found = restarted_run_dir(cfg.experiment.output_dir) if dist.is_main else None
    found = D.broadcast_object(str(found) if found else None)
    if found is None:
        return None
    if any(Path(found).glob("*_ckpt.pth")):
        cfg.trainer.resume = found
        return None
    return Path(found)


def find_resume_point(
    resume: str | Path, model: nn.Module, is_main: bool, class_names: Sequence[str] = ()
) -> ResumePoint:
    """The checkpoint ``resume`` names (a file, or a run directory's newest intact one), checked
    to hold a whole training state, the data's ``class_names`` and weights that fit ``model``:
    a CheckpointError (a DataError for other classes) otherwise, before anything is written."""
    path = Path(resume)
    if path.is_dir():
        if is_main:
            remove_stale_temp_files(path)  # a killed writer's leftovers
        ckpt_path, skipped = newest_intact_checkpoint(path)
        for bad, why in skipped:
            log.warning("skipping damaged checkpoint %s (%s)", bad, why)
        if skipped:
            log.warning("resuming from the newest intact checkpoint: %s", ckpt_path)
    else:
        ckpt_path = path
    state = load_checkpoint(ckpt_path)
    check_training_state(state, ckpt_path)
    check_trained_classes(state.get("class_names"), class_names, ckpt_path)
    load_model_weights(model, state["model"], str(ckpt_path))
    return ResumePoint(state, ckpt_path)


def _count(minimum: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= minimum


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# Each field's rule, said as the message says it: checked before anything is restored.
FIELD_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "model": (lambda v: isinstance(v, dict), "a mapping of tensors"),
    "optimizer": (lambda v: isinstance(v, dict), "a mapping"),
    "scheduler": (_optional(lambda v: isinstance(v, dict)), "a mapping or None"),
    "schedule_total": (_count(0), "an integer >= 0"),
    "scaler": (lambda v: isinstance(v, dict), "a mapping"),
    "epoch": (_count(0), "an integer >= 0"),
    "global_step": (_count(0), "an integer >= 0"),
    "batch_in_epoch": (_count(0), "an integer >= 0"),
    "world_size": (_count(1), "an integer >= 1"),
    "train_progress": (lambda v: isinstance(v, list), "a list"),
    "best_score": (_optional(_number), "a number or None"),
    "best_epoch": (_optional(_count(1)), "an integer >= 1 or None"),
    "stopped_by": (_optional(lambda v: isinstance(v, str)), "a string or None"),
    "stop_reason": (_optional(lambda v: isinstance(v, str)), "a string or None"),
    "rng": (lambda v: isinstance(v, list), "a list (one state per process)"),
    "callbacks": (lambda v: isinstance(v, dict), "a mapping of states by callback key"),
    "finished": (lambda v: isinstance(v, bool), "true or false"),
    "config": (lambda v: isinstance(v, dict), "a mapping of sections"),
}


def check_training_state(state: dict[str, Any], path: Path) -> None:
    """A CheckpointError naming ``path`` unless ``state`` holds every key of a training state,
    each of the right type and range (a hostile or damaged file is refused before anything is
    restored or written)."""
    missing = [k for k in TRAINING_KEYS if k not in state]
    if missing:
        if "model" in state and "optimizer" not in state:
            why = "it holds evaluated weights only (an average such as ema's), no training state"
        else:
            why = f"it lacks {', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}"
        raise CheckpointError(
            f"{path}: cannot resume from this checkpoint: {why}; resume from the run directory "
            "(its last or interrupt checkpoint), or evaluate this file with dltemplate eval"
        )
    for key, (ok, rule) in FIELD_RULES.items():
        if not ok(state[key]):
            raise CheckpointError(
                f"{path}: cannot resume from this checkpoint: {key}={short_repr(state[key])} "
                f"(must be {rule})"
            )


def stop_cause(exc: BaseException) -> str:
    """What stopped a run, in a word: the signal (``SIGTERM``), the reason given to
    ``request_stop`` (``max_time``), or the exception's class."""
    if isinstance(exc, RunStopped):
        return exc.signal_name
    if isinstance(exc, KeyboardInterrupt):
        return "SIGINT"
    return type(exc).__name__


def all_finite(weights: dict[str, Any]) -> bool:
    """Whether every floating-point tensor of ``weights`` is finite (no NaN, no infinity)."""
    tensors = [t for t in weights.values() if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def finished_note(point: ResumePoint, epochs: int, callbacks: Callbacks) -> str | None:
    """If ``point``'s run is complete for a run of ``epochs`` epochs (``resume`` of it is a
    no-op), the line that says so; None to train on. A larger ``trainer.epochs`` (train longer)
    reopens a finished run; one that a callback ended stays ended unless that callback itself,
    given today's arguments, would no longer end it."""
    state = point.state
    if not state["finished"]:
        return None
    end_epoch, end_step = state.get("finished_at", [state["epoch"], state["global_step"]])
    where = f"run {point.run_dir} is finished (epoch {end_epoch}, step {end_step})"
    stopper = state["stopped_by"]
    if stopper is not None and stop_holds(callbacks, stopper, point):
        reason = state["stop_reason"] or "no reason given"
        return f"{where}: nothing to do; {stopper} ended its training ({reason})"
    if end_epoch >= epochs:
        return f"{where}: nothing to do; resume with a larger trainer.epochs to train longer"
    if [state["epoch"], state["global_step"]] != [end_epoch, end_step]:
        raise CheckpointError(
            f"{point.path}: the run finished at epoch {end_epoch} but its newest checkpoint "
            f"holds epoch {state['epoch']} (no last checkpoint was kept), so it cannot go on "
            "exactly: train a new run, or keep the checkpoint callback's save_last on"
        )
    return None


# What a resume restores from the checkpoint, by the config keys it follows: the optimizer and
# scheduler (hyperparameters included: torch's optimizers keep lr, betas... in their state),
# and the best score and early-stopping counts, kept in terms of trainer.monitor. None: every
# key of the section; optimizer.fused may still be set (documented to follow the checkpoint).
RESTORED = {
    "optimizer": (None, "optimizer"),
    "scheduler": (None, "scheduler"),
    "trainer": (("monitor", "monitor_mode"), "best score (of trainer.monitor)"),
}
RESTORED_FREE = ("optimizer.fused",)


def refuse_restored_changes(point: ResumePoint, now: dict[str, Any]) -> None:
    """A ConfigError if the config ``now`` (a dict of sections) changes a key whose state a
    resume restores from the checkpoint at ``point`` (:data:`RESTORED`): the new value would be
    logged and saved but never used (``optimizer.lr``), fail mid-run (another
    ``optimizer.name``), or compare scores of another metric (``trainer.monitor``)."""
    saved = point.state["config"]
    for section, (keys, what) in RESTORED.items():
        was, value = saved.get(section, {}), now.get(section, {})
        for key in keys or sorted(set(was) | set(value)):
            dotted = f"{section}.{key}"
            if dotted in RESTORED_FREE or key not in was or key not in value:
                continue  # a key one version lacks is no change the user made
            if was[key] == value[key]:
                continue
            raise ConfigError(
                f"{point.path}: {dotted}={short_repr(value.get(key))}: a resume continues the "
                f"run's {what} as the checkpoint saved it ({dotted}={short_repr(was.get(key))}"
                f"); leave it out, or train a new run with it"
            )


def refuse_fewer_epochs_than_done(point: ResumePoint, epochs: int) -> None:
    """A ConfigError if a resume of the unfinished run at ``point`` asks for fewer
    ``trainer.epochs`` than it has trained (counting an epoch begun): nothing would be trained,
    and finishing there would mark an older checkpoint finished and delete the newer one."""
    done, begun = point.state["epoch"], point.state["batch_in_epoch"] > 0
    least = done + 1 if begun else done
    if epochs < least:
        trained = f"{done} epoch(s)" + (" and part of the next" if begun else "")
        raise ConfigError(
            f"{point.path}: trainer.epochs={epochs}: the run has trained {trained}, so it "
            f"cannot end after epoch {epochs}; give trainer.epochs={least} or more (training "
            "shorter ends a run at an epoch it has not reached)"
        )


def stop_holds(callbacks: Callbacks, key: str, point: ResumePoint) -> bool:
    """Whether callback ``key``, its saved state restored, still ends the run; a callback this
    run lacks cannot reopen it."""
    callback = callbacks.find(key)
    if callback is None:
        return True
    saved = point.state["callbacks"].get(key)
    if saved is not None:
        callback.load_state_dict(saved)
    return bool(callback.stop_holds())


# == the owner ===================================================================================
class RunState:
    """The live objects of a run and the checkpoints made of them (rank 0 writes).

    Built by the composition root from the run's parts; the trainer moves the objects, the
    ``checkpoint`` callback decides which files to write, this class writes, links, marks and
    restores them.
    """

    def __init__(
        self,
        *,
        cfg: Config,
        model: nn.Module,
        schedule: Schedule,
        precision: Precision,
        loop: LoopState,
        train_totals: Callable[[], list[torch.Tensor]],
        snapshot: BoundarySnapshot,
        callbacks: Callbacks,
        dist: D.DistContext,
        write: bool = True,
        class_names: Sequence[str] = (),
    ) -> None:
        self.cfg = cfg
        self.class_names = [str(c) for c in class_names]  # eval checks the data still has them
        self.model = unwrap_model(model)  # saved bare: no module. / _orig_mod. prefixes
        self.schedule, self.precision, self.loop = schedule, precision, loop
        self.train_totals = train_totals  # this process's running sums of the epoch
        self.snapshot, self.callbacks, self.dist = snapshot, callbacks, dist
        self.write = write and dist.is_main  # fast_dev_run writes nothing
        self.run_dir: Path | None = None
        self.lock: RunLock | None = None  # held by rank 0 while it writes the run directory
        self.interrupt = Interrupt()

    # -- what a checkpoint holds -----------------------------------------------------------------
    def state_dict(self, at_last_boundary: bool = False) -> dict[str, Any]:
        """Everything needed to continue the run exactly (tensors and plain types only).

        Collective under several processes (every rank's random state is gathered).
        ``at_last_boundary``: the model buffers and random state as they were at the last step
        boundary, for a stop part-way through a step.
        """
        rng = self.snapshot.rng() if at_last_boundary else rng_state()
        unknown = torch.tensor([rng is None], dtype=torch.int64, device=D.collective_device())
        D.all_reduce_max(unknown)  # every process decides alike
        if unknown.item():
            raise NotResumable("the task drew from Python's or NumPy's generator in this epoch")
        scheduler = self.schedule.scheduler
        weights = self.snapshot.model_state(self.model) if at_last_boundary else None
        return {
            "model_name": self.cfg.model.name,
            "model": weights if weights is not None else self.model.state_dict(),
            "optimizer": self.schedule.optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "schedule_total": self.schedule.total,
            "scaler": self.precision.scaler.state_dict(),
            **self.loop.state_dict(),
            "world_size": self.dist.world_size,
            "train_progress": D.gather_objects([t.cpu() for t in self.train_totals()]),
            "rng": D.gather_objects(rng),
            "callbacks": self.callbacks.state_dict(),
            "finished": False,
            "config": config_to_dict(self.cfg),
            "class_names": list(self.class_names),
        }

    def evaluated_state(self, state: dict[str, Any], evaluated: nn.Module) -> dict[str, Any]:
        """``state`` with the weights that were evaluated (``evaluated``, when it is not the
        trained model): what the best checkpoints hold. Such a file cannot resume training (it
        has no optimizer: restoring refuses it)."""
        evaluated = unwrap_model(evaluated)
        if evaluated is self.model:
            return state
        return {
            **{k: v for k, v in state.items() if k != "optimizer"},
            "model": evaluated.state_dict(),
        }

    def interrupt_state(self, exc: BaseException) -> dict[str, Any]:
        """The state an interrupt checkpoint may hold after ``exc``, or :class:`NotResumable`.

        A signal stops at a step boundary (exact). After another exception on one process, the
        state of the last boundary is saved (its random state and buffers were kept). None is
        exact when the stop tore an optimizer step or an epoch's end, during the final test
        (training is complete), after a non-finite loss or a configuration error, or when one
        process of several failed alone: ``resume`` then continues from the newest checkpoint.
        """
        agreed = isinstance(exc, RunStopped) and exc.at_boundary
        if self.run_dir is None:
            raise NotResumable("the run had not started")
        if isinstance(exc, NonFiniteLossError):
            raise NotResumable("the weights are not to be trusted")
        if isinstance(exc, UsageError):
            raise NotResumable("the configuration or input is wrong: fix it, then resume")
        if self.loop.phase == "test":
            raise NotResumable("training was complete (the final test runs again on resume)")
        if self.loop.torn is not None:
            raise NotResumable(f"it stopped part-way through {self.loop.torn}")
        if self.dist.enabled and not agreed:
            raise NotResumable("one process of several failed on its own")
        return self.state_dict(at_last_boundary=True)

    # -- writing ---------------------------------------------------------------------------------
    def path(self, kind: str) -> Path:
        """``<run>/<Model>_<kind>_ckpt.pth``."""
        assert self.run_dir is not None, "the run directory is not open yet"
        return self.run_dir / checkpoint_name(self.cfg.model.name, kind)

    def save(self, kind: str, state: dict[str, Any]) -> Path | None:
        """Write ``<Model>_<kind>_ckpt.pth`` (rank 0; not in fast_dev_run), atomically with a
        digest. Weights that are not finite are never written: NonFiniteLossError."""
        if not self.write:
            return None
        if not all_finite(state["model"]):
            raise NonFiniteLossError(
                f"the weights are not finite at epoch {self.loop.epoch}, step "
                f"{self.loop.global_step}: {self.path(kind).name} not written (the checkpoints "
                "on disk are kept)"
            )
        path = self.path(kind)
        save_checkpoint(path, state)
        return path

    def link(self, source: Path, kind: str) -> Path | None:
        """Make ``<Model>_<kind>_ckpt.pth`` the same file as ``source`` (same state, rank 0)."""
        if not self.write:
            return None
        path = self.path(kind)
        link_checkpoint(source, path)
        return path

    def remove(self, kind: str) -> None:
        """Delete ``<Model>_<kind>_ckpt.pth`` (rank 0), e.g. a best epoch out of the top k."""
        if self.write:
            self.path(kind).unlink(missing_ok=True)

    def save_interrupt(self, exc: BaseException) -> None:
        """Write the interrupt checkpoint where the state allows an exact resume; record in
        :attr:`interrupt` what was written, or why nothing was."""
        try:
            state = {**self.interrupt_state(exc), "interrupted_by": stop_cause(exc)}
            if not all_finite(state["model"]):
                raise NotResumable("the weights are not finite")
            path = self.save("interrupt", state) if self.write else None
        except NotResumable as why:
            self.interrupt = Interrupt(None, f"no interrupt checkpoint written ({why})")
            return
        except Exception as save_exc:  # the original error matters more than this one
            self.interrupt = Interrupt(None, f"saving a checkpoint failed too: {save_exc}")
            return
        if path is not None:
            self.interrupt = Interrupt(path, f"checkpoint saved to {path}")
        else:
            self.interrupt = Interrupt(None, "no interrupt checkpoint written (fast_dev_run)")

    def skip_interrupt(self, why: str) -> None:
        """Record that no interrupt checkpoint is written, and why."""
        self.interrupt = Interrupt(None, f"no interrupt checkpoint written ({why})")

    def mark_finished(self) -> None:
        """Record that the run is complete in the checkpoint a ``resume`` of it would pick (the
        last one, or without one the newest intact), so that ``resume`` changes nothing."""
        if not self.write:
            return
        last = self.path("last")
        if last.exists():
            path = last
        else:
            try:
                path, _ = newest_intact_checkpoint(self.run_dir)
            except CheckpointError:
                return  # no checkpoint at all (checkpointing off): nothing resumes this run
        state = load_checkpoint(path)
        state.pop("digest", None)
        at = [self.loop.epoch, self.loop.global_step]
        save_checkpoint(path, {**state, "finished": True, "finished_at": at})
        interrupt = self.path("interrupt")
        if path != interrupt and interrupt.exists():  # an earlier stop's: resumed past, stale
            interrupt.unlink()
            log.info("removed %s: the run went on past that stop and is finished", interrupt.name)

    # -- resuming ---------------------------------------------------------------------------------
    def load_state_dict(self, point: ResumePoint) -> None:
        """Restore every live object from ``point`` (its keys were checked when it was found)."""
        state, path = point.state, point.path
        self.schedule.optimizer.load_state_dict(state["optimizer"])
        saved = state["scheduler"]
        if (saved is None) != (self.schedule.scheduler is None):
            raise CheckpointError(f"{path}: the checkpoint's scheduler does not match the config")
        if self.schedule.scheduler is not None:
            if is_stretched_state(saved):
                self.schedule.scheduler = StretchedSchedule.from_state_dict(
                    self.schedule.optimizer, saved
                )
            else:
                self.schedule.scheduler.load_state_dict(saved)
        self.precision.scaler.load_state_dict(state["scaler"])
        self.loop.load_state_dict(state)
        stopper = self.loop.stopped_by
        if stopper is not None and not stop_holds(self.callbacks, stopper, point):
            log.info("%s no longer ends the run: training goes on", stopper)
            self.loop.stopped_by = self.loop.stop_reason = None
        progress = state["train_progress"]
        if len(progress) == self.dist.world_size:
            for mine, kept in zip(self.train_totals(), progress[self.dist.rank]):
                mine.copy_(kept)
        self._warn_on_other_batches(state, path)
        self._train_longer(state["schedule_total"])
        self.callbacks.load_state_dict(state["callbacks"], str(path))
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

    def _warn_on_other_batches(self, state: dict[str, Any], path: Path) -> None:
        """Warn when a stop part-way through an epoch is resumed with global batches of another
        size (another ``data.batch_size`` or number of processes): the epoch goes on after as
        many batches as were done, not as many samples."""
        done, data = state["batch_in_epoch"], state["config"].get("data")
        batch = data.get("batch_size") if isinstance(data, dict) else None
        if done == 0 or not isinstance(batch, int):
            return
        was, now = batch * state["world_size"], self.cfg.data.batch_size * self.dist.world_size
        if was != now:
            log.warning(
                "%s stopped epoch %d after %d batch(es) of %d samples; this resume reads batches "
                "of %d, so the epoch goes on after %d samples, not %d: some of its samples are "
                "trained twice or not at all (resume with the run's data.batch_size and number "
                "of processes to continue exactly)",
                path, state["epoch"] + 1, done, was, now, done * now, done * was,
            )  # fmt: skip

    def _train_longer(self, old_total: int) -> None:
        """A resume asking for more epochs stretches what was left of the schedule over the new
        length (see :mod:`dltemplate.optim.stretch`): no jump, no stepping past its end. A
        schedule that had ended holds its final rate, and one asked for fewer epochs is cut
        where it stands: both are said in a warning."""
        schedule = self.schedule
        if schedule.scheduler is None or is_plateau(schedule.scheduler):
            return  # no schedule, or one without a length
        done = self.loop.global_step if schedule.per_step else self.loop.epoch
        if schedule.total < old_total:
            log.warning(
                "training shorter: the run now ends at scheduler step %d of the %d its "
                "learning-rate schedule was planned for; the schedule is not compressed but cut "
                "where it stands, so the rate never reaches its planned final value",
                schedule.total,
                old_total,
            )
            return
        if schedule.total == old_total:
            return
        if done >= old_total:  # nothing left to stretch: the final rate is held
            lr = float(schedule.optimizer.param_groups[0]["lr"])
            eta_min = getattr(schedule.scheduler, "eta_min", None)
            named = f" (scheduler.args.eta_min={eta_min:g})" if eta_min is not None else ""
            advice = (
                "at that rate the model does not change: to train further, train a new run "
                "with the larger trainer.epochs (its schedule then spans them all), or give "
                "runs you mean to extend a non-zero scheduler.args.eta_min"
                if lr <= 1e-12
                else "the schedule is not restarted"
            )
            log.warning(
                "training longer: the learning-rate schedule had already ended (scheduler step "
                "%d of %d), so the added steps %d-%d keep its final learning rate %g%s; %s",
                done, old_total, old_total, schedule.total, lr, named, advice,
            )  # fmt: skip
        schedule.scheduler = stretch_scheduler(
            schedule.scheduler, schedule.optimizer, done=done, old_total=old_total,
            new_total=schedule.total,
        )  # fmt: skip
        if done < old_total:
            log.info(
                "training longer: the rest of the learning-rate schedule (scheduler steps "
                "%d-%d) is stretched over steps %d-%d",
                done,
                old_total,
                done,
                schedule.total,
            )

    def close(self) -> None:
        """Let go of the run directory (another process may write it from now on)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None
