"""benchmarks/gpu.py cannot rot: its ``--dry-run`` runs every section's code on the CPU at tiny
sizes and writes a JSON whose structure and values are checked here (the figures themselves are
the GPU's to give)."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import pytest
from conftest import REPO

SCRIPT = REPO / "benchmarks" / "gpu.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gpu_bench") / "dry.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"wrote {out}" in proc.stdout
    return json.loads(out.read_text())


def positive(x: object) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.slow  # the whole dry run: ~30 s of child processes
def test_the_dry_run_records_the_machine_and_skips_the_cuda_tests(dry_run):
    import torch

    assert dry_run["dry_run"] is True and dry_run["device"]["torch"] == torch.__version__
    assert set(dry_run["sections"]) == {"cuda_tests", "mlp", "unet"}
    tests = dry_run["sections"]["cuda_tests"]
    assert tests["status"] == "skipped" and "dry run" in tests["note"]
    assert set(dry_run["goals_met"]) == {"cuda_tests", "mlp", "unet"}
    assert dry_run["goals_met"]["cuda_tests"] is False  # not run is not passed
    assert 0 < dry_run["seconds"] < 8 * 60


@pytest.mark.slow  # the whole dry run: ~30 s of child processes
def test_the_dry_run_measures_the_mlp_engine_against_the_plain_loop(dry_run):
    mlp = dry_run["sections"]["mlp"]
    assert mlp["status"] == "ok" and [r["batch"] for r in mlp["rows"]] == [256, 1024]
    for row in mlp["rows"]:
        assert positive(row["engine_samples_per_s"]) and positive(row["plain_loop_samples_per_s"])
        assert positive(row["train_pass_ratio"]) and positive(row["epoch_ratio"])
        assert row["data_device"] == "cpu"  # data.device=auto on a CPU run
    ratios = [r["train_pass_ratio"] for r in mlp["rows"]]
    assert (
        mlp["goal_met"] is (min(ratios) >= 0.90)
        and dry_run["goals_met"]["mlp"] is (mlp["goal_met"])
    )


@pytest.mark.slow  # the whole dry run: ~30 s of child processes
def test_the_dry_run_measures_unet_in_every_setting(dry_run):
    unet = dry_run["sections"]["unet"]
    rows = {r["setting"]: r for r in unet["rows"]}
    assert list(rows) == [
        "fp32_eager",
        "fp32_tf32",
        "bf16",
        "bf16_channels_last",
        "bf16_channels_last_compile",
    ]
    assert all(r["status"] == "ok" and positive(r["images_per_s"]) for r in rows.values())
    assert rows["fp32_eager"]["speedup"] == 1.0
    assert rows["bf16"]["precision"] == "bf16" and not rows["bf16"]["channels_last"]
    assert (
        rows["bf16_channels_last"]["channels_last"]
        and rows["bf16_channels_last_compile"]["compile"]
    )
    fast = max(rows[n]["images_per_s"] for n in ("bf16", "bf16_channels_last",
                                                  "bf16_channels_last_compile"))  # fmt: skip
    assert unet["best_speedup"] == pytest.approx(fast / rows["fp32_eager"]["images_per_s"], 1e-2)
    assert unet["goal_met"] is (unet["best_speedup"] >= 2.0)


def test_a_failing_unet_setting_is_recorded_and_the_others_still_run(tmp_path, monkeypatch):
    gpu = load_script()
    real = gpu.unet_row

    def row(setting, sizes, device):
        if setting[0] == "bf16":
            raise RuntimeError("CUDA error: an illegal memory access\nmore lines")
        return real(setting, sizes, device)

    monkeypatch.setattr(gpu, "unet_row", row)
    monkeypatch.setattr(gpu, "UNET_SETTINGS", gpu.UNET_SETTINGS[:3])  # the eager ones: quick
    out = gpu.Writer(tmp_path / "unet.json", {})
    gpu.unet(True, 60.0, out)
    saved = json.loads((tmp_path / "unet.json").read_text())
    status = {r["setting"]: r["status"] for r in saved["rows"]}
    assert status == {"fp32_eager": "ok", "fp32_tf32": "ok", "bf16": "failed"}
    (failed,) = [r for r in saved["rows"] if r["status"] == "failed"]
    assert failed["error"] == "RuntimeError: CUDA error: an illegal memory access"
    assert saved["status"] == "ok" and saved["best_speedup"] is None and not saved["goal_met"]


def test_without_cuda_the_real_run_refuses_with_one_line(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the real run would start")
    assert load_script().main([]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["benchmarks/gpu.py: no CUDA device; use --dry-run on the CPU"]
