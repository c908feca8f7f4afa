"""Measure the fail-safe targets of issue 18 on a real config, through the `t2i` command as a user runs it.

    python scripts/failsafe_check.py --out /tmp/failsafe [--config configs/demo.yaml] [--unet-steps 200]

1. A reference run, uninterrupted (VAE and CLIP shortened by --set; they only feed the U-Net stage).
2. Divergence: the U-Net stage again at learning rate 1e9 without clipping, a checkpoint every step: the step
   of the first non-finite loss, the step it stopped at, and whether any checkpoint holds a non-finite value.
3. A busy folder: a second `t2i train` into a folder whose lock a live process holds; seconds to refusal.
4. SIGTERM: the U-Net stage killed politely halfway, seconds from signal to exit, exit status, then `--resume`
   and the largest difference from the reference's final weights.
Run `python scripts/bench_help.py` for the last target (`t2i --help` time).
"""
from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
UNET_WEIGHTS = Path("unet/final/diffusion_pytorch_model.safetensors")


def t2i(*args: str) -> list[str]:
    return [sys.executable, "-m", "t2i.cli", *args]


def settings(*pairs: str) -> list[str]:
    return [arg for pair in pairs for arg in ("--set", pair)]


def unet_only_copy(reference: Path, run_dir: Path) -> Path:
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    for stage in ("vae", "clip"):
        shutil.copytree(reference / stage / "final", run_dir / stage / "final")
    return run_dir


def metrics_steps(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="scratch folder for the runs")
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "demo.yaml")
    parser.add_argument("--unet-steps", type=int, default=200)
    args = parser.parse_args()
    base = [str(args.config), *settings("train.vae.steps=100", "train.clip.steps=40",
                                        f"train.unet.steps={args.unet_steps}", "train.unet.sample_every=0",
                                        "train.unet.checkpoint_every=0", "train.unet.log_every=1")]
    reference = args.out / "reference"
    shutil.rmtree(reference, ignore_errors=True)
    started = time.perf_counter()
    subprocess.run(t2i("train", *base, *settings(f"run_dir={reference}")), check=True)
    print(f"reference run: {time.perf_counter() - started:.0f} s")

    diverged = unet_only_copy(reference, args.out / "diverged")
    result = subprocess.run(t2i("train", *base, *settings(f"run_dir={diverged}", "train.unet.learning_rate=1e9",
                                                          "train.unet.grad_clip=null", "train.unet.checkpoint_every=1"),
                                "--resume"), capture_output=True, text=True)
    error = [line for line in result.stderr.splitlines() if line.startswith("t2i train")]
    logged = metrics_steps(diverged / "unet" / "metrics.jsonl")
    first_bad = next((r["step"] for r in logged if r["loss"] is None), None)
    stopped = int(error[0].split("diverged at step ")[1].split(":")[0]) if error and "diverged at step" in error[0] \
        else None
    checkpoints = sorted((diverged / "unet" / "checkpoints").glob("step_*"))
    non_finite = sum(not all(torch.isfinite(t).all() for t in load_file(f).values())
                     for c in checkpoints for f in c.glob("*.safetensors") if f.name in ("model.safetensors",
                                                                                         "ema.safetensors"))
    print(f"divergence: exit {result.returncode}; {error[0] if error else result.stderr[-500:]}")
    print(f"divergence: first non-finite loss logged: {first_bad}; stopped at step {stopped}; "
          f"{len(checkpoints)} checkpoints kept, {non_finite} of them non-finite")

    busy = unet_only_copy(reference, args.out / "busy")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom pathlib import Path\n"
                               "from t2i.training import run_lock\nwith run_lock.hold(Path(sys.argv[1])):\n"
                               "    print('held', flush=True); time.sleep(120)", str(busy)],
                              stdout=subprocess.PIPE, text=True)
    holder.stdout.readline()
    started = time.perf_counter()
    refused = subprocess.run(t2i("train", *base, *settings(f"run_dir={busy}"), "--resume"), capture_output=True,
                             text=True)
    refused_in = time.perf_counter() - started
    holder.kill()
    holder.wait()
    print(f"busy folder: exit {refused.returncode} in {refused_in:.2f} s: {refused.stderr.strip()}")

    interrupted = unet_only_copy(reference, args.out / "interrupted")
    process = subprocess.Popen(t2i("train", *base, *settings(f"run_dir={interrupted}"), "--resume"),
                               stderr=subprocess.PIPE, text=True)
    metrics = interrupted / "unet" / "metrics.jsonl"
    while process.poll() is None and not any(r["step"] >= args.unet_steps // 2 for r in metrics_steps(metrics)):
        time.sleep(0.05)
    signalled = time.perf_counter()
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate()
    stop_seconds = time.perf_counter() - signalled
    print(f"SIGTERM: exit {process.returncode} after {stop_seconds:.2f} s: "
          f"{[line for line in err.splitlines() if line.startswith('t2i train')]}")
    subprocess.run(t2i("train", *base, *settings(f"run_dir={interrupted}"), "--resume"), check=True)
    resumed, uninterrupted = load_file(interrupted / UNET_WEIGHTS), load_file(reference / UNET_WEIGHTS)
    difference = max((resumed[k] - uninterrupted[k]).abs().max().item() for k in uninterrupted)
    duplicates = len(metrics_steps(metrics)) - len({r["step"] for r in metrics_steps(metrics)})

    print("\ntargets:")
    rows = [("divergence stopped within 1 step of the first non-finite loss",
             stopped is not None and (first_bad is None or stopped - first_bad <= 1), f"stopped at {stopped}"),
            ("0 non-finite checkpoints", non_finite == 0, str(non_finite)),
            ("busy folder refused in < 10 s", refused.returncode == 2 and refused_in < 10, f"{refused_in:.2f} s"),
            ("SIGTERM: stop within 30 s", process.returncode == 143 and stop_seconds < 30, f"{stop_seconds:.2f} s"),
            ("SIGTERM then --resume: 0 difference in final weights", difference == 0.0, f"{difference:g}"),
            ("0 duplicated metrics", duplicates == 0, str(duplicates))]
    for name, met, value in rows:
        print(f"  {name:<62}{value:>12}  {'met' if met else 'NOT met'}")


if __name__ == "__main__":
    main()
