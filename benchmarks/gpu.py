"""Everything issue 18 asks of a GPU, in one call of at most 8 minutes: the CUDA tests, then two
measurements against their goals, written with the device and versions to one JSON file.

Sections, each in a child process of its own with a time box (a crash, a CUDA error or a hang in
one is recorded and the others still run; a child writes its JSON after every row, so a section
cut by its time box keeps the rows it finished):

- ``cuda_tests``: ``python -m pytest -m cuda tests/test_cuda.py``; passed/failed/skipped counts
  and the failing tests' names (from pytest's JUnit XML).
- ``mlp``: an epoch of the 784-512-512-10 MLP on Fashion-MNIST-size data (60,000 synthetic
  uint8 1x28x28 images, 10 classes, 55,000 trained on), kept on the GPU by ``data.device=auto``,
  through the engine (a user's run: progress bar, metrics, checkpoints) against a plain GPU loop
  over the same tensors, interleaved pairs; :mod:`classification` (this folder) does the
  measuring. Goal: the training pass (``train_epoch``) >= 0.90 of the plain loop at batch 256
  and 1024; the whole ``fit()`` epoch's ratio (validation, checkpoints, CSV, curves.png) is
  recorded beside it.
- ``unet``: training steps of UNet (``configs/unet_carvana_half.yaml``'s: base width 16, depth
  5) at Carvana 1/2 scale (3x640x960: 959 rounded up to the model's stride of 32), batch 4,
  synthetic tensors on the GPU, with the engine's own pieces (Precision, channels_last, the
  fused Adam the engine builds, bce_dice). images/s for: fp32 eager (TF32 and cuDNN autotuning
  off), fp32 with TF32 + autotuning (the new default of ``trainer.precision=32``), bf16, bf16 +
  channels_last, and bf16 + channels_last + ``torch.compile``. Goal: the fastest of the fast
  settings >= 2x fp32 eager.

    python benchmarks/gpu.py                 # on a GPU: writes benchmarks/results/gpu.json
    python benchmarks/gpu.py --dry-run       # on the CPU, tiny sizes, the same code path

``--dry-run`` runs every section but the CUDA tests (recorded as skipped) on the CPU with tiny
sizes (compile with the eager backend: no C++ toolchain needed) and writes, by default,
``benchmarks/results/gpu_dry_run.json`` (git-ignored): it exists so the script cannot rot.
Exit status 0 whatever the figures: this measures; the JSON says what passed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_OUT = HERE / "results" / "gpu.json"
DRY_RUN_OUT = HERE / "results" / "gpu_dry_run.json"  # git-ignored

MLP_GOAL = 0.90  # engine / plain loop, training pass, at each batch size
UNET_GOAL = 2.0  # fastest fast setting / fp32 eager, images/s
# Seconds each section may take (their sum stays under 8 minutes with start-up to spare).
TIME_BOX = {"cuda_tests": 200, "mlp": 80, "unet": 160}
GRACE = 10  # seconds a child may overrun its box (its own deadlines come first) before a kill
DRY_TIME_BOX = {"cuda_tests": 0, "mlp": 120, "unet": 120}

# Sizes: (GPU, dry run).
MLP_SIZES = {"train_samples": (60_000, 600), "pairs": (5, 1), "batch_sizes": ((256, 1024),) * 2}
UNET_SIZES = {
    "image": ((3, 640, 960), (3, 32, 32)),
    "batch": (4, 2),
    "model": ({"base_width": 16, "depth": 5}, {"base_width": 2, "depth": 2}),
    "warmup": (3, 1),
    "steps": (15, 1),
}
UNET_SETTINGS = [  # (name, precision, tf32 + cudnn autotuning, channels_last, compile)
    ("fp32_eager", "32", False, False, False),
    ("fp32_tf32", "32", True, False, False),
    ("bf16", "bf16", True, False, False),
    ("bf16_channels_last", "bf16", True, True, False),
    ("bf16_channels_last_compile", "bf16", True, True, True),
]
FAST = ("bf16", "bf16_channels_last", "bf16_channels_last_compile")


def pick(sizes: dict[str, Any], dry: bool) -> dict[str, Any]:
    """The GPU's or the dry run's value of each size."""
    return {k: v[1 if dry else 0] for k, v in sizes.items()}


def device_record(device: torch.device) -> dict[str, Any]:
    """Which machine and versions measured."""
    record: dict[str, Any] = {
        "device": str(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": platform.python_version(),
        "host": platform.node(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        record.update(
            name=props.name,
            capability=list(torch.cuda.get_device_capability(device)),
            memory_gib=round(props.total_memory / 2**30, 1),
            gpus=torch.cuda.device_count(),
        )
    else:
        record["name"] = platform.processor() or "cpu"
    return record


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that wall-clock times are complete."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Writer:
    """A section's result, written to ``path`` after every change (a time box keeps rows)."""

    def __init__(self, path: Path, result: dict[str, Any]) -> None:
        self.path, self.result = path, result
        self.write()

    def write(self) -> None:
        """Write the result as it stands (a temporary file renamed over the JSON: a killed
        script leaves the last complete version)."""
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.result, indent=1))
        tmp.replace(self.path)


# == section: the CUDA tests ======================================================================
def cuda_tests(dry: bool, box: float, out: Writer) -> None:
    """``pytest -m cuda`` in a child process; counts and failing names from its JUnit XML."""
    res = out.result
    if dry:
        res.update(status="skipped", note="dry run: no GPU, the CUDA tests are not run")
        return
    with tempfile.TemporaryDirectory(prefix="dltemplate_cuda_tests_") as tmp:
        xml = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider",
               "tests/test_cuda.py", f"--junitxml={xml}", f"--basetemp={tmp}/t"]  # fmt: skip
        started = time.perf_counter()
        try:
            proc = subprocess.run(
                cmd, cwd=REPO, capture_output=True, text=True, timeout=max(10.0, box - 5)
            )
        except subprocess.TimeoutExpired as exc:
            said = exc.stdout or b""
            said = said.decode(errors="replace") if isinstance(said, bytes) else said
            res.update(status="timeout", error=f"pytest ran over {box - 5:.0f} s",
                       output_tail=said[-3000:])  # fmt: skip
            return
        res["pytest_seconds"] = round(time.perf_counter() - started, 1)
        res["exit_status"] = proc.returncode
        res["output_tail"] = (proc.stdout + proc.stderr)[-3000:]
        if not xml.exists():
            res.update(status="failed", error="pytest wrote no JUnit XML")
            return
        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite[0]
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        failing = [
            f"{case.get('classname')}::{case.get('name')}"
            for case in suite.iter("testcase")
            if case.find("failure") is not None or case.find("error") is not None
        ]
        skipped = [case.get("name") for case in suite.iter("testcase")
                   if case.find("skipped") is not None]  # fmt: skip
        passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
        res.update(
            passed=passed,
            failed=counts["failures"] + counts["errors"],
            skipped=counts["skipped"],
            failing=failing,
            skipped_names=skipped,
            status="passed" if proc.returncode == 0 and passed > 0 else "failed",
        )


# == section: the MLP epoch, the engine against a plain GPU loop ===================================
def mlp(dry: bool, box: float, out: Writer) -> None:
    """:func:`classification.measure` at batch 256 and 1024, data on the device."""
    sys.path.insert(0, str(HERE))
    import classification  # this folder's benchmark: the engine's run and the plain loop

    sizes = pick(MLP_SIZES, dry)
    res = out.result
    res.update(
        goal=f"train_epoch samples/s >= {MLP_GOAL:.2f} x the plain loop's at batch 256 and 1024",
        train_samples=sizes["train_samples"],
        pairs=sizes["pairs"],
        rows=[],
    )
    args = argparse.Namespace(epochs=sizes["pairs"], train_samples=sizes["train_samples"])
    clock = classification.CpuClock()
    deadline = time.perf_counter() + box
    with tempfile.TemporaryDirectory(prefix="dltemplate_gpu_mlp_") as tmp:
        for bs in sizes["batch_sizes"]:
            if time.perf_counter() > deadline - 5:
                res.setdefault("not_measured", []).append(bs)
                continue
            with contextlib.redirect_stdout(sys.stderr):
                row = classification.measure(args, bs, str(Path(tmp) / f"bs{bs}"), clock)
            res["rows"].append(
                {
                    "batch": bs,
                    "engine_samples_per_s": round(row["engine"], 1),
                    "plain_loop_samples_per_s": round(row["floor"], 1),
                    "epoch_ratio": round(row["ratio"], 4),
                    "train_pass_ratio": round(row["train_ratio"], 4),
                    "epoch_ratio_min_max": [round(row["min"], 4), round(row["max"], 4)],
                    "data_device": row["data_device"],
                    "others_cpu": None if row["others"] != row["others"] else row["others"],
                }
            )
            out.write()
        logging.getLogger("dltemplate").handlers.clear()  # its log files were in tmp
    ratios = [r["train_pass_ratio"] for r in res["rows"]]
    res["goal_met"] = len(ratios) == len(sizes["batch_sizes"]) and min(ratios) >= MLP_GOAL
    res["status"] = "ok"
    out.write()


# == section: UNet images/s per setting ==========================================================
def unet_row(
    setting: tuple[str, str, bool, bool, bool], sizes: dict[str, Any], device: torch.device
) -> dict[str, Any]:
    """Warm-up steps, then timed training steps of UNet in one setting; its images/s."""
    from dltemplate.config import OptimizerConfig
    from dltemplate.engine.precision import Precision
    from dltemplate.engine.speed import apply_channels_last, is_channels_last
    from dltemplate.optim import build_optimizer
    from dltemplate.registry import LOSSES, MODELS

    name, precision, fast_backends, channels_last, compiled = setting
    torch.backends.cuda.matmul.fp32_precision = "tf32" if fast_backends else "ieee"
    torch.backends.cudnn.conv.fp32_precision = "tf32" if fast_backends else "ieee"
    torch.backends.cudnn.benchmark = fast_backends and device.type == "cuda"
    torch.manual_seed(0)
    shape, batch = tuple(sizes["image"]), sizes["batch"]
    model = MODELS.build("UNet", input_shape=shape, num_classes=1, **sizes["model"]).to(device)
    if channels_last:
        model = apply_channels_last(model)
    optimizer = build_optimizer(OptimizerConfig(name="adam", lr=1e-3), model.parameters(), device)
    criterion = LOSSES.build("bce_dice", "loss.name").to(device)
    amp = Precision(precision, device)
    step_model: Any = model
    if compiled:  # the dry run has no C++ toolchain to count on: same call, eager backend
        backend = "inductor" if device.type == "cuda" else "eager"
        step_model = torch.compile(model, backend=backend)
    x = torch.randn(batch, *shape, device=device)
    masks = (torch.rand(batch, 1, *shape[1:], device=device) > 0.5).float()

    def step() -> None:
        with amp.autocast():
            loss = criterion(step_model(x), masks)
        amp.backward(loss)
        amp.step(optimizer)
        optimizer.zero_grad(set_to_none=True)

    model.train()
    started = time.perf_counter()
    for _ in range(sizes["warmup"]):
        step()
    sync(device)
    warm = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(sizes["steps"]):
        step()
    sync(device)
    seconds = time.perf_counter() - started
    return {
        "setting": name,
        "precision": precision,
        "tf32_and_cudnn_benchmark": fast_backends,
        "channels_last": is_channels_last(model),
        "compile": compiled,
        "fused_optimizer": bool(optimizer.defaults.get("fused")),
        "warmup_seconds": round(warm, 2),
        "steps": sizes["steps"],
        "images_per_s": round(batch * sizes["steps"] / seconds, 2),
        "peak_memory_gib": (
            round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            if device.type == "cuda"
            else None
        ),
    }


def unet(dry: bool, box: float, out: Writer) -> None:
    """images/s of each of :data:`UNET_SETTINGS`; a failing setting is recorded, the next runs."""
    import dltemplate.losses  # noqa: F401  (registers the components)
    import dltemplate.models  # noqa: F401
    import dltemplate.optim  # noqa: F401

    device = torch.device("cpu" if dry else "cuda")
    sizes = pick(UNET_SIZES, dry)
    res = out.result
    res.update(
        goal=f"fastest of {', '.join(FAST)} >= {UNET_GOAL:.1f} x fp32_eager images/s",
        image=list(sizes["image"]),
        batch=sizes["batch"],
        model={"name": "UNet", **sizes["model"]},
        rows=[],
    )
    deadline = time.perf_counter() + box
    for setting in UNET_SETTINGS:
        if time.perf_counter() > deadline - 10:
            res["rows"].append({"setting": setting[0], "status": "not run: time box"})
            out.write()
            continue
        try:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            row = {**unet_row(setting, sizes, device), "status": "ok"}
        except Exception as exc:  # recorded; the next setting still runs
            row = {"setting": setting[0], "status": "failed", "error": f"{type(exc).__name__}: "
                   f"{(str(exc).strip().splitlines() or [''])[0][:300]}"}  # fmt: skip
        finally:
            torch._dynamo.reset()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        res["rows"].append(row)
        out.write()
    speed = {r["setting"]: r["images_per_s"] for r in res["rows"] if r.get("status") == "ok"}
    base = speed.get("fp32_eager")
    for r in res["rows"]:
        if base and r.get("status") == "ok":
            r["speedup"] = round(r["images_per_s"] / base, 3)
    fast = [speed[n] for n in FAST if n in speed]
    res["best_speedup"] = round(max(fast) / base, 3) if base and fast else None
    res["goal_met"] = bool(res["best_speedup"] and res["best_speedup"] >= UNET_GOAL)
    res["status"] = "ok"
    out.write()


SECTIONS = {"cuda_tests": cuda_tests, "mlp": mlp, "unet": unet}


# == the parent: each section in a child, with its time box ======================================
def run_section(name: str, dry: bool, box: float, tmp: Path) -> dict[str, Any]:
    """Run section ``name`` in a child process; its JSON, or what went wrong."""
    path = tmp / f"{name}.json"
    if dry and name == "cuda_tests":  # no GPU: recorded as skipped, no child started
        out = Writer(tmp / f"{name}.json", {})
        cuda_tests(dry, box, out)
        return {**out.result, "seconds": 0.0, "time_box_s": box}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--section", name,
           "--section-out", str(path), "--time-box", str(box)]  # fmt: skip
    if dry:
        cmd.append("--dry-run")
    started = time.perf_counter()
    status: str | None = None
    error = ""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=box + GRACE)
        if proc.returncode != 0:
            status, error = "failed", (proc.stdout + proc.stderr)[-3000:]
    except subprocess.TimeoutExpired:
        status = "timeout"
        error = f"over its time box of {box:.0f} s (+{GRACE} s grace): killed"
    result: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    if status is not None:  # the child's own status is only kept when it ended well
        result.update(status=status, error=error)
    result.setdefault("status", "failed")
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["time_box_s"] = box
    return result


def main(argv: list[str] | None = None) -> int:
    """Run the sections in child processes (or, with ``--section``, be one of them) and write
    the JSON report; return 0 once it is written (2 without CUDA and without ``--dry-run``)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--dry-run", action="store_true", help="on the CPU, tiny sizes, no CUDA tests")
    p.add_argument("--out", type=Path, help=f"JSON to write (default {DEFAULT_OUT.name}; "
                   f"with --dry-run {DRY_RUN_OUT.name}), in benchmarks/results")  # fmt: skip
    p.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    p.add_argument("--section", choices=list(SECTIONS), help=argparse.SUPPRESS)  # a child
    p.add_argument("--section-out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--time-box", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.section:  # a child: one section, its JSON to --section-out
        if args.dry_run:  # a quick check on a CPU others share: one thread waits on none
            torch.set_num_threads(1)
        out = Writer(args.section_out, {"status": "running"})
        SECTIONS[args.section](args.dry_run, args.time_box, out)
        out.write()
        return 0
    if not args.dry_run and not torch.cuda.is_available():
        print("benchmarks/gpu.py: no CUDA device; use --dry-run on the CPU", file=sys.stderr)
        return 2
    path = args.out or (DRY_RUN_OUT if args.dry_run else DEFAULT_OUT)
    path.parent.mkdir(parents=True, exist_ok=True)
    boxes = DRY_TIME_BOX if args.dry_run else TIME_BOX
    started = time.perf_counter()
    device = torch.device("cpu" if args.dry_run else "cuda")
    report: dict[str, Any] = {
        "script": "benchmarks/gpu.py",
        "dry_run": args.dry_run,
        "started_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device_record(device),
        "time_boxes_s": {k: boxes[k] for k in args.sections},
        "goals": {
            "mlp": f"train_epoch >= {MLP_GOAL:.2f} x a plain GPU loop, batch 256 and 1024",
            "unet": f"fast settings >= {UNET_GOAL:.1f} x fp32 eager images/s",
            "cuda_tests": "every test of pytest -m cuda passes",
        },
        "sections": {},
    }
    with tempfile.TemporaryDirectory(prefix="dltemplate_gpu_") as tmp:
        for name in args.sections:
            print(f"gpu.py: {name} (time box {boxes[name]} s)...", file=sys.stderr, flush=True)
            result = run_section(name, args.dry_run, boxes[name], Path(tmp))
            report["sections"][name] = result
            print(f"gpu.py: {name}: {result['status']} in {result['seconds']} s",
                  file=sys.stderr, flush=True)  # fmt: skip
    sections = report["sections"]
    report["goals_met"] = {
        "cuda_tests": sections.get("cuda_tests", {}).get("status") == "passed",
        "mlp": bool(sections.get("mlp", {}).get("goal_met")),
        "unet": bool(sections.get("unet", {}).get("goal_met")),
    }
    report["seconds"] = round(time.perf_counter() - started, 1)
    tmp_path = path.with_suffix(".tmp")
    tmp_path.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(tmp_path, path)
    print(json.dumps({k: report[k] for k in ("goals_met", "seconds")}))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
