"""The run directory: ``<output_dir>/<timestamp>_<run_name>/`` and what goes in it.

It holds the config as JSON, the log, TensorBoard's ``summary/``, the checkpoints, the
per-epoch metrics table (``metrics.csv``) and a picture of the training curves
(``curves.png``).
"""

from __future__ import annotations

import csv
import datetime
import io
import json
import logging
import os
import platform
import re
import subprocess
import threading
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dltemplate.atomic import atomic_write, atomic_write_text
from dltemplate.engine.loop_state import BestScore
from dltemplate.errors import ConfigError, DataError, UsageError, short_repr

if TYPE_CHECKING:
    from matplotlib.figure import Figure

TIMESTAMP_FORMAT = "%Y%m%d_%H%M%S"
# <timestamp>[_<run name>][_N]: N counts runs started in the same second under the same name
_RUN_NAME = re.compile(r"(\d{8}_\d{6})(?:_(.+?))??(?:_(\d+))?")
# ".<name>.<pid>.tmp": how save_checkpoint and atomic_write_text name their temp files
_PID_TEMP = re.compile(r"\.(.+)\.(\d+)\.tmp")


def check_output_dir(output_dir: str | Path) -> None:
    """A ConfigError naming ``experiment.output_dir`` unless run directories can be made in
    it: its nearest existing part must be a writable folder (not a file, not read-only)."""
    existing = Path(output_dir).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    where = f"experiment.output_dir={output_dir}"
    if not existing.is_dir():
        raise ConfigError(f"{where}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{where}: cannot write in {existing} (permission or read-only disk)")


def new_run_dir(output_dir: str | Path, run_name: str | None = None) -> Path:
    """Create and return a fresh ``<output_dir>/<timestamp>[_<run_name>][_N]/`` (never reuses a
    folder); an output folder that cannot hold one is a ConfigError (see
    :func:`check_output_dir`)."""
    stamp = datetime.datetime.now().strftime(TIMESTAMP_FORMAT)
    base = Path(output_dir)
    check_output_dir(base)
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # e.g. a read-only file system that os.access did not see
        raise ConfigError(f"experiment.output_dir={output_dir}: {exc.strerror}") from exc
    for n in range(1000):
        name = f"{stamp}_{run_name}" if run_name else stamp
        path = base / (name if n == 0 else f"{name}_{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
        except OSError as exc:
            raise ConfigError(f"experiment.output_dir={output_dir}: {exc.strerror}") from exc
    raise UsageError(f"{base}: cannot create a run directory named after {stamp}")


def run_dir_time(name: str) -> tuple[datetime.datetime, int] | None:
    """``(start time, N)`` from a run directory name ``YYYYmmdd_HHMMSS[_<run name>][_N]``,
    else None."""
    match = _RUN_NAME.fullmatch(name)
    if match is None:
        return None
    try:
        stamp = datetime.datetime.strptime(match.group(1), TIMESTAMP_FORMAT)
    except ValueError:
        return None
    return stamp, int(match.group(3) or 0)


def latest_run_dir(output_dir: str | Path, depth: int = 1) -> Path:
    """The newest run directory (one holding a config JSON) in ``output_dir``, or up to
    ``depth`` folder levels down (2: ``./Results/<config>/<run>``).

    Newest by the timestamp in its name, then (runs started in the same second, whatever
    their names) by when its config was written, not by modification time: evaluating an old
    run writes into it but does not make it the latest. Folders whose names are no timestamp
    are ignored, unless no folder has one (then: newest modified).
    """
    runs = [
        p.parent
        for level in range(1, depth + 1)
        for p in Path(output_dir).glob("*/" * level + "config_*.json")
    ]
    if not runs:
        raise UsageError(f"no run directory under {output_dir}")
    stamped = [(t, p) for p in runs if (t := run_dir_time(p.name)) is not None]
    if stamped:
        # _N orders only runs of one name whose configs share a modification time.
        newest = max(stamped, key=lambda tp: (tp[0][0], _config_mtime(tp[1]), tp[0][1], tp[1].name))
        return newest[1]
    return max(runs, key=lambda p: (p.stat().st_mtime, p.name))


def _config_mtime(run_dir: Path) -> float:
    """When ``run_dir``'s config was written: orders runs started in the same second."""
    return min((p.stat().st_mtime for p in run_dir.glob("config_*.json")), default=0.0)


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (when unsure: yes, so that nothing live is removed)."""
    if pid <= 0:
        return False
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, under another user
        return True
    return True


def remove_stale_temp_files(run_dir: str | Path) -> list[Path]:
    """Delete temp files that a killed writer left in ``run_dir``; return the removed paths.

    These are ``.<name>.<pid>.tmp`` (checkpoints, :func:`atomic_write_text`, metrics), older
    ``*.csv.tmp`` and ``*.tmp.png`` (curves). A pid-named one whose process is alive and is not
    this one is kept: it may be another process writing right now.
    """
    removed = []
    me = os.getpid()
    for path in sorted(Path(run_dir).iterdir()):
        name = path.name
        match = _PID_TEMP.fullmatch(name)
        if match is not None:
            pid = int(match.group(2))
            if pid != me and _pid_alive(pid):
                continue
        elif not (
            (name.startswith(".") and name.endswith(".tmp"))
            or name.endswith(".csv.tmp")
            or name.endswith(".tmp.png")
        ):
            continue
        if not path.is_file():
            continue
        try:
            path.unlink()
        except OSError:  # gone meanwhile, or not ours to remove: leave it
            continue
        removed.append(path)
    return removed


def package_version() -> str:
    """dltemplate's version, from the installed package's metadata (pyproject.toml)."""
    try:
        return version("dltemplate")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def refuse_links(run_dir: Path) -> None:
    """A UsageError naming the first symbolic link inside ``run_dir`` (its files, and the files
    of ``summary/``): run directories are shared, and a link there would have a resume append
    its log or TensorBoard events to whatever the link points at."""
    for path in sorted(Path(run_dir).iterdir()):
        inside = sorted(path.iterdir()) if path.is_dir() and not path.is_symlink() else []
        for found in [path, *inside]:
            if found.is_symlink():
                raise UsageError(
                    f"{found}: is a symbolic link; dltemplate never writes through a link in a "
                    "run directory (replace it with the file itself, or copy the run)"
                )


class RunLock:
    """The one writer of a run directory: an advisory lock (``fcntl.flock``) on ``<run>/.lock``,
    held from the moment the run directory is opened until the run ends. The kernel releases it
    when the holder dies (a kill, a crash, a preempted job), so a stale lock is simply taken over;
    a live holder — another ``resume`` of the same run, a forgotten job — is named instead.
    Where ``flock`` is missing (Windows) the lock is a no-op."""

    NAME = ".lock"

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / self.NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise UsageError naming the process that holds it."""
        try:
            import fcntl
        except ImportError:  # no flock on this system: one writer is the user's to keep
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise UsageError(
                f"{self.path.parent}: the run is being written by {holder}; one process writes "
                "a run directory at a time (wait for it, or stop it, then resume)"
            ) from None
        me = f"pid {os.getpid()} on {platform.node()} since {datetime.datetime.now():%H:%M:%S}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, me.encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Let go of the lock (the file stays: removing it could let two writers in)."""
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None


def git_commit() -> str | None:
    """The project's git commit, when it runs from a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def save_config(run_dir: Path, name: str, config: dict[str, Any]) -> Path:
    """Write ``config_<name>_<timestamp>.json`` with the versions that produced the run."""
    import torch  # here, not at the top: reading run directories (compare-configs) needs no torch

    match = _RUN_NAME.fullmatch(run_dir.name)
    stamp = match.group(1) if match is not None else run_dir.name
    meta = {
        "timestamp": stamp,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "dltemplate": package_version(),
        "git_commit": git_commit(),
    }
    path = run_dir / f"config_{name}_{stamp}.json"
    atomic_write_text(path, json.dumps({**config, "_meta": meta}, indent=2))
    return path


def find_config(run_dir: Path) -> Path:
    """The config JSON saved in ``run_dir``."""
    found = sorted(Path(run_dir).glob("config_*.json"))
    if not found:
        raise UsageError(f"{run_dir}: no config_*.json in this directory (is it a run directory?)")
    return found[0]


def read_saved_config(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The config saved in ``run_dir`` (as a dict) and its ``_meta``; a missing, truncated or
    garbled file is a DataError naming it."""
    path = find_config(run_dir)
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except RecursionError as exc:  # a hostile file: 100,000 nested lists
        raise DataError(f"{path}: not a readable saved config (nested too deep)") from exc
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{path}: not a readable saved config ({str(exc)[:200]})") from exc
    if not isinstance(saved, dict):
        raise DataError(f"{path}: not a saved config (expected a mapping of sections)")
    meta = saved.pop("_meta", {})
    return saved, meta


def update_saved_config(run_dir: Path, now: dict[str, Any]) -> list[str]:
    """Rewrite the config saved in ``run_dir`` when a resume changed it (``now``, e.g. train
    longer), so that the run directory alone says how the run goes on; return the changes as
    ``section.key: old -> new``. ``trainer.resume`` keeps its saved value, and so do
    ``experiment.output_dir`` and ``experiment.run_name``: a resumed run stays where it is."""
    path = find_config(run_dir)
    saved, meta = read_saved_config(run_dir)
    now = {**now, "trainer": {**now["trainer"], "resume": saved.get("trainer", {}).get("resume")}}
    where = saved.get("experiment", {})
    kept = {key: where[key] for key in ("output_dir", "run_name") if key in where}
    now = {**now, "experiment": {**now.get("experiment", {}), **kept}}
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
        atomic_write_text(path, json.dumps({**now, "_meta": meta}, indent=2))
    return changed


class MetricsTable:
    """``metrics.csv``: one row per epoch; rewritten whole when new columns appear."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows = self.read(path) if path.exists() else []

    @staticmethod
    def read(path: Path) -> list[dict[str, Any]]:
        """The rows of an existing ``metrics.csv``; a garbled one is a DataError naming it."""
        try:
            return metrics_rows(path)
        except ValueError as exc:
            raise DataError(
                f"{path}: not a metrics table written by dltemplate ({exc}); move it away to "
                "resume without it"
            ) from exc

    def truncate(self, epoch: int) -> None:
        """Keep only rows of epochs before ``epoch`` (1-based), e.g. when resuming."""
        self.rows = [r for r in self.rows if int(float(r["epoch"])) < epoch]
        self._write()

    def append(self, row: dict[str, Any]) -> None:
        """Add one epoch's row and rewrite the file."""
        self.rows.append(row)
        self._write()

    def _write(self) -> None:
        columns: list[str] = []
        for r in self.rows:
            columns += [k for k in r if k not in columns]
        buf = io.StringIO(newline="")
        writer = csv.DictWriter(buf, fieldnames=columns or ["epoch"])
        writer.writeheader()
        writer.writerows(self.rows)
        # the pid-named temp file lets remove_stale_temp_files tell a live writer's from a dead one
        atomic_write_text(self.path, buf.getvalue())

    def plot(
        self, png: Path, monitor: str | None = None, mode: str = "max", min_delta: float = 0.0
    ) -> threading.Thread | None:
        """Redraw the curves into ``png`` in a background thread (returned, to join; None when
        no thread could be started: then the picture is skipped, with one warning); ``monitor``,
        ``mode`` and ``min_delta`` mark the best epoch (see :func:`best_epoch`).

        Drawing takes a few tenths of a second; a thread lets the next epoch start meanwhile.
        """
        self.wait()
        rows = [dict(r) for r in self.rows]  # a snapshot: the table may grow while drawing
        thread = threading.Thread(
            target=_plot_quietly, args=(rows, png, monitor, mode, min_delta), daemon=True
        )
        try:
            thread.start()
        except RuntimeError as exc:  # no thread to be had: a picture never stops training
            if not getattr(self, "_said_no_thread", False):
                logging.getLogger("dltemplate").warning("curves.png not drawn: %s", exc)
                self._said_no_thread = True
            return None
        self._plotting = thread
        return thread

    def wait(self) -> None:
        """Wait for a drawing in progress to finish."""
        if getattr(self, "_plotting", None) is not None:
            self._plotting.join()
            self._plotting = None


def metrics_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a ``metrics.csv`` as text; a ValueError saying in a few words why the file
    is not a metrics table (unreadable, no ``epoch`` column, a ragged row, a cell that is not a
    number)."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            rows = [dict(r) for r in reader]
            columns = reader.fieldnames or []
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ValueError(f"{type(exc).__name__}: {exc}") from exc
    if columns and "epoch" not in columns:
        raise ValueError("no 'epoch' column")
    for number, row in enumerate(rows, start=1):
        _check_row(row, number, len(columns))
    return rows


def _check_row(row: dict[str, Any], number: int, width: int) -> None:
    """A ValueError saying what is wrong with the ``metrics.csv`` row ``number`` (fields more
    or fewer than the header's ``width``, or a cell that is not a number), if anything is."""
    if None in row or None in row.values():  # csv.DictReader's marks of a ragged row
        count = width + len(row.get(None) or []) - list(row.values()).count(None)
        raise ValueError(f"row {number} has {count} fields, the header {width}")
    for key, text in row.items():
        try:
            float(text) if text != "" else None
        except ValueError:
            raise ValueError(f"row {number}: {key}={short_repr(text)} is not a number") from None
    if row["epoch"] == "":
        raise ValueError(f"row {number}: the epoch is missing")


def _plot_quietly(
    rows: list[dict[str, Any]], png: Path, monitor: str | None, mode: str, min_delta: float
) -> None:
    # A picture is not worth a traceback from a thread (a full disk is reported by the run).
    try:
        plot_curves(rows, png, monitor=monitor, mode=mode, min_delta=min_delta)
    except Exception as exc:
        logging.getLogger("dltemplate").warning("curves.png not drawn: %s", exc)


def plot_curves(
    rows: list[dict[str, Any]],
    png: Path,
    *,
    monitor: str | None = None,
    mode: str = "max",
    min_delta: float = 0.0,
) -> None:
    """Draw the curves of ``rows`` (see :func:`curves_figure`) into ``png``, titled with the
    name of the folder that holds it (the run directory)."""
    if not rows:
        return
    title = png.resolve().parent.name
    fig = curves_figure(rows, title=title, monitor=monitor, mode=mode, min_delta=min_delta)
    atomic_write(png, lambda fh: fig.savefig(fh, dpi=72, format="png"))


def best_epoch(
    rows: list[dict[str, Any]], monitor: str, mode: str = "max", min_delta: float = 0.0
) -> int | None:
    """The epoch the run keeps as its best by ``monitor`` (``mode`` ``max`` or ``min``): the
    rows replayed through :class:`~dltemplate.engine.loop_state.BestScore`, so an epoch counts
    only when it beats the best by more than ``min_delta`` (``trainer.early_stopping_min_delta``)
    and the first of equals stays, as the checkpoint callback keeps it; None when no row has
    the column."""
    best = BestScore(mode, min_delta)
    for row in rows:
        if row.get(monitor, "") != "":
            best.update(float(row[monitor]), int(float(row["epoch"])))
    return best.epoch


def curves_figure(
    rows: list[dict[str, Any]],
    title: str | None = None,
    monitor: str | None = None,
    mode: str = "max",
    min_delta: float = 0.0,
) -> Figure:
    """The figure :func:`plot_curves` saves: one panel per metric (train and val), y label the
    metric's name, then a panel of the learning rate; three panels a row, integer epoch ticks.
    ``title`` heads the figure; with ``monitor`` (e.g. ``val/accuracy``) a star marks its best
    epoch and a dotted line shows that epoch on every panel. Margins are sized for the number
    of rows, so that no label is clipped."""
    # The object API, not pyplot: no global state, so drawing off the main thread is safe.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    names = sorted({k.split("/", 1)[1] for k in rows[0] if "/" in k}) if rows else []
    epochs = [int(float(r["epoch"])) for r in rows]
    has_lr = any(r.get("lr", "") != "" for r in rows)
    panels = len(names) + has_lr
    cols = min(3, max(1, panels))
    nrows = max(1, -(-panels // cols))
    top = 0.35 + 0.3 * bool(title)  # inches above the panels: the panel titles, the run name
    width, height = 4.5 * cols, 3.2 * nrows + 0.3 * bool(title)
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    # A fixed layout (tight_layout would draw the whole figure once more), with margins in
    # inches: the tick labels, the x label and the title fit whatever the number of rows.
    fig.subplots_adjust(
        left=0.8 / width,
        right=1 - 0.15 / width,
        bottom=0.6 / height,
        top=1 - top / height,
        wspace=0.35,
        hspace=0.45,
    )
    if title:
        fig.suptitle(title, fontsize=11, y=1 - 0.08 / height, va="top")
    best = best_epoch(rows, monitor, mode, min_delta) if monitor else None
    axes = fig.subplots(nrows, cols, squeeze=False)
    for ax, name in zip(axes.flat, names):
        for split in ("train", "val"):
            key = f"{split}/{name}"
            pts = [(e, float(r[key])) for e, r in zip(epochs, rows) if r.get(key, "") != ""]
            if pts:
                ax.plot(*zip(*pts), marker="o", markersize=3, label=split)
            if best is not None and key == monitor:
                value = dict(pts)[best]
                ax.plot([best], [value], marker="*", markersize=13, color="crimson",
                        linestyle="none", label=f"best: epoch {best}")  # fmt: skip
        ax.set_title(name, fontsize=10)
        ax.set_ylabel(name)
    if has_lr:
        ax = list(axes.flat)[len(names)]
        pts = [(e, float(r["lr"])) for e, r in zip(epochs, rows) if r.get("lr", "") != ""]
        ax.plot(*zip(*pts), marker="o", markersize=3, color="tab:green", label="lr")
        ax.set_title("learning rate", fontsize=10)
        ax.set_ylabel("learning rate")
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    for ax in list(axes.flat)[:panels]:
        if best is not None:
            ax.axvline(best, color="crimson", linestyle=":", linewidth=1)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[panels:]:
        ax.axis("off")
    return fig
