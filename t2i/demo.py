"""`t2i demo`, the main job: from nothing to a trained text-to-image model, judged, in minutes on a CPU.

Generates the shapes dataset, trains VAE, CLIP and U-Net, saves the pipeline to OUT/pipeline, renders the
fixed prompt suite (seen, held-out and two-object prompts), judges every image and writes OUT/grid.png and
OUT/report.html. A second run in the same folder resumes where the first stopped.
"""
from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

from t2i.config import PACKAGED_CONFIGS, load_config
from t2i.data.shapes import prompt_suite
from t2i.eval.evaluate import evaluate
from t2i.eval.report import write_report
from t2i.pipeline import Text2ImagePipeline
from t2i.pipeline.pipeline import resolve_device
from t2i.training import run_lock
from t2i.training.run import run_training

# The targets for the CPU demo: fully-correct fractions and a wall-time budget.
TARGETS = {"seen": 0.60, "held_out": 0.40, "colour": 0.90, "seconds": 240.0}


def default_config(device: str) -> Path:
    return PACKAGED_CONFIGS / ("demo_gpu.yaml" if resolve_device(device).type == "cuda" else "demo.yaml")


def run_demo(out: Path, device: str = "auto", config_path: Path | None = None,
             overrides: list[str] | None = None, resume_weights_only: bool = False) -> dict:
    config = load_config(config_path or default_config(device),
                         [*(overrides or []), f"run_dir={out}", f"device={device}"])
    with run_lock.hold(out):  # training, sampling and the report: one demo in a folder at a time
        return _run_demo(out, device, config, resume_weights_only)


def _run_demo(out: Path, device: str, config, resume_weights_only: bool) -> dict:
    started = time.perf_counter()
    pipeline_dir = run_training(config, resume=True, resume_weights_only=resume_weights_only)
    trained = time.perf_counter()

    pipe = Text2ImagePipeline.from_pretrained(pipeline_dir, device=device).speed_up()
    sampling = config.sampling
    # The suite repeated: image i is drawn from seed i, so every repeat of a prompt gets its own seed.
    suite = prompt_suite(config.data.held_out_pairs) * sampling.samples_per_prompt
    evaluation = evaluate(pipe, suite, sampling.steps, sampling.guidance_scale, sampling.sampler)
    timings = {"training (data, vae, clip, unet)": trained - started, "sampling + judging": evaluation.seconds,
               "total": time.perf_counter() - started}
    grid, report = write_report(out, evaluation, out, list(config.stages), timings,
                                {"steps": sampling.steps, "guidance_scale": sampling.guidance_scale,
                                 "sampler": sampling.sampler, "samples_per_prompt": sampling.samples_per_prompt})
    timings["total"] = time.perf_counter() - started
    _print_summary(evaluation.summary, Counter(evaluation.categories), timings, grid, report, pipeline_dir)
    return {"summary": evaluation.summary, "timings": timings, "pipeline": pipeline_dir, "report": report}


def _print_summary(summary: dict, images: Counter, timings: dict, grid: Path, report: Path,
                   pipeline_dir: Path) -> None:
    print("\njudged accuracy (fraction of images):")
    for category, scores in summary.items():
        count = images.total() if category == "all" else images[category]
        print(f"  {category:<11}" + "  ".join(f"{name} {value:.2f}" for name, value in scores.items())
              + f"  ({count} images)")
    checks = [
        ("seen fully correct", summary.get("seen", {}).get("correct", 0.0), TARGETS["seen"], True),
        ("held-out fully correct", summary.get("held_out", {}).get("correct", 0.0), TARGETS["held_out"], True),
        ("colour (all prompts)", summary["all"]["colour"], TARGETS["colour"], True),
        ("wall time, s", timings["total"], TARGETS["seconds"], False),
    ]
    print("targets:")
    for name, value, target, higher_is_better in checks:
        met = value >= target if higher_is_better else value <= target
        print(f"  {name:<24}{value:8.2f}  target {'≥' if higher_is_better else '≤'} {target:g}  "
              f"{'met' if met else 'NOT met'}")
    print(f"pipeline: {pipeline_dir}\ngrid:     {grid}\nreport:   {report}")
