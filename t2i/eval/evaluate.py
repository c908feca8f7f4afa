"""Judge a pipeline on a fixed prompt suite: generate, judge each image against its prompt, summarise; and score
its super-resolution stage, on the suite's images (judged again) and on held-out images (PSNR, SSIM)."""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from t2i.diffusion.super_resolution import area_downsample, upsample
from t2i.eval.fidelity import psnr, ssim
from t2i.eval.grid import to_pil
from t2i.eval.judge import Judgement, judge, summarize


@dataclass
class Evaluation:
    prompts: list[str]
    categories: list[str]
    images: list[Image.Image]
    judgements: list[Judgement]
    summary: dict[str, dict[str, float]]  # category (and "all") -> attribute (and "correct") -> fraction
    seconds: float


def evaluate(pipe, suite: list[tuple[str, str]], num_inference_steps: int | None = None,
             guidance_scale: float | None = None, sampler: str | None = None, seed: int = 0,
             batch_size: int = 48, classifier_guidance: float = 0.0) -> Evaluation:
    """Generate one image per (prompt, category) of `suite`, image i from seed + i, and judge it."""
    prompts = [prompt for prompt, _ in suite]
    categories = [category for _, category in suite]
    started = time.perf_counter()
    images = pipe(prompts, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                  sampler=sampler, seed=seed, batch_size=batch_size, progress=True,
                  classifier_guidance=classifier_guidance)
    seconds = time.perf_counter() - started
    judgements = [judge(image, prompt) for image, prompt in zip(images, prompts)]
    return Evaluation(prompts, categories, images, judgements, summarize(judgements, categories), seconds)


def evaluate_upscaled(pipe, base: Evaluation, seed: int = 0, batch_size: int = 48) -> Evaluation:
    """`base`'s images through the pipeline's SR stage (its defaults), image i with seed + i, judged again."""
    started = time.perf_counter()
    images: list[Image.Image] = []
    for start in range(0, len(base.images), batch_size):
        chunk = slice(start, start + batch_size)
        images.extend(pipe.upscale(base.images[chunk], base.prompts[chunk], seed=seed + start))
    seconds = time.perf_counter() - started
    judgements = [judge(image, prompt) for image, prompt in zip(images, base.prompts)]
    return Evaluation(base.prompts, base.categories, images, judgements, summarize(judgements, base.categories),
                      seconds)


@dataclass
class Fidelity:
    """Mean PSNR (dB) and SSIM of SR output and of bicubic upsampling against the true high-resolution images."""

    psnr: float
    ssim: float
    psnr_bicubic: float
    ssim_bicubic: float
    images: int
    seconds: float


def sr_fidelity(pipe, truth: torch.Tensor, captions: list[str], noise_level: int | None = None, seed: int = 0,
                batch_size: int = 64) -> Fidelity:
    """Area-downsample `truth` (B, 3, H, W) in [-1, 1] by the SR factor, round to 8-bit images as a base stage
    outputs them, upscale with the SR stage and with bicubic, and score both against `truth`."""
    factor = pipe.sr.factor
    low = to_pil(area_downsample(truth, factor))
    started = time.perf_counter()
    upscaled: list[Image.Image] = []
    for start in range(0, len(low), batch_size):
        chunk = slice(start, start + batch_size)
        upscaled.extend(pipe.upscale(low[chunk], captions[chunk], noise_level=noise_level, seed=seed + start))
    seconds = time.perf_counter() - started
    bicubic = upsample(_unit_to_signed(_as_tensor(low)), factor)
    unit_truth = (truth.float().cpu().clamp(-1, 1) + 1) / 2
    sr, bicubic = _as_tensor(upscaled), (bicubic + 1) / 2
    return Fidelity(psnr(sr, unit_truth).mean().item(), ssim(sr, unit_truth).mean().item(),
                    psnr(bicubic, unit_truth).mean().item(), ssim(bicubic, unit_truth).mean().item(), len(low),
                    seconds)


def _as_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL images -> (B, 3, H, W) in [0, 1]."""
    return torch.stack([torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32)) for image in images]
                       ).permute(0, 3, 1, 2) / 255


def _unit_to_signed(images: torch.Tensor) -> torch.Tensor:
    return images * 2 - 1
