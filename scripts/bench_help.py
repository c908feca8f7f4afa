"""How fast `t2i --help` answers, as a fraction of `python -c "import torch, diffusers"` on the same machine.

    python scripts/bench_help.py [--repeats 5]

Each command runs in a fresh interpreter, alternating, and the median wall time of each is compared. The
target (issue 18): every `t2i [COMMAND] --help` under 0.25 of the import time.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

TARGET_RATIO = 0.25
HELP_COMMANDS = [[], ["demo"], ["train"], ["finetune"], ["generate"], ["batch"], ["export"]]


def wall_time(argv: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="runs of each command (default: 5)")
    args = parser.parse_args()

    baseline_argv = [sys.executable, "-c", "import torch, diffusers"]
    help_argvs = {" ".join(["t2i", *c, "--help"]): [sys.executable, "-m", "t2i.cli", *c, "--help"]
                  for c in HELP_COMMANDS}
    times: dict[str, list[float]] = {"import torch, diffusers": [], **{name: [] for name in help_argvs}}
    wall_time(baseline_argv)  # the first import fills the page cache; it is not counted
    for _ in range(args.repeats):
        times["import torch, diffusers"].append(wall_time(baseline_argv))
        for name, argv in help_argvs.items():
            times[name].append(wall_time(argv))
    baseline = statistics.median(times["import torch, diffusers"])
    print(f"{'command':<28}{'median s':>10}{'ratio':>8}")
    print(f"{'import torch, diffusers':<28}{baseline:>10.3f}{1.0:>8.2f}")
    for name in help_argvs:
        ratio = statistics.median(times[name]) / baseline
        verdict = "met" if ratio < TARGET_RATIO else "NOT met"
        print(f"{name:<28}{statistics.median(times[name]):>10.3f}{ratio:>8.3f}  target < {TARGET_RATIO}: {verdict}")


if __name__ == "__main__":
    main()
