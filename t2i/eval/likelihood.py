"""Bits/dim of 8-bit images under a t2i pipeline (`t2i eval --likelihood`): an upper bound on −log₂ P(x) / (3·H·W).

A latent model gives an image the probability P(x) = ∫ p(z) P(x | z) dz, and for any encoder q(z | x) (the VAE's
evidence lower bound, Kingma & Welling 2014, eq. 3)

    −log P(x) ≤ E_{z ~ q(z | x)}[−log p(z) + log q(z | x) − log P(x | z)],

estimated here with one z per image:
- p(z): the U-Net's density of the scaled latent z through the probability-flow ODE, from the smallest to the largest
  σ of its training schedule (`t2i.diffusion.likelihood.ode_log_likelihood`, one Hutchinson probe per image), with
  the empty prompt and guidance 1: the unconditional model that caption dropout trains, so the number is the
  model's P(x), comparable across models and needing no captions;
- q(z | x): the VAE encoder's diagonal Gaussian posterior, in the same scaled coordinates;
- P(x | z): a discretised Gaussian around the decoded image (`discretized_gaussian_log_likelihood`) with one scale for
  every pixel, fitted by maximum likelihood on the evaluated images (one parameter fitted on the test data).
The decoder puts a probability on each 8-bit level, so nothing is dequantised: uniform dequantisation (and its
+log₂ 127.5 bits/dim) is for a density evaluated on pixel values themselves (`dequantized_bits_per_dim`), and t2i has
no pixel-space base model. Both draws (z and the probe) are unbiased, so the mean over images estimates the mean
bound without bias; the standard error covers the images and the draws.

Image i draws its posterior noise and then its probe from seed + i: its latent terms do not depend on its batch.
"""
from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from t2i.diffusion.likelihood import (
    PIXEL_BIN_WIDTH,
    TraceEstimator,
    discretized_gaussian_log_likelihood,
    gaussian_log_prob,
    ode_log_likelihood,
    pixel_values,
)
from t2i.diffusion.schedules import ZERO_SNR_ALPHA_BAR, scheduler_alphas_cumprod, sigma_from_alpha_bar
from t2i.diffusion.score_samplers import DEFAULT_ODE_TOLERANCE, Denoiser, Generator, noise_like
from t2i.errors import T2IError

DEFAULT_IMAGES = 64
DEFAULT_BATCH_SIZE = 16
# The decoder's scale is searched in log₂ scale over pixel values, from a hundredth of a level to the whole range
# [−1, 1]: every half octave, then every 1/32 octave around the best; the result is within 2^(1/64) of the optimum,
# which costs under 10⁻³ bits/dim.
DECODER_SCALE_RANGE = (math.log2(PIXEL_BIN_WIDTH / 100), 1.0)
COARSE_OCTAVES, FINE_OCTAVES = 1 / 2, 1 / 32
SHAPES_DATA = "shapes"

Encoder = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # pixels -> posterior (mean, std) of z
Decoder = Callable[[torch.Tensor], torch.Tensor]                        # z -> decoded pixels (the decoder's mean)


@dataclass(frozen=True)
class LatentTerms:
    """Per image (B,): log p(z) and log q(z | x) in nats, the decoded image of z, the ODE's drift evaluations."""

    prior_log_prob: torch.Tensor
    posterior_log_prob: torch.Tensor
    decoded: torch.Tensor
    evaluations: torch.Tensor


def latent_terms(denoise: Denoiser, encode: Encoder, decode: Decoder, levels: torch.Tensor, sigma_min: float,
                 sigma_max: float, generator: Generator = None, trace: TraceEstimator = "hutchinson",
                 tolerance: float = DEFAULT_ODE_TOLERANCE) -> LatentTerms:
    """The latent half of the bound for 8-bit images `levels` (B, 3, H, W): z = mean + std · ε, ε drawn by
    `noise_like` from `generator`, then log q(z | x), log p(z) through the ODE (its probe from the same generator)
    and the decoded image of z."""
    with torch.no_grad():
        mean, std = (part.to(torch.float64) for part in encode(pixel_values(levels)))
        z = mean + std * noise_like(mean, generator)
        posterior = gaussian_log_prob(z, mean, std)
        decoded = decode(z).to(torch.float64)
    prior, evaluations = ode_log_likelihood(denoise, z, sigma_min, sigma_max, trace, generator, tolerance, tolerance)
    return LatentTerms(prior, posterior, decoded, evaluations)


def fit_decoder_scale(levels: torch.Tensor, decoded: torch.Tensor) -> tuple[float, torch.Tensor]:
    """The scale that maximises the discretised Gaussian likelihood of all images (searched as
    `DECODER_SCALE_RANGE` says), and each image's log P(x | z) at it (N,)."""
    def best_of(log_scales: torch.Tensor) -> float:
        totals = [discretized_gaussian_log_likelihood(levels, decoded, 2**log_scale).sum() for log_scale in log_scales]
        return log_scales[int(torch.stack(totals).argmax())].item()

    coarse = best_of(torch.arange(*DECODER_SCALE_RANGE, COARSE_OCTAVES, dtype=torch.float64))
    fine = best_of(coarse + torch.arange(-COARSE_OCTAVES, COARSE_OCTAVES + FINE_OCTAVES, FINE_OCTAVES,
                                         dtype=torch.float64))
    return 2**fine, discretized_gaussian_log_likelihood(levels, decoded, 2**fine)


@dataclass(frozen=True)
class LikelihoodResult:
    """Bits per pixel dimension: the bound per image and its three terms (each (N,)), and how it was computed."""

    bits: torch.Tensor
    prior_bits: torch.Tensor      # −log p(z) / (D ln 2)
    posterior_bits: torch.Tensor  # +log q(z | x) / (D ln 2)
    decoder_bits: torch.Tensor    # −log P(x | z) / (D ln 2)
    decoder_scale: float          # in pixel values; one 8-bit level is PIXEL_BIN_WIDTH
    evaluations: torch.Tensor
    seconds: float
    tolerance: float
    image_shape: tuple[int, ...]

    @property
    def mean(self) -> float:
        return self.bits.mean().item()

    @property
    def standard_error(self) -> float:
        count = len(self.bits)
        return self.bits.std().item() / math.sqrt(count) if count > 1 else math.nan

    def lines(self) -> list[str]:
        channels, height, width = self.image_shape
        count = len(self.bits)
        error = f" ± {self.standard_error:.3f} (standard error over {count} images)" if count > 1 else " (1 image)"
        return [
            f"bits/dim: {self.mean:.3f}{error}",
            f"  = latent −log p(z) {self.prior_bits.mean():.3f} + encoder log q(z|x) {self.posterior_bits.mean():.3f}"
            f" + decoder −log P(x|z) {self.decoder_bits.mean():.3f}",
            f"measured: an upper bound on −log₂ P(x) / D of the 8-bit images, D = {channels}·{height}·{width}: the "
            "VAE's evidence bound with one z ~ q(z|x) per image; p(z) is the U-Net's exact density of the latent "
            "through the probability-flow ODE (unconditional: empty prompt, guidance 1; RK45 at rtol = atol = "
            f"{self.tolerance:g}, Hutchinson trace); P(x|z) is a discretised Gaussian around the decoded image with "
            f"scale {self.decoder_scale / PIXEL_BIN_WIDTH:.2f} levels of 255, fitted on these images",
            f"cost: {self.seconds:.1f} s, {self.evaluations.float().mean():.0f} ODE drift evaluations per image (each "
            "a U-Net forward and backward pass)",
        ]


def pipeline_sigma_range(scheduler_config: dict) -> tuple[float, float]:
    """(σ_min, σ_max): the noise levels of the first and last training timesteps, in x/√ᾱ coordinates."""
    sigmas = sigma_from_alpha_bar(scheduler_alphas_cumprod(scheduler_config).clamp(min=ZERO_SNR_ALPHA_BAR))
    return sigmas[0].item(), sigmas[-1].item()


def vae_codec(vae) -> tuple[Encoder, Decoder]:
    """The VAE's posterior and decoder in the U-Net's latent coordinates z = (latent − shift) · scaling_factor."""
    scale, shift = vae.config.scaling_factor, getattr(vae.config, "shift_factor", None) or 0.0
    device, dtype = next(vae.parameters()).device, next(vae.parameters()).dtype

    def encode(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = vae.encode(pixels.to(device, dtype)).latent_dist  # channels-last strides: see sample_latents
        return ((posterior.mean - shift) * scale).contiguous(), (posterior.std * scale).contiguous()

    def decode(z: torch.Tensor) -> torch.Tensor:
        return vae.decode((z / scale + shift).to(device, dtype)).sample

    return encode, decode


@contextmanager
def _frozen(module: torch.nn.Module):
    """Gradients flow to the ODE's state only, not into the weights; their flags are restored after."""
    flags = [parameter.requires_grad for parameter in module.parameters()]
    module.requires_grad_(False)
    try:
        yield module
    finally:
        for parameter, flag in zip(module.parameters(), flags):
            parameter.requires_grad_(flag)


def measure_likelihood(pipe, levels: torch.Tensor, batch_size: int = DEFAULT_BATCH_SIZE, seed: int = 0,
                       tolerance: float = DEFAULT_ODE_TOLERANCE, progress: bool = True) -> LikelihoodResult:
    """The bound in bits/dim for the 8-bit images `levels` (N, 3, H, W) under the pipeline `pipe` (module doc)."""
    from t2i.pipeline.denoiser import unet_denoiser

    if batch_size < 1:
        raise T2IError(f"the batch size must be at least 1; got {batch_size}")
    if not 0 < tolerance < 1:  # NaN too; at 1 and above RK45 accepts any step, and the ODE is not solved
        raise T2IError(f"the ODE tolerance must lie in (0, 1), 1e-5 in Song et al.; got {tolerance}")
    started = time.perf_counter()
    sigma_min, sigma_max = pipeline_sigma_range(pipe.scheduler_config)
    encode, decode = vae_codec(pipe.vae)
    terms: list[LatentTerms] = []
    with _frozen(pipe.unet), tqdm(total=len(levels), desc="likelihood", unit="img", disable=not progress) as bar:
        for start in range(0, len(levels), batch_size):
            chunk = levels[start:start + batch_size]
            # Token states made outside inference mode, so that autograd may keep them for the backward pass.
            context = pipe.encode_prompts([""] * len(chunk)).clone()
            denoise = unet_denoiser(pipe.unet, context, 1.0, pipe.scheduler_config)
            generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
            terms.append(latent_terms(denoise, encode, decode, chunk, sigma_min, sigma_max, generators,
                                      tolerance=tolerance))
            bar.update(len(chunk))
    prior = torch.cat([term.prior_log_prob for term in terms]).cpu()
    posterior = torch.cat([term.posterior_log_prob for term in terms]).cpu()
    scale, decoder = fit_decoder_scale(levels, torch.cat([term.decoded for term in terms]).cpu())
    nats_to_bits = 1 / (levels[0].numel() * math.log(2))
    prior_bits, posterior_bits, decoder_bits = -prior * nats_to_bits, posterior * nats_to_bits, -decoder * nats_to_bits
    return LikelihoodResult(prior_bits + posterior_bits + decoder_bits, prior_bits, posterior_bits, decoder_bits,
                            scale, torch.cat([term.evaluations for term in terms]), time.perf_counter() - started,
                            tolerance, tuple(levels.shape[1:]))


def held_out_shapes(count: int, resolution: int) -> torch.Tensor:
    """`count` shapes images (N, 3, H, W) uint8 drawn as the demo's data with its seed + 1: never trained on."""
    from t2i.config import PACKAGED_CONFIGS, SHAPES_RESOLUTIONS, load_config
    from t2i.data.build import build_datasets

    if resolution not in SHAPES_RESOLUTIONS:
        raise T2IError(f"--data {SHAPES_DATA} renders {' or '.join(map(str, SHAPES_RESOLUTIONS))} px images and "
                       f"this pipeline makes {resolution} px ones; give a folder of images instead")
    data = load_config(PACKAGED_CONFIGS / "demo.yaml").data
    dataset, _, _ = build_datasets(replace(data, size=count, resolution=resolution, seed=data.seed + 1), None, False)
    return torch.from_numpy(dataset.images).permute(0, 3, 1, 2).contiguous()


def folder_images(root: Path, count: int, resolution: int) -> tuple[torch.Tensor, Counter[str]]:
    """The first `count` readable images of an image folder (sorted by name; captions not needed), centre-cropped
    to `resolution` (N, 3, H, W) uint8, and the bad entries met on the way counted by reason."""
    from t2i.data.quarantine import Quarantine, Rejected
    from t2i.data.scan import check_image
    from t2i.data.sources.imagefolder import list_imagefolder
    from t2i.data.transforms import resize_crop_flip

    quarantine, images = Quarantine(), []
    for entry in list_imagefolder(root):
        if len(images) == count:
            break
        try:
            if entry.image is None and entry.problem is not None:
                raise entry.problem
            rgb = check_image(entry.image, max(1, resolution // 2))  # as data.min_image_size's default
        except Rejected as rejected:
            quarantine.add(entry.name, rejected.reason, rejected.detail)
            continue
        cropped = resize_crop_flip(rgb, resolution, resolution, "center", False, torch.Generator())
        images.append(torch.from_numpy(np.asarray(cropped, dtype=np.uint8).copy()).permute(2, 0, 1))
    if not images:
        raise T2IError(f"no readable image in '{root}'" + (f" ({_skipped(quarantine.counts)})"
                                                          if quarantine.counts else ""))
    return torch.stack(images), quarantine.counts


def _images(count: int) -> str:
    return f"{count} image{'' if count == 1 else 's'}"


def _skipped(counts: Counter[str]) -> str:
    return f"{sum(counts.values())} skipped: " + ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items()))


def evaluate_likelihood(model: Path, data: str = SHAPES_DATA, num_images: int = DEFAULT_IMAGES,
                        batch_size: int = DEFAULT_BATCH_SIZE, seed: int = 0, tolerance: float = DEFAULT_ODE_TOLERANCE,
                        device: str = "auto", allow_pickle: bool = False) -> tuple[str, LikelihoodResult]:
    """Load `model`, take `num_images` images of `data` ("shapes" or an image folder) and measure the bound; returns a
    line describing the data and the result."""
    from t2i.pipeline import Text2ImagePipeline

    if num_images < 1:
        raise T2IError(f"--num-images must be at least 1; got {num_images}")
    if batch_size < 1:
        raise T2IError(f"--batch-size must be at least 1; got {batch_size}")
    if data != SHAPES_DATA and not Path(data).is_dir():
        raise T2IError(f"--data '{data}' is neither '{SHAPES_DATA}' nor a folder of images")
    # fp32 on every device: the ODE's divergence is a difference of large terms.
    pipe = Text2ImagePipeline.from_pretrained(model, device=device, dtype=torch.float32, allow_pickle=allow_pickle)
    size = pipe.default_size
    if data == SHAPES_DATA:
        levels = held_out_shapes(num_images, size)
        described = (f"data: {_images(len(levels))} of held-out shapes, {size}x{size} px "
                     "(the demo's data with seed + 1)")
    else:
        levels, skipped = folder_images(Path(data), num_images, size)
        described = (f"data: {_images(len(levels))} from {data}, centre-cropped to {size}x{size} px"
                     + (f"; {_skipped(skipped)}" if skipped else ""))
        if len(levels) < num_images:
            described += f" (fewer than the {num_images} asked for)"
    return described, measure_likelihood(pipe, levels, batch_size, seed, tolerance)
