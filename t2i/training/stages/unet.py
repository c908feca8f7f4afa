"""Stage unet: train the conditional U-Net to denoise VAE latents (DDPM's simple loss, ε or v target; with learned
variances Improved DDPM's L_hybrid), with captions dropped to the empty prompt so that classifier-free guidance
works. VAE and text encoder are frozen."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from t2i.config import DiffusionConfig
from t2i.data.text_states import EMPTY_PROMPT, TextStates, cached_text_states
from t2i.diffusion.losses import diffusion_loss, min_snr_weights
from t2i.diffusion.parameterization import add_noise, training_target
from t2i.diffusion.schedules import scheduler_alphas_cumprod
from t2i.diffusion.vlb import hybrid_loss, predicts_variance
from t2i.eval.grid import save_grid
from t2i.models.text_encoder import TextEncoder
from t2i.pipeline import Text2ImagePipeline
from t2i.training.randomness import BatchRandomness


@torch.no_grad()
def sample_latents(vae: AutoencoderKL, batch: dict, rng: BatchRandomness) -> torch.Tensor:
    """Scaled latents, contiguous (NCHW): sampled from cached posterior moments, or encoded from pixels on the fly.

    The VAE's mid-block attention leaves its output, and so the moments, with channels-last strides. A U-Net fed
    those runs channels-last throughout (its convolutions follow their input), where bf16 GroupNorm is slow: the
    demo's U-Net took 123.8 ms for forward and backward on such input against 118.2 ms on contiguous input.
    Cached moments come out of batch collation contiguous; latents encoded at every step (fine-tuning with random
    crops or flips) did not."""
    if "latent_mean" in batch:
        mean, std = batch["latent_mean"], batch["latent_std"]
    else:
        posterior = vae.encode(batch["pixel_values"]).latent_dist
        mean, std = posterior.mean, posterior.std
    noise = rng.randn(mean.shape, dtype=mean.dtype, device=mean.device)
    return ((mean + std * noise) * vae.config.scaling_factor).contiguous()


def drop_captions(captions: list[str], probability: float, rng: BatchRandomness) -> list[str]:
    """Replace each caption by the empty prompt with `probability` (the unconditional model of CFG)."""
    dropped = rng.rand(len(captions)) < probability
    return [EMPTY_PROMPT if drop else caption for caption, drop in zip(captions, dropped.tolist())]


class UNetStage:
    """The noise schedule and parameterisation come from `scheduler_config`, the one the pipeline samples with;
    `diffusion` gives the training choices (caption dropout, Min-SNR-γ, noise offset)."""

    name = "unet"

    def __init__(self, unet: UNet2DConditionModel, vae: AutoencoderKL, text_encoder: TextEncoder,
                 diffusion: DiffusionConfig, scheduler_config: dict, preview_prompts: list[str],
                 device: torch.device, preview_defaults: dict | None = None):
        self.model = unet
        self.vae = vae.requires_grad_(False).eval().to(device)
        self.text_encoder = text_encoder.requires_grad_(False).eval().to(device)
        self.diffusion = diffusion
        self.scheduler_config = scheduler_config
        self.preview_prompts = preview_prompts
        self.preview_defaults = preview_defaults or {"num_inference_steps": 20, "guidance_scale": 2.0}
        self.prediction = scheduler_config["prediction_type"]
        self.num_train_timesteps = scheduler_config["num_train_timesteps"]
        self.alpha_bar = scheduler_alphas_cumprod(scheduler_config).float().to(device)
        self.text_states: TextStates | None = None  # see cache_text_states; None: encoded at every step
        # A U-Net with learned variances (Improved DDPM) trains on L_hybrid; ᾱ in float64 keeps β_t exact near t = 0.
        self.learned_variance = predicts_variance(scheduler_config)
        self.exact_alpha_bar = scheduler_alphas_cumprod(scheduler_config).to(device) if self.learned_variance else None

    def _latents(self, batch: dict, rng: BatchRandomness) -> torch.Tensor:
        return sample_latents(self.vae, batch, rng)

    def cache_text_states(self, captions: list[str], cache_dir: Path | None) -> None:
        """Encode every distinct caption (and the empty prompt) once, instead of at every step."""
        self.text_states = cached_text_states(self.text_encoder, captions, cache_dir)

    @torch.no_grad()
    def _context(self, captions: list[str], device: torch.device) -> torch.Tensor:
        if self.text_states is not None and self.text_states.covers(captions):  # held-out captions are not
            return self.text_states(captions, device)
        return self.text_encoder(self.text_encoder.tokenize(captions).ids.to(device))

    def loss(self, model: UNet2DConditionModel, batch: dict, rng: BatchRandomness,
             caption_dropout: float | None = None) -> tuple[torch.Tensor, dict]:
        return self.denoising_loss(model, self._context, batch, rng, caption_dropout)

    def denoising_loss(self, unet: UNet2DConditionModel, encode: Callable[[list[str], torch.device], torch.Tensor],
                       batch: dict, rng: BatchRandomness, caption_dropout: float | None = None
                       ) -> tuple[torch.Tensor, dict]:
        """The loss of `unet` on `batch`, its captions turned into token states by `encode`."""
        x0 = self._latents(batch, rng)  # (B, C, h, w)
        dropout = self.diffusion.caption_dropout if caption_dropout is None else caption_dropout
        captions = drop_captions(list(batch["caption"]), dropout, rng)
        context = encode(captions, x0.device)  # (B, L, D)
        t = rng.randint(self.num_train_timesteps, x0.shape[0]).to(x0.device)
        noise = rng.randn(x0.shape, dtype=x0.dtype, device=x0.device)
        if self.diffusion.noise_offset:
            noise = noise + self.diffusion.noise_offset * rng.randn((*x0.shape[:2], 1, 1), dtype=x0.dtype,
                                                                    device=x0.device)
        alpha_bar = self.alpha_bar[t]
        xt = add_noise(x0, noise, alpha_bar)
        prediction = unet(xt, t, encoder_hidden_states=context).sample
        target = training_target(self.prediction, x0, noise, alpha_bar)
        weights = (min_snr_weights(alpha_bar, self.diffusion.min_snr_gamma, self.prediction)
                   if self.diffusion.min_snr_gamma else None)
        if self.learned_variance:
            loss, vlb = hybrid_loss(self.prediction, prediction, target, x0, xt, self.exact_alpha_bar, t,
                                    self.diffusion.vlb_weight, weights)
            return loss, {"vlb_bits_per_dim": vlb.item()}
        return diffusion_loss(prediction, target, weights), {}

    @torch.no_grad()
    def sample(self, model: UNet2DConditionModel, path: Path) -> None:
        model.eval()
        pipe = Text2ImagePipeline(self.vae, self.text_encoder, model, self.scheduler_config)
        steps, guidance = self.preview_defaults["num_inference_steps"], self.preview_defaults["guidance_scale"]
        images = pipe(self.preview_prompts, num_inference_steps=steps, guidance_scale=guidance, seed=0)
        save_grid(images, path, rows=1, labels=self.preview_prompts)

    def save(self, model: UNet2DConditionModel, folder: Path) -> None:
        model.save_pretrained(folder)
