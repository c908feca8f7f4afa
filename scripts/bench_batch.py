"""Images/s of `t2i batch` against a plain loop that calls the pipeline once per prompt and saves each PNG.

    python scripts/bench_batch.py                         # random weights at configs/demo.yaml's sizes
    python scripts/bench_batch.py --model t2i-demo/pipeline --prompts 64 --steps 20 --rounds 2

Both sides make the same images (same prompts, seeds, steps, sampler, guidance) with the same pipeline; the
rounds alternate, so that load from other work on the machine falls on both. Target: batch ≥ 1.5× the loop.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from t2i.config import load_config  # noqa: E402
from t2i.diffusion.schedules import scheduler_config  # noqa: E402
from t2i.jobs.items import JobDefaults, derived_seed, read_items  # noqa: E402
from t2i.jobs.run import BatchJob, run_batch_job  # noqa: E402
from t2i.models.text_encoder import OpenClipTextEncoder  # noqa: E402
from t2i.models.unet import build_unet  # noqa: E402
from t2i.models.vae import build_vae  # noqa: E402
from t2i.pipeline import Text2ImagePipeline  # noqa: E402

COLOURS = ("red", "green", "blue", "yellow", "white", "purple", "orange", "cyan")
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
TARGET = 1.5


def save_random_model(path: Path, config_path: Path) -> Path:
    """A pipeline with random weights at the sizes of `config_path`: enough for timing and for resume checks."""
    config = load_config(config_path)
    torch.manual_seed(0)
    vae = build_vae(config.vae, config.data.resolution)
    text_encoder = OpenClipTextEncoder.from_config(config.text_encoder, config.data.resolution)
    unet = build_unet(config.unet, config.vae.latent_channels, text_encoder.hidden_size,
                      config.data.resolution // config.vae.latent_factor)
    schedule = scheduler_config(config.diffusion.schedule, config.diffusion.num_train_timesteps,
                                config.diffusion.prediction)
    Text2ImagePipeline(vae, text_encoder, unet, schedule).save_pretrained(path)
    return path


def prompt_list(count: int) -> list[str]:
    every = [f"a {size} {colour} {shape}" for size in SIZES for colour in COLOURS for shape in SHAPES]
    return [every[i % len(every)] + ("" if i < len(every) else f" number {i // len(every)}") for i in range(count)]


def plain_loop(pipe, prompts: list[str], seeds: list[int], steps: int, out: Path) -> float:
    out.mkdir(parents=True)
    started = time.perf_counter()
    for i, (prompt, seed) in enumerate(zip(prompts, seeds)):
        pipe(prompt, seed=seed, num_inference_steps=steps)[0].save(out / f"{i}.png")
    return len(prompts) / (time.perf_counter() - started)


def batch_job(model: Path, prompts_file: Path, out: Path, steps: int, batch_size: int) -> float:
    summary = run_batch_job(BatchJob(model, prompts_file, out, batch_size=batch_size, steps=steps, device="cpu",
                                     progress=False))
    return summary.images_per_second


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="pipeline folder (default: random demo-sized)")
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "demo.yaml",
                        help="sizes of the random model when --model is not given")
    parser.add_argument("--prompts", type=int, default=48, help="distinct prompts, one image each")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2, help="alternating loop/batch rounds; medians reported")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        model = args.model or save_random_model(scratch / "model", args.config)
        pipe = Text2ImagePipeline.from_pretrained(model, device="cpu")
        prompts = prompt_list(args.prompts)
        prompts_file = scratch / "prompts.txt"
        prompts_file.write_text("\n".join(prompts) + "\n")
        defaults = JobDefaults("", 0, args.steps, 7.5, "dpmpp_2m", 32, 32, 1)
        seeds = [derived_seed(0, item.id, 0) for item in read_items(prompts_file, defaults, 1)[0]]
        pipe(prompts[:2], seed=0, num_inference_steps=2)  # warm-up: first calls pay for kernel selection

        loop_rates, batch_rates = [], []
        for round_ in range(args.rounds):
            loop_rates.append(plain_loop(pipe, prompts, seeds, args.steps, scratch / f"loop{round_}"))
            batch_rates.append(batch_job(model, prompts_file, scratch / f"batch{round_}", args.steps,
                                         args.batch_size))
            print(f"round {round_}: loop {loop_rates[-1]:.2f} images/s, batch {batch_rates[-1]:.2f} images/s",
                  flush=True)

    loop, batch = statistics.median(loop_rates), statistics.median(batch_rates)
    print(f"plain loop: {loop:.2f} images/s; t2i batch (batch size {args.batch_size}): {batch:.2f} images/s; "
          f"{batch / loop:.2f}x (target >= {TARGET}x: {'met' if batch / loop >= TARGET else 'NOT met'})")


if __name__ == "__main__":
    main()
