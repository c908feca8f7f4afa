"""`t2i demo`, the main job: from nothing to a trained text-to-image model, judged, in minutes on a CPU.

Generates the shapes dataset, trains VAE, CLIP and U-Net, saves the pipeline to OUT/pipeline, renders the
fixed prompt suite (seen, held-out and two-object prompts), judges every image and writes OUT/grid.png and
OUT/report.html. A second run in the same folder resumes where the first stopped.

With `cascade`, a super-resolution stage (32 -> 64 px) trains after the U-Net; the report then shows every image
beside its upscaled version, judged again at 64 px, and the SR stage's PSNR and SSIM on held-out images against
bicubic upsampling. A cascade run in the folder of a finished plain demo trains only the SR stage.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch

from t2i.config import PACKAGED_CONFIGS, load_config
from t2i.data.shapes import prompt_suite
from t2i.eval.evaluate import (
    Evaluation,
    Fidelity,
    evaluate,
    evaluate_upscaled,
    sr_fidelity,
)
from t2i.eval.report import Check, write_report
from t2i.pipeline import Text2ImagePipeline
from t2i.pipeline.pipeline import resolve_device
from t2i.training import run_lock
from t2i.training.run import run_training, sr_resolution

# The targets for the CPU demo: fully-correct fractions and a wall-time budget.
TARGETS = {"seen": 0.60, "held_out": 0.40, "colour": 0.90, "seconds": 240.0}
# ... and for `--cascade`: the fully-correct rate at the SR stage's size at most this far below the base stage's,
# SR at least this many dB above bicubic on held-out images, and the whole run within this time.
CASCADE_TARGETS = {"correct_drop": 0.05, "psnr_margin_db": 2.0, "seconds": 900.0}
HELD_OUT_IMAGES = 256  # held-out images (drawn with data.seed + 1) the SR stage's PSNR and SSIM are measured on


def default_config(device: str) -> Path:
    return PACKAGED_CONFIGS / ("demo_gpu.yaml" if resolve_device(device).type == "cuda" else "demo.yaml")


def run_demo(out: Path, device: str = "auto", config_path: Path | None = None,
             overrides: list[str] | None = None, resume_weights_only: bool = False, cascade: bool = False) -> dict:
    config = load_config(config_path or default_config(device),
                         [*(overrides or []), f"run_dir={out}", f"device={device}"])
    if cascade and "sr" not in config.stages:
        config = replace(config, stages=(*config.stages, "sr"))
    with run_lock.hold(out):  # training, sampling and the report: one demo in a folder at a time
        return _run_demo(out, device, config, resume_weights_only)


def _run_demo(out: Path, device: str, config, resume_weights_only: bool) -> dict:
    started = time.perf_counter()
    # The wall-time target is judged on a whole demo: not on one that resumed a run with stages begun already.
    resumed = any((out / stage).is_dir() for stage in config.stages)
    cascade = "sr" in config.stages
    if cascade:  # the base stages first, on their own, so that the SR stage's extra time is measured apart
        base = replace(config, stages=tuple(stage for stage in config.stages if stage != "sr"))
        run_training(base, resume=True, resume_weights_only=resume_weights_only)
        base_trained = time.perf_counter()
    pipeline_dir = run_training(config, resume=True, resume_weights_only=resume_weights_only)
    trained = time.perf_counter()

    pipe = Text2ImagePipeline.from_pretrained(pipeline_dir, device=device).speed_up()
    sampling = config.sampling
    # The suite repeated: image i is drawn from seed i, so every repeat of a prompt gets its own seed.
    suite = prompt_suite(config.data.held_out_pairs) * sampling.samples_per_prompt
    evaluation = evaluate(pipe, suite, sampling.steps, sampling.guidance_scale, sampling.sampler)
    timings = {"training (data, vae, clip, unet)": trained - started, "sampling + judging": evaluation.seconds,
               "total": time.perf_counter() - started}
    settings = {"steps": sampling.steps, "guidance_scale": sampling.guidance_scale, "sampler": sampling.sampler,
                "samples_per_prompt": sampling.samples_per_prompt}
    upscaled, fidelity = None, None
    if cascade:
        upscaled = evaluate_upscaled(pipe, evaluation)
        fidelity = _held_out_fidelity(pipe, config)
        timings = {"training (data, vae, clip, unet)": base_trained - started,
                   "sampling + judging": evaluation.seconds,
                   "sr: training (64 px data, sr)": trained - base_trained,
                   "sr: upscaling + judging": upscaled.seconds,
                   "sr: held-out PSNR / SSIM": fidelity.seconds}
        timings["sr: extra time"] = sum(v for k, v in timings.items() if k.startswith("sr:"))
        timings["total"] = time.perf_counter() - started
        settings["sr"] = pipe.sr.defaults

    def checks(timings: dict) -> list[Check]:
        base = _checks(evaluation.summary, timings, resumed)
        return base + (_cascade_checks(evaluation, upscaled, fidelity, timings, resumed) if cascade else [])

    grid, report = write_report(out, evaluation, out, list(config.stages), timings, settings, upscaled, fidelity,
                                 resumed, started, checks)
    _print_summary(evaluation.summary, Counter(evaluation.categories), _checks(evaluation.summary, timings, resumed),
                   grid, report, pipeline_dir, resumed)
    if cascade:
        _print_cascade(fidelity, upscaled, evaluation, _cascade_checks(evaluation, upscaled, fidelity, timings, resumed),
                       resumed)
    return {"summary": evaluation.summary, "timings": timings, "pipeline": pipeline_dir, "report": report,
            **({"upscaled_summary": upscaled.summary, "fidelity": fidelity} if cascade else {})}


def _held_out_fidelity(pipe: Text2ImagePipeline, config) -> Fidelity:
    """The SR stage's PSNR and SSIM on shapes it never trained on (the data drawn with seed + 1)."""
    from t2i.data.build import build_datasets

    data = replace(config.data, resolution=sr_resolution(config), size=HELD_OUT_IMAGES, seed=config.data.seed + 1)
    dataset, _, _ = build_datasets(data, None, False)
    items = [dataset[i] for i in range(len(dataset))]
    truth = torch.stack([item["pixel_values"] for item in items])
    return sr_fidelity(pipe, truth, [item["caption"] for item in items])


def _cascade_checks(base: Evaluation, upscaled: Evaluation, fidelity: Fidelity, timings: dict,
                    resumed: bool) -> list[Check]:
    size = upscaled.images[0].width
    base_correct, sr_correct = base.summary["all"]["correct"], upscaled.summary["all"]["correct"]
    return [
        Check(f"fully correct at {size} px", sr_correct, base_correct - CASCADE_TARGETS["correct_drop"], True),
        Check("PSNR over bicubic, dB", fidelity.psnr - fidelity.psnr_bicubic, CASCADE_TARGETS["psnr_margin_db"], True),
        Check("SR extra time, s", timings["sr: extra time"], None, False),
        Check("wall time, s", timings["total"], None if resumed else CASCADE_TARGETS["seconds"], False),
    ]


def _print_cascade(fidelity: Fidelity, upscaled: Evaluation, base: Evaluation, checks: list[Check],
                   resumed: bool) -> None:
    print(f"cascade (SR stage, {base.images[0].width} -> {upscaled.images[0].width} px):")
    print(f"  held-out PSNR: SR {fidelity.psnr:.2f} dB, bicubic {fidelity.psnr_bicubic:.2f} dB; SSIM: SR "
          f"{fidelity.ssim:.4f}, bicubic {fidelity.ssim_bicubic:.4f}")
    _print_checks(checks, resumed)


def _checks(summary: dict, timings: dict, resumed: bool) -> list[Check]:
    return [
        Check("seen fully correct", summary.get("seen", {}).get("correct", 0.0), TARGETS["seen"], True),
        Check("held-out fully correct", summary.get("held_out", {}).get("correct", 0.0), TARGETS["held_out"], True),
        Check("colour (all prompts)", summary["all"]["colour"], TARGETS["colour"], True),
        # In a --cascade run the SR stage's extra time is judged apart, against its own target.
        Check("wall time, s", timings["total"] - timings.get("sr: extra time", 0.0),
              None if resumed else TARGETS["seconds"], False),
    ]


def _print_summary(summary: dict, images: Counter, checks: list[Check], grid: Path, report: Path,
                   pipeline_dir: Path, resumed: bool) -> None:
    print("\njudged accuracy (fraction of images):")
    for category, scores in summary.items():
        count = images.total() if category == "all" else images[category]
        print(f"  {category:<11}" + "  ".join(f"{name} {value:.2f}" for name, value in scores.items())
              + f"  ({count} images)")
    print("targets:")
    _print_checks(checks, resumed)
    print(f"pipeline: {pipeline_dir}\ngrid:     {grid}\nreport:   {report}")


def _print_checks(checks: list[Check], resumed: bool) -> None:
    """One line a check: its value, and whether it meets its target; a time of a resumed run is not judged."""
    for check in checks:
        if check.target is None:
            note = "  (not judged: this run resumed one begun earlier)" if resumed and check.name.endswith(", s") else ""
            print(f"  {check.name:<24}{check.value:8.2f}{note}")
            continue
        print(f"  {check.name:<24}{check.value:8.2f}  target {check.target_text()}  "
              f"{'met' if check.met else 'NOT met'}")
