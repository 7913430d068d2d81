"""The seed template's command-line flags, translated into ``dltemplate`` commands.

The seed's scripts (``trainer_vanilla.py``, ``eval_vanilla.py``) call these, so their
documented commands keep working unchanged.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dltemplate.cli import main


def _seed_bool(text: str) -> bool:
    return text.strip().lower() in ("1", "true", "yes", "y")


def seed_train_main(argv: list[str], default_config: Path, *, exiting: bool = False) -> int:
    """``--proj_name --model_type --data_type --output_dir --gpu_devices --data_dir`` -> train
    (``exiting``: the script's process ends next, as :func:`dltemplate.cli.main` takes it)."""
    p = argparse.ArgumentParser(
        description="Train as the seed template did: each flag sets a key of the config "
        f"(--config, default {default_config.name}); section.key=value arguments after the "
        "flags override any other key. Runs 'dltemplate train'.",
    )
    p.add_argument("--proj_name", default=None, help="run name (experiment.name)")
    p.add_argument(
        "--model_type", default=None, help="model, a registered name (model.name), e.g. Vanilla"
    )
    p.add_argument(
        "--data_type",
        default=None,
        help="dataset, a registered name (data.name), e.g. FashionMNIST",
    )
    p.add_argument(
        "--output_dir",
        default=None,
        help="folder the run directory goes in (experiment.output_dir)",
    )
    p.add_argument(
        "--gpu_devices",
        default=None,
        nargs="+",
        type=int,
        help="GPU ids, e.g. 0 1 (experiment.gpu_devices); several: DataParallel",
    )
    p.add_argument("--data_dir", default=None, help="folder holding the dataset (data.root)")
    p.add_argument("--config", default=str(default_config), help="base YAML config")
    p.add_argument("--epochs", type=int, default=None, help="epochs to train (trainer.epochs)")
    p.add_argument(
        "--batch_size", type=int, default=None, help="samples per batch (data.batch_size)"
    )
    p.add_argument("--lr", type=float, default=None, help="learning rate (optimizer.lr)")
    args, extra = p.parse_known_args(argv)
    if args.output_dir and args.data_dir and _inside(args.output_dir, args.data_dir):
        # The seed's Carvana command wrote its runs into the dataset: keep data and runs apart.
        moved = f"./Results/{args.proj_name or Path(args.config).stem}"
        print(
            f"dltemplate: --output_dir {args.output_dir} is inside --data_dir {args.data_dir}: "
            f"runs go to {moved} instead (data folders hold data only)",
            file=sys.stderr,
        )
        args.output_dir = moved
    mapping = {
        "experiment.name": args.proj_name,
        "model.name": args.model_type,
        "data.name": args.data_type,
        "experiment.output_dir": args.output_dir,
        "experiment.gpu_devices": args.gpu_devices,
        "data.root": args.data_dir,
        "trainer.epochs": args.epochs,
        "data.batch_size": args.batch_size,
        "optimizer.lr": args.lr,
    }
    overrides = [f"{k}={v}" for k, v in mapping.items() if v is not None]
    return main(["train", args.config, *overrides, *extra], exiting=exiting)


def _inside(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or lies within it."""
    path_abs, folder_abs = Path(path).resolve(), Path(folder).resolve()
    return path_abs == folder_abs or folder_abs in path_abs.parents


def seed_eval_main(argv: list[str], *, exiting: bool = False) -> int:
    """``--model_path [--data_dir] [--save_path] [--viz True]`` -> ``dltemplate eval``
    (``exiting`` as for :func:`seed_train_main`)."""
    p = argparse.ArgumentParser(description="Evaluate as the seed template did.")
    p.add_argument("--model_path", required=True, help="checkpoint (or run directory)")
    p.add_argument("--data_dir", default=None, help="override the data folder saved in the run")
    p.add_argument("--save_path", default=None, help="where to write the JSON report")
    p.add_argument("--model_type", default=None, help="accepted for compatibility; must match")
    p.add_argument("--data_type", default=None, help="accepted for compatibility; must match")
    p.add_argument("--viz", default="False", type=_seed_bool, help="write prediction triplets")
    p.add_argument("--viz_freq", type=int, default=50, help="a triplet every N-th sample")
    args, extra = p.parse_known_args(argv)
    cmd = ["eval", args.model_path, *extra]
    if args.data_dir:
        cmd.append(f"data.root={args.data_dir}")
    if args.model_type:
        cmd.append(f"model.name={args.model_type}")
    if args.data_type:
        cmd.append(f"data.name={args.data_type}")
    if args.save_path:
        cmd += ["--out", str(Path(args.save_path) / "eval_test.json")]
    if args.viz:
        cmd += ["--viz", "--viz-freq", str(args.viz_freq)]
        if args.save_path:
            cmd += ["--viz-dir", args.save_path]
    return main(cmd, exiting=exiting)
