"""Throughput of the engine's training epoch against a plain PyTorch loop, in one run.

What is measured
----------------
*Engine*: a :class:`~dltemplate.engine.trainer.TrainerBase` with a
:class:`~dltemplate.tasks.classification.ClassificationTask`, configured as a normal run
(logging, metrics, ``metrics.csv``, ``curves.png``, TensorBoard and checkpoints all on; only the
progress bar and the final test are off). One epoch is exactly what ``fit()`` does per epoch::

    trainer.train_epoch(); trainer.evaluate(trainer.val_loader, "val"); trainer.end_epoch(...)

*Reference*: the same model class (a fresh instance from the same seed), the same optimizer and
learning rate, over the same in-memory uint8 tensors (``trainer.data.train`` / ``.val``): index
batches from a random permutation, uint8 -> float, normalise, cross-entropy, ``zero_grad`` /
``backward`` / ``step``, and then a forward pass over the validation split (loss and correct
count kept on the device, read once). Nothing else.

The data is Fashion-MNIST-shaped and synthetic, made in memory (no download): 60,000 training
and 10,000 test uint8 images of 1x28x28, 10 classes, each label a fixed random linear function of
its image (so the model learns and "best" checkpoints get written as in a real run). With
``val_fraction = 1/12`` the pool splits 55,000 / 5,000 as usual for Fashion-MNIST. The model is
the seed's MLP 784-512-512-10 (``Vanilla``).

For each batch size: one warm-up epoch of each, then ``--epochs`` measured epochs of each,
interleaved (engine, reference, engine, reference, ...) so that machine noise hits both alike.
samples/s = training samples per epoch / the *best* (shortest) epoch time of each, since other
processes on a shared machine only ever add time; ratio = engine / reference samples/s, and the
target is a ratio of at least 0.85. The exit status is 0 whatever the result: this is a
measurement, not a test.

Shared machines: torch's default threads fill every core, so another process busy on one core
can make an epoch many times slower. Before each measured epoch the script waits (up to
``--max-wait`` s) until other processes use under 10% of the CPU (Linux ``/proc/stat``), records
the share they took during the epoch, takes the best of the undisturbed epochs, and runs up to
``--epochs`` extra rounds while either side has none. The table shows that share and the ratio
of the median epoch times; every epoch time goes to stderr.

``--breakdown`` then runs extra engine epochs with timers around the pieces of the epoch
(batch preparation, forward/loss, backward, optimizer step, metric and meter updates,
TensorBoard, the CSV and PNG writes, checkpoints) and prints where the time goes; these timed
epochs are not part of the table.

Run it from the repository root with the project's environment active::

    python benchmarks/classification.py                      # batch sizes 64 and 256, 3 epochs
    python benchmarks/classification.py --batch-sizes 128 --epochs 2 --train-samples 20000
    python benchmarks/classification.py --breakdown          # plus the engine's time breakdown

Torch keeps its default number of threads (printed in the header).
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import dltemplate.data  # noqa: F401  (registers the built-in components, as the CLI does)
import dltemplate.losses  # noqa: F401
import dltemplate.metrics  # noqa: F401
import dltemplate.models  # noqa: F401
import dltemplate.optim  # noqa: F401
import dltemplate.tasks  # noqa: F401
from dltemplate.config import Config, load_config
from dltemplate.data.base import DataInfo, InMemoryDataset, TensorSplit
from dltemplate.engine.trainer import TrainerBase
from dltemplate.registry import DATASETS, MODELS, OPTIMIZERS
from dltemplate.tasks.classification import ClassificationTask

TARGET_RATIO = 0.85
SEED = 42
LR = 1e-3
OPTIMIZER = "adam"
QUIET_SHARE = 0.1  # an epoch is "quiet" when other processes used under 10% of the CPU
VAL_FRACTION = 1 / 12  # 60,000 -> 55,000 train + 5,000 val, as usual for Fashion-MNIST


@DATASETS.register("bench_fmnist")
class BenchFashionMNIST(InMemoryDataset):
    """Synthetic Fashion-MNIST look-alike: uint8 1x28x28 images, 10 classes, made in memory.

    Pixels are uniform in [0, 255]; the label of an image is the argmax of a fixed random
    linear map of it, so a model can learn it.
    """

    info = DataInfo(
        input_shape=(1, 28, 28),
        num_classes=10,
        class_names=[f"class_{i}" for i in range(10)],
        mean=(0.286,),
        std=(0.353,),
    )

    def __init__(
        self,
        root: str = "",
        download: bool = True,
        num_train: int = 60_000,
        num_test: int = 10_000,
        seed: int = 0,
    ) -> None:
        super().__init__(root, download)
        self.num_train, self.num_test, self.seed = num_train, num_test, seed

    def load(self) -> tuple[TensorSplit, TensorSplit | None]:
        """A training pool of ``num_train`` and a test split of ``num_test`` images."""
        gen = torch.Generator().manual_seed(self.seed)
        projection = torch.randn(28 * 28, 10, generator=gen)

        def make(n: int) -> TensorSplit:
            images = torch.randint(0, 256, (n, 1, 28, 28), generator=gen, dtype=torch.uint8)
            centred = images.flatten(1).float() - 127.5
            labels = (centred @ projection).argmax(1)
            return TensorSplit(images, labels)

        return make(self.num_train), make(self.num_test)


# == engine ==================================================================================
def make_config(batch_size: int, epochs: int, train_samples: int, output_dir: str) -> Config:
    """A normal run's config on the benchmark data; only the progress bar and test are off."""
    overrides = [
        "experiment.name=bench_classification",
        f"experiment.output_dir={output_dir}",
        f"experiment.seed={SEED}",
        "data.name=bench_fmnist",
        f"data.batch_size={batch_size}",
        f"data.val_fraction={VAL_FRACTION}",
        f"data.args.num_train={train_samples}",
        f"data.args.num_test={max(1, train_samples // 6)}",
        "model.name=Vanilla",
        "model.args.hidden=[512, 512]",
        f"optimizer.name={OPTIMIZER}",
        f"optimizer.lr={LR}",
        f"trainer.epochs={epochs}",
        "trainer.progress_bar='off'",  # quoted: YAML reads a bare off as false
        "trainer.test_after_fit=false",
    ]
    return load_config(None, overrides)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that wall-clock times are complete."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Machine:
    """How much of the machine's CPU *other* processes use (Linux ``/proc/stat``; else 0).

    On a shared machine another process busy on one core can make a multi-threaded torch
    epoch several times slower, so measured epochs wait for a quiet moment first and each
    epoch's share of CPU taken by others is reported beside its time.
    """

    def __init__(self) -> None:
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.available = self._ticks() is not None

    @staticmethod
    def _ticks() -> tuple[int, int] | None:
        try:
            with open("/proc/stat") as fh:
                fields = [int(v) for v in fh.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields) - idle, sum(fields)

    def snapshot(self) -> tuple[int, int, float]:
        """(busy ticks, all ticks) of the whole machine and this process's CPU seconds."""
        busy, total = self._ticks() or (0, 0)
        return busy, total, time.process_time()

    def others_share(self, before: tuple[int, int, float], after: tuple[int, int, float]) -> float:
        """Share (0-1) of the machine's CPU that other processes used between two snapshots."""
        total = after[1] - before[1]
        if not self.available or total <= 0:
            return 0.0
        own = (after[2] - before[2]) * self.tick
        return min(1.0, max(0.0, (after[0] - before[0] - own) / total))

    def wait_quiet(self, max_wait: float, threshold: float = 0.1) -> None:
        """Wait (at most ``max_wait`` s) until others use under ``threshold`` of the CPU."""
        deadline = time.monotonic() + max_wait
        while self.available and time.monotonic() < deadline:
            before = self.snapshot()
            time.sleep(0.5)
            if self.others_share(before, self.snapshot()) < threshold:
                return


def timed(epoch: Callable[[], float], machine: Machine) -> tuple[float, float]:
    """Run one epoch; return its seconds and the share of CPU others took meanwhile."""
    before = machine.snapshot()
    seconds = epoch()
    return seconds, machine.others_share(before, machine.snapshot())


def engine_epoch(trainer: TrainerBase) -> float:
    """One epoch exactly as ``fit()`` runs it; returns its wall-clock seconds."""
    sync(trainer.device)
    started = time.perf_counter()
    train = trainer.train_epoch()
    val = trainer.evaluate(trainer.val_loader, "val")
    trainer.end_epoch(train, val, time.perf_counter() - started)
    sync(trainer.device)
    return time.perf_counter() - started


# == reference ===============================================================================
class Reference:
    """The plain loop: the same model, optimizer and tensors, nothing but the training step."""

    def __init__(self, trainer: TrainerBase) -> None:
        cfg = trainer.cfg
        self.device = trainer.device
        torch.manual_seed(cfg.experiment.seed)  # the trainer seeds the same way before its model
        self.model: nn.Module = MODELS.build(
            cfg.model.name,
            input_shape=tuple(trainer.info.input_shape),
            num_classes=trainer.info.num_classes,
            **cfg.model.args,
        ).to(self.device)
        self.optimizer: torch.optim.Optimizer = OPTIMIZERS.get(cfg.optimizer.name)(
            self.model.parameters(), lr=cfg.optimizer.lr
        )
        self.train = trainer.data.train  # the very tensors the engine trains on
        self.val = trainer.data.val
        self.batch_size = cfg.data.batch_size
        self.eval_batch_size = cfg.data.eval_batch_size or 2 * cfg.data.batch_size
        self.mean = torch.tensor(trainer.info.mean, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(trainer.info.std, device=self.device).view(1, -1, 1, 1)
        self.gen = torch.Generator().manual_seed(cfg.experiment.seed)

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images -> normalised floats on the device."""
        x = images.to(self.device, non_blocking=True).float().div_(255.0)
        return (x - self.mean) / self.std

    def epoch(self) -> float:
        """A training pass and a validation forward pass; returns the wall-clock seconds."""
        sync(self.device)
        started = time.perf_counter()
        self.model.train()
        order = torch.randperm(len(self.train), generator=self.gen)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            x = self.inputs(self.train.inputs[idx])
            y = self.train.targets[idx].to(self.device, non_blocking=True)
            loss = F.cross_entropy(self.model(x), y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        self.model.eval()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        with torch.no_grad():
            for start in range(0, len(self.val), self.eval_batch_size):
                x = self.inputs(self.val.inputs[start : start + self.eval_batch_size])
                y = self.val.targets[start : start + self.eval_batch_size].to(self.device)
                out = self.model(x)
                loss_sum += F.cross_entropy(out, y, reduction="sum")
                correct += (out.argmax(1) == y).sum()
        _ = (loss_sum.item(), correct.item())  # one read at the end, as any loop would
        sync(self.device)
        return time.perf_counter() - started


# == breakdown ===============================================================================
class Timers:
    """Accumulated wall-clock seconds and call counts per named section."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def wrap(self, owner: Any, attr: str, name: str) -> None:
        """Replace ``owner.attr`` (on this instance only) by a timed version of itself."""
        fn: Callable[..., Any] = getattr(owner, attr)

        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            sync(self.device)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                sync(self.device)
                self.seconds[name] += time.perf_counter() - t0
                self.calls[name] += 1

        setattr(owner, attr, timed)


def instrument(trainer: TrainerBase, timers: Timers) -> None:
    """Put timers around the pieces of an engine epoch (instance attributes only)."""
    t = timers
    t.wrap(trainer, "train_epoch", "train_epoch (total)")
    t.wrap(trainer, "evaluate", "evaluate val (total)")
    t.wrap(trainer, "end_epoch", "end_epoch (total)")
    # Per batch, inside train_epoch and evaluate.
    t.wrap(trainer.task, "prepare_batch", "  prepare_batch (uint8->float, normalise)")
    t.wrap(trainer.task, "forward", "  forward")
    t.wrap(trainer.task, "compute_loss", "  compute_loss")
    t.wrap(trainer.precision, "backward", "  backward")
    t.wrap(trainer, "optimizer_step", "  optimizer_step (step + zero_grad)")
    t.wrap(trainer.metrics, "update", "  metrics.update (4 metrics)")
    t.wrap(trainer.train_meter, "update", "  train_meter.update")
    # Per epoch, inside end_epoch (and TensorBoard per step in train_epoch).
    assert trainer.writer is not None
    t.wrap(trainer.writer, "add_scalar", "  TensorBoard add_scalar")
    t.wrap(trainer.writer, "flush", "  TensorBoard flush")
    t.wrap(trainer.table, "append", "  metrics.csv append")
    t.wrap(trainer.table, "plot", "  curves.png plot")
    t.wrap(trainer, "checkpoint_state", "  checkpoint_state")
    t.wrap(trainer, "save", "  checkpoint save (best/last)")


def breakdown(args: argparse.Namespace, batch_size: int, out_dir: str, machine: Machine) -> None:
    """Run timed engine epochs and print the seconds per epoch of each section.

    Each number is the median over the undisturbed epochs (over all when none was).
    """
    epochs = max(1, args.epochs)
    cfg = make_config(batch_size, 1 + epochs, args.train_samples, out_dir)
    trainer = TrainerBase(cfg, ClassificationTask(cfg))
    # (seconds per section, calls per section, epoch seconds, others' CPU share) per epoch
    engine: list[tuple[dict[str, float], dict[str, int], float, float]] = []
    plain: list[tuple[float, float]] = []
    try:
        engine_epoch(trainer)  # warm-up, untimed
        timers = Timers(trainer.device)
        instrument(trainer, timers)
        ref = Reference(trainer)
        ref.epoch()
        for _ in range(epochs):
            machine.wait_quiet(args.max_wait)
            secs, calls = dict(timers.seconds), dict(timers.calls)
            seconds, others = timed(lambda: engine_epoch(trainer), machine)
            engine.append(
                (
                    {k: v - secs.get(k, 0.0) for k, v in timers.seconds.items()},
                    {k: v - calls.get(k, 0) for k, v in timers.calls.items()},
                    seconds,
                    others,
                )
            )
            machine.wait_quiet(args.max_wait)
            plain.append(timed(ref.epoch, machine))
    finally:
        trainer.close()
    quiet_engine = [e for e in engine if e[3] < QUIET_SHARE] or engine
    quiet_plain = _quiet(plain) or plain
    disturbed = sum(e[3] >= QUIET_SHARE for e in engine) + len(plain) - len(_quiet(plain))
    note = f"median over {len(quiet_engine)} instrumented epochs; timers add some overhead"
    if disturbed:
        note += f"; {disturbed} epoch(s) disturbed by other processes"
        if quiet_engine is engine or quiet_plain is plain:
            note += ", NO undisturbed epoch on one side: numbers are noisy"
    print(f"\nengine time breakdown, batch size {batch_size} ({note}):")
    print(f"  {'section':<44} {'s/epoch':>8} {'calls/epoch':>12} {'us/call':>9}")
    for name in timers.seconds:
        secs = statistics.median(e[0].get(name, 0.0) for e in quiet_engine)
        n = statistics.median(e[1].get(name, 0) for e in quiet_engine)
        print(f"  {name:<44} {secs:8.3f} {n:12.0f} {1e6 * secs / max(n, 1):9.1f}")
    engine_s = statistics.median(e[2] for e in quiet_engine)
    ref_s = statistics.median(t for t, _ in quiet_plain)
    print(f"  {'engine epoch (instrumented)':<44} {engine_s:8.3f}")
    print(f"  {'reference epoch (uninstrumented)':<44} {ref_s:8.3f}")


# == main ====================================================================================
def measure(
    args: argparse.Namespace, batch_size: int, out_dir: str, machine: Machine
) -> dict[str, float]:
    """Warm up, then interleave engine and reference epochs; return samples/s of each."""
    epochs = 1 + 2 * args.epochs  # warm-up, measured epochs and room for the extra rounds
    cfg = make_config(batch_size, epochs, args.train_samples, out_dir)
    trainer = TrainerBase(cfg, ClassificationTask(cfg))
    try:
        ref = Reference(trainer)
        n_train = len(trainer.data.train)
        engine_epoch(trainer)  # warm-up of each, untimed
        ref.epoch()
        engine: list[tuple[float, float]] = []
        plain: list[tuple[float, float]] = []
        rounds = 0
        # A B A B ...; up to ``epochs`` extra rounds while either side has no quiet epoch yet.
        while rounds < args.epochs or (
            rounds < 2 * args.epochs and not (_quiet(engine) and _quiet(plain))
        ):
            machine.wait_quiet(args.max_wait)
            engine.append(timed(lambda: engine_epoch(trainer), machine))
            machine.wait_quiet(args.max_wait)
            plain.append(timed(ref.epoch, machine))
            rounds += 1
    finally:
        trainer.close()

    def show(runs: list[tuple[float, float]]) -> str:
        return ", ".join(f"{t:.2f} s ({100 * o:.0f}%)" for t, o in runs)

    print(f"batch {batch_size}: engine epochs {show(engine)}; reference epochs {show(plain)} "
          "(in brackets: CPU share used by other processes)", file=sys.stderr)  # fmt: skip
    (engine_s, engine_others) = min(_quiet(engine) or engine)
    (ref_s, ref_others) = min(_quiet(plain) or plain)
    median_ratio = statistics.median(t for t, _ in plain) / statistics.median(t for t, _ in engine)
    return {
        "batch_size": batch_size,
        "n_train": n_train,
        "engine_s": engine_s,
        "ref_s": ref_s,
        "engine_rate": n_train / engine_s,
        "ref_rate": n_train / ref_s,
        "ratio": ref_s / engine_s,
        "median_ratio": median_ratio,
        "others": max(engine_others, ref_others),
    }


def _quiet(runs: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (seconds, others' share) epochs that other processes did not disturb."""
    return [run for run in runs if run[1] < QUIET_SHARE]


def print_table(rows: list[dict[str, float]], device: str) -> None:
    """The result table (stdout)."""
    n_train = int(rows[0]["n_train"]) if rows else 0
    where = f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    print(f"\nengine vs plain loop, one epoch = train {n_train} samples + validation; {where}")
    head = f"{'batch':>6} {'engine s/ep':>11} {'ref s/ep':>9} {'engine samples/s':>17} "
    head += f"{'ref samples/s':>14} {'ratio':>6} {'target':>7} {'median ratio':>12} "
    head += f"{'others CPU':>10}  result"
    print(
        "best epoch of each (s/ep, samples/s, ratio = engine / reference); median ratio for info;"
    )
    print("others CPU: share of the machine's CPU other processes used during those best epochs")
    print(f"(best among epochs where it was under {QUIET_SHARE:.0%}, when there were any)")
    print(head)
    print("-" * len(head))
    for r in rows:
        ok = "ok" if r["ratio"] >= TARGET_RATIO else "BELOW TARGET"
        if r["others"] >= QUIET_SHARE:
            ok += " (noisy: no undisturbed epoch)"
        print(f"{int(r['batch_size']):>6} {r['engine_s']:>11.2f} {r['ref_s']:>9.2f} "
              f"{r['engine_rate']:>17,.0f} {r['ref_rate']:>14,.0f} {r['ratio']:>6.3f} "
              f"{'>=' + str(TARGET_RATIO):>7} {r['median_ratio']:>12.3f} "
              f"{100 * r['others']:>9.0f}%  {ok}")  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
    p.add_argument("--epochs", type=int, default=3, help="measured epochs of each (after warm-up)")
    p.add_argument("--train-samples", type=int, default=60_000, help="training pool (train+val)")
    p.add_argument("--breakdown", action="store_true", help="also time the engine's pieces")
    quiet = "seconds to wait for other processes to go quiet before each measured epoch"
    p.add_argument("--max-wait", type=float, default=30.0, help=quiet)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; always returns 0."""
    args = parse_args(argv)
    args.epochs = max(1, args.epochs)
    rows = []
    machine = Machine()
    with tempfile.TemporaryDirectory(prefix="dltemplate_bench_") as out_dir:
        for bs in args.batch_sizes:
            rows.append(measure(args, bs, str(Path(out_dir) / f"bs{bs}"), machine))
        print_table(rows, _device_name())
        if args.breakdown:
            for bs in args.batch_sizes:
                breakdown(args, bs, str(Path(out_dir) / f"breakdown_bs{bs}"), machine)
    logging.getLogger("dltemplate").handlers.clear()  # the log files were in out_dir
    return 0


def _device_name() -> str:
    """The device that ``experiment.device=auto`` picks here."""
    if torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name()})"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


if __name__ == "__main__":
    sys.exit(main())
