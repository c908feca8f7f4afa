"""Issue 13's first target: a 200-step LoRA fine-tune on a 100-image folder with planted bad files.

    python scripts/finetune_target.py --model t2i-demo/pipeline --images /tmp/emoji-data --out /tmp/ft-target

Takes 100 images of an image folder (made by scripts/emoji_imagefolder.py), plants five bad entries beside them
(a truncated PNG, a zero-byte file, text named .png, a file name that climbs out of the folder, an empty
caption), runs `t2i finetune --lora-rank 8 --max-steps 200` on it, and prints the targets: wall time under 3
minutes, training loss falling, and a quarantine that lists exactly the planted entries.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

GOOD_IMAGES = 100
TARGET_SECONDS = 180.0


def plant(folder: Path, source: Path) -> dict[str, str]:
    """Copy the first 100 captioned images of `source` into `folder` with five bad entries; return the bad ones."""
    rows = [json.loads(line) for line in (source / "metadata.jsonl").read_text().splitlines()][:GOOD_IMAGES]
    folder.mkdir(parents=True)
    for row in rows:
        shutil.copyfile(source / row["file_name"], folder / row["file_name"])
    png = (source / rows[0]["file_name"]).read_bytes()
    (folder / "truncated.png").write_bytes(png[: len(png) // 3])
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.png").write_text("these are not pixels")
    shutil.copyfile(source / rows[1]["file_name"], folder / "uncaptioned.png")
    bad = {"truncated.png": "an emoji cut short", "empty.png": "an emoji of nothing", "notes.png": "a text file",
           "../outside.png": "climbs out of the folder", "uncaptioned.png": "   "}
    rows += [{"file_name": name, "text": caption} for name, caption in bad.items()]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return bad


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="the pipeline to fine-tune (e.g. the demo's)")
    parser.add_argument("--images", type=Path, required=True, help="an image folder with metadata.jsonl")
    parser.add_argument("--out", type=Path, required=True, help="scratch folder (replaced)")
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    bad = plant(args.out / "data", args.images)

    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "t2i.cli", "finetune", "--model", str(args.model), "--data",
                    str(args.out / "data"), "--out", str(args.out / "run"), "--lora-rank", "8", "--max-steps", "200",
                    "--batch-size", "8", "--device", "cpu", "--set", "train.finetune.log_every=1"], check=True)
    seconds = time.perf_counter() - started

    records = [json.loads(line) for line in (args.out / "run" / "finetune" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    validation = [(r["step"], r["validation_loss"]) for r in records if "validation_loss" in r]
    quarantined = {json.loads(line)["file"] for line in (args.out / "run" / "quarantine.jsonl").read_text().splitlines()}
    first, last = mean(losses[:20]), mean(losses[-20:])
    print(f"\ntraining loss, mean of the first 20 steps {first:.4f}, of the last 20 {last:.4f}")
    print(f"held-out loss by step: {', '.join(f'{step}: {loss:.4f}' for step, loss in validation)}")
    print("targets:")
    for name, met, value in [
            (f"wall time under {TARGET_SECONDS:.0f} s", seconds < TARGET_SECONDS, f"{seconds:.1f} s"),
            ("training loss falls", last < first, f"{first:.4f} -> {last:.4f}"),
            ("quarantine = the planted entries", quarantined == set(bad),
             f"{len(quarantined)} listed, {len(set(bad) - quarantined)} missed, {len(quarantined - set(bad))} extra")]:
        print(f"  {name:<36}{value:>28}  {'met' if met else 'NOT met'}")


if __name__ == "__main__":
    main()
