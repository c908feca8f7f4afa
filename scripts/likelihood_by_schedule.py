"""Bits/dim of the same held-out shapes images under several pipelines (e.g. U-Nets trained with different noise
schedules on one VAE), as the Markdown table of docs/samplers.md, "Likelihood".

    OMP_NUM_THREADS=1 python scripts/likelihood_by_schedule.py /tmp/lik-linear/pipeline \\
        /tmp/lik-scaled_linear/pipeline /tmp/dfinal/pipeline --images 16 --tolerance 1e-3

Every pipeline sees the same images and the same draws (image i from seed + i). With one VAE, z and the encoder and
decoder terms are then the same for all, and the differences lie in the U-Net's latent term alone: the last column
gives them against the first pipeline, with the standard error of the paired per-image differences.
"""
import argparse
import math

import torch

from t2i.diffusion.schedules import DIFFUSERS_BETA_SCHEDULE
from t2i.eval.likelihood import DEFAULT_BATCH_SIZE, LikelihoodResult, held_out_shapes, measure_likelihood
from t2i.pipeline import Text2ImagePipeline

SCHEDULE_NAMES = {diffusers_name: ours for ours, diffusers_name in DIFFUSERS_BETA_SCHEDULE.items()}


def paired_difference(result: LikelihoodResult, reference: LikelihoodResult) -> str:
    difference = result.bits - reference.bits
    error = difference.std().item() / math.sqrt(len(difference)) if len(difference) > 1 else math.nan
    return f"{difference.mean().item():+.3f} ± {error:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pipelines", nargs="+", help="pipeline folders, the first one the reference")
    parser.add_argument("--images", type=int, default=16, help="held-out shapes images (default: 16)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="images per ODE solve")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first image's draws (default: 0)")
    parser.add_argument("--tolerance", type=float, default=1e-3, help="the ODE's rtol and atol (default: 1e-3)")
    args = parser.parse_args()
    rows, reference = [], None
    for folder in args.pipelines:
        pipe = Text2ImagePipeline.from_pretrained(folder, device="cpu", dtype=torch.float32)
        levels = held_out_shapes(args.images, pipe.default_size)
        result = measure_likelihood(pipe, levels, args.batch_size, args.seed, args.tolerance)
        reference = reference or result
        config = pipe.scheduler_config
        schedule = SCHEDULE_NAMES.get(config["beta_schedule"], config["beta_schedule"])
        rows.append(f"| `{schedule}` | {config['prediction_type']} | {result.mean:.3f} ± {result.standard_error:.3f} | "
                    f"{result.prior_bits.mean():.3f} | {result.posterior_bits.mean():.3f} | "
                    f"{result.decoder_bits.mean():.3f} | {paired_difference(result, reference)} | "
                    f"{result.evaluations.float().mean():.0f} | {result.seconds:.0f} | `{folder}` |")
        print(rows[-1], flush=True)
    print(f"\n{args.images} held-out shapes images, seed {args.seed}, rtol = atol = {args.tolerance:g}; bits/dim of "
          "3·H·W 8-bit values\n")
    print("| schedule | prediction | bits/dim (bound) | latent −log p(z) | encoder log q(z\\|x) | decoder −log P(x\\|z) "
          "| vs first (paired) | drift evaluations / image | seconds | pipeline |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
