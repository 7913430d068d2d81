"""``dltemplate runs [DIR ...]``: one row per run directory, read from the files it holds.

A *run directory* is a folder holding a ``config_*.json``. Each DIR is searched itself and up
to :data:`MAX_DEPTH` folder levels below it (hidden folders and symbolic links are skipped,
and nothing below a run directory is searched): ``Results/``, one experiment's output folder,
a sweep folder of trial runs, or a single run directory all work.

**Status** — decided in this order, from the files alone:

1. ``running``: a process holds the run's lock. ``<run>/.lock`` is an advisory
   ``fcntl.flock`` that the writing process holds for as long as it writes the run (the kernel
   drops it when that process dies, however it dies); the table tries a shared, non-blocking
   ``flock(LOCK_SH | LOCK_NB)`` on it and lets go at once. When that is refused, the run is
   running, and the note names the holder (what the writer wrote into the file: its pid, host
   and start time). No ``.lock`` file, or a system without ``flock``: never ``running``. (The
   shared lock is held for microseconds; a writer starting in that very instant is refused with
   its one-line "being written by" error, and can simply be started again.)
2. ``damaged``: a file the row is read from cannot be read: the saved config JSON (not JSON,
   not a mapping), ``metrics.csv`` (not a table with an ``epoch`` column of numbers),
   ``test_metrics.json``, or the checkpoint read for the status (see 3) — which is loaded with
   :func:`dltemplate.engine.checkpoint.load_checkpoint`, so a file whose content does not match
   its digest is damaged too. The note says which file and why; the columns that could still be
   read are filled in.
3. The checkpoint that says where the run is: the newest, by modification time, of
   ``*_last_ckpt.pth`` and ``*_interrupt_ckpt.pth`` (an interrupt checkpoint newer than the last
   one means the run stopped after its last epoch's end); only when there is neither, a
   ``*_best_ckpt.pth`` (a run with ``save_last: false``). Exactly one checkpoint is loaded per
   run, never the best one beside a last one (the last one holds ``best_score`` too).

   - ``finished``: that checkpoint's ``finished`` flag is set (the run trained all its epochs or
     a callback ended it, and was tested; the note names a callback that ended it, e.g.
     ``early_stopping``).
   - ``stopped``: the flag is not set: a signal or an exception stopped it (the note: what, from
     the interrupt checkpoint's ``interrupted_by``), or it was killed with no interrupt checkpoint
     (the note says so, with ``train.log``'s ``run stopped by ...`` line when it has one).
     ``dltemplate resume`` continues it.
4. No checkpoint at all:

   - ``finished``: ``test_metrics.json`` exists, or ``train.log`` says ``run ... finished`` (a
     run with checkpointing off that completed);
   - ``failed``: otherwise — the run stopped (an exception, a kill) before its first checkpoint;
     the note quotes ``train.log``'s ``run stopped by ...`` line when there is one.

**Columns** (also the keys of :func:`list_runs`' rows, in this order):

- ``run``: the run directory's path relative to its DIR (its own name when DIR is the run
  directory); with several DIRs, prefixed with the DIR as given.
- ``status``: as above. ``epochs``: epochs done — the checkpoint's ``epoch``, else the last
  ``epoch`` of ``metrics.csv``, else 0.
- ``best_epoch`` and a column named after each run's ``trainer.monitor`` (``val/accuracy``):
  the *best* value of the monitored metric and its epoch — the checkpoint's ``best_score`` and
  ``best_epoch``, else the best (by ``trainer.monitor_mode``) of ``metrics.csv``'s column.
- ``test/<metric>`` (the monitored metric's test counterpart: ``val/accuracy`` ->
  ``test/accuracy``) and ``test/loss``: from ``test_metrics.json``.
- ``duration`` (seconds; the table prints it as ``1m05s``): the sum of ``metrics.csv``'s
  ``seconds`` (each epoch's training and validation, across resumes; not the start-up or the
  test). A run with no such row yet takes it from ``train.log``: the time from the first to the
  last line of each session (a start or a resume), summed, start-up and test included; the
  table marks those with ``~`` and the rows say which in ``duration_source``.
- one column per config key whose value differs between the listed runs: the saved configs
  flattened to ``section.key`` (``model.args.hidden``), leaving out ``_meta``,
  ``trainer.resume`` and ``experiment.output_dir``. A key one config lacks (an older version of
  dltemplate) counts as a difference.
- ``note``: why a run is damaged, stopped or failed, what ended it early, who is writing it.
- ``path`` and ``duration_source`` are in the rows and the CSV, not in the table.

**Sorting** (``sort``): by any column, ascending; ``-KEY`` descending (on the command line
``--sort=-KEY``: argparse would take ``-KEY`` for an option). Empty cells go last either way;
ties keep the order found (each DIR in turn, its runs by path).

**Grouping** (``group_seeds``): runs whose flattened configs are equal but for
``experiment.seed`` become one row: ``n`` (how many), ``run`` (the first one's, ``+k``),
the status (``finished/stopped`` when they differ), and for each number column (``epochs``,
``best_epoch``, the monitored and test metrics, ``duration``) the mean over the runs that have a
value and, in ``<column>_std``, the sample standard deviation (with at least two values; the
table prints ``mean ± std``). ``experiment.seed`` then lists the group's seeds.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import math
import os
import re
import statistics
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from dltemplate.engine.rundir import best_epoch as replay_best_epoch
from dltemplate.engine.rundir import metrics_rows
from dltemplate.engine.runlog import format_duration
from dltemplate.errors import UsageError, did_you_mean
from dltemplate.tools.compare_configs import flatten

__all__ = [
    "MAX_DEPTH",
    "find_run_dirs",
    "format_csv",
    "format_table",
    "is_run_dir",
    "list_runs",
    "lock_holder",
    "read_run",
    "sort_rows",
]

MAX_DEPTH = 6  # folder levels below each DIR searched (<out>/<sweep>/trials/<NNNN>/<run>: 4)
# Keys that differ between runs without making them different experiments (the run column
# shows the run's name already).
IGNORED_KEYS = frozenset({"trainer.resume", "experiment.output_dir", "experiment.run_name"})
SEED_KEY = "experiment.seed"
HIDDEN = ("path", "duration_source")  # in the rows and the CSV, not in the table
_STD = "_std"
_NUMBER_COLUMNS = ("epochs", "best_epoch", "duration")  # averaged by group_seeds, with metrics

_LOG_TIME = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ")
_SESSION = re.compile(r" INFO run \S+ (started: |resumed from |had no checkpoint yet)")
_FINISHED = re.compile(r" INFO run \S+ finished: ")
_STOPPED = re.compile(
    r" ERROR (run stopped by \S+ (?:at epoch \d+|during the final test), step \d+)"
)


# == finding run directories ====================================================================
def is_run_dir(folder: Path) -> bool:
    """Whether ``folder`` holds a ``config_*.json`` file."""
    try:
        return any(p.is_file() for p in folder.glob("config_*.json"))
    except OSError:
        return False


def find_run_dirs(root: str | Path, max_depth: int = MAX_DEPTH) -> list[Path]:
    """The run directories at ``root`` or up to ``max_depth`` folder levels below it, in name
    order (hidden folders and links are skipped; nothing below a run directory is searched).

    A ``root`` that is not a folder is a UsageError; one without runs gives ``[]``.
    """
    root = Path(root)
    if not root.exists():
        raise UsageError(f"{root}: no such folder")
    if not root.is_dir():
        raise UsageError(f"{root}: not a folder (give a run directory or a folder of runs)")
    found: list[Path] = []

    def walk(folder: Path, depth: int) -> None:
        if is_run_dir(folder):
            found.append(folder)
            return
        if depth >= max_depth:
            return
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            return
        for entry in entries:
            try:
                if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False):
                    continue
            except OSError:
                continue
            walk(Path(entry.path), depth + 1)

    walk(root, 0)
    return found


# == reading one run ============================================================================
def lock_holder(run_dir: str | Path) -> str | None:
    """Who holds ``<run_dir>/.lock`` (the text its writer put in it, e.g. ``pid 123 on host
    since 10:02:03``), or None when no process holds it (or there is no lock to test)."""
    try:
        import fcntl
    except ImportError:  # no flock here: a writer cannot be seen
        return None
    try:
        fd = os.open(Path(run_dir) / ".lock", os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                return None
            text = os.read(fd, 200).decode("utf-8", "replace").strip()
            return text or "another process"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _read_config(run_dir: Path, problems: list[str]) -> dict[str, Any] | None:
    """The saved config (``_meta`` dropped), or None with a problem noted."""
    found = sorted(p for p in run_dir.glob("config_*.json") if p.is_file())
    if not found:  # removed since the run was found
        problems.append("config_*.json: gone")
        return None
    path = found[0]
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:
        problems.append(f"{path.name}: not readable (nested too deep)")
        return None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        problems.append(f"{path.name}: not readable ({_first_words(exc)})")
        return None
    if not isinstance(saved, dict):
        problems.append(f"{path.name}: not a saved config (expected a mapping of sections)")
        return None
    saved.pop("_meta", None)
    return saved


def _read_metrics(run_dir: Path, problems: list[str]) -> list[dict[str, str]]:
    """The rows of ``metrics.csv`` (``[]`` without one, or with a problem noted)."""
    path = run_dir / "metrics.csv"
    if not path.exists():
        return []
    try:
        return metrics_rows(path)  # the check resume makes: ragged rows, text for numbers
    except ValueError as exc:
        problems.append(f"metrics.csv: not a metrics table ({exc})")
        return []


def _read_test(run_dir: Path, problems: list[str]) -> dict[str, float] | None:
    """``test_metrics.json`` (numbers only), or None without one (or with a problem noted)."""
    path = run_dir / "test_metrics.json"
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("not a mapping of metrics")
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        problems.append(f"test_metrics.json: not readable ({_first_words(exc)})")
        return None
    return {str(k): float(v) for k, v in data.items() if _is_number(v)}


def _status_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint whose ``finished`` flag says where the run is (see the module's doc)."""
    candidates = [p for k in ("last", "interrupt") for p in run_dir.glob(f"*_{k}_ckpt.pth")]
    if not candidates:
        candidates = list(run_dir.glob("*_best_ckpt.pth"))

    def newest(p: Path) -> tuple[int, bool, str]:
        try:
            mtime = p.stat().st_mtime_ns
        except OSError:
            mtime = -1
        return mtime, p.name.endswith("_interrupt_ckpt.pth"), p.name

    files = [p for p in candidates if p.is_file()]
    return max(files, key=newest) if files else None


def _load_state(path: Path, problems: list[str]) -> dict[str, Any] | None:
    """The checkpoint's content (digest checked), or None with a problem noted."""
    from dltemplate.engine.checkpoint import load_checkpoint  # torch: only for runs that need it
    from dltemplate.errors import CheckpointError

    try:
        state = load_checkpoint(path)
    except (CheckpointError, OSError) as exc:
        text = str(exc)
        for prefix in (f"{path}: ", f"{path} "):
            if text.startswith(prefix):
                text = text[len(prefix) :]
        problems.append(f"{path.name}: {text.split('; ')[0]}")
        return None
    return state


def _log_facts(run_dir: Path) -> tuple[float | None, bool, str | None]:
    """From ``train.log``: the summed duration of its sessions (first to last line of each),
    whether its last session finished, and its last session's ``run stopped by ...`` line."""
    path = run_dir / "train.log"
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None, False, None
    spans: list[list[datetime]] = []
    finished, stopped = False, None
    for line in text.splitlines():
        if _SESSION.search(line) or not spans:
            spans.append([])
            finished, stopped = False, None
        match = _LOG_TIME.match(line)
        if match:
            try:
                stamp = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S")
            except ValueError:
                continue
            spans[-1].append(stamp.replace(microsecond=int(match.group(2)) * 1000))
        if _FINISHED.search(line):
            finished = True
        elif found := _STOPPED.search(line):
            stopped = found.group(1)
    times = [s for s in spans if s]
    seconds = sum((s[-1] - s[0]).total_seconds() for s in times) if times else None
    return seconds, finished, stopped


def read_run(run_dir: str | Path) -> dict[str, Any]:
    """What one run directory says about its run, never raising for a damaged file.

    Returns a dict: ``path``, ``status`` (``running``, ``damaged``, ``finished``, ``stopped``,
    ``failed``: see the module's doc), ``epochs``, ``monitor`` (``trainer.monitor``), ``best``
    and ``best_epoch``, ``test`` (``{"test/accuracy": ..., "test/loss": ...}``: every metric of
    ``test_metrics.json``), ``duration`` (seconds) and ``duration_source`` (``metrics.csv``,
    ``train.log`` or None), ``config`` (the saved config flattened to ``section.key``, without
    ``_meta``; None when it cannot be read) and ``notes`` (a list of short texts).
    """
    run_dir = Path(run_dir)
    problems: list[str] = []
    notes: list[str] = []
    holder = lock_holder(run_dir)
    config = _read_config(run_dir, problems)
    rows = _read_metrics(run_dir, problems)
    test = _read_test(run_dir, problems)
    ckpt = _status_checkpoint(run_dir)
    state = _load_state(ckpt, problems) if ckpt is not None else None
    log_seconds, log_finished, log_stopped = _log_facts(run_dir)

    source = config if config is not None else (state or {}).get("config")
    trainer = source.get("trainer", {}) if isinstance(source, dict) else {}
    trainer = trainer if isinstance(trainer, dict) else {}
    monitor = trainer.get("monitor") if isinstance(trainer.get("monitor"), str) else None
    mode = "min" if trainer.get("monitor_mode") == "min" else "max"

    # status
    if holder is not None:
        status = "running"
        notes.append(f"being written by {holder}")
    elif problems:
        status = "damaged"
    elif state is not None:
        if state.get("finished") is True:
            status = "finished"
            if isinstance(state.get("stopped_by"), str):
                why = state.get("stop_reason")
                notes.append(f"ended by {state['stopped_by']}" + (f" ({why})" if why else ""))
        else:
            status = "stopped"
            assert ckpt is not None
            if "interrupted_by" in state:
                notes.append(f"stopped by {state['interrupted_by']} ({ckpt.name})")
            else:
                notes.append(
                    "no interrupt checkpoint for its last stop"
                    + (f" ({log_stopped})" if log_stopped else ": killed?")
                )
    elif test is not None or log_finished:
        status = "finished"
        notes.append("no checkpoint")
    else:
        status = "failed"
        notes.append(f"no checkpoint; {log_stopped}" if log_stopped else "no checkpoint")
    notes = problems + notes

    # epochs, best
    epochs = state.get("epoch") if state is not None else None
    if not _is_int(epochs):
        epochs = max((int(float(r["epoch"])) for r in rows), default=0)
    best, best_epoch = None, None
    if state is not None and _is_number(state.get("best_score")):
        best, best_epoch = float(state["best_score"]), state.get("best_epoch")
        best_epoch = best_epoch if _is_int(best_epoch) else None
    elif monitor is not None:  # no checkpoint: the rows replayed as the run counts its best
        delta = trainer.get("early_stopping_min_delta")
        numeric = [r for r in rows if _float(r.get(monitor)) is not None]
        best_epoch = replay_best_epoch(numeric, monitor, mode, delta if _is_number(delta) else 0.0)
        if best_epoch is not None:
            best = next(_float(r[monitor]) for r in numeric if int(float(r["epoch"])) == best_epoch)

    # duration
    seconds = [s for r in rows if (s := _float(r.get("seconds"))) is not None]
    if seconds:
        duration, duration_source = float(sum(seconds)), "metrics.csv"
    elif log_seconds is not None:
        duration, duration_source = log_seconds, "train.log"
    else:
        duration, duration_source = None, None

    flat = None
    if config is not None:
        flat = {k: v for k, v in flatten(config).items() if k not in IGNORED_KEYS}
    return {
        "path": str(run_dir.absolute()),
        "status": status,
        "epochs": epochs,
        "monitor": monitor,
        "best": best,
        "best_epoch": best_epoch,
        "test": {f"test/{k}": v for k, v in (test or {}).items()},
        "duration": duration,
        "duration_source": duration_source,
        "config": flat,
        "notes": notes,
    }


# == the table ==================================================================================
def list_runs(
    dirs: Sequence[str | Path] = ("./Results",),
    *,
    sort: str | None = None,
    group_seeds: bool = False,
) -> list[dict[str, Any]]:
    """One row per run directory under ``dirs`` (see the module's doc for every column): dicts
    with the same keys in the same order (the table's columns), None where a run has no value.

    ``sort``: a column to sort by, ascending, ``-column`` descending (default: the order
    found, each DIR in turn, its runs by path).
    ``group_seeds``: runs that differ only in ``experiment.seed`` make one row, with ``n``,
    means and ``<column>_std``. A DIR that does not exist or holds no run directory, or an
    unknown sort column, is a UsageError.
    """
    if isinstance(dirs, (str, Path)):
        dirs = [dirs]
    if not dirs:
        dirs = ["./Results"]
    found: list[tuple[str, Path]] = []
    seen: set[Path] = set()
    for given in dirs:
        runs = find_run_dirs(given)
        if not runs:
            raise UsageError(
                f"{given}: no run directory (a folder holding a config_*.json) in it or up to "
                f"{MAX_DEPTH} levels below"
            )
        for run in runs:
            if run.resolve() in seen:
                continue
            seen.add(run.resolve())
            found.append((_run_name(Path(given), run, several=len(dirs) > 1), run))
    facts = [(name, read_run(run)) for name, run in found]
    # a run deleted while the table was read (a clean-up, a finished sweep's tidying) is gone
    facts = [(name, f) for (name, f), (_, run) in zip(facts, found) if is_run_dir(run)]
    diff = _diff_keys(facts)
    rows = _rows(facts, diff)
    if group_seeds:
        rows = _group(rows, [f["config"] for _, f in facts], diff)
    if sort:
        rows = sort_rows(rows, sort)
    return rows


def _run_name(given: Path, run: Path, several: bool) -> str:
    rel = run.relative_to(given)
    if rel == Path("."):
        return str(given) if several else given.resolve().name
    return os.path.normpath(given / rel) if several else rel.as_posix()


def _diff_keys(facts: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """The config keys whose values differ between the runs whose config could be read."""
    configs = [f["config"] for _, f in facts if f["config"] is not None]
    if len(configs) < 2:
        return []
    keys: list[str] = []
    for config in configs:
        keys += [k for k in config if k not in keys]
    return [k for k in keys if len({_key(c[k]) if k in c else "<absent>" for c in configs}) > 1]


def _key(value: Any) -> str:
    """A config value as comparable text."""
    return json.dumps(value, sort_keys=True, default=str)


def _rows(facts: list[tuple[str, dict[str, Any]]], diff: list[str]) -> list[dict[str, Any]]:
    """One row per run, every row with the same columns (see the module's doc)."""
    monitors = list(dict.fromkeys(f["monitor"] for _, f in facts if f["monitor"] is not None))
    tests = list(dict.fromkeys([*(f"test/{m.split('/', 1)[-1]}" for m in monitors), "test/loss"]))
    rows = []
    for name, f in facts:
        row: dict[str, Any] = {"run": name, "status": f["status"], "epochs": f["epochs"]}
        row["best_epoch"] = f["best_epoch"]
        row.update({m: f["best"] if f["monitor"] == m else None for m in monitors})
        row.update({t: f["test"].get(t) for t in tests})
        row["duration"] = f["duration"]
        config = f["config"] or {}
        row.update({k: config.get(k) for k in diff})
        row["note"] = "; ".join(f["notes"]) or None
        row["path"] = f["path"]
        row["duration_source"] = f["duration_source"]
        rows.append(row)
    return rows


def _is_metric(column: str) -> bool:
    """``val/accuracy``, ``test/loss``: not a config key (``section.key``, no ``/`` in its
    section)."""
    return "/" in column.split(".", 1)[0]


def _group(
    rows: list[dict[str, Any]], configs: list[dict[str, Any] | None], diff: list[str]
) -> list[dict[str, Any]]:
    """Rows whose configs are equal but for ``experiment.seed`` made one (see the module's
    doc); a run whose config cannot be read stays alone."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for i, (row, config) in enumerate(zip(rows, configs)):
        if config is None:
            key = f"#{i}"
        else:
            key = _key({k: v for k, v in config.items() if k != SEED_KEY})
        groups.setdefault(key, []).append(row)
    out = []
    for members in groups.values():
        first, n = members[0], len(members)
        row: dict[str, Any] = {"run": first["run"] + (f" +{n - 1}" if n > 1 else ""), "n": n}
        row["status"] = "/".join(sorted({m["status"] for m in members}))
        partial = []
        for column in first:
            if column in ("run", "status", "note", *HIDDEN):
                continue
            if column in _NUMBER_COLUMNS or (_is_metric(column) and column not in diff):
                values = [m[column] for m in members if _is_number(m[column])]
                row[column] = statistics.fmean(values) if values else None
                row[column + _STD] = statistics.stdev(values) if len(values) > 1 else None
                if values and len(values) < n:
                    partial.append(f"{column} of {len(values)} of {n} runs")
            elif column == SEED_KEY:
                row[column] = [m[column] for m in members]
            else:
                row[column] = first[column]
        notes = partial + [m["note"] for m in members if m["note"]]
        row["note"] = "; ".join(dict.fromkeys(notes)) or None
        for column in HIDDEN:
            row[column] = ";".join(dict.fromkeys(str(m[column]) for m in members if m[column]))
            row[column] = row[column] or None
        out.append(row)
    return out


def sort_rows(rows: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """``rows`` by column ``key`` ascending (``-key``: descending); empty cells last. An unknown
    column is a UsageError listing the columns."""
    descending = key.startswith("-")
    column = key[1:] if descending else key
    columns = list(rows[0]) if rows else []
    if column not in columns:
        listed = ", ".join(c for c in columns if not c.endswith(_STD))
        raise UsageError(
            f"--sort {key}: no column {column!r}{did_you_mean(column, columns)} (columns: {listed})"
        )
    present = [r for r in rows if r[column] is not None]
    empty = [r for r in rows if r[column] is None]

    def order(row: dict[str, Any]) -> tuple[int, Any]:
        value = row[column]
        if _is_number(value):
            return (0, float(value))
        return (1, value if isinstance(value, str) else json.dumps(value, default=str))

    return sorted(present, key=order, reverse=descending) + empty


# == output =====================================================================================
def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows as an aligned text table: numbers right-aligned, empty cells ``-``, a grouped
    row's means as ``mean ± std``; ``path`` and ``duration_source`` left out."""
    if not rows:
        return "(no runs)"
    columns = [c for c in rows[0] if c not in HIDDEN and not c.endswith(_STD)]
    cells = [[_cell(row, c) for c in columns] for row in rows]
    right = [
        all(_is_number(r[c]) or r[c] is None for r in rows) and c not in ("run", "note")
        for c in columns
    ]
    widths = [max(len(c), *(len(line[i]) for line in cells)) for i, c in enumerate(columns)]

    def line(values: list[str]) -> str:
        parts = [v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, right)]
        return "  ".join(parts).rstrip()

    return "\n".join([line(columns), *(line(c) for c in cells)])


def _cell(row: dict[str, Any], column: str) -> str:
    value = row[column]
    if value is None:
        return "-"
    std = row.get(column + _STD)
    text = _format_value(column, value, row)
    if std is not None:
        text += " ± " + _format_value(column, std, {})
    return text


def _format_value(column: str, value: Any, row: dict[str, Any]) -> str:
    if column == "duration" and _is_number(value):
        mark = "~" if "train.log" in (row.get("duration_source") or "") else ""
        return mark + format_duration(float(value), compact=True)
    if column in ("epochs", "best_epoch", "n") and _is_number(value):
        return str(int(value)) if float(value).is_integer() else f"{value:.1f}"
    if _is_metric(column) and _is_number(value):
        small_or_huge = value != 0 and not 0.01 <= abs(value) < 1e6  # .4f: 0.0000 or 20 digits
        return f"{value:.4g}" if small_or_huge else f"{value:.4f}"
    if isinstance(value, str):
        return value
    if isinstance(value, float):  # a config value a sampler drew: 6 significant digits
        return f"{value:.6g}"  # (--csv keeps every digit)
    return json.dumps(value, default=str)


def format_csv(rows: list[dict[str, Any]]) -> str:
    """The rows as CSV, every column (``path``, ``duration_source`` and ``*_std`` included):
    numbers as they are (``duration`` in seconds), empty cells empty, lists as JSON."""
    buf = io.StringIO(newline="")
    columns = list(rows[0]) if rows else ["run"]
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_csv_value(row[c]) for c in columns])
    return buf.getvalue()


def _csv_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        return repr(value)
    return json.dumps(value, default=str)


# == small helpers ==============================================================================
def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _float(text: Any) -> float | None:
    """A finite number from a metrics.csv cell, else None."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _first_words(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= 120 else text[:117] + "..."
