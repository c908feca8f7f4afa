"""Judge a pipeline on a fixed prompt suite: generate, judge each image against its prompt, summarise."""
from __future__ import annotations

import time
from dataclasses import dataclass

from PIL import Image

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
             batch_size: int = 48) -> Evaluation:
    """Generate one image per (prompt, category) of `suite`, image i from seed + i, and judge it."""
    prompts = [prompt for prompt, _ in suite]
    categories = [category for _, category in suite]
    started = time.perf_counter()
    images = pipe(prompts, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                  sampler=sampler, seed=seed, batch_size=batch_size, progress=True)
    seconds = time.perf_counter() - started
    judgements = [judge(image, prompt) for image, prompt in zip(images, prompts)]
    return Evaluation(prompts, categories, images, judgements, summarize(judgements, categories), seconds)
