"""dltemplate: train, evaluate, resume and inspect runs from a YAML config.

Exit status: 0 done; 2 bad usage, configuration or input (the message says what and where);
1 a failure during the run (after the interrupt checkpoint was written); 130 Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import logging
import os
import signal
import sys
import threading
import time
import typing
from pathlib import Path
from typing import Any

import yaml

# Only what help, `config`, `compare-configs` and argument errors need is imported here: none
# of it imports torch (a second or more). Each command imports the rest when it runs.
from dltemplate.config import Config, config_from_dict, config_keys, config_to_dict, load_config
from dltemplate.config.loader import apply_overrides, notice_signal, read_yaml
from dltemplate.engine import slurm
from dltemplate.errors import DataError, DiskFullError, NonFiniteLossError, UsageError
from dltemplate.tools.compare_configs import compare_configs, format_diff

log = logging.getLogger("dltemplate")


def _stop_on_signal(signum: int, frame: Any) -> None:
    # Before training starts (loading data), SIGTERM and the cluster's notice stop like Ctrl-C;
    # the trainer then takes them over and stops at the next step boundary.
    from dltemplate.engine.stopping import RunStopped, run_finished  # imported already

    if run_finished():  # the run wrote everything (a notice as the job ends): nothing to stop
        return
    raise RunStopped(signal.Signals(signum).name, at_boundary=False)


def _thread_failed(args: threading.ExceptHookArgs) -> None:
    # A background thread's error (TensorBoard's writer on a full disk) in one line, not a
    # traceback printed into the middle of the run's output; the run reports what follows.
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "a thread"
    log.warning("background thread %s failed: %s: %s", name, args.exc_type.__name__, args.exc_value)


def _catch_sigterm(notice: str | None = "SIGUSR1") -> None:
    from dltemplate.engine.stopping import set_run_finished  # now, not in the signal handler

    set_run_finished(False)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _stop_on_signal)
        if notice is not None:  # its default action would kill the process, checkpoint-less
            signal.signal(notice_signal(notice), _stop_on_signal)


def _stopped(name: str) -> int:
    """The exit status of a run stopped by ``name`` (after its interrupt checkpoint); on the
    cluster's notice, rank 0 first asks SLURM to requeue the job."""
    if name in ("SIGINT", "SIGTERM") or not name.startswith("SIG"):
        print(f"dltemplate: interrupted by {name}", file=sys.stderr)
        return 130
    if slurm.launch_rank() != 0:
        return 130  # one process of the job requeues it
    if os.environ.get("DLTEMPLATE_NO_REQUEUE"):  # a sweep's trial: its sweep requeues the job
        print(f"dltemplate: stopped by {name}; not requeued (the sweep is)", file=sys.stderr)
        return slurm.EXIT_NOT_REQUEUED
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the requeue TERMs the job: we are done
    requeued, said = slurm.requeue()
    print(f"dltemplate: stopped by {name} (a preemption notice); {said}", file=sys.stderr)
    return 130 if requeued else slurm.EXIT_NOT_REQUEUED


def cmd_train(args: argparse.Namespace) -> int:
    """``dltemplate train CONFIG [overrides]``: train a run; 0 when it finished."""
    cfg = load_config(args.config, args.overrides)  # a config error is said before torch loads
    from dltemplate import api

    _catch_sigterm(cfg.trainer.notice_signal)
    api.train(cfg)
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    """``dltemplate config CONFIG [overrides]``: print the resolved config as YAML."""
    cfg = load_config(args.config, args.overrides, name_run=False)  # a reusable file: no name
    print(format_config(cfg), end="")
    return 0


def format_config(cfg: Config) -> str:
    """``cfg`` as YAML, every section and key in schema order, defaults filled in: a file
    that ``dltemplate train`` accepts as it is."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)


def cmd_resume(args: argparse.Namespace) -> int:
    """``dltemplate resume RUN|CHECKPOINT|last [overrides]``: continue a run."""
    from dltemplate import api

    target = args.target
    if target == "last":
        target = str(last_run(args.output_dir, args.config))
    _catch_sigterm(_resume_notice(target, args.overrides))
    api.resume(target, args.overrides, trust_code=args.trust_code)
    return 0


def _resume_notice(target: str, overrides: list[str]) -> str | None:
    """The notice signal a resumed run catches (an override's, else its saved config's), to be
    caught from the start, while the run loads, and not only once it trains. Whatever cannot be
    read here gives the default; the resume itself then says what is wrong."""
    from dltemplate.engine.rundir import read_saved_config

    default = "SIGUSR1"
    path = Path(target)
    mine = [o for o in overrides if o.partition("=")[0].strip() == "trainer.notice_signal"]
    try:
        saved = read_saved_config(path if path.is_dir() else path.parent)[0]
    except (UsageError, DataError, OSError):
        saved = {}  # a checkpoint outside its run directory: the default
    try:
        trainer = apply_overrides(saved, mine).get("trainer") or {}
        name = trainer.get("notice_signal", default) if isinstance(trainer, dict) else default
        return None if name is None else notice_signal(name).name
    except (UsageError, ValueError, AttributeError, TypeError):
        return default


DEFAULT_RESULTS = "./Results"  # where the shipped configs write: ./Results/<config>/<run>


def last_run(output_dir: str | None, config: str | None) -> Path:
    """The run ``resume last`` continues: the newest in ``output_dir``, else in ``config``'s
    ``experiment.output_dir``, else in ./Results or a folder below it (./Results/<config>/);
    none there is a UsageError saying where it looked and what to pass."""
    from dltemplate.engine.rundir import latest_run_dir

    if output_dir is not None:
        where, depth = [output_dir], 1
    elif config is not None:
        where, depth = [load_config(config, name_run=False).experiment.output_dir], 1
    else:
        where, depth = [DEFAULT_RESULTS], 2
    try:
        return latest_run_dir(where[0], depth=depth)
    except UsageError:
        looked = f"{where[0]} and the folders in it" if depth == 2 else where[0]
        raise UsageError(
            f"resume last: no run directory in {looked}; pass --output-dir DIR (the "
            "experiment.output_dir the run was trained with) or --config CONFIG.yaml"
        ) from None


def cmd_eval(args: argparse.Namespace) -> int:
    """``dltemplate eval RUN|CHECKPOINT``: evaluate a split; print and write its report."""
    from dltemplate.assemble import build_evaluator
    from dltemplate.atomic import refuse_path_under_a_file
    from dltemplate.engine.checkpoint import refuse_overwriting
    from dltemplate.engine.evaluator import EvaluatorBase
    from dltemplate.engine.runlog import setup_logging

    if args.out and Path(args.out).is_dir():
        raise UsageError(f"--out {args.out}: is a folder; give the JSON report's file name")
    setup_logging()
    evaluator = build_evaluator(args.target, args.overrides, args.trust_code)
    out = Path(args.out) if args.out else default_report_path(evaluator.checkpoint_path, args.split)
    refuse_path_under_a_file(out, "--out")
    refuse_overwriting(out, evaluator.checkpoint_path)
    viz_dir = None
    if args.viz and not evaluator.task.draws_pictures:
        print(
            f"dltemplate: task '{evaluator.cfg.experiment.task}' draws no pictures: --viz ignored",
            file=sys.stderr,
        )
    elif args.viz:
        viz_dir = Path(args.viz_dir) if args.viz_dir else evaluator.checkpoint_path.parent / "viz"
        refuse_path_under_a_file(viz_dir, "--viz-dir")
    report = evaluator.run(
        args.split, limit=args.limit_batches, viz_dir=viz_dir, viz_freq=args.viz_freq
    )
    EvaluatorBase.write_report(report, out)
    print(format_report(report))
    print(f"report written to {out}")
    if "pictures" in report:
        count = report["pictures"]["count"]
        what = "picture" if count == 1 else "pictures"
        print(f"{count} {what} written to {report['pictures']['folder']}")
    return 0


def default_report_path(checkpoint: Path, split: str) -> Path:
    """Where ``eval`` writes its report by default: ``eval_<split>_<checkpoint>.json`` beside
    the checkpoint (``eval_test_best.json``, ``eval_val_last.json``): evaluating another
    checkpoint of the run does not overwrite it."""
    from dltemplate.engine.checkpoint import checkpoint_kind

    return checkpoint.parent / f"eval_{split}_{checkpoint_kind(checkpoint)}.json"


def cmd_predict(args: argparse.Namespace) -> int:
    """``dltemplate predict RUN FILES...``: predictions for files (classes or masks)."""
    from dltemplate.assemble import build_evaluator
    from dltemplate.atomic import atomic_write_text, refuse_path_under_a_file
    from dltemplate.engine.checkpoint import refuse_overwriting
    from dltemplate.engine.runlog import setup_logging

    files, overrides = _files_and_overrides(args.images)
    setup_logging()
    evaluator = build_evaluator(args.target, [*args.overrides, *overrides], args.trust_code)
    task, name = evaluator.task, evaluator.cfg.experiment.task
    kind = task.predict_output  # records (classification) or files (segmentation's masks)
    out = Path(args.out) if args.out is not None else None
    if kind is None:
        raise UsageError(f"task '{name}' does not support predict")
    if out is not None:
        refuse_path_under_a_file(out, "--out")
    if kind == "files":
        if out is None:  # inside the run, like every output: not in the working directory
            out = evaluator.checkpoint_path.parent / "predictions"
        if out.exists() and not out.is_dir():
            raise UsageError(
                f"--out {out}: exists and is not a folder (give a folder to write into)"
            )
        if args.top_k is not None:
            raise UsageError(
                f"--top-k: task '{name}' predicts no classes (it is for classification)"
            )
    elif out is not None and out.is_dir():
        raise UsageError(f"--out {out}: is a folder; task '{name}' writes one JSON file: name it")
    elif out is not None:
        refuse_overwriting(out, evaluator.checkpoint_path, [Path(p) for p in files])
    paths = [Path(p) for p in files]
    folders = [str(p) for p in paths if p.is_dir()]
    if folders:
        raise UsageError(
            f"{', '.join(folders)}: a folder, not an image file (give its images: "
            f"{Path(folders[0]) / '*.jpg'}...)"
        )
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise UsageError(f"no such image file: {', '.join(missing)}")
    if out is not None and kind == "files":
        for path in task.predict_files(evaluator.model, paths, out, evaluator.device,
                                       evaluator.info):  # fmt: skip
            print(path)
        return 0
    records = task.predict(
        evaluator.model, paths, evaluator.device, evaluator.info, top_k=args.top_k or 1
    )
    if out is not None:  # every file was read: nothing is written before a bad one is found
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, json.dumps(records, indent=2))
    for record in records:
        print(_prediction_line(record))
    if out is not None:
        print(f"dltemplate: {len(records)} prediction(s) written to {out}", file=sys.stderr)
    return 0


def _files_and_overrides(args: list[str]) -> tuple[list[str], list[str]]:
    """``predict``'s positional arguments split into image files and ``section.key=value``
    overrides (``data.root=/data/MyImages``): an argument is an override when it is not an
    existing file and what precedes its ``=`` is a config section with a key after it."""
    sections = {key.split(".")[0] for key in config_keys()}
    files, overrides = [], []
    for arg in args:
        head, eq, _ = arg.partition("=")
        section, dot, key = head.partition(".")
        is_override = eq and dot and key and section in sections and not Path(arg).exists()
        (overrides if is_override else files).append(arg)
    if not files:
        raise UsageError(f"predict: no image files given (only overrides: {' '.join(overrides)})")
    return files, overrides


def _prediction_line(record: Any) -> str:
    """One file's predictions: ``file: cat 0.9731, dog 0.0200``; other records as ``key
    value`` pairs."""
    if not isinstance(record, dict):
        return repr(record)
    found = record.get("predictions")
    if isinstance(found, list) and all(isinstance(p, dict) for p in found):
        said = ", ".join(f"{p.get('class')} {_metric_value(p.get('probability'))}" for p in found)
        return f"{record.get('file')}: {said}"
    return ", ".join(f"{k} {v}" for k, v in record.items())


def cmd_export(args: argparse.Namespace) -> int:
    """``dltemplate export RUN``: the model as ONNX or TorchScript, checked against torch."""
    from dltemplate.engine.runlog import setup_logging
    from dltemplate.export import ExportError, export_model  # onnx only when asked for

    setup_logging()
    try:
        result = export_model(
            args.target, args.format, args.out, args.overrides, trust_code=args.trust_code
        )
    except ExportError as exc:  # a failure one line explains: exit status 1
        print(f"dltemplate: error: {exc}", file=sys.stderr)
        return 1
    meta = result.metadata
    print(f"wrote {result.path} ({result.format}) from {result.checkpoint}")
    print(f"  input: {meta['input']}; output: {meta['output']}")
    if result.note:
        print(f"  {result.note}")
    print(
        f"  checked against PyTorch on {result.checked_on}: largest |difference| "
        f"{result.max_difference:.3g} (tolerance {result.tolerance:g})"
    )
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """``dltemplate sweep SWEEP.yaml``: run (or continue) a sweep's trials."""
    from dltemplate.engine.runlog import setup_logging
    from dltemplate.sweeps.runner import run_sweep  # imports optuna: only for sweeps

    setup_logging()
    run_sweep(args.target, trials=args.trials, jobs=args.jobs, storage=args.storage)
    return 0


def cmd_sample_data(args: argparse.Namespace) -> int:
    """``dltemplate make-sample-data carvana OUT``: write a small synthetic Carvana-like set."""
    from dltemplate.data.sample_carvana import make_sample_carvana
    from dltemplate.engine.runlog import setup_logging

    if args.n < 1:
        raise UsageError(f"--n {args.n}: must be at least 1")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UsageError(f"{args.out}: exists and is not a folder (give a folder to write into)")
    setup_logging()  # progress lines, where no bar is drawn
    _catch_sigterm()  # SIGTERM then unwinds like Ctrl-C: the partial set is removed
    out = make_sample_carvana(Path(args.out), n=args.n)
    print(f"wrote {args.n} synthetic Carvana-layout image/mask pairs to {out}")
    return 0


def format_report(report: dict[str, Any]) -> str:
    """Metrics, confusion matrix and sample predictions as the seed's eval prints them.

    Sample entries (see :meth:`dltemplate.engine.task.Task.describe_predictions`) with a
    ``prediction`` and a ``label`` print as a classification line, other dicts as ``key value``
    pairs, and anything else as its ``repr``: a task's own entries never break the report.
    """
    lines = [f"{report['checkpoint']} on {report['split']} ({report['num_samples']} samples):"]
    lines += [f"  {k}: {_metric_value(v)}" for k, v in report["metrics"].items()]
    full = report["report"]
    if "confusion_matrix" in full:
        names = full.get("class_names") or [str(i) for i in range(len(full["confusion_matrix"]))]
        width = max(6, *(len(n) for n in names))
        lines.append("confusion matrix (rows: label, columns: prediction):")
        lines.append(" " * (width + 1) + " ".join(f"{i:>5}" for i in range(len(names))))
        for name, row in zip(names, full["confusion_matrix"]):
            lines.append(f"{name:>{width}} " + " ".join(f"{c:>5}" for c in row))
    if report["samples"]:
        lines.append("sample predictions:")
        lines += ["  " + _sample_line(sample) for sample in report["samples"]]
    return "\n".join(lines)


def _metric_value(value: Any) -> str:
    """A metric as ``0.1234``; a value that is not a number as it is."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:.4f}"
    return str(value)


_CLASSIFICATION_KEYS = ("prediction", "label", "correct")


def _sample_line(sample: Any) -> str:
    """One sample prediction: a classification line, ``key value`` pairs, or a ``repr``."""
    if not isinstance(sample, dict):
        return repr(sample)
    if "prediction" in sample and "label" in sample:
        wrong = "  (wrong)" if "correct" in sample and not sample["correct"] else ""
        line = f"predicted {sample['prediction']!r:<16} label {sample['label']!r}{wrong}"
        rest = {k: v for k, v in sample.items() if k not in _CLASSIFICATION_KEYS}
        return line + "".join(f", {k} {v}" for k, v in rest.items())
    return ", ".join(f"{k} {v}" for k, v in sample.items())


def cmd_compare(args: argparse.Namespace) -> int:
    """``dltemplate compare-configs A B``: the keys in which two configs or runs differ."""
    print(format_diff(compare_configs(args.a, args.b), args.a, args.b))
    return 0


def cmd_count(args: argparse.Namespace) -> int:
    """``dltemplate count-params CONFIG|RUN``: trainable and total parameters per module."""
    from dltemplate import api
    from dltemplate.assemble import validate_names
    from dltemplate.config.trust import refuse_untrusted_code
    from dltemplate.engine.build import config_section
    from dltemplate.engine.task import make_task
    from dltemplate.registry import MODELS
    from dltemplate.tools.count_params import count_parameters, format_counts

    path = Path(args.config)
    if path.is_dir() or path.suffix in (".pth", ".pt"):
        raw, _ = api.config_of_run(path, trust_code=args.trust_code)
        cfg = config_from_dict(apply_overrides(raw, args.overrides), str(path))
    elif path.is_file() and path.name.startswith("config_") and path.suffix == ".json":
        raw = read_yaml(path)  # a run's saved config: it may name only registered components
        refuse_untrusted_code(raw, str(path), args.trust_code)
        cfg = config_from_dict(apply_overrides(raw, args.overrides), str(path))
    else:
        cfg = load_config(path, args.overrides)
    validate_names(cfg)
    task = make_task(cfg)
    title = f"model {cfg.model.name}"
    try:
        info = task.data_info()
    except DataError as exc:  # counting needs no data: the model's own default shape will do
        log.warning("%s", exc)
        with config_section("model", cfg.model.name, cfg.model.args):
            model = MODELS.build(cfg.model.name, "model.name", **cfg.model.args)
        title += " (data not found: the model's default input shape)"
    else:
        with config_section("model", cfg.model.name, cfg.model.args):
            model = task.build_model(info)
        title += f" on input {tuple(info.input_shape)}"
    print(format_counts(count_parameters(model), title))
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    """``dltemplate runs [DIR...]``: the table of runs under the given folders."""
    from dltemplate.tools.runs_table import format_csv, format_table, list_runs

    rows = list_runs(args.dirs, sort=args.sort, group_seeds=args.group_seeds)
    if args.csv:
        sys.stdout.write(format_csv(rows))
    else:
        print(format_table(rows))
    return 0


OVERRIDE_EXAMPLES = """\
overrides: section.key=value, the value read as YAML; deeper keys go into args mappings
  dltemplate train configs/digits_mlp.yaml trainer.epochs=5 optimizer.lr=3e-4
  dltemplate train configs/digits_mlp.yaml model.args.hidden=[128,64] data.batch_size=32
  dltemplate train configs/digits_mlp.yaml "loss.args={label_smoothing: 0.1}" scheduler.name=none
  dltemplate config configs/digits_mlp.yaml trainer.epochs=5   # print the resolved config
every key, its type and default: the README's config reference (src/dltemplate/config/schema.py)
"""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage block), as every error here."""

    def error(self, message: str) -> typing.NoReturn:
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def _positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: must be at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``dltemplate`` command."""
    parser = _Parser(
        prog="dltemplate",
        description=__doc__.split("\n")[0],
        epilog="Exit status: 0 done, 2 bad usage/config/input, 1 failure in the run, 130 Ctrl-C.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    over = {"nargs": "*", "default": [], "metavar": "section.key=value"}
    trust = {
        "action": "store_true",
        "help": "let the run's saved config import code (module paths, experiment.imports, "
        "experiment.trainer); without it only registered components may be named",
    }

    p = sub.add_parser(
        "train",
        help="train from a YAML config",
        description="Train from a YAML config; each section.key=value after it overrides a key.",
        epilog=OVERRIDE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", help="YAML config file (it may build on another: base: OTHER.yaml)")
    p.add_argument("overrides", **over)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "config",
        help="print the resolved config (defaults filled in, overrides applied) as YAML",
        description="Print CONFIG with the overrides applied and every default filled in, as "
        "YAML: what train would run. Keys and types are checked as train checks them.",
        epilog=OVERRIDE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", help="YAML config file (or a run's config_*.json)")
    p.add_argument("overrides", **over)
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("resume", help="continue a stopped run in its own run directory")
    p.add_argument("target", help="run directory, checkpoint, or 'last'")
    p.add_argument("overrides", **over)
    p.add_argument(
        "--output-dir",
        default=None,
        help="where 'last' looks for runs (default: ./Results and the folders in it, where the "
        "shipped configs write)",
    )
    p.add_argument("--config", default=None, help="'last' looks where this config writes its runs")
    p.add_argument("--trust-code", **trust)
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("eval", help="evaluate a run directory or checkpoint")
    p.add_argument("target", help="run directory (best checkpoint) or checkpoint file")
    p.add_argument("overrides", **over)
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument(
        "--out",
        help="JSON report path (default: <run>/eval_<split>_<checkpoint>.json, e.g. "
        "eval_test_best.json)",
    )
    p.add_argument(
        "--limit-batches", type=_positive_int, default=None, help="evaluate only N batches"
    )
    p.add_argument("--viz", action="store_true", help="write pictures of predictions")
    p.add_argument("--viz-dir", default=None, help="where --viz writes (default: <run>/viz)")
    p.add_argument(
        "--viz-freq",
        type=_positive_int,
        default=None,
        help="picture every N-th sample (default: every 50th, closer on a small split: ~8 drawn)",
    )
    p.add_argument("--trust-code", **trust)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "predict",
        help="predict on image files with a trained run (classes, or segmentation masks)",
        description="Predict on image files with a run's best (else last) checkpoint; images "
        "are decoded as the run's data was (its size, grey or RGB). Classification prints one "
        "line per file, its most probable class and probability (--top-k K: the K best), and "
        "with --out FILE.json writes them all as JSON. Segmentation writes <name>_mask.png at "
        "each image's size into the --out folder (default <run>/predictions/). A bad file "
        "stops everything: exit status 2. section.key=value overrides that do not change the "
        "model are allowed, as for eval (data.root=/elsewhere: the run's data moved).",
    )
    p.add_argument("target", help="run directory (best checkpoint) or checkpoint file")
    p.add_argument("images", nargs="+", help="image files, and section.key=value overrides")
    p.add_argument(
        "--out",
        help="classification: a JSON file for every file's predictions (optional); "
        "segmentation: the folder for the masks (default: <run>/predictions/)",
    )
    p.add_argument(
        "--top-k",
        type=_positive_int,
        default=None,
        metavar="K",
        help="classification: the K most probable classes of each file (default 1)",
    )
    p.add_argument("--trust-code", **trust)
    p.set_defaults(func=cmd_predict, overrides=[])

    p = sub.add_parser(
        "export",
        help="write a run's model as ONNX or TorchScript: raw inputs in [0, 1] in, "
        "probabilities out",
        description="Write a run's model (its best, else last, checkpoint) as one ONNX or "
        "TorchScript file that takes float32 inputs in [0, 1], N x C x H x W at the trained "
        "size, normalises them inside and returns probabilities; check it against PyTorch on "
        "a few test samples.",
    )
    p.add_argument("target", help="run directory (best, else last, checkpoint) or checkpoint")
    p.add_argument("overrides", **over)
    p.add_argument("--format", default="onnx", choices=["onnx", "torchscript"])
    p.add_argument(
        "--out", help="file to write (default: beside the checkpoint, <stem>.onnx or <stem>.pt)"
    )
    p.add_argument("--trust-code", **trust)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("make-sample-data", help="write a synthetic sample dataset")
    p.add_argument("dataset", choices=["carvana"])
    p.add_argument("out", help="folder to write into")
    p.add_argument("--n", type=int, default=64, help="number of image/mask pairs")
    p.set_defaults(func=cmd_sample_data)

    p = sub.add_parser(
        "compare-configs",
        help="print the keys that differ between two configs",
        description="Resolve both configs (defaults filled in, bases merged) and print the keys "
        "whose values differ. Each is a YAML config, a run's config_*.json, a run directory "
        "(its saved config) or a checkpoint (the config inside it).",
    )
    p.add_argument("a", help="config file, run directory or checkpoint")
    p.add_argument("b", help="config file, run directory or checkpoint")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser(
        "sweep",
        help="search hyperparameters with Optuna: each trial an ordinary run",
        description="Run the sweep SWEEP.yaml describes, or continue the one in SWEEP_DIR: "
        "finished trials are kept, trials that were running resume in their run directories, "
        "the rest run. See the README's 'Many runs'.",
    )
    p.add_argument("target", metavar="SWEEP.yaml|SWEEP_DIR")
    p.add_argument("--trials", type=int, help="trials in all (default: the file's trials)")
    p.add_argument("--jobs", type=int, help="trials at once on this machine (default: jobs)")
    p.add_argument("--storage", help="a database URL shared by workers on several machines "
                   "(default: a journal file in the sweep directory)")  # fmt: skip
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("count-params", help="trainable and total parameters per module")
    p.add_argument("config", help="YAML config, run directory or checkpoint")
    p.add_argument("overrides", **over)
    p.add_argument("--trust-code", **trust)
    p.set_defaults(func=cmd_count)

    p = sub.add_parser(
        "runs",
        help="a table of the runs under folders: status, epochs, best and test metrics, "
        "duration, the config keys that differ",
        description="One row per run directory (a folder holding a config_*.json) in each DIR "
        "or a few levels below it: its status (finished, stopped, running, failed, damaged), "
        "epochs done, the best monitored value and its epoch, test metrics, duration and the "
        "config keys that differ between the runs.",
    )
    p.add_argument("dirs", nargs="*", default=["./Results"], metavar="DIR",
                   help="folders of runs, or run directories (default: ./Results)")  # fmt: skip
    p.add_argument(
        "--sort",
        metavar="KEY",
        help="sort by a column, ascending; --sort=-KEY descending (e.g. --sort=-test/accuracy)",
    )
    p.add_argument("--csv", action="store_true", help="write CSV (every column) to stdout")
    p.add_argument(
        "--group-seeds",
        action="store_true",
        help="one row for runs that differ only in experiment.seed: n, mean ± std",
    )
    p.set_defaults(func=cmd_runs)
    return parser


def _override_hint(rest: list[str]) -> str:
    """For an option that is a config key (``--epochs 5``): ``" (did you mean
    trainer.epochs=5? config keys are set as section.key=value)"``; else ``""``."""
    keys = config_keys()
    leaves = {key.rsplit(".", 1)[-1]: key for key in reversed(keys)}  # the first section wins
    for i, arg in enumerate(rest):
        if not arg.startswith("--"):
            continue
        name, eq, value = arg[2:].partition("=")
        if not eq and i + 1 < len(rest) and not rest[i + 1].startswith("-"):
            value = rest[i + 1]
        name = name.replace("-", "_")
        close = difflib.get_close_matches(name, leaves, n=1, cutoff=0.8)
        key = name if name in keys else leaves.get(name) or (leaves[close[0]] if close else None)
        if key is not None:
            return (
                f" (did you mean {key}={value or '...'}? config keys are set as section.key=value)"
            )
    return ""


def _tell_torchrun(message: str) -> None:
    """Under torchrun, put ``message`` in this process's error file: torchrun's failure report
    then shows it as the root cause instead of a link to its documentation."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    try:
        with open(path, "w") as fh:  # the format torch's own error handler writes
            json.dump({"message": message, "timestamp": int(time.time())}, fh)
    except OSError:
        pass  # the message was printed; the report only lacks it


def _reader_gone() -> int:
    """Standard output's reader closed the pipe: stop without a message, with the status of a
    process that SIGPIPE ended (141), as ``seq 9999 | head`` does. Standard output is pointed
    at ``/dev/null`` first, so that Python's own flush at exit does not fail again."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return 128 + signal.SIGPIPE


def program() -> typing.NoReturn:
    """The ``dltemplate`` program (``python -m dltemplate``): :func:`main`, then exit with its
    status."""
    sys.exit(main(exiting=True))


def main(argv: list[str] | None = None, *, exiting: bool = False) -> int:
    """Run the command line; return the exit status.

    The signals a command catches (SIGTERM, the cluster's notice) are given back their earlier
    handlers when it returns; with ``exiting`` (the process ends next) they are ignored instead:
    a notice that reached a finished run's process as it exits would otherwise kill it (the
    default action), and SLURM would call the job FAILED.
    """
    parser = build_parser()
    # Overrides may come before or after options: collect the ones argparse left over.
    args, rest = parser.parse_known_args(argv)
    unknown = [r for r in rest if r.startswith("-") or "=" not in r]
    if unknown or (rest and not hasattr(args, "overrides")):
        # One line, without argparse's usage block (as every other error here).
        hint = _override_hint(rest)
        print(f"dltemplate: error: unrecognized arguments: {' '.join(unknown or rest)}{hint}",
              file=sys.stderr)  # fmt: skip
        return 2
    if rest:
        args.overrides = [*args.overrides, *rest]
    main_thread = threading.current_thread() is threading.main_thread()
    caught = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)  # what a command may catch
    handlers = {sig: signal.getsignal(sig) for sig in caught} if main_thread else {}
    thread_hook, threading.excepthook = threading.excepthook, _thread_failed
    try:
        return args.func(args)
    except UsageError as exc:
        if slurm.launch_rank() == 0:  # under torchrun or srun every rank fails alike: once
            print(f"dltemplate: error: {exc}", file=sys.stderr)
        _tell_torchrun(f"dltemplate: error: {exc} (exit status 2)")
        return 2
    except KeyboardInterrupt as exc:
        return _stopped(getattr(exc, "signal_name", "SIGINT"))  # RunStopped names its signal
    except (NonFiniteLossError, DiskFullError) as exc:  # failures that one line explains
        print(f"dltemplate: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `dltemplate runs | head`: the reader has all it wanted
        return _reader_gone()
    except OSError as exc:  # a file that cannot be written or read: its error names it
        print(f"dltemplate: error: {exc}", file=sys.stderr)
        return 1
    except Exception:
        log.exception("dltemplate: the run failed")
        return 1
    finally:
        threading.excepthook = thread_hook
        for sig, handler in handlers.items():  # the command is over: a late signal no longer
            signal.signal(sig, signal.SIG_IGN if exiting else handler)  # raises into the exit


if __name__ == "__main__":
    program()
