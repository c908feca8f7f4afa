"""Score a pipeline's super-resolution stage on held-out shapes images: PSNR and SSIM against the truth, next to
bicubic upsampling, at one or more conditioning noise levels; and the VAE's own reconstruction PSNR at the high
resolution, which caps what an SR stage in the VAE's latent space could reach.

    python scripts/sr_eval.py t2i-demo/pipeline --images 256 --noise-levels 0 50

Held-out images: the demo's shapes data drawn with another seed (data.seed + 1), never trained on.
"""
import argparse
from dataclasses import replace

import torch

from t2i.config import PACKAGED_CONFIGS, load_config
from t2i.data.build import build_datasets
from t2i.eval.evaluate import sr_fidelity
from t2i.eval.fidelity import psnr
from t2i.pipeline import Text2ImagePipeline

PSNR_MARGIN_DB = 2.0  # the target: SR at least this far above bicubic


def held_out_images(config, high: int, count: int) -> tuple[torch.Tensor, list[str]]:
    data = replace(config.data, resolution=high, size=count, seed=config.data.seed + 1)
    dataset, _, _ = build_datasets(data, None, False)
    items = [dataset[i] for i in range(count)]
    return torch.stack([item["pixel_values"] for item in items]), [item["caption"] for item in items]


@torch.no_grad()
def vae_psnr(pipe: Text2ImagePipeline, truth: torch.Tensor) -> float:
    """PSNR of the VAE's reconstruction of the high-resolution truth (posterior mean)."""
    vae = pipe.vae
    reconstructed = vae.decode(vae.encode(truth.to(pipe.device, pipe.dtype)).latent_dist.mean).sample
    return psnr((reconstructed.float().cpu().clamp(-1, 1) + 1) / 2, (truth + 1) / 2).mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pipeline", help="a t2i pipeline folder with an sr/ stage")
    parser.add_argument("--config", default=str(PACKAGED_CONFIGS / "demo.yaml"), help="the run config of the data")
    parser.add_argument("--images", type=int, default=256, help="held-out images to score (default: 256)")
    parser.add_argument("--noise-levels", type=int, nargs="+", default=None,
                        help="conditioning noise levels to score (default: the stage's own)")
    parser.add_argument("--steps", type=int, default=None, help="SR sampling steps (default: the stage's)")
    args = parser.parse_args()
    pipe = Text2ImagePipeline.from_pretrained(args.pipeline, device="cpu")
    if args.steps is not None:
        pipe.sr.defaults["num_inference_steps"] = args.steps
    config = load_config(args.config)
    high = config.data.resolution * pipe.sr.factor
    truth, captions = held_out_images(config, high, args.images)
    print(f"{args.images} held-out images, {high // pipe.sr.factor} -> {high} px; SR defaults {pipe.sr.defaults}")
    for level in args.noise_levels or [pipe.sr.defaults["noise_level"]]:
        scores = sr_fidelity(pipe, truth, captions, noise_level=level)
        margin = scores.psnr - scores.psnr_bicubic
        print(f"noise level {level:>3}: SR PSNR {scores.psnr:.2f} dB, SSIM {scores.ssim:.4f} | bicubic PSNR "
              f"{scores.psnr_bicubic:.2f} dB, SSIM {scores.ssim_bicubic:.4f} | margin {margin:+.2f} dB (target "
              f"≥ +{PSNR_MARGIN_DB:g}: {'met' if margin >= PSNR_MARGIN_DB else 'NOT met'}) | {scores.seconds:.1f} s")
    print(f"VAE reconstruction at {high} px (the cap of a latent-space SR stage): PSNR {vae_psnr(pipe, truth):.2f} dB")


if __name__ == "__main__":
    main()
