"""The composition root: a config becomes a built run, handed to the trainer.

:func:`build_trainer` is the one place where a run is put together — the process group, the
device, the components (:mod:`dltemplate.engine.build`), the callbacks in their order, the
checkpoint to resume, the data and loaders, the schedule, the run's saved state, the model's
wrappers and the run directory — before the loop (:class:`~dltemplate.engine.trainer.TrainerBase`)
is given the built objects. The loop never builds its observers; callbacks never see this module.

``experiment.trainer`` names a :class:`TrainerBase` subclass as ``package.module:Class`` (None:
``TrainerBase`` itself). Evaluation uses that class's ``evaluator_class`` attribute (default
:class:`EvaluatorBase`), so a trainer that changes the loop can bring its own evaluator.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dltemplate.atomic import atomic_write_text
from dltemplate.callbacks import build_callbacks
from dltemplate.callbacks.sweep_trial import SweepTrial
from dltemplate.config import Config, config_from_dict, config_to_dict
from dltemplate.config.loader import apply_overrides, refuse_resplit
from dltemplate.config.trust import refuse_untrusted_code
from dltemplate.data.base import DataSplits, TensorSplit
from dltemplate.engine import distributed as D
from dltemplate.engine.build import build_components, build_loaders, build_schedule
from dltemplate.engine.checkpoint import keep_for_next_load, load_checkpoint
from dltemplate.engine.device import select_device
from dltemplate.engine.evaluator import EvaluatorBase, resolve_eval_target
from dltemplate.engine.loop_state import BestScore, LoopState
from dltemplate.engine.meters import AverageMeter
from dltemplate.engine.restarts import remember_run_dir
from dltemplate.engine.run_state import (
    ResumePoint,
    RunState,
    find_resume_point,
    finished_note,
    refuse_fewer_epochs_than_done,
    refuse_restored_changes,
    restart_dir,
)
from dltemplate.engine.rundir import (
    RunLock,
    check_output_dir,
    new_run_dir,
    refuse_links,
    remove_stale_temp_files,
    save_config,
    update_saved_config,
)
from dltemplate.engine.runlog import attach_log_file, rerun_command, setup_logging
from dltemplate.engine.seeding import rank_seed, seed_everything
from dltemplate.engine.speed import (
    apply_backends,
    check_speed_config,
    is_channels_last,
    place_data,
    speed_summary,
)
from dltemplate.engine.stopping import BoundarySnapshot
from dltemplate.engine.task import Task, import_plugins, make_task
from dltemplate.engine.threads import apply_threads
from dltemplate.engine.trainer import RunParts, TrainerBase
from dltemplate.errors import ConfigError
from dltemplate.registry import (
    CALLBACKS,
    DATASETS,
    LOSSES,
    METRICS,
    MODELS,
    OPTIMIZERS,
    SCHEDULERS,
    TASKS,
    import_path,
    refuse_objects_not_given,
)

log = logging.getLogger("dltemplate")

KEY = "experiment.trainer"


class FinishedRun:
    """What :func:`build_trainer` gives for a run that is already complete: ``fit()`` says so
    and returns its saved test metrics; nothing is trained or written."""

    def __init__(self, run_dir: Path, note: str) -> None:
        self.run_dir, self.note = run_dir, note

    def fit(self) -> dict[str, float]:
        """Say that the run is finished; return the test metrics it saved."""
        log.info("%s", self.note)
        D.shutdown_distributed()
        path = self.run_dir / "test_metrics.json"
        return json.loads(path.read_text()) if path.exists() else {}


def build_trainer(cfg: Config, task: Task | None = None) -> TrainerBase | FinishedRun:
    """Build the run ``cfg`` describes and return its trainer (of the class
    ``experiment.trainer`` names), ready to :meth:`~TrainerBase.fit`; or, for a resume of a
    finished run, a :class:`FinishedRun`.

    Everything that can be wrong with the config, the checkpoint to resume or the data fails
    here, before any file is written.
    """
    import_plugins(cfg)
    cls = trainer_class(cfg)
    tc = cfg.trainer
    task = task or make_task(cfg)
    epochs = 1 if tc.fast_dev_run > 0 else tc.epochs
    want_cuda = cfg.experiment.device.startswith(("auto", "cuda")) and torch.cuda.is_available()
    dist = D.init_distributed(use_cuda=want_cuda)
    setup_logging(None, dist.is_main)  # the file joins once the run directory exists
    local_rank = dist.local_rank if dist.enabled else None
    device, dp_ids = select_device(cfg.experiment.device, cfg.experiment.gpu_devices, local_rank)
    check_speed_config(cfg, device)
    threads = apply_threads(cfg.experiment.threads, dist.enabled)
    seed_everything(cfg.experiment.seed, cfg.experiment.deterministic)

    # What needs no data: a wrong config, callback argument or checkpoint fails here.
    sync_bn = tc.sync_batchnorm and dist.enabled
    parts = build_components(cfg, task, device, sync_batchnorm=sync_bn)
    callbacks = build_callbacks(cfg, added=[t for t in [SweepTrial.from_env()] if t is not None])
    for setup in callbacks.setup:
        setup(cfg, parts.model)
    restarted = restart_dir(cfg, dist)  # may set trainer.resume (a torchrun restart)
    point = None
    if tc.resume:
        point = find_resume_point(tc.resume, parts.model, dist.is_main, parts.info.class_names)
    if point is not None:  # the run's split is its own: no override may re-split its data
        refuse_resplit(point.state["config"], config_to_dict(cfg), str(point.path))
        refuse_restored_changes(point, config_to_dict(cfg))
    reopened = point.run_dir if point is not None else restarted
    if reopened is not None:  # a directory someone may have tampered with: before any word
        refuse_links(reopened)
    if point is not None and (note := finished_note(point, epochs, callbacks)) is not None:
        return FinishedRun(point.run_dir, note)  # nothing to do, nothing to write
    if point is not None:
        refuse_fewer_epochs_than_done(point, epochs)
    if point is None and dist.is_main:  # before a long first decode of the data
        check_output_dir(cfg.experiment.output_dir)

    # Rank 0 loads first, so that files are downloaded and decode caches written once.
    if not dist.is_main:
        D.barrier()
    data = task.load_data()
    if dist.is_main and dist.enabled:
        D.barrier()
    data = place_data(cfg.data.device, data, device)  # small in-memory data: on the GPU
    fast = apply_backends(cfg, device, fixed_shapes=isinstance(data.train, TensorSplit))
    train_loader, val_loader, test_loader = build_loaders(cfg, data, dist.rank, dist.world_size)
    schedule = build_schedule(cfg, parts.model, epochs, len(train_loader))
    # Each process draws its own random numbers (dropout, augmentation), seeded from the seed
    # and its rank; the model was built before, from the same seed on every rank.
    if dist.rank > 0:
        seed_everything(rank_seed(cfg.experiment.seed, dist.rank))

    state = LoopState(epochs, best=BestScore(tc.monitor_mode, tc.early_stopping_min_delta))
    train_metrics, train_meter = parts.train_metrics(), AverageMeter()
    snapshot = BoundarySnapshot(parts.model)
    run_state = RunState(
        cfg=cfg,
        model=parts.model,
        schedule=schedule,
        precision=parts.precision,
        loop=state,
        train_totals=lambda: train_meter.state() + train_metrics.state(),
        snapshot=snapshot,
        callbacks=callbacks,
        dist=dist,
        write=tc.fast_dev_run == 0,
        class_names=parts.info.class_names,
    )
    if point is not None:
        run_state.load_state_dict(point)
    snapshot.take_all()  # the first boundary: as built, or as restored
    train_model, eval_model = wrap_model(cfg, parts.model, dp_ids, dist, device)
    run_dir, run_state.lock = open_run_dir(cfg, dist, point, restarted)
    run_state.run_dir = run_dir
    if dist.is_main:
        log_run(cfg, dist, device, threads, parts.model, data, point is None, run_dir)
        if device.type == "cuda":
            fast["channels_last"] = is_channels_last(parts.model)
            # the param groups, not the defaults: a resume takes the checkpoint's setting
            fast["fused_optimizer"] = bool(schedule.optimizer.param_groups[0].get("fused"))
            log.info("GPU settings: %s", speed_summary(fast))
    return cls(
        cfg,
        RunParts(
            task=task,
            info=parts.info,
            model=parts.model,
            train_model=train_model,
            eval_model=eval_model,
            criterion=parts.criterion,
            precision=parts.precision,
            evaluation=parts.evaluation,
            train_metrics=train_metrics,
            train_meter=train_meter,
            data=data,
            train_loader=train_loader,
            val_loader=val_loader,
            test_loader=test_loader,
            schedule=schedule,
            callbacks=callbacks,
            state=state,
            run_state=run_state,
            snapshot=snapshot,
            dist=dist,
            device=device,
            run_dir=run_dir,
        ),
    )


def wrap_model(
    cfg: Config, model: nn.Module, dp_ids: list[int], dist: D.DistContext, device: torch.device
) -> tuple[nn.Module, nn.Module]:
    """(model for training, model for evaluation): compiled, DataParallel, DDP as asked. The
    wrappers share the bare model's parameters; checkpoints always hold the bare model's."""
    wrapped: nn.Module = model
    if cfg.trainer.compile:
        wrapped = torch.compile(wrapped)  # type: ignore[assignment]
    if dp_ids:
        wrapped = nn.DataParallel(wrapped, device_ids=dp_ids)
    if dist.enabled:
        ids = [device.index] if device.type == "cuda" else None
        # Evaluation uses the model without DDP: DDP's forward would need every rank in lockstep.
        return DistributedDataParallel(wrapped, device_ids=ids), wrapped
    return wrapped, wrapped


def open_run_dir(
    cfg: Config, dist: D.DistContext, point: ResumePoint | None, restarted: Path | None
) -> tuple[Path, RunLock | None]:
    """Create (rank 0) or reopen the run directory and take its lock (rank 0: the one writer);
    log to it; save or update the config."""
    output_dir = cfg.experiment.output_dir
    if point is not None:
        run_dir = point.run_dir
    elif restarted is not None:  # killed (or torchrun restarted us) before any checkpoint
        run_dir = restarted
    else:
        made = new_run_dir(output_dir, cfg.experiment.run_name) if dist.is_main else None
        run_dir = Path(D.broadcast_object(str(made) if made else None))
    if not dist.is_main:
        return run_dir, None
    lock = RunLock(run_dir)
    lock.acquire()  # before anything is written: a second writer is refused here
    remove_stale_temp_files(run_dir)  # a killed writer's leftovers
    attach_log_file(run_dir / "train.log")
    if point is None:
        save_config(run_dir, cfg.experiment.name, config_to_dict(cfg))
        remember_run_dir(output_dir, run_dir)
        if restarted is None:
            log.info("run %s started: %s", run_dir.name, run_dir)
        else:
            log.info("run %s had no checkpoint yet: started over in %s", run_dir.name, run_dir)
    else:
        state = point.state
        cause = f" (stopped by {state['interrupted_by']})" if "interrupted_by" in state else ""
        epoch, step = state["epoch"], state["global_step"]
        at = f"at epoch {epoch + 1}, step {step}"
        if epoch >= cfg.trainer.epochs:  # "epoch 3" of a 2-epoch run would read as a 3rd one
            at = f"with training complete ({epoch} epochs, step {step})"
        log.info("run %s resumed from %s%s %s", run_dir.name, point.path, cause, at)
        changed = update_saved_config(run_dir, config_to_dict(cfg))
        if changed:
            log.info("config changed on resume: %s", "; ".join(changed))
    return run_dir, lock


def log_run(
    cfg: Config,
    dist: D.DistContext,
    device: torch.device,
    threads: int,
    model: nn.Module,
    data: DataSplits,
    new: bool,
    run_dir: Path,
) -> None:
    """The run's first lines: the command, device, model and data; a new run's split.json."""
    log.info("command: %s", rerun_command())
    log.info(
        "device %s x %d process(es), %d CPU thread(s) each; model %s (%d parameters); "
        "train %d, val %d, test %d samples",
        device,
        dist.world_size,
        threads,
        cfg.model.name,
        sum(p.numel() for p in model.parameters()),
        len(data.train),
        len(data.val),
        len(data.test),
    )
    for note in data.notes:
        log.info("data: %s", note)
    groups = data.group_record()
    if groups is not None and new:
        atomic_write_text(run_dir / "split.json", json.dumps(groups, indent=1))


# == which classes a config names ================================================================
def trainer_class(cfg: Config) -> type[TrainerBase]:
    """The class ``experiment.trainer`` names (a ConfigError naming the key if it is not a
    ``package.module:Class`` path to a :class:`TrainerBase` subclass)."""
    path = cfg.experiment.trainer
    if path is None:
        return TrainerBase
    if ":" not in path:
        raise ConfigError(
            f"{KEY}={path!r}: expected package.module:Class (a subclass of "
            "dltemplate.engine.trainer.TrainerBase), or null for TrainerBase"
        )
    cls = import_path(path, KEY)
    if not (isinstance(cls, type) and issubclass(cls, TrainerBase)):
        raise ConfigError(
            f"{KEY}={path!r}: {cls!r} is not a subclass of dltemplate.engine.trainer.TrainerBase"
        )
    return cls


def evaluator_class(cfg: Config) -> type[EvaluatorBase]:
    """The evaluator of ``cfg``'s trainer: its ``evaluator_class`` (default EvaluatorBase)."""
    cls = getattr(trainer_class(cfg), "evaluator_class", EvaluatorBase)
    if not (isinstance(cls, type) and issubclass(cls, EvaluatorBase)):
        raise ConfigError(
            f"{KEY}={cfg.experiment.trainer!r}: its evaluator_class {cls!r} is not a subclass "
            "of dltemplate.engine.evaluator.EvaluatorBase"
        )
    return cls


def validate_names(cfg: Config) -> None:
    """Check every registry name and class path in ``cfg`` before any work starts (a
    ConfigError naming the key, with a "did you mean", if one is unknown)."""
    import_plugins(cfg)
    TASKS.get(cfg.experiment.task, "experiment.task")
    evaluator_class(cfg)  # the trainer class, and the evaluator it brings
    DATASETS.get(cfg.data.name, "data.name")
    MODELS.get(cfg.model.name, "model.name")
    LOSSES.get(cfg.loss.name, "loss.name")
    OPTIMIZERS.get(cfg.optimizer.name, "optimizer.name")
    SCHEDULERS.get(cfg.scheduler.name, "scheduler.name")
    for name in cfg.trainer.metrics:
        METRICS.get(name, "trainer.metrics")
    for i, item in enumerate(cfg.callbacks):
        CALLBACKS.get(item.name, f"callbacks[{i}].name")


def build_evaluator(
    target: str | Path, overrides: list[str] | None = None, trust_code: bool = False
) -> EvaluatorBase:
    """The evaluator of a run directory (its best, else last, checkpoint) or a checkpoint file,
    of the class its saved config's trainer names. The checkpoint is read once.

    The saved config may name only registered components unless ``trust_code`` (see
    :mod:`dltemplate.config.trust`); ``overrides`` are the caller's own and not checked.
    """
    path = resolve_eval_target(target)
    state = load_checkpoint(path)
    refuse_untrusted_code(state["config"], str(path), trust_code)
    raw = apply_overrides(copy.deepcopy(state["config"]), list(overrides or []))
    refuse_objects_not_given(raw, f"{path} (saved config)")  # eval RUN of objects given in code
    refuse_resplit(state["config"], raw, f"{path} (saved config)")
    cfg = config_from_dict(raw, f"{path} (saved config)")
    import_plugins(cfg)
    cls = evaluator_class(cfg)
    keep_for_next_load(path, state)
    return cls(path, overrides)
