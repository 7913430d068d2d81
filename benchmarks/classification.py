"""Throughput of the engine's training epoch against the compute floor, in one run.

*Engine*: a :class:`~dltemplate.engine.trainer.TrainerBase` configured as a user's run: progress
bar ON (``trainer.progress_bar=on``), logging, metrics, ``metrics.csv``, ``curves.png``,
TensorBoard and "best"/"last" checkpoints. One epoch is what ``fit()`` runs per epoch::

    trainer.train_epoch(); trainer.validate(); trainer.end_epoch(...)

plus waiting for the curves drawing that ``end_epoch`` starts in a thread (in a real run it
overlaps the next epoch; left running here it would slow the floor epoch that follows). While
an epoch is timed, ``sys.stderr`` is a StringIO: tqdm draws the bar there as on a terminal
(the bytes it wrote are counted); the logger keeps the real stderr (one line per epoch).

*Floor*: the same MLP (784-512-512-10 "Vanilla", a fresh instance from the same seed) and Adam
(same learning rate) over ONE float32 tensor of the 55,000 training images, normalised once
before timing; each epoch, ``torch.randperm`` index batches, forward + cross-entropy + backward
+ step + zero_grad. Nothing else: no validation, no metrics, no ``.item()``.

Data: Fashion-MNIST-shaped, synthetic, in memory (60,000 uint8 1x28x28 training images split
55,000 / 5,000, 10 classes; each label a fixed random linear function of its image). Per batch
size: one warm-up epoch of each side, then ``--epochs`` pairs, interleaved (engine, floor,
engine, floor, ...) so that noise from other processes hits both alike. samples/s = 55,000 /
epoch seconds; ratio = engine / floor samples/s of a pair; the table gives medians, the pair
ratios' min/max, and the share of the machine's CPU other processes used meanwhile. Target:
ratio >= 0.90. Exit status 0 whatever the result: this measures, it does not test.

    python benchmarks/classification.py                  # batch sizes 64 and 256, 4 pairs each
    python benchmarks/classification.py --epochs 1 --batch-sizes 256      # a quick check
    python benchmarks/classification.py --breakdown      # plus where the engine's time goes

``--threads N`` sets torch's threads (default: torch's own, one per core). On a busy machine
two threads on two cores wait on each other whenever one is descheduled, and epochs get several
times slower and erratic; ``--threads 1`` then gives steadier (single-core) figures.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import dltemplate.data  # noqa: F401  (registers the built-in components, as the CLI does)
import dltemplate.models  # noqa: F401
import dltemplate.optim  # noqa: F401
from dltemplate.assemble import build_trainer
from dltemplate.callbacks import MetricsTableCallback
from dltemplate.config import Config, load_config
from dltemplate.data.base import DataInfo, InMemoryDataset, TensorSplit
from dltemplate.engine.trainer import TrainerBase
from dltemplate.registry import DATASETS, MODELS
from dltemplate.tasks.classification import ClassificationTask

TARGET = 0.90
SEED, LR = 42, 1e-3


@DATASETS.register("bench_fmnist")
class BenchFashionMNIST(InMemoryDataset):
    """Fashion-MNIST look-alike made in memory: uint8 1x28x28 images, 10 learnable classes."""

    info = DataInfo(
        input_shape=(1, 28, 28),
        num_classes=10,
        class_names=[f"class_{i}" for i in range(10)],
        mean=(0.286,),
        std=(0.353,),
    )

    def __init__(self, root: str = "", download: bool = True, num_train: int = 60_000) -> None:
        super().__init__(root, download)
        self.num_train = num_train

    def load(self) -> tuple[TensorSplit, TensorSplit | None]:
        gen = torch.Generator().manual_seed(0)
        projection = torch.randn(28 * 28, 10, generator=gen)

        def make(n: int) -> TensorSplit:
            images = torch.randint(0, 256, (n, 1, 28, 28), generator=gen, dtype=torch.uint8)
            labels = ((images.flatten(1).float() - 127.5) @ projection).argmax(1)
            return TensorSplit(images, labels)

        return make(self.num_train), make(max(1, self.num_train // 6))


def make_trainer(batch_size: int, epochs: int, train_samples: int, out_dir: str) -> TrainerBase:
    """A user's run on the benchmark data (progress bar on); only the final test is off."""
    overrides = [
        "experiment.name=bench_classification",
        f"experiment.output_dir={out_dir}",
        f"experiment.seed={SEED}",
        "data.name=bench_fmnist",
        f"data.batch_size={batch_size}",
        f"data.val_fraction={1 / 12}",  # 60,000 -> 55,000 train + 5,000 val
        f"data.args.num_train={train_samples}",
        "model.name=Vanilla",
        "model.args.hidden=[512, 512]",
        "optimizer.name=adam",
        f"optimizer.lr={LR}",
        f"trainer.epochs={epochs}",
        "trainer.progress_bar='on'",  # quoted: YAML reads a bare on as true
        "trainer.test_after_fit=false",
    ]
    cfg: Config = load_config(None, overrides)
    trainer = build_trainer(cfg, ClassificationTask(cfg))
    for fn in trainer.callbacks.on_fit_start:  # as fit() does: opens TensorBoard, the table
        fn(trainer)
    return trainer


def metrics_table(trainer: TrainerBase) -> MetricsTableCallback:
    """The run's metrics-table callback (it draws curves.png in a thread)."""
    (table,) = [c for c in trainer.callbacks.callbacks if isinstance(c, MetricsTableCallback)]
    return table


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that wall-clock times are complete."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# == the two sides ==========================================================================
BAR_SINK = io.StringIO()  # sys.stderr while an engine epoch is timed: where tqdm draws


def engine_epoch(trainer: TrainerBase) -> tuple[float, float, float]:
    """One epoch as ``fit()`` runs it, then the curves drawing it started.

    Returns the seconds of the whole, of the training pass, and of the wait for the drawing.
    """
    sync(trainer.device)
    started = time.perf_counter()
    with contextlib.redirect_stderr(BAR_SINK):
        train = trainer.train_epoch()
        sync(trainer.device)
        train_s = time.perf_counter() - started
        val = trainer.validate()
        trainer.end_epoch(train, val, time.perf_counter() - started)
        drawn = time.perf_counter()
        metrics_table(trainer).wait()  # the curves.png thread: the engine's work, not the floor's
    sync(trainer.device)
    ended = time.perf_counter()
    return ended - started, train_s, ended - drawn


class Floor:
    """Same MLP and Adam over one pre-normalised float tensor: the training step, nothing else."""

    def __init__(self, trainer: TrainerBase) -> None:
        cfg, info, dev = trainer.cfg, trainer.info, trainer.device
        self.device, self.batch_size = dev, cfg.data.batch_size
        torch.manual_seed(cfg.experiment.seed)  # as the trainer seeds before building its model
        args = dict(input_shape=tuple(info.input_shape), num_classes=info.num_classes)
        self.model = MODELS.build(cfg.model.name, **args, **cfg.model.args).to(dev)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.optimizer.lr)
        mean = torch.tensor(info.mean).view(1, -1, 1, 1)
        std = torch.tensor(info.std).view(1, -1, 1, 1)
        train = trainer.data.train  # the very images the engine trains on
        self.x = ((train.inputs.float() / 255.0 - mean) / std).contiguous().to(dev)
        self.y = train.targets.to(dev)
        self.gen = torch.Generator().manual_seed(cfg.experiment.seed)

    def epoch(self) -> float:
        """One training pass; returns its wall-clock seconds."""
        sync(self.device)
        started = time.perf_counter()
        self.model.train()
        order = torch.randperm(len(self.y), generator=self.gen).to(self.device)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            loss = F.cross_entropy(self.model(self.x[idx]), self.y[idx])
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        sync(self.device)
        return time.perf_counter() - started


# == CPU used by other processes =============================================================
class CpuClock:
    """(busy CPU seconds of the machine, this process's CPU seconds, wall seconds), from Linux
    ``/proc/stat``; ``others(a, b)`` = (busy - own) / (wall x cores) between two readings."""

    def __init__(self) -> None:
        self.tick = os.sysconf("SC_CLK_TCK")
        self.cores = os.cpu_count() or 1
        self.available = self.busy() is not None

    @staticmethod
    def busy() -> int | None:
        try:
            with open("/proc/stat") as fh:
                first = fh.readline()
        except OSError:
            return None
        fields = [int(v) for v in first.split()[1:8]]  # user nice system idle iowait irq soft
        return sum(fields) - fields[3] - fields[4]

    def read(self) -> tuple[float, float, float]:
        return (self.busy() or 0) / self.tick, time.process_time(), time.perf_counter()

    def others(self, a: tuple[float, float, float], b: tuple[float, float, float]) -> float:
        wall = (b[2] - a[2]) * self.cores
        if not self.available or wall <= 0:
            return float("nan")
        return min(1.0, max(0.0, ((b[0] - a[0]) - (b[1] - a[1])) / wall))


# == measurement =============================================================================
def measure(args: argparse.Namespace, batch_size: int, out_dir: str, clock: CpuClock) -> dict:
    """Warm up each side once, then ``args.epochs`` interleaved (engine, floor) pairs."""
    trainer = make_trainer(batch_size, 1 + args.epochs, args.train_samples, out_dir)
    data_device = str(trainer.data.train.source_inputs.device)  # data.device=auto: the GPU's
    try:
        floor = Floor(trainer)
        engine_epoch(trainer)  # warm-ups, untimed
        floor.epoch()
        BAR_SINK.seek(0)
        BAR_SINK.truncate()
        pairs = []  # (engine s, engine train-pass s, floor s, others' share: engine, floor)
        waits = []  # seconds waiting for the curves drawing after each engine epoch
        start = a = clock.read()
        for _ in range(args.epochs):
            engine_s, train_s, wait_s = engine_epoch(trainer)
            b = clock.read()
            floor_s = floor.epoch()
            c = clock.read()
            pairs.append((engine_s, train_s, floor_s, clock.others(a, b), clock.others(b, c)))
            waits.append(wait_s)
            a = c
        others = clock.others(start, a)
    finally:
        trainer.close()
    n = len(floor.y)
    for i, ((e, t, f, oe, of), w) in enumerate(zip(pairs, waits), 1):
        print(
            f"batch {batch_size} pair {i}: engine {e:.2f} s (train pass {t:.2f} s, curves wait "
            f"{w:.2f} s; others {oe:.0%}), floor {f:.2f} s (others {of:.0%}), ratio {f / e:.3f}",
            file=sys.stderr,
        )
    ratios = [f / e for e, _, f, _, _ in pairs]
    return {
        "batch": batch_size,
        "n": n,
        "engine": n / statistics.median(e for e, *_ in pairs),
        "floor": n / statistics.median(f for _, _, f, *_ in pairs),
        "ratio": statistics.median(ratios),
        "min": min(ratios),
        "max": max(ratios),
        "train_ratio": statistics.median(f / t for _, t, f, *_ in pairs),
        "others": others,
        "bar_bytes": BAR_SINK.tell(),
        "floor_s": statistics.median(f for _, _, f, *_ in pairs),
        "data_device": data_device,
    }


def print_table(rows: list[dict], epochs: int) -> None:
    """The result table (stdout)."""
    where = f"{_device_name()}, torch {torch.__version__}, threads {torch.get_num_threads()}"
    print(
        f"\nengine epoch (fit(): train + val + end_epoch; progress bar, logging, TensorBoard, "
        f"csv, curves, checkpoints on)\nvs compute floor (same MLP + Adam, one pre-normalised "
        f"float32 tensor, randperm batches, training step only)\n{rows[0]['n']:,} training "
        f"samples per epoch; {where}; medians of {epochs} interleaved pair(s)"
    )
    head = (
        f"{'batch':>5} {'engine samples/s':>16} {'floor samples/s':>15} {'ratio':>6} "
        f"{'min':>6} {'max':>6} {'train-pass ratio':>16} {'others CPU':>10}  result"
    )
    print(head + "\n" + "-" * len(head))
    for r in rows:
        ok = "ok" if r["ratio"] >= TARGET else f"below {TARGET:.2f}"
        print(
            f"{r['batch']:>5} {r['engine']:>16,.0f} {r['floor']:>15,.0f} {r['ratio']:>6.3f} "
            f"{r['min']:>6.3f} {r['max']:>6.3f} {r['train_ratio']:>16.3f} "
            f"{r['others']:>10.0%}  {ok}"
        )
    print(
        f"ratio = engine / floor samples/s, median of the per-pair ratios (min, max); target "
        f">= {TARGET:.2f}.\ntrain-pass ratio: the engine's train_epoch() alone against the "
        f"floor. others CPU: share of the machine's CPU\n(cores x wall time) other processes "
        f"used during the measured pairs; above ~10% the figures are noisy.\nprogress bar: "
        + ", ".join(f"{r['bar_bytes']:,} bytes drawn at batch {r['batch']}" for r in rows)
    )


def _device_name() -> str:
    if torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name()})"
    return "cpu"


# == breakdown ===============================================================================
def breakdown(args: argparse.Namespace, batch_size: int, out_dir: str, floor_s: float) -> None:
    """Engine epochs with timers around their pieces; prints seconds per epoch of each."""
    trainer = make_trainer(batch_size, 1 + args.epochs, args.train_samples, out_dir)
    t = trainer
    table = metrics_table(trainer).table
    sections = [  # (owner, method, name), printed in this order
        (t, "train_epoch", "train_epoch (total)"),
        (t.task, "prepare_batch", "  prepare_batch (uint8 -> normalised float)"),
        (t.task, "forward", "  forward"),
        (t.task, "compute_loss", "  compute_loss"),
        (t.precision, "backward", "  backward"),
        (t, "optimizer_step", "  optimizer_step (step, zero_grad, meters, metrics)"),
        (t.train_meter, "update", "    train_meter.update"),
        (t.task, "update_metrics", "    update_metrics (also in evaluate)"),
        (t.callbacks.on_train_batch_end, 0, "  progress bar update"),
        (t, "read_losses", "  read_losses (also in end_epoch)"),
        (t.writer, "add_scalar", "  TensorBoard add_scalar (also in end_epoch)"),
        (t, "evaluate", "evaluate val (total)"),
        (t, "end_epoch", "end_epoch (total)"),
        (table, "append", "  metrics.csv append"),
        (table, "plot", "  curves.png (start the drawing thread)"),
        (t.writer, "flush", "  TensorBoard flush"),
        (t.run_state, "state_dict", "  the checkpoint's content (RunState.state_dict)"),
        (t.run_state, "save", "  checkpoint save (best, last)"),
        (table, "wait", "curves.png drawing (waited for after the epoch)"),
    ]
    seconds = {name: 0.0 for *_, name in sections}
    calls = {name: 0 for *_, name in sections}

    def wrap(owner: Any, attr: Any, name: str) -> None:
        fn = owner[attr] if isinstance(owner, list) else getattr(owner, attr)

        @functools.wraps(fn)
        def timed(*a: Any, **k: Any) -> Any:
            sync(t.device)
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                sync(t.device)
                seconds[name] += time.perf_counter() - t0
                calls[name] += 1

        if isinstance(owner, list):  # a list of listeners, as the loop holds them
            owner[attr] = timed
        else:
            setattr(owner, attr, timed)

    try:
        engine_epoch(t)  # warm-up, untimed
        for owner, attr, name in sections:
            if owner is not None:
                wrap(owner, attr, name)
        epoch_s = [engine_epoch(t)[0] for _ in range(args.epochs)]
    finally:
        t.close()
    n = args.epochs
    print(
        f"\nengine time breakdown, batch {batch_size} (mean of {n} instrumented epoch(s); "
        "the timers add some overhead):"
    )
    print(f"  {'section':<52} {'s/epoch':>8} {'calls/epoch':>12} {'us/call':>9}")
    for name in seconds:
        s, c = seconds[name] / n, calls[name] / n
        print(f"  {name:<52} {s:8.3f} {c:12.0f} {1e6 * s / max(c, 1):9.1f}")
    print(f"  {'engine epoch (instrumented)':<52} {statistics.median(epoch_s):8.3f}")
    print(f"  {'floor epoch (median of the measurement)':<52} {floor_s:8.3f}")


# == main ====================================================================================
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
    p.add_argument("--epochs", type=int, default=4, help="measured pairs (after one warm-up)")
    p.add_argument("--train-samples", type=int, default=60_000, help="training pool (train+val)")
    p.add_argument("--breakdown", action="store_true", help="also time the engine's pieces")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's, all cores)")
    args = p.parse_args(argv)
    args.epochs = max(1, args.epochs)
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = CpuClock()
    with tempfile.TemporaryDirectory(prefix="dltemplate_bench_") as out_dir:
        rows = [measure(args, bs, str(Path(out_dir) / f"bs{bs}"), clock) for bs in args.batch_sizes]
        print_table(rows, args.epochs)
        sys.stdout.flush()
        if args.breakdown:
            for r in rows:
                breakdown(args, r["batch"], str(Path(out_dir) / f"bd{r['batch']}"), r["floor_s"])
        logging.getLogger("dltemplate").handlers.clear()  # its log files were in out_dir
    return 0


if __name__ == "__main__":
    sys.exit(main())
