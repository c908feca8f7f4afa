"""Kill a 200-image `t2i batch` job with SIGKILL at 10 random moments, finish it, and count lost and duplicated images.

    OMP_NUM_THREADS=1 python scripts/kill_batch_job.py     # tiny random model, 50 prompts x 4 images
    python scripts/kill_batch_job.py --kills 10 --seed 1

Each kill lands a random 0-1.5 s after the job's next image appears, so it falls mid-batch, mid-write or
between batches. After the last rerun: every (id, k) the prompt file asks for must have exactly one file and
one manifest line whose sha256 is the file's, no temporary file may remain, and (with --reference) every image
must equal that of an uninterrupted run byte for byte. Target: 0 lost, 0 duplicated.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_batch import prompt_list, save_random_model  # noqa: E402


def command(model: Path, prompts: Path, out: Path, args) -> list[str]:
    return [sys.executable, "-m", "t2i.cli", "batch", "--model", str(model), "--prompts", str(prompts),
            "--out", str(out), "--num-images", str(args.images_per_prompt), "--steps", str(args.steps),
            "--batch-size", str(args.batch_size), "--device", "cpu"]


def image_count(out: Path) -> int:
    return len(list((out / "images").glob("*.png"))) if (out / "images").is_dir() else 0


def run_and_kill(cmd: list[str], out: Path, rng: random.Random, env: dict) -> tuple[int, int] | None:
    """Start the job, wait for its next image, kill it a random moment later; None if it finished first."""
    before = image_count(out)
    job = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while job.poll() is None and image_count(out) == before:
        time.sleep(0.01)
    time.sleep(rng.uniform(0, 1.5))
    if job.poll() is not None:
        return None
    job.send_signal(signal.SIGKILL)
    job.wait()
    return before, image_count(out)


def audit(out: Path, expected: int) -> dict:
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    keys = [(record["id"], record["k"]) for record in records]
    files = sorted(path.name for path in (out / "images").iterdir())
    bad_hashes = [r["file"] for r in records
                  if not (out / r["file"]).is_file()
                  or hashlib.sha256((out / r["file"]).read_bytes()).hexdigest() != r["sha256"]]
    return {"expected": expected, "records": len(records), "files": len(files),
            "lost": expected - len(set(keys)), "duplicated": len(keys) - len(set(keys)),
            "temporary_files": sum(name.startswith(".") for name in files),
            "files_without_record": len(set(files) - {Path(r["file"]).name for r in records}),
            "hash_mismatches": len(bad_hashes)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("--images-per-prompt", type=int, default=4)
    parser.add_argument("--steps", type=int, default=60, help="enough that 10 kills land before the end")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    parser.add_argument("--reference", action=argparse.BooleanOptionalAction, default=True,
                        help="also run the job uninterrupted and compare every file byte for byte")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        model = save_random_model(scratch / "model", REPO / "configs" / "tiny.yaml")
        prompts = scratch / "prompts.txt"
        prompts.write_text("\n".join(prompt_list(args.prompts)) + "\n")
        out = scratch / "out"
        expected = args.prompts * args.images_per_prompt
        kills = 0
        for attempt in range(args.kills):
            result = run_and_kill(command(model, prompts, out, args), out, rng, env)
            if result is None:
                print(f"run {attempt}: finished before the kill")
                break
            kills += 1
            print(f"kill {kills}: {result[0]} -> {result[1]} of {expected} images", flush=True)
        subprocess.run(command(model, prompts, out, args), env=env, check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        report = {"kills": kills, **audit(out, expected)}
        if args.reference:
            whole = scratch / "whole"
            subprocess.run(command(model, prompts, whole, args), env=env, check=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
            report["differs_from_uninterrupted"] = sum(
                (out / "images" / path.name).read_bytes() != path.read_bytes()
                for path in (whole / "images").iterdir()) + int(
                (out / "manifest.jsonl").read_bytes() != (whole / "manifest.jsonl").read_bytes())
        print(json.dumps(report))
        clean = report["lost"] == report["duplicated"] == report["temporary_files"] == 0 and \
            report["files_without_record"] == report["hash_mismatches"] == 0 and \
            not report.get("differs_from_uninterrupted")
        print(f"{kills} kills: {report['lost']} lost, {report['duplicated']} duplicated "
              f"(target 0 and 0: {'met' if clean else 'NOT met'})")
        sys.exit(0 if clean else 1)


if __name__ == "__main__":
    main()
