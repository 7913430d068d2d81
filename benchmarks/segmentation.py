"""Segmentation input pipeline and engine speed on the Carvana-layout sample data, in one run.

Prints, for UNet on the synthetic sample set (``make-sample-data carvana``, 64 pairs at
1918x1280, trained at 1/8 scale):

- *cold*: images/s of the first run's data load (decoding every JPEG/GIF, in worker processes)
  plus its first epoch — what the first run on a dataset costs;
- *warm*: images/s of an epoch through the engine (``train_epoch`` + validation + ``end_epoch``)
  when the decoded cache exists — every later epoch and every later run;
- *reference*: images/s of the same model and optimizer on the same in-memory tensors, with a
  plain loop (normalise, forward, loss, backward, step) and the same validation forward pass;
- *waiting*: the share of the engine's training-step time spent waiting for the next batch
  (the loader's ``next()``), the figure the design keeps under 10% after the first epoch.

Augmentation is off on both sides, so that the engine and the plain loop do the same work.
Run from the repository root: ``python benchmarks/segmentation.py [--n 64] [--epochs 3]``.
The exit status is 0 whatever the numbers: this measures, it does not test.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from dltemplate.assemble import build_trainer
from dltemplate.config import load_config
from dltemplate.data.sample_carvana import make_sample_carvana
from dltemplate.engine.trainer import TrainerBase
from dltemplate.tasks.segmentation import SegmentationTask

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "unet_carvana.yaml"


class TimedLoader:
    """Wraps a loader and adds up the time spent in ``next()`` (waiting for data)."""

    def __init__(self, loader) -> None:
        self.loader, self.waiting = loader, 0.0

    def __getattr__(self, name: str):
        return getattr(self.loader, name)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        it = iter(self.loader)
        while True:
            start = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            self.waiting += time.perf_counter() - start
            yield batch


def engine_epoch(trainer: TrainerBase) -> tuple[float, float, float]:
    """(epoch seconds, training-pass seconds, seconds waiting for data) of one engine epoch."""
    timed = TimedLoader(trainer.train_loader)
    trainer.train_loader = timed
    start = time.perf_counter()
    train = trainer.train_epoch()
    train_s = time.perf_counter() - start
    val = trainer.validate()
    trainer.end_epoch(train, val, time.perf_counter() - start)
    trainer.train_loader = timed.loader
    return time.perf_counter() - start, train_s, timed.waiting


def reference_epoch(trainer: TrainerBase, model, optimizer, criterion, epoch: int) -> float:
    """Seconds of a plain-loop epoch of ``model`` over the trainer's in-memory tensors."""
    data, info, device = trainer.data, trainer.info, trainer.device
    mean = torch.tensor(info.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(info.std, device=device).view(1, -1, 1, 1)
    bs = trainer.cfg.data.batch_size
    start = time.perf_counter()
    model.train()
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(epoch))
    for i in range(0, len(order), bs):
        idx = order[i : i + bs]
        x = (data.train.inputs[idx].to(device).float() / 255 - mean) / std
        loss = criterion(model(x), data.train.targets[idx].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        for i in range(0, len(data.val), 2 * bs):
            x = (data.val.inputs[i : i + 2 * bs].to(device).float() / 255 - mean) / std
            criterion(model(x), data.val.targets[i : i + 2 * bs].to(device))
    return time.perf_counter() - start


def main() -> None:
    """Measure and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=64, help="image/mask pairs to generate")
    parser.add_argument("--epochs", type=int, default=3, help="measured warm epochs")
    args = parser.parse_args()
    logging.disable(logging.INFO)  # the engine's per-epoch lines would drown the table
    work = Path(tempfile.mkdtemp(prefix="dltemplate-seg-bench-"))
    try:
        data_root = make_sample_carvana(work / "data", n=args.n)
        overrides = [f"data.root={data_root}", f"experiment.output_dir={work / 'runs'}",
                     "trainer.progress_bar=off", "trainer.test_after_fit=false",
                     f"trainer.epochs={args.epochs + 2}", "data.augment=false"]  # fmt: skip
        cfg = load_config(CONFIG, overrides)

        start = time.perf_counter()
        cold = build_trainer(cfg, SegmentationTask(cfg))  # decodes every file, fills the cache
        load_s = time.perf_counter() - start
        for fn in cold.callbacks.on_fit_start:  # as fit() does: TensorBoard, the table
            fn(cold)
        epoch_s, _, _ = engine_epoch(cold)
        n_train = len(cold.data.train)
        cold.close()
        cold_rate = n_train / (load_s + epoch_s)

        start = time.perf_counter()
        warm = build_trainer(cfg, SegmentationTask(cfg))  # reads the cache
        for fn in warm.callbacks.on_fit_start:  # as fit() does: TensorBoard, the table
            fn(warm)
        warm_load_s = time.perf_counter() - start
        model = SegmentationTask(cfg).build_model(warm.info).to(warm.device)
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.optimizer.lr)
        criterion = warm.criterion
        engine_epoch(warm)  # warm-up, both sides
        reference_epoch(warm, model, optimizer, criterion, 0)
        engine, reference, waiting = [], [], []
        for epoch in range(args.epochs):  # interleaved, so machine noise hits both alike
            total, train_s, wait_s = engine_epoch(warm)
            engine.append(total)
            waiting.append(wait_s / train_s)
            reference.append(reference_epoch(warm, model, optimizer, criterion, epoch + 1))
        warm.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    e, r = min(engine), min(reference)
    print(f"UNet on {args.n} synthetic Carvana pairs at 1/8 scale, {n_train} training images, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")  # fmt: skip
    print(f"cold: data load {load_s:.2f}s (decode + cache) + first epoch {epoch_s:.2f}s "
          f"-> {cold_rate:.1f} images/s")  # fmt: skip
    print(f"warm: data load {warm_load_s:.2f}s (cache)")
    print(f"{'':10}{'s/epoch':>10}{'images/s':>10}")
    print(f"{'engine':10}{e:10.2f}{n_train / e:10.1f}")
    print(f"{'reference':10}{r:10.2f}{n_train / r:10.1f}")
    print(f"ratio engine/reference (best epochs): {r / e:.3f}")
    print(f"waiting for data: {100 * statistics.median(waiting):.2f}% of training-step time "
          f"(median of {len(waiting)} warm epochs; target < 10%)")  # fmt: skip


if __name__ == "__main__":
    main()
