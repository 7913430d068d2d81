"""Carvana-layout data at a size that fills memory: the mapped decode cache against the others.

Generates ``--pairs`` synthetic Carvana pairs at 1918x1280 (``make_sample_carvana``; the time is
printed apart and is part of no figure), or reuses ``--data``, then measures at ``--scale``:

- *cold build*: ``Carvana(root, scale, workers=0).load()`` on an empty cache (decoding every
  JPEG/GIF in worker processes, writing the ``.npy`` cache): seconds, pairs/s, the cache's size on
  disk and the peak RSS of this process meanwhile (the cold pass decodes into the mapped cache
  file: its private memory should not grow with the data);
  then a warm load (map + CRC check).
- *training runs*: ``dltemplate train configs/unet_carvana_half.yaml`` as subprocesses, each with
  the same small UNet (``--base-width``, ``--depth``), the same ``--batches`` training batches per
  epoch (same seed, so the same images) and ``--epochs`` epochs, augmentation off, no test, no
  checkpoints. A callback of this file (:class:`DataProbe`) times every training epoch and the
  wait for each batch, and at the end writes its process's memory figures. Runs: the mapped
  cache (``mode: cache``), the in-memory path (:class:`CarvanaInMemory`: the same arrays copied
  into private memory; skipped when they need more than half of the available RAM), ``mode:
  files`` with ``data.num_workers`` 0 and 2, the mapped cache in 2 processes (torchrun,
  ``OMP_NUM_THREADS=1``), and the mapped and in-memory paths on a quarter of the pairs.

Columns of the table:

- *images/s*: training images / seconds of the training passes after the first epoch (the
  first is the warm-up), the median over ``--rounds`` (1-process runs interleaved per round);
  *vs in-memory*: that / the in-memory run's (the goal for the mapped cache: >= 0.95);
- *waiting*: the share of those seconds spent waiting for the next batch (from the end of a
  step to the start of the next, the loader's ``next()``);
- *VmHWM*: peak RSS, which counts the touched pages of the mapped cache (shared, page cache);
  *RssFile*: file pages mapped at the end (the cache, shared, plus ~100 MB of libraries);
  *peak RssAnon*: private memory, the highest value read at the end of each forward pass and of
  each step; *Pss*: the proportional set size at the end (shared pages divided among the
  processes mapping them); *workers' Pss*: the DataLoader workers' (``mode: files``).

What it is to show: with the mapped cache, private memory per process should stay flat as the
dataset grows, its pages shared by the processes of a node; the in-memory copy grows with it.
Run from the repository root: ``python benchmarks/data_scale.py [--pairs 1000 --scale 0.5]``.
The exit status is 0 whatever the numbers: this measures, it does not test.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import dltemplate
from dltemplate.callbacks.base import Callback
from dltemplate.data.base import TensorSplit
from dltemplate.data.carvana import Carvana
from dltemplate.data.sample_carvana import make_sample_carvana

HERE = Path(__file__).resolve().parent
CONFIG = HERE.parent / "configs" / "unet_carvana_half.yaml"
MB = 2**20
STATUS_KEYS = ("VmHWM", "RssAnon", "RssFile")
THROUGHPUT = ("mapped cache", "in-memory", "files, 0 workers", "files, 2 workers")


def _kb_fields(path: str, keys: tuple[str, ...]) -> dict[str, float]:
    """The ``key: N kB`` lines of a /proc file, in MB."""
    out = {}
    for line in Path(path).read_text().splitlines():
        key, _, value = line.partition(":")
        if key in keys:
            out[key] = int(value.split()[0]) / 1024
    return out


def memory() -> dict[str, float]:
    """This process's VmHWM, RssAnon, RssFile (/proc/self/status) and Pss (smaps_rollup), MB."""
    figures = _kb_fields("/proc/self/status", STATUS_KEYS)
    return figures | _kb_fields("/proc/self/smaps_rollup", ("Pss",))


def children_pss() -> float:
    """The summed Pss (MB) of this process's children (the DataLoader workers)."""
    total = 0.0
    for task in Path("/proc/self/task").iterdir():
        for pid in (task / "children").read_text().split():
            with contextlib.suppress(OSError):  # a worker may have just left
                total += _kb_fields(f"/proc/{pid}/smaps_rollup", ("Pss",)).get("Pss", 0.0)
    return total


class DataProbe(Callback):
    """Times each training epoch and its waits for batches; at the end of the run, writes them
    and this process's memory figures to ``<out>/rank<R>.json``."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.epochs: list[dict[str, float]] = []
        self.peak_anon = 0.0
        self.start = self.last = self.wait = 0.0

    def sample(self, *_: Any) -> None:
        """Keep the highest private memory (RssAnon) seen."""
        anon = _kb_fields("/proc/self/status", ("RssAnon",))["RssAnon"]
        self.peak_anon = max(self.peak_anon, anon)

    def on_fit_start(self, trainer: Any) -> None:
        """Sample at the end of every forward pass too, when activations fill memory most."""
        trainer.unwrapped_model.register_forward_hook(self.sample)

    def on_train_epoch_start(self, trainer: Any) -> None:
        """Start the epoch's clock."""
        self.start = self.last = time.perf_counter()
        self.wait = 0.0

    def on_train_batch_start(self, trainer: Any, batch_index: int) -> None:
        """Count the time since the last step (or the epoch's start) as waiting for data."""
        self.wait += time.perf_counter() - self.last

    def on_train_batch_end(self, trainer: Any, batch_index: int, loss: torch.Tensor) -> None:
        """Sample private memory, then restart the waiting clock."""
        self.sample()
        self.last = time.perf_counter()

    def on_train_epoch_end(self, trainer: Any, metrics: dict[str, float]) -> None:
        """Record the epoch: seconds, seconds waiting, training images over all processes."""
        images = sum(trainer.train_loader.global_batch_sizes())
        seconds = time.perf_counter() - self.start
        self.epochs.append({"seconds": seconds, "wait": self.wait, "images": images})

    def on_fit_end(self, trainer: Any) -> None:
        """Write this rank's figures."""
        figures = {"epochs": self.epochs, "peak_RssAnon": self.peak_anon, **memory()}
        figures["workers_Pss"] = children_pss()
        (self.out / f"rank{trainer.dist.rank}.json").write_text(json.dumps(figures))


class CarvanaInMemory(Carvana):
    """Carvana read from the same cache, then copied into ordinary (private) memory: the
    in-memory path that the mapped cache is measured against."""

    def load(self) -> tuple[TensorSplit, None]:
        """The mapped split's arrays, cloned."""
        split, _ = super().load()
        inputs, targets = split.source_inputs.clone(), split.source_targets.clone()
        return TensorSplit(inputs, targets, split.groups, split.names), None


def prepare_data(args: argparse.Namespace, work: Path) -> tuple[Path, float | None]:
    """The data root (reused when ``--data`` holds images) and the generation seconds."""
    root = Path(args.data) if args.data else work / "data"
    if any((root / "train").glob("*.jpg")):
        return root, None
    start = time.perf_counter()
    views = max(1, min(16, args.pairs // 40))  # enough cars for the splits of small sets
    make_sample_carvana(root, n=args.pairs, views=views)
    return root, time.perf_counter() - start


def quarter_copy(root: Path, dest: Path, n: int) -> Path:
    """A dataset of the first ``n`` pairs of ``root`` (by name), as symbolic links."""
    for sub in ("train", "train_masks"):
        (dest / sub).mkdir(parents=True, exist_ok=True)
    for image in sorted((root / "train").glob("*.jpg"))[:n]:
        mask = f"{image.stem}_mask.gif"
        (dest / "train" / image.name).symlink_to(image.resolve())
        (dest / "train_masks" / mask).symlink_to((root / "train_masks" / mask).resolve())
    return dest


def cold_build(root: Path, scale: float, cache: Path) -> dict[str, Any]:
    """Decode ``root`` into an empty ``cache`` and load it again warm; the figures."""
    shutil.rmtree(cache, ignore_errors=True)
    with contextlib.suppress(OSError):  # restart VmHWM (Linux: writing 5 resets it)
        Path("/proc/self/clear_refs").write_text("5")
    start = time.perf_counter()
    split, _ = Carvana(str(root), scale=scale, workers=0, cache_dir=str(cache)).load()
    seconds = time.perf_counter() - start
    peak = memory()["VmHWM"]
    shape, pairs = tuple(split.source_inputs.shape[1:]), len(split)
    del split
    gc.collect()
    start = time.perf_counter()
    warm, _ = Carvana(str(root), scale=scale, cache_dir=str(cache)).load()
    warm_s = time.perf_counter() - start
    del warm
    size = sum(f.stat().st_size for f in cache.iterdir())
    return {"root": root, "seconds": seconds, "pairs": pairs, "shape": shape, "bytes": size,
            "peak": peak, "warm": warm_s}  # fmt: skip


def train_run(name: str, work: Path, overrides: list[str], procs: int = 1) -> list[dict] | None:
    """Run ``dltemplate train`` (under torchrun for ``procs`` > 1) with the probe; the ranks'
    figures, or None when the run failed (its log's end goes to stderr)."""
    out = work / "probe" / name
    out.mkdir(parents=True)
    probe = {"name": "data_scale:DataProbe", "args": {"out": str(out)}}
    off = [{"name": n, "enabled": False} for n in ("tensorboard", "metrics_table", "checkpoint")]
    cmd = ["-m", "dltemplate", "train", str(CONFIG), *overrides,
           f"experiment.output_dir={work / 'runs' / name}",
           f"callbacks={json.dumps(off + [probe])}"]  # fmt: skip
    env = dict(os.environ)
    src = str(Path(dltemplate.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), src, env.get("PYTHONPATH")) if p)
    if procs > 1:
        cmd = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs), *cmd]
        env["OMP_NUM_THREADS"] = "1"
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *cmd], env=env, capture_output=True, text=True)
    print(f"  {name}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    ranks = sorted(out.glob("rank*.json"))
    if done.returncode != 0 or len(ranks) != procs:
        print(f"  {name} FAILED (exit {done.returncode}):\n{done.stderr[-3000:]}", file=sys.stderr)
        return None
    return [json.loads(p.read_text()) for p in ranks]


def rate(rank: dict) -> tuple[float, float]:
    """(images/s, waiting share) of the epochs after the first (all of them if only one)."""
    warm = rank["epochs"][1:] or rank["epochs"]
    seconds = sum(e["seconds"] for e in warm)
    return sum(e["images"] for e in warm) / seconds, sum(e["wait"] for e in warm) / seconds


def mem_available() -> float:
    """MemAvailable in bytes."""
    return _kb_fields("/proc/meminfo", ("MemAvailable",))["MemAvailable"] * MB


@dataclass
class Measured:
    """What main() gathered: generation seconds, the cold builds, per run its pairs and its
    ranks' figures per round (None: failed), and the runs skipped (why)."""

    load_at_start: float
    gen_s: float | None = None
    cold: dict[str, Any] = field(default_factory=dict)
    small: dict[str, Any] = field(default_factory=dict)
    results: dict[str, list[list[dict] | None]] = field(default_factory=dict)
    pairs: dict[str, int] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)


def plan(args: argparse.Namespace, work: Path, m: Measured) -> dict[str, tuple[list[str], int]]:
    """The runs, in order: name -> (overrides, processes); sets their pairs in ``m``."""
    n, quarter = m.cold["pairs"], m.small["pairs"]
    common = [f"data.args.scale={args.scale}", "data.augment=false",
              f"model.args.base_width={args.base_width}", f"model.args.depth={args.depth}",
              f"trainer.epochs={args.epochs}", f"trainer.limit_train_batches={args.batches}",
              "trainer.limit_val_batches=2", "trainer.test_after_fit=false",
              "trainer.progress_bar=off"]  # fmt: skip
    one = common + ([f"experiment.threads={args.threads}"] if args.threads else [])
    full = [f"data.root={m.cold['root']}", f"data.args.cache_dir={work / 'cache'}"]
    small = [f"data.root={m.small['root']}", f"data.args.cache_dir={work / 'cache-quarter'}"]
    memory = ["data.name=data_scale:CarvanaInMemory"]
    runs = {  # name: (overrides, processes, pairs)
        "mapped cache": (full + one, 1, n),
        "in-memory": (full + one + memory, 1, n),
        "files, 0 workers": (full + one + ["data.args.mode=files", "data.num_workers=0"], 1, n),
        "files, 2 workers": (full + one + ["data.args.mode=files", "data.num_workers=2"], 1, n),
        "mapped cache, torchrun": (full + common, 2, n),
        "mapped cache, 1/4 pairs": (small + one, 1, quarter),
        "in-memory, 1/4 pairs": (small + one + memory, 1, quarter),
    }
    half_ram = mem_available() / 2
    for name, c in (("in-memory", m.cold), ("in-memory, 1/4 pairs", m.small)):
        if c["bytes"] > half_ram:
            m.skipped.append(f"{name}: needs {c['bytes'] / 1e9:.2f} GB, over half the free RAM")
            del runs[name]
    m.pairs.update({name: count for name, (_, _, count) in runs.items()})
    return {name: (ovr, procs) for name, (ovr, procs, _) in runs.items()}


def main() -> None:
    """Measure and print the table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", type=int, default=1000, help="pairs to generate (1918x1280)")
    p.add_argument("--scale", type=float, default=0.5, help="Carvana scale (0.5: 959x640)")
    p.add_argument("--data", help="data root: reused if it holds train/*.jpg, else generated")
    p.add_argument("--keep", action="store_true", help="keep the work folder (data, logs)")
    p.add_argument("--batches", type=int, default=20, help="training batches per epoch")
    p.add_argument("--epochs", type=int, default=2, help="epochs per run; the first is warm-up")
    p.add_argument("--rounds", type=int, default=1, help="rounds of the 4 throughput runs")
    p.add_argument("--threads", type=int, help="torch threads of 1-process runs (default: all)")
    p.add_argument("--base-width", type=int, default=8, help="UNet base width")
    p.add_argument("--depth", type=int, default=3, help="UNet depth")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dltemplate-data-scale-"))
    m = Measured(load_at_start=os.getloadavg()[0])
    try:
        root, m.gen_s = prepare_data(args, work)
        m.cold = cold_build(root, args.scale, work / "cache")
        quarter = quarter_copy(root, work / "quarter", max(1, m.cold["pairs"] // 4))
        m.small = cold_build(quarter, args.scale, work / "cache-quarter")
        runs = plan(args, work, m)
        print(f"runs in {work}", file=sys.stderr)
        for r in range(args.rounds):  # every run once, then rounds of the throughput runs
            for name, (ovr, procs) in runs.items():
                if r == 0 or name in THROUGHPUT:
                    ranks = train_run(f"{name}-{r}", work, ovr, procs)
                    m.results.setdefault(name, []).append(ranks)
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    report(args, m)


def report(args: argparse.Namespace, m: Measured) -> None:
    """Print the machine, the cold builds and the markdown table of the runs."""
    cold, small, pairs = m.cold, m.small, m.pairs
    h, w = cold["shape"][1:]
    print(f"## data_scale: {cold['pairs']} Carvana-layout pairs at scale {args.scale} ({w}x{h}), "
          f"UNet base_width {args.base_width} depth {args.depth}")  # fmt: skip
    print(f"command: python {' '.join(sys.argv)}")
    print(f"machine: {os.cpu_count()} cores, {mem_available() / 2**30:.1f} GiB available, "
          f"torch {torch.__version__}, Python {platform.python_version()}; load average "
          f"{m.load_at_start:.2f} at the start, {os.getloadavg()[0]:.2f} at the end")  # fmt: skip
    if m.load_at_start > 0.5:
        print("(the machine was busy: figures are noisy; --threads 1 is steadier there)")
    if m.gen_s is not None:
        print(f"generation (no figure): {cold['pairs']} pairs in {m.gen_s:.1f} s")
    for label, c in (("cold cache build", cold), ("cold cache build, 1/4 pairs", small)):
        print(f"{label}: {c['seconds']:.1f} s, {c['pairs'] / c['seconds']:.1f} pairs/s, "
              f"cache {c['bytes'] / 1e9:.3f} GB on disk, peak RSS of this process "
              f"{c['peak']:.0f} MB; warm load (map + CRC) {c['warm']:.2f} s")  # fmt: skip
    for note in m.skipped:
        print(f"skipped {note}")
    speed = {  # name: median images/s and waiting share over the rounds
        name: [statistics.median(v) for v in zip(*(rate(r[0]) for r in rounds if r))]
        for name, rounds in m.results.items()
        if any(rounds)
    }
    base = speed.get("in-memory", [0.0])[0]
    print("\n| run | pairs | processes | images/s | vs in-memory | waiting | VmHWM | RssFile "
          "| peak RssAnon | Pss | workers' Pss |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, rounds in m.results.items():
        ranks = next((r for r in rounds if r), None)
        if ranks is None:
            print(f"| {name} | {pairs[name]} | | failed | | | | | | | |")
            continue
        for i, rank in enumerate(ranks):
            images, waiting = speed[name] if i == 0 else rate(rank)
            ratio = f"{images / base:.3f}" if base and i == 0 and name in THROUGHPUT else ""
            mem = " | ".join(f"{rank[k]:.0f}" for k in ("VmHWM", "RssFile", "peak_RssAnon", "Pss"))
            procs = f"{len(ranks)} (rank {i})" if len(ranks) > 1 else "1"
            workers = f"{rank['workers_Pss']:.0f}" if rank["workers_Pss"] else ""
            print(f"| {name} | {pairs[name]} | {procs} | {images:.2f} | {ratio} | "
                  f"{100 * waiting:.1f}% | {mem} | {workers} |")  # fmt: skip
    print(f"\nMemory in MB per process at the end of the run (VmHWM: peak). images/s: training "
          f"passes after the first of {args.epochs} epochs (<= {args.batches} batches each), over "
          f"all processes; median of {args.rounds} round(s) for the first four runs.")  # fmt: skip
    if base and "mapped cache" in speed:
        ratio = speed["mapped cache"][0] / base
        verdict = "met" if ratio >= 0.95 else "NOT met"
        print(f"mapped / in-memory: {ratio:.3f} (goal >= 0.95: {verdict})")
    for name in ("mapped cache", "in-memory"):
        big, little = (m.results.get(k, [None])[0] for k in (name, f"{name}, 1/4 pairs"))
        if big and little:
            a, b = little[0]["peak_RssAnon"], big[0]["peak_RssAnon"]
            print(f"{name}: peak RssAnon {a:.0f} MB at {small['pairs']} pairs, {b:.0f} MB at "
                  f"{cold['pairs']} pairs ({b - a:+.0f} MB; the cache grew by "
                  f"{(cold['bytes'] - small['bytes']) / MB:.0f} MB)")  # fmt: skip


if __name__ == "__main__":
    main()
