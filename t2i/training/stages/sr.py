"""Stage sr: train the super-resolution U-Net of the cascade (t2i.pipeline.upscaler) on (low, high) pairs: the
dataset rendered at factor x data.resolution, each image area-downsampled for its low-resolution condition. The
conditioning-augmentation level is drawn per sample, and captions are dropped to the empty prompt as in stage
unet so that classifier-free guidance works. The text encoder is frozen."""
from __future__ import annotations

from pathlib import Path

import torch

from t2i.config import DiffusionConfig
from t2i.data.text_states import TextStates, cached_text_states
from t2i.diffusion.losses import diffusion_loss, min_snr_weights
from t2i.diffusion.parameterization import add_noise, training_target
from t2i.diffusion.super_resolution import area_downsample, upsample
from t2i.eval.fidelity import psnr
from t2i.eval.grid import save_grid
from t2i.models.text_encoder import TextEncoder
from t2i.pipeline.upscaler import Upscaler
from t2i.training.randomness import BatchRandomness
from t2i.training.stages.unet import drop_captions


class SRStage:
    name = "sr"

    def __init__(self, upscaler: Upscaler, text_encoder: TextEncoder, diffusion: DiffusionConfig,
                 preview: dict, device: torch.device, min_snr_gamma: float | None = None):
        """`preview`: a batch ({"pixel_values", "caption"}) of high-resolution images that sample() upscales;
        `diffusion` gives caption dropout, `min_snr_gamma` the loss weighting (None: unweighted)."""
        self.model = upscaler.unet
        self.upscaler = upscaler
        self.text_encoder = text_encoder.requires_grad_(False).eval().to(device)
        self.diffusion = diffusion
        self.preview = preview
        self.min_snr_gamma = min_snr_gamma
        self.prediction = upscaler.scheduler_config["prediction_type"]
        self.alpha_bar = upscaler.alphas_cumprod.to(device)
        self.text_states: TextStates | None = None  # see cache_text_states; None: encoded at every step

    def cache_text_states(self, captions: list[str], cache_dir: Path | None) -> None:
        self.text_states = cached_text_states(self.text_encoder, captions, cache_dir)

    @torch.no_grad()
    def _context(self, captions: list[str], device: torch.device) -> torch.Tensor:
        if self.text_states is not None and self.text_states.covers(captions):
            return self.text_states(captions, device)
        return self.text_encoder(self.text_encoder.tokenize(captions).ids.to(device))

    def loss(self, model: torch.nn.Module, batch: dict, rng: BatchRandomness) -> tuple[torch.Tensor, dict]:
        upscaler = self.upscaler
        high = batch["pixel_values"]  # (B, 3, H, W)
        low = area_downsample(high, upscaler.factor)  # (B, 3, H/f, W/f)
        batch_size, device = high.shape[0], high.device
        context = self._context(drop_captions(list(batch["caption"]), self.diffusion.caption_dropout, rng), device)
        levels = rng.randint(upscaler.max_noise_level + 1, batch_size).to(device)
        condition = upscaler.condition(low, rng.randn(low.shape, dtype=low.dtype, device=device), levels)
        x0 = upscaler.target_image(high, low)  # (B, 3, H, W)
        t = rng.randint(len(self.alpha_bar), batch_size).to(device)
        noise = rng.randn(x0.shape, dtype=x0.dtype, device=device)
        alpha_bar = self.alpha_bar[t]
        prediction = upscaler.predict(model, add_noise(x0, noise, alpha_bar), condition, t, context, levels)
        target = training_target(self.prediction, x0, noise, alpha_bar)
        weights = (min_snr_weights(alpha_bar, self.min_snr_gamma, self.prediction)
                   if self.min_snr_gamma else None)
        return diffusion_loss(prediction, target, weights), {}

    @torch.no_grad()
    def sample(self, model: torch.nn.Module, path: Path) -> dict:
        """Rows: bicubic, SR and the truth, for the preview images; their PSNRs as metrics."""
        model.eval()
        upscaler = self.upscaler
        high = self.preview["pixel_values"].to(model.device)
        low = area_downsample(high, upscaler.factor)
        captions = list(self.preview["caption"])
        context = self._context(captions, model.device)
        negative = self._context([""] * len(captions), model.device)
        defaults = upscaler.defaults
        result = upscaler.with_unet(model).sample(
            low, context, negative, list(range(len(captions))), defaults["num_inference_steps"],
            defaults["guidance_scale"], defaults["noise_level"], defaults["sampler"])
        bicubic = upsample(low, upscaler.factor)
        save_grid(torch.cat([bicubic, result, high]), path, rows=3, row_labels=["bicubic", "SR", "truth"])
        return {"psnr": _mean_psnr(result, high), "psnr_bicubic": _mean_psnr(bicubic, high)}

    def save(self, model: torch.nn.Module, folder: Path) -> None:
        self.upscaler.with_unet(model).save_pretrained(folder)


def _mean_psnr(images: torch.Tensor, truth: torch.Tensor) -> float:
    return psnr((images + 1) / 2, (truth + 1) / 2).mean().item()
