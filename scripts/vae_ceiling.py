"""How well can a pipeline's VAE alone do? Judge its reconstructions of reference renders of the demo prompts.

    python scripts/vae_ceiling.py t2i-demo/pipeline

The fully-correct fraction of the reconstructions bounds what the U-Net can reach through that VAE.
"""
import argparse

import numpy as np
import torch
from diffusers import AutoencoderKL

from t2i.data.shapes import parse_caption, prompt_suite, render, scene_for_spec
from t2i.eval.judge import judge, summarize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("pipeline", help="a t2i pipeline folder")
    parser.add_argument("--repeats", type=int, default=4, help="jittered renders per prompt")
    args = parser.parse_args()
    vae = AutoencoderKL.from_pretrained(f"{args.pipeline}/vae").eval()
    suite = prompt_suite()
    rng = np.random.default_rng(0)
    prompts, categories, images = [], [], []
    for _ in range(args.repeats):
        for prompt, category in suite:
            prompts.append(prompt)
            categories.append(category)
            images.append(render(scene_for_spec(parse_caption(prompt), rng)))
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        reconstructed = vae.decode(vae.encode(pixels).latent_dist.mean).sample
    out = ((reconstructed.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    summary = summarize([judge(image, prompt) for image, prompt in zip(out, prompts)], categories)
    for category, scores in summary.items():
        print(f"{category:<11}" + "  ".join(f"{name} {value:.2f}" for name, value in scores.items()))


if __name__ == "__main__":
    main()
