"""How long the command line takes to answer when it does no work (help, `config`, an error),
against a bare Python start and one that imports torch, measured interleaved in the same run.

    python benchmarks/cli_startup.py            # 5 rounds
    python benchmarks/cli_startup.py --rounds 9
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "configs" / "digits_mlp.yaml")

COMMANDS = {
    "python (nothing)": [sys.executable, "-c", "pass"],
    "python -c 'import torch'": [sys.executable, "-c", "import torch"],
    "dltemplate --help": [sys.executable, "-m", "dltemplate", "--help"],
    "dltemplate train --help": [sys.executable, "-m", "dltemplate", "train", "--help"],
    "dltemplate config DEMO": [sys.executable, "-m", "dltemplate", "config", DEMO],
    "dltemplate compare-configs": [
        sys.executable,
        "-m",
        "dltemplate",
        "compare-configs",
        DEMO,
        DEMO,
    ],  # fmt: skip
    "dltemplate train DEMO (typo)": [
        sys.executable,
        "-m",
        "dltemplate",
        "train",
        DEMO,
        "trainer.epoch=3",
    ],  # fmt: skip
}


def seconds(command: list[str]) -> float:
    """Wall-clock seconds of one run of ``command`` (its output discarded)."""
    start = time.perf_counter()
    subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    return time.perf_counter() - start


def main() -> None:
    """Print the median seconds of each command and its ratio to ``import torch``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds (after a warm-up)")
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for command in COMMANDS.values():  # warm-up: the file cache, .pyc files
        seconds(command)
    for _ in range(args.rounds):  # interleaved: the machine's load hits every command alike
        for name, command in COMMANDS.items():
            times[name].append(seconds(command))
    torch_s = statistics.median(times["python -c 'import torch'"])
    print(f"{'command':<32} {'median s':>9} {'/ import torch':>15}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<32} {median:>9.3f} {median / torch_s:>15.2f}")


if __name__ == "__main__":
    main()
