"""The cascade's super-resolution stage: low-resolution image + token states -> an image `factor` times larger.

A folder `sr/` beside a pipeline's other components holds it: `unet/` (a diffusers UNet2DConditionModel) and
`sr.json` (factor, patch size, residual or not, noise schedule, sampling defaults). The sampling loop is
`Text2ImagePipeline.denoise`'s, in pixel space, with the low-resolution condition beside the noisy image.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.utils.torch_utils import randn_tensor

from t2i.diffusion.guidance import classifier_free_guidance
from t2i.diffusion.samplers import check_sampler, make_scheduler, seeded_step_kwargs, set_timesteps
from t2i.diffusion.schedules import scheduler_alphas_cumprod
from t2i.diffusion.super_resolution import augment_condition, upsample
from t2i.errors import T2IError
from t2i.models import weight_files

SETTINGS_FILE = "sr.json"
UNET = "unet"
DEFAULTS = {"num_inference_steps": 20, "guidance_scale": 1.0, "sampler": "dpmpp_2m", "noise_level": 0}


class Upscaler:
    """An SR U-Net with what it needs to run: its factor, patch size, target, noise schedule and defaults."""

    def __init__(self, unet: UNet2DConditionModel, scheduler_config: dict, factor: int, patch_size: int = 1,
                 residual: bool = False, max_noise_level: int | None = None, defaults: dict | None = None,
                 residual_scale: float = 1.0):
        """`residual_scale` multiplies the residual into the diffusion's space: 1 / its standard deviation on the
        data, measured as the VAE's scaling factor is (a residual of std 0.05 under unit noise is all noise at
        nearly every timestep, and the sampler's early errors would outweigh it)."""
        self.unet = unet.eval()
        self.scheduler_config = dict(scheduler_config)
        self.factor, self.patch_size, self.residual = factor, patch_size, residual
        self.residual_scale = residual_scale
        self.max_noise_level = max_noise_level
        self.defaults = {**DEFAULTS, **(defaults or {})}
        self.alphas_cumprod = scheduler_alphas_cumprod(self.scheduler_config).float()

    def with_unet(self, unet: UNet2DConditionModel) -> Upscaler:
        """The same settings around another U-Net (the weights in training, or their EMA)."""
        return Upscaler(unet, self.scheduler_config, self.factor, self.patch_size, self.residual,
                        self.max_noise_level, self.defaults, self.residual_scale)

    # ----------------------------------------------------------------- the network's view

    def predict(self, unet: UNet2DConditionModel, noisy: torch.Tensor, condition: torch.Tensor, t: torch.Tensor,
                context: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        """The U-Net's output (ε or v) for the noisy image (B, 3, H, W), given the upsampled, augmented
        low-resolution image (B, 3, H, W), token states (B, L, D) and noise levels (B,)."""
        model_input = F.pixel_unshuffle(torch.cat([noisy, condition], dim=1), self.patch_size)  # (B, 6p², H/p, W/p)
        # pixel_unshuffle interleaves the two images' channels per pixel; the U-Net learns whatever order it sees,
        # so long as training and sampling agree, which they do by sharing this method.
        output = unet(model_input, t, encoder_hidden_states=context, class_labels=levels).sample
        return F.pixel_shuffle(output, self.patch_size)  # (B, 3, H, W)

    def target_image(self, high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        """What the diffusion denoises: the high-resolution image, or its scaled residual over bicubic upsampling."""
        return (high - upsample(low, self.factor)) * self.residual_scale if self.residual else high

    def condition(self, low: torch.Tensor, noise: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        """The low-resolution image, noised to `levels` and upsampled: (B, 3, h, w) -> (B, 3, f·h, f·w)."""
        return upsample(augment_condition(low, noise, levels, self.alphas_cumprod), self.factor)

    # ----------------------------------------------------------------- sampling

    @torch.no_grad()
    def sample(self, low: torch.Tensor, context: torch.Tensor, negative_context: torch.Tensor | None,
               seeds: list[int], steps: int, guidance: float, noise_level: int, sampler: str) -> torch.Tensor:
        """High-resolution images (B, 3, f·h, f·w) in [-1, 1] from low-resolution ones (B, 3, h, w) in [-1, 1]."""
        check_sampler(sampler)
        self._check_level(noise_level)
        if steps < 1:
            raise T2IError(f"num_inference_steps must be at least 1; got {steps}")
        device, dtype = self.unet.device, self.unet.dtype
        low = low.to(device, dtype)
        use_guidance = guidance != 1.0
        if use_guidance:
            if negative_context is None:
                raise T2IError(f"guidance {guidance} needs the negative prompts' token states")
            context = torch.cat([negative_context, context])
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        levels = torch.full((len(seeds),), noise_level, device=device, dtype=torch.long)
        augmentation = randn_tensor(low.shape, generator=generators, device=device, dtype=dtype)
        condition = self.condition(low, augmentation, levels)
        if use_guidance:
            condition, levels = torch.cat([condition] * 2), torch.cat([levels] * 2)

        scheduler = make_scheduler(sampler, self.scheduler_config)
        unet_timesteps = set_timesteps(scheduler, sampler, steps, device)
        shape = (len(seeds), low.shape[1], low.shape[2] * self.factor, low.shape[3] * self.factor)
        x = randn_tensor(shape, generator=generators, device=device, dtype=dtype) * scheduler.init_noise_sigma
        step_kwargs = seeded_step_kwargs(scheduler, seeds, generators)
        for t, unet_t in zip(scheduler.timesteps, unet_timesteps, strict=True):
            model_input = scheduler.scale_model_input(torch.cat([x] * 2) if use_guidance else x, t)
            prediction = self.predict(self.unet, model_input, condition, unet_t, context, levels)
            if use_guidance:
                uncond, cond = prediction.chunk(2)
                prediction = classifier_free_guidance(uncond, cond, guidance)
            x = scheduler.step(prediction, t, x, **step_kwargs).prev_sample
        if not torch.isfinite(x).all():
            raise T2IError(f"the SR stage produced non-finite pixels with sampler {sampler!r} at {steps} steps")
        return (upsample(low, self.factor) + x / self.residual_scale if self.residual else x).clamp(-1, 1)

    def _check_level(self, noise_level: int) -> None:
        top = self.max_noise_level if self.max_noise_level is not None else len(self.alphas_cumprod)
        if not 0 <= noise_level <= top:
            raise T2IError(f"noise_level must lie in [0, {top}] (the levels the SR stage was trained on); "
                           f"got {noise_level}")

    def check_size(self, height: int, width: int) -> None:
        """Low-resolution sides must become multiples of the U-Net's alignment once upsampled."""
        unet_levels = len(self.unet.config.block_out_channels) - 1
        alignment = self.patch_size * 2 ** unet_levels
        for name, value in (("height", height), ("width", width)):
            if (value * self.factor) % alignment:
                raise T2IError(f"image {name} {value} becomes {value * self.factor} px, which the SR stage cannot "
                               f"take: it must be a multiple of {alignment}")

    # ----------------------------------------------------------------- moving, saving, loading

    def to(self, device: torch.device, dtype: torch.dtype) -> Upscaler:
        self.unet.to(device)
        if next(self.unet.parameters()).dtype != dtype:
            torch.nn.Module.to(self.unet, dtype)  # diffusers' own `to` warns at every dtype cast
        return self

    def save_pretrained(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.unet.save_pretrained(folder / UNET)
        settings = {"factor": self.factor, "patch_size": self.patch_size, "residual": self.residual,
                    "residual_scale": self.residual_scale, "max_noise_level": self.max_noise_level,
                    "scheduler": self.scheduler_config,
                    "defaults": self.defaults}
        (folder / SETTINGS_FILE).write_text(json.dumps(settings, indent=2))

    @classmethod
    def from_pretrained(cls, folder: Path, root: Path | None = None, allow_pickle: bool = False) -> Upscaler:
        root = root or folder
        settings = weight_files.check_json(folder / SETTINGS_FILE, root)
        weight_files.check_component(folder / UNET, root, allow_pickle)
        with weight_files.loading(root, "SR U-Net", folder / UNET):
            unet = UNet2DConditionModel.from_pretrained(folder / UNET, use_safetensors=None if allow_pickle else True)
        try:
            return cls(unet, settings["scheduler"], settings["factor"], settings["patch_size"], settings["residual"],
                       settings.get("max_noise_level"), settings.get("defaults"), settings.get("residual_scale", 1.0))
        except KeyError as missing:
            raise T2IError(f"'{folder / SETTINGS_FILE}' lacks the key {missing}; the SR stage is damaged") from None
