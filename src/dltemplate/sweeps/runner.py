"""Running a sweep: trials as ordinary runs in subprocesses, coordinated through Optuna's study.

The sweep directory ``<output_dir>/<name>/`` holds ``sweep.yaml`` (the checked sweep file),
``base.json`` (the base config its trials share, as first started), the study
(``study.journal``, unless ``--storage`` names a database), ``trials/<NNNN>/`` (each trial's
``experiment.output_dir``: one ordinary run directory, and ``trial.log``, what the trial
printed), ``trials.csv``, ``best.yaml`` and the pictures.

**What survives what.** A trial is a ``dltemplate train`` (or ``resume``) subprocess in a
session of its own; its outcome is told to the study only when it ends: finished (its best
objective), pruned, or failed (with its one-line reason; the sweep goes on). While a trial
runs, the coordinator holds a lock on its folder (``trials/<NNNN>/.lock``, which the system
drops when the holder dies). A sweep stopped by Ctrl-C, SIGTERM or a cluster's notice passes the
signal to its trials, which stop at a step boundary with their checkpoints, and leaves them
RUNNING in the study. ``dltemplate sweep SWEEP_DIR`` then takes every RUNNING trial whose lock
it can take (its coordinator is gone: stopped, SIGKILLed, preempted) and *resumes* its run
directory exactly (or, if the trial had not started its run yet, starts it), waits for trials a
dead coordinator left running on their own, and asks new trials until the sweep has as many as
asked. Several coordinators (a SLURM job array, machines sharing a database) share one study the
same way: new trials are asked under a lock on the sweep directory, so the count is exact.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dltemplate.atomic import atomic_write_text
from dltemplate.config import config_to_dict
from dltemplate.config.loader import UNNAMED_KEYS
from dltemplate.engine.checkpoint import load_checkpoint
from dltemplate.engine.rundir import MetricsTable, RunLock, best_epoch, read_saved_config
from dltemplate.engine.stopping import RunStopped
from dltemplate.engine.threads import available_cores
from dltemplate.errors import CheckpointError, ConfigError, DataError, UsageError, short_repr
from dltemplate.sweeps import report
from dltemplate.sweeps.spec import (
    SweepSpec,
    base_config,
    decode_params,
    direction,
    load_sweep,
    objective,
    param_override,
    stored_choices,
    sweep_from_dict,
)
from dltemplate.sweeps.study import (
    JOURNAL,
    TRIAL_ENV,
    grid_size,
    make_pruner,
    make_sampler,
    open_storage,
    storage_url,
    trial_seed,
)
from dltemplate.tools.compare_configs import flatten

log = logging.getLogger("dltemplate")

SPEC_FILE = "sweep.yaml"
BASE_FILE = "base.json"  # the base config and overrides every trial shares, as first started
STORAGE_FILE = "storage.txt"  # the storage URL a sweep was started with (--storage)
NO_REQUEUE = "DLTEMPLATE_NO_REQUEUE"  # a trial never requeues the job: its sweep does


@dataclass
class Job:
    """One trial to run now: new, or taken over from a coordinator that is gone."""

    number: int
    params: dict[str, Any]
    folder: Path
    lock: RunLock


class Sweep:
    """A sweep directory and its study; :meth:`run` runs trials until the sweep has its count."""

    def __init__(self, spec: SweepSpec, folder: Path, storage: str, keep: bool = False) -> None:
        self.spec, self.folder, self.storage = spec, folder, storage
        self._keep_storage = keep  # a --storage: kept in STORAGE_FILE for later continues
        self.objective, self.direction = objective(spec), direction(spec)
        self.stop_signal: str | None = None
        self._children: set[subprocess.Popen] = set()
        self._lock = threading.Lock()
        self._tracker: dict[str, str] = {}
        self.study: Any = None

    # == opening ==================================================================================
    @classmethod
    def open(
        cls,
        target: str | Path,
        trials: int | None = None,
        jobs: int | None = None,
        storage: str | None = None,
    ) -> Sweep:
        """The sweep a file describes (created, or continued if its directory exists with the
        same settings), or the one in a sweep directory; ``trials``/``jobs`` override the file's."""
        target = Path(target)
        if target.is_dir():
            saved = target / SPEC_FILE
            if not saved.is_file():
                raise UsageError(f"{target}: not a sweep directory (no {SPEC_FILE})")
            raw = yaml.safe_load(saved.read_text())
            spec = sweep_from_dict(raw, str(saved), relative_to=target)
            folder = target
        else:
            spec = load_sweep(target)
            folder = Path(spec.output_dir) / spec.name
            saved = folder / SPEC_FILE
            if saved.is_file():
                before = yaml.safe_load(saved.read_text())
                now = spec.to_dict()
                differ = [k for k in now if k not in ("trials", "jobs") and before.get(k) != now[k]]
                if differ:
                    raise ConfigError(
                        f"{target}: a sweep named {spec.name!r} already lives in {folder} with "
                        f"other settings ({', '.join(differ)}); continue it with dltemplate "
                        "sweep " + f"{folder}, or give this one another name"
                    )
        spec.trials = trials if trials is not None else spec.trials
        spec.jobs = jobs if jobs is not None else spec.jobs
        if spec.trials < 1 or spec.jobs < 1:
            raise UsageError("--trials and --jobs must be at least 1")
        base = _shared_base(spec, folder, str(target))
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / SPEC_FILE, yaml.safe_dump(spec.to_dict(), sort_keys=False))
        if not (folder / BASE_FILE).is_file():
            atomic_write_text(folder / BASE_FILE, json.dumps(base, indent=1) + "\n")
        kept = folder / STORAGE_FILE
        if storage is None and kept.is_file():
            storage = kept.read_text().strip() or None
        url = storage_url(folder, storage)  # kept in STORAGE_FILE once connect() accepts it
        return cls(spec, folder.resolve(), url, keep=storage is not None)

    def tracker_env(self) -> dict[str, str]:
        """When the base config uses the ``mlflow`` callback: one store for the whole sweep (the
        callback's ``tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else ``<sweep>/mlflow.db``)
        and a parent run, in the callback's ``experiment`` (default ``experiment.name``), that
        every trial's MLflow run is nested under (kept in ``<sweep>/mlflow_parent.txt``). A
        store that cannot be reached or an experiment that is deleted is a ConfigError."""
        cfg = base_config(self.spec, "sweep")
        item = next((c for c in cfg.callbacks if c.name == "mlflow" and c.enabled), None)
        if item is None:
            return {}
        from mlflow.tracking import MlflowClient  # only for sweeps that track

        args = item.args or {}
        given = args.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI")
        uri = given or f"sqlite:///{self.folder / 'mlflow.db'}"
        kept = self.folder / "mlflow_parent.txt"
        if kept.is_file():
            parent = kept.read_text().strip()
        else:
            name = args.get("experiment") or cfg.experiment.name
            try:
                client = MlflowClient(uri)
                found = client.get_experiment_by_name(name)
                if found is not None and found.lifecycle_stage == "deleted":
                    raise ConfigError(
                        f"callback 'mlflow': experiment '{name}' is deleted in {uri}: restore it "
                        "(mlflow experiments restore) or give another args.experiment"
                    )
                where = None if given else (self.folder / ".mlartifacts").as_uri()
                experiment = found.experiment_id if found else client.create_experiment(name, where)
                run = client.create_run(experiment, run_name=f"sweep {self.spec.name}",
                                        tags={"dltemplate.sweep": str(self.folder)})  # fmt: skip
            except ConfigError:
                raise
            except Exception as exc:  # as the callback says it: before any trial
                said = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
                raise ConfigError(f"callback 'mlflow': tracking store {uri}: {said}") from exc
            parent = run.info.run_id
            atomic_write_text(kept, parent + "\n")
        return {"MLFLOW_TRACKING_URI": uri, "DLTEMPLATE_MLFLOW_PARENT": parent}

    def connect(self) -> Any:
        """Create or load the study."""
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.study = optuna.create_study(
            study_name=self.spec.name,
            storage=open_storage(self.storage),
            sampler=make_sampler(self.spec.sampler, self.spec.seed, self.spec.params),
            pruner=make_pruner(self.spec.pruner, self.spec.pruner_args),
            direction=self.direction,
            load_if_exists=True,
        )
        with _FolderLock(self.folder / ".ask.lock"):  # no trial is asked meanwhile
            self._check_study()
        if self._keep_storage:
            atomic_write_text(self.folder / STORAGE_FILE, self.storage + "\n")
        return self.study

    def _check_study(self) -> None:
        """A UsageError if a trial folder holds a run the study has no trial for: the study is
        not this directory's (another ``--storage``, or the journal removed), and its new trials
        would take those folders' runs for their own results."""
        known = len(self.study.get_trials(deepcopy=False))
        trials = self.folder / "trials"
        for folder in sorted(trials.iterdir()) if trials.is_dir() else []:
            if folder.name.isdigit() and int(folder.name) >= known and trial_run_dir(folder):
                raise UsageError(
                    f"{self.folder}: trials/{folder.name} holds a run, but the study in "
                    f"{self.storage} has {known} trial(s): it is not this sweep's study (another "
                    f"--storage, or {JOURNAL} removed?); continue with the storage the sweep "
                    "started with"
                )

    # == running ==================================================================================
    def run(self) -> None:
        """Run trials (``jobs`` at once) until the study holds :meth:`planned` of them, none left
        running; then write the results. A signal stops the trials at a step boundary and
        raises :class:`RunStopped` once they have stopped (continue with ``dltemplate sweep``)."""
        self.connect()
        self._tracker = self.tracker_env()  # (a store that refuses: said before any word)
        planned = self.planned()
        grid = f" (the grid's points; trials: {self.spec.trials})"
        log.info(
            "sweep %s: %d trial(s)%s, %d at once, %s %s; in %s",
            self.spec.name,
            planned,
            grid if planned < self.spec.trials else "",
            self.spec.jobs,
            self.direction,
            self.objective,
            self.folder,
        )
        previous = self._catch_signals()
        try:
            workers = [
                threading.Thread(target=self._work, args=(slot,), name=f"sweep-slot-{slot}")
                for slot in range(self.spec.jobs)
            ]
            for worker in workers:
                worker.start()
            while any(w.is_alive() for w in workers):
                for worker in workers:
                    worker.join(timeout=0.2)  # wake for signals
            # What stopped the trials, if anything; a signal from now on (a cluster's notice as
            # the job ends) finds them all over and is let pass, rather than killing the sweep
            # while it writes its table (its handlers are still ours) or requeueing it for nothing.
            # Ctrl-C is the user's again: it may interrupt a tracking server that does not answer.
            stopped = self.stop_signal
            if signal.SIGINT in previous:
                signal.signal(signal.SIGINT, previous.pop(signal.SIGINT))
            report.write(self)
            if stopped is None:
                report.summary(self)
                if self._tracker and not self._pending():  # the parent run is complete too
                    from mlflow.tracking import MlflowClient

                    uri, parent = (
                        self._tracker["MLFLOW_TRACKING_URI"],
                        self._tracker["DLTEMPLATE_MLFLOW_PARENT"],
                    )
                    MlflowClient(uri).set_terminated(parent, "FINISHED")
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if stopped is not None:
            raise RunStopped(stopped, at_boundary=True)

    def _pending(self) -> bool:
        """Whether trials are still running (other coordinators of the same sweep)."""
        from optuna.trial import TrialState

        return any(t.state == TrialState.RUNNING for t in self.study.get_trials(deepcopy=False))

    def _catch_signals(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}
        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
            previous[sig] = signal.signal(sig, self._on_signal)
        return previous

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.stop_signal = self.stop_signal or signal.Signals(signum).name
        for child in list(self._children):  # the trials run in sessions of their own: pass it on
            if child.poll() is None:
                child.send_signal(signum)

    def _work(self, slot: int) -> None:
        while self.stop_signal is None:
            job = self._next_job()
            if job is None:
                return
            try:
                self._run_job(job, slot)
            finally:
                job.lock.release()

    def _next_job(self) -> Job | None:
        """Under the sweep's lock: a RUNNING trial nobody holds (its coordinator is gone), else a
        new trial while the study has fewer than ``trials``, else None."""
        from optuna.trial import TrialState

        with self._lock, _FolderLock(self.folder / ".ask.lock"):
            trials = self.study.get_trials(deepcopy=False)
            for trial in trials:
                if trial.state != TrialState.RUNNING:
                    continue
                folder = self.trial_folder(trial.number)
                lock = RunLock(folder)
                folder.mkdir(parents=True, exist_ok=True)
                try:
                    lock.acquire()
                except UsageError:
                    continue  # a live coordinator runs it
                return Job(trial.number, decode_params(self.spec, trial.params), folder, lock)
            if len(trials) >= self.planned():
                return None
            if self.spec.sampler != "grid":  # (a grid's seed orders its points: kept)
                seed = trial_seed(self.spec.seed, len(trials))  # len: the number ask() gives
                self.study.sampler = make_sampler(self.spec.sampler, seed, self.spec.params)
            trial = self.study.ask()
            params = {key: _suggest(trial, key, spec) for key, spec in self.spec.params.items()}
            folder = self.trial_folder(trial.number)
            folder.mkdir(parents=True, exist_ok=True)
            trial.set_user_attr("folder", str(folder))
            lock = RunLock(folder)
            lock.acquire()
            return Job(trial.number, params, folder, lock)

    def planned(self) -> int:
        """The trials the sweep runs in all: ``trials``, or fewer for a smaller grid (each
        point of a grid once)."""
        if self.spec.sampler == "grid":
            return min(self.spec.trials, grid_size(self.spec.params))
        return self.spec.trials

    def trial_folder(self, number: int) -> Path:
        """``trials/<NNNN>``: the trial's ``experiment.output_dir``."""
        return self.folder / "trials" / f"{number:04d}"

    def _run_job(self, job: Job, slot: int) -> None:
        run = trial_run_dir(job.folder)
        if run is not None and not self._wait_until_free(run):
            return  # stopped while a stray trial process still wrote its run
        if run is not None and _finished(run):
            self._tell(job, 0, "")  # its run ended while its coordinator was gone
            return
        overrides = [param_override(k, v) for k, v in job.params.items()]
        if run is None:
            where = [f"experiment.output_dir={job.folder}"]
            chosen = base_config(self.spec, "sweep").experiment.threads is not None
            if not chosen and "experiment.threads" not in job.params:  # else the user's count
                threads = max(1, available_cores() // self.spec.jobs)
                where.append(f"experiment.threads={threads}")
            command = ["train", self.spec.base, *self.spec.overrides, *overrides, *where]
            log.info("sweep: trial %d starts: %s", job.number, " ".join(overrides))
        else:
            # the sweep's own config: as trusted as when the sweep started it (train trusts)
            command = ["resume", str(run), "--trust-code"]
            log.info("sweep: trial %d resumes %s", job.number, run)
        env = {**os.environ, NO_REQUEUE: "1", TRIAL_ENV: json.dumps(self._trial_env(job))}
        env.update(_devices(slot, self.spec.jobs))
        env.update(self._tracker)
        with open(job.folder / "trial.log", "a", encoding="utf-8") as out:
            child = subprocess.Popen(
                [sys.executable, "-m", "dltemplate", *command],
                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )  # fmt: skip
            self._children.add(child)
            try:
                code = child.wait()
            finally:
                self._children.discard(child)
        self._tell(job, code, (job.folder / "trial.log").read_text(errors="replace"))

    def _wait_until_free(self, run: Path) -> bool:
        """Wait while a process still writes ``run`` (a trial its dead coordinator left running
        on its own holds the run directory's lock); False if the sweep is stopped meanwhile."""
        while self.stop_signal is None:
            lock = RunLock(run)
            try:
                lock.acquire()
            except UsageError:
                time.sleep(0.5)
                continue
            lock.release()
            return True
        return False

    def _trial_env(self, job: Job) -> dict[str, Any]:
        trial_id = self.study.get_trials(deepcopy=False)[job.number]._trial_id
        return {
            "storage": self.storage,
            "study": self.spec.name,
            "trial_id": trial_id,
            "objective": self.objective,
            "pruner": self.spec.pruner,
            "pruner_args": self.spec.pruner_args,
        }

    def _tell(self, job: Job, code: int, said: str) -> None:
        """Record how the trial ended: its value, pruned, or failed with its reason; a trial
        stopped by a signal stays RUNNING (a continued sweep resumes it)."""
        from optuna.trial import TrialState

        if code in (130, 75) or (code < 0 and self.stop_signal is not None):
            log.info("sweep: trial %d stopped (exit %d): it resumes when the sweep goes on",
                     job.number, code)  # fmt: skip
            return
        run = trial_run_dir(job.folder)
        with self._lock:
            if run is not None:  # a failed trial's run too: where to read why
                self._attr(job, "run_dir", str(run))
            if code != 0 or run is None:
                self._fail(job, _reason(code, said))
                return
            try:
                value, pruned = trial_outcome(run, self.objective, self.direction)
            except (CheckpointError, DataError, OSError, ValueError) as exc:
                self._fail(job, str(exc))
                return
            if pruned:
                self.study.tell(job.number, state=TrialState.PRUNED)
                log.info("sweep: trial %d pruned", job.number)
            else:
                self.study.tell(job.number, value)
                log.info("sweep: trial %d finished: %s %.6g", job.number, self.objective, value)
            report.write(self)

    def _attr(self, job: Job, key: str, value: Any) -> None:
        import optuna

        trial_id = self.study.get_trials(deepcopy=False)[job.number]._trial_id
        optuna.trial.Trial(self.study, trial_id).set_user_attr(key, value)

    def _fail(self, job: Job, reason: str) -> None:
        from optuna.trial import TrialState

        self._attr(job, "reason", reason)
        self.study.tell(job.number, state=TrialState.FAIL)
        log.warning("sweep: trial %d failed: %s", job.number, reason)
        report.write(self)


def _shared_base(spec: SweepSpec, folder: Path, source: str) -> dict[str, Any]:
    """The base config with the sweep's overrides, flattened to ``section.key`` (the searched
    keys, and those that say where or how a run goes, left out): what every trial shares. A
    ConfigError if it differs from the one the sweep started with (kept in ``BASE_FILE``): a
    base edited between two continues would mix trials of two configs, and best.yaml would
    not reproduce the best."""
    flat = flatten(config_to_dict(base_config(spec, source)))
    shared = {k: v for k, v in flat.items() if k not in UNNAMED_KEYS and k not in spec.params}
    now = json.loads(json.dumps(shared))
    kept = folder / BASE_FILE
    if kept.is_file():
        before, gone = json.loads(kept.read_text(encoding="utf-8")), "<absent>"
        changed = [k for k in sorted({*before, *now}) if before.get(k, gone) != now.get(k, gone)]
        if changed:
            shown = [f"{k}: {short_repr(before.get(k, gone))} -> {short_repr(now.get(k, gone))}"
                     for k in changed[:3]]  # fmt: skip
            raise ConfigError(
                f"{source}: the base config {spec.base} changed since sweep {spec.name!r} "
                f"started ({', '.join(shown)}{', ...' if len(changed) > 3 else ''}): its trials "
                f"would not compare; restore it ({kept} holds the one the trials share), or "
                "start a sweep of another name"
            )
    return now


def _suggest(trial: Any, key: str, spec: Any) -> Any:
    if spec.type == "categorical":
        return decode_params_one(spec, trial.suggest_categorical(key, stored_choices(spec)))
    if spec.type == "int":
        step = int(spec.step) if spec.step is not None else 1
        return trial.suggest_int(key, int(spec.low), int(spec.high), step=step, log=spec.log)
    return trial.suggest_float(key, spec.low, spec.high, step=spec.step, log=spec.log)


def decode_params_one(param: Any, value: Any) -> Any:
    """One categorical value as the config takes it (see :func:`stored_choices`)."""
    stored = stored_choices(param)
    return param.choices[stored.index(value)] if value in stored else value


def _devices(slot: int, jobs: int) -> dict[str, str]:
    """With as many GPUs as jobs or more, each job slot gets its own."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [d for d in (visible.split(",") if visible else []) if d.strip()]
    if not ids and shutil.which("nvidia-smi"):
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
        ids = [str(i) for i, line in enumerate(listed.stdout.splitlines()) if line.strip()]
    if len(ids) < jobs or jobs == 1:
        return {}
    share = len(ids) // jobs
    return {"CUDA_VISIBLE_DEVICES": ",".join(ids[slot * share : (slot + 1) * share])}


def _reason(code: int, said: str) -> str:
    """A failed trial's one-line reason: its error line, else its last line and exit status."""
    lines = [line for line in said.strip().splitlines() if line.strip()]
    errors = [line for line in lines if "dltemplate: error:" in line or "Error" in line]
    picked = (errors or lines or [""])[-1].strip()
    if code < 0:
        return f"killed by {signal.Signals(-code).name} (out of memory?)" + (
            f": {picked}" if picked else ""
        )
    return picked or f"exit status {code}"


def trial_run_dir(folder: Path) -> Path | None:
    """The run directory under a trial's folder, if its run has started."""
    runs = sorted(p.parent for p in Path(folder).glob("*/config_*.json"))
    return runs[-1] if runs else None


def _finished(run: Path) -> bool:
    last = sorted(run.glob("*_last_ckpt.pth"))
    if not last:
        return False
    try:
        return bool(load_checkpoint(last[0]).get("finished"))
    except CheckpointError:
        return False


def trial_outcome(run: Path, column: str, direction: str) -> tuple[float, bool]:
    """A finished trial's objective and whether the sweep's pruner ended it. The objective is
    the best value of ``column`` over its epochs; when ``column`` is the run's
    ``trainer.monitor``, the run's own best epoch's (the epoch its best checkpoint holds, which
    ``early_stopping_min_delta`` may keep over a slightly better later one)."""
    rows = MetricsTable.read(run / "metrics.csv") if (run / "metrics.csv").exists() else []
    rows = [
        r for r in rows if r.get(column) not in (None, "") and float(r[column]) == float(r[column])
    ]
    if not rows:  # (NaN is no result)
        raise ValueError(f"{run}: no {column} in its metrics.csv")
    values = [float(r[column]) for r in rows]
    best = max(values) if direction == "maximize" else min(values)
    trainer = read_saved_config(run)[0].get("trainer", {})
    if column == trainer.get("monitor"):
        mode, delta = trainer.get("monitor_mode", "max"), trainer.get("early_stopping_min_delta")
        epoch = best_epoch(rows, column, mode, float(delta or 0.0))
        best = next(float(r[column]) for r in rows if int(float(r["epoch"])) == epoch)
    pruned = False
    last = sorted(run.glob("*_last_ckpt.pth"))
    if last:
        pruned = load_checkpoint(last[0]).get("stopped_by") == "SweepTrial"
    return best, pruned


class _FolderLock:
    """An exclusive ``flock`` held for a ``with`` block (waits for other coordinators)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def __enter__(self) -> _FolderLock:
        import fcntl

        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def run_sweep(
    target: str | Path,
    trials: int | None = None,
    jobs: int | None = None,
    storage: str | None = None,
) -> Sweep:
    """Open the sweep ``target`` names (a sweep file or directory) and run it."""
    sweep = Sweep.open(target, trials, jobs, storage)
    sweep.run()
    return sweep
