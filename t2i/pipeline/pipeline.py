"""Prompt -> images: text encoding, classifier-free-guided latent denoising, VAE decoding; optionally then the
cascade's super-resolution stage (`upscale=True`, or `pipe.upscale(images, prompt)` for existing images).

The sampling loop follows diffusers' `StableDiffusionPipeline` step for step (same noise draw, same scheduler
calls, same post-processing), so a Stable Diffusion folder gives the same images through either.
"""
from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from tqdm.auto import tqdm

from t2i.data.images import to_rgb8
from t2i.diffusion.guidance import guide_batched
from t2i.diffusion.samplers import SCORE_SAMPLERS, check_sampler, make_scheduler, seeded_step_kwargs, set_timesteps
from t2i.diffusion.vlb import predicts_variance, split_variance
from t2i.errors import T2IError
from t2i.models.classifier import NoisyLatentClassifier
from t2i.models.text_encoder import TextEncoder, report_truncation
from t2i.models.vae import latent_factor
from t2i.pipeline import storage
from t2i.pipeline.classifier_guidance import Guide, classifier_guide, prompt_labels
from t2i.pipeline.denoiser import sampling_sigmas, unet_denoiser
from t2i.pipeline.memory import attention_is_quadratic, generation_floor, out_of_memory_named, upscaler_floor
from t2i.pipeline.speed import SpeedOptions, apply_speed_options, dtype_name, network_dtype
from t2i.pipeline.upscaler import Upscaler

logger = logging.getLogger("t2i")
MAX_SEED = 2**63 - 1  # the largest seed torch.Generator.manual_seed takes as a non-negative int64


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return default_device()
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise T2IError(f"unknown device {device!r}; use 'cpu', 'cuda', 'cuda:N' or 'auto'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise T2IError("device 'cuda' was asked for, but PyTorch sees no CUDA GPU here; use --device cpu")
    return device


def device_memory(device: torch.device) -> int:
    """Bytes of memory on `device`: the GPU's own, or the machine's RAM."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _gib(size: int) -> str:
    """Bytes as GiB, to a tenth below 10 ("0.4", not "0")."""
    gib = size / 2**30
    return f"{gib:.1f}" if gib < 10 else f"{gib:.0f}"


def default_dtype(device: torch.device) -> torch.dtype:
    """The dtype a pipeline loads in: fp32 on CPU (the weights as stored), bf16 on GPUs, which does not overflow
    like fp16. `speed_up` picks the fastest (bf16 on CPUs with AMX too)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


class NonFiniteSample(T2IError):
    """Sampling produced NaN or infinite values; the message says whether the model or the sampler did."""


class DivergedModel(NonFiniteSample):
    """The networks themselves gave non-finite values: every image would fail alike, whatever its settings."""


class Text2ImagePipeline:
    """A VAE, a text encoder and a conditional U-Net, with the noise schedule they were trained on; optionally
    a super-resolution stage (`sr`) that upsamples their images, conditioned on the same text encoder, and a
    noise-aware classifier of the latents (`classifier`) for classifier guidance."""

    def __init__(self, vae: AutoencoderKL, text_encoder: TextEncoder, unet: UNet2DConditionModel,
                 scheduler_config: dict, defaults: dict | None = None, sr: Upscaler | None = None,
                 classifier: NoisyLatentClassifier | None = None):
        self.vae = vae.eval()
        self.text_encoder = text_encoder.eval()
        self.unet = unet.eval()
        self.scheduler_config = dict(scheduler_config)
        self.defaults = {"num_inference_steps": 30, "guidance_scale": 7.5, "sampler": "dpmpp_2m", **(defaults or {})}
        self.sr = sr
        self.classifier = classifier.eval() if classifier is not None else None
        self.device, self.dtype = self.unet.device, self.unet.dtype
        # The weights' own precision, as made or loaded, and the fewest bits `to` has since rounded them to.
        self.weights_dtype = self.rounded_to = self.unet.dtype

    # ----------------------------------------------------------------- loading, saving, moving

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None, allow_pickle: bool = False) -> "Text2ImagePipeline":
        """Load a t2i pipeline folder or a diffusers-format Stable Diffusion folder.

        Weights are read from safetensors; pickle weight files, which can run code when loaded, are refused
        unless `allow_pickle`.
        """
        pipe = cls(**storage.load_components(Path(path), allow_pickle))
        return pipe.to(device, dtype)

    def save_pretrained(self, path: str | Path, allow_rounded: bool = False) -> None:
        """Write the pipeline folder; see `check_unrounded` for `allow_rounded`."""
        self.check_unrounded(allow_rounded)
        storage.save_components(Path(path), self.vae, self.text_encoder, self.unet, self.scheduler_config,
                                self.defaults, self.sr, self.classifier)

    def check_unrounded(self, allow_rounded: bool = False) -> None:
        """Refuse to save weights that `to` or `speed_up` (or the GPU's bf16 default) rounded to fewer bits than
        they were made or loaded with: the lost bits could never be recovered from what is written. With
        `allow_rounded` they are saved so, on purpose (half the size)."""
        if allow_rounded or torch.finfo(self.rounded_to).bits >= torch.finfo(self.weights_dtype).bits:
            return
        raise T2IError(f"this pipeline's {dtype_name(self.weights_dtype)} weights were rounded to "
                       f"{dtype_name(self.rounded_to)} (by `to`, `speed_up` or the GPU's default), and saving would "
                       "keep only the rounded weights: load it again with dtype=torch.float32 to save it, or pass "
                       "allow_rounded=True to save the rounded weights on purpose")

    def to(self, device: str | torch.device | torch.dtype | None = None,
           dtype: torch.dtype | None = None) -> "Text2ImagePipeline":
        """Move to `device` (None or "auto": CUDA if present, else CPU) in `dtype` (None: the device's default).
        `pipe.to(torch.bfloat16)`, as diffusers' pipelines take it, keeps the device."""
        if isinstance(device, torch.dtype) and dtype is None:
            device, dtype = self.device, device
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise T2IError(f"dtype must be a floating-point torch.dtype such as torch.float32 or torch.bfloat16; "
                           f"got {dtype!r}")
        self.device = resolve_device(device)
        self.dtype = dtype or default_dtype(self.device)
        if torch.finfo(self.dtype).bits < torch.finfo(self.rounded_to).bits:
            self.rounded_to = self.dtype
        for module in (self.vae, self.text_encoder, self.unet):
            module.to(self.device)
            if next(module.parameters()).dtype != self.dtype:
                torch.nn.Module.to(module, self.dtype)  # diffusers' own `to` warns at every dtype cast
        if self.sr is not None:
            self.sr.to(self.device, self.dtype)
        if self.classifier is not None:  # stays fp32, as guidance does: it is small, and its gradient steers
            self.classifier.to(self.device)
        return self

    def speed_up(self, options: SpeedOptions | None = None) -> "Text2ImagePipeline":
        """Run the networks as `options` say (t2i.pipeline.speed; its defaults when None): in bf16 where that is
        fast, in NHWC, compiled. Call it once, after `to`. Images change by a few levels of 255 at most; latents,
        guidance and the sampler stay fp32. Not for a pipeline that will be saved: it may cast the weights."""
        options = options or SpeedOptions()
        dtype = network_dtype(options.dtype, self.device)
        if dtype != self.dtype:
            self.to(self.device, dtype)
        apply_speed_options(self.unet, self.vae, options, self.device)
        return self

    @property
    def latent_factor(self) -> int:
        return latent_factor(self.vae)

    @property
    def default_size(self) -> int:
        return self.unet.config.sample_size * self.latent_factor

    # ----------------------------------------------------------------- sampling

    @torch.inference_mode()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Token states (B, L, D) for `prompts`; a prompt longer than the context is truncated and reported."""
        tokens = self.text_encoder.tokenize(prompts)
        report_truncation(prompts, tokens, self.text_encoder.context_length)
        states = self.text_encoder(tokens.ids.to(self.device))
        if not torch.isfinite(states).all():
            raise DivergedModel("the text encoder's token states are not finite: its weights are damaged or have "
                                  "diverged")
        return states.to(self.dtype)

    @torch.inference_mode()
    def __call__(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        seed: int | Sequence[int] | None = None,
        sampler: str | None = None,
        batch_size: int | None = None,
        progress: bool = False,
        upscale: bool = False,
        eta: float = 0.0,
        guidance_rescale: float = 0.0,
        dynamic_threshold: float | None = None,
        classifier_guidance: float = 0.0,
    ) -> list[Image.Image]:
        """Images for `prompt` (one per prompt); image i is drawn from seed + i, or from seed[i] for a list.
        With `upscale`, each image then goes through the SR stage (its own defaults), with the same prompt and seed.

        `eta` is DDIM's η (Song et al. 2020, eq. 16): 0 deterministic, 1 DDPM's ancestral noise; for `ddim` only.
        `guidance_rescale` is φ of Lin et al. 2023 (eq. 16; 0 off, 0.7 theirs); `dynamic_threshold` is Imagen's
        percentile p (Saharia et al. 2022, §2.3; None off, 0.995 theirs), for samplers that see x̂_0.
        `classifier_guidance` is the scale s of classifier guidance (Dhariwal & Nichol 2021, Alg. 2; 0 off) towards
        the labels each prompt names (t2i.pipeline.classifier_guidance), with or without classifier-free guidance.

        An image with seed s starts from the latents `StableDiffusionPipeline` draws for
        `generator=torch.Generator("cpu").manual_seed(s)`, on any device.
        """
        prompts = _as_prompt_list(prompt)
        negatives = _as_negative_list(negative_prompt, len(prompts))
        seeds = _as_seed_list(seed, len(prompts))
        steps = num_inference_steps if num_inference_steps is not None else self.defaults["num_inference_steps"]
        guidance = guidance_scale if guidance_scale is not None else self.defaults["guidance_scale"]
        sampler = sampler or self.defaults["sampler"]
        check_sampler(sampler)
        _check_number("num_inference_steps", steps, 1, None, integer=True)
        trained = self.scheduler_config["num_train_timesteps"]
        if sampler not in SCORE_SAMPLERS and steps > trained:
            raise T2IError(f"num_inference_steps {steps} is more than the {trained} timesteps the model was trained "
                           f"on; sampler {sampler!r} takes at most {trained}")
        _check_number("guidance_scale", guidance, None, None)
        _check_number("eta", eta, 0, 1)
        _check_number("guidance_rescale", guidance_rescale, 0, 1)
        _check_number("classifier_guidance", classifier_guidance, None, None)
        if dynamic_threshold is not None:
            _check_number("dynamic_threshold", dynamic_threshold, None, None)
            if not 0 < dynamic_threshold <= 1:
                raise T2IError(f"dynamic_threshold is a percentile in (0, 1], 0.995 in Imagen; got {dynamic_threshold}")
        if guidance == 1.0:  # the unconditional pass, which the negative prompt and the rescale act on, is skipped
            sr_guided = upscale and self.sr is not None and self.sr.defaults["guidance_scale"] != 1.0
            unused = [name for name, used in (("the negative prompt", any(negatives) and not sr_guided),
                                              ("guidance_rescale", guidance_rescale)) if used]
            if unused:
                logger.warning("guidance_scale 1 turns classifier-free guidance off, so %s %s not used",
                               " and ".join(unused), "is" if len(unused) == 1 else "are")
        height = self.default_size if height is None else height
        width = self.default_size if width is None else width
        height, width = self._check_size(height, width)
        if upscale:
            self._require_sr().check_size(height, width)
        labels = prompt_labels(prompts, self._require_classifier().config.labels) if classifier_guidance else None

        if batch_size is not None:
            _check_number("batch_size", batch_size, 1, None, integer=True)
        batch_size = batch_size or len(prompts)
        self.check_memory(min(batch_size, len(prompts)), height, width, guided=guidance != 1.0)
        if upscale:
            self.check_upscale_memory(min(batch_size, len(prompts)), height, width,
                                      guided=self.sr.defaults["guidance_scale"] != 1.0)
        images: list[Image.Image] = []
        starts = range(0, len(prompts), batch_size)
        for start in tqdm(starts, desc="sampling", disable=not progress or len(starts) == 1):
            chunk = slice(start, start + batch_size)
            context = self.encode_prompts(prompts[chunk])
            negative_context = self.encode_prompts(negatives[chunk]) if guidance != 1.0 else None
            guide = self.classifier_guide(labels[chunk], classifier_guidance) if labels is not None else None
            latents = self.denoise(context, negative_context, seeds[chunk], steps, guidance, height, width, sampler,
                                   eta=eta, guidance_rescale=guidance_rescale, dynamic_threshold=dynamic_threshold,
                                   guide=guide)
            base = self.decode(latents)
            images.extend(self.upscale(base, prompts[chunk], negative_prompt=negatives[chunk], seed=seeds[chunk])
                          if upscale else base)
        return images

    def _require_sr(self) -> Upscaler:
        if self.sr is None:
            raise T2IError("this pipeline has no super-resolution stage (no sr/ folder); train one with stage 'sr' "
                           "(t2i demo --cascade, or stages: [vae, clip, unet, sr])")
        return self.sr

    def _require_classifier(self) -> NoisyLatentClassifier:
        if self.classifier is None:
            raise T2IError("this pipeline has no classifier (no classifier/ folder), so classifier guidance cannot "
                           "be used; train one with stage 'classifier' (stages: [vae, clip, unet, classifier])")
        return self.classifier

    def classifier_guide(self, labels: torch.Tensor, scale: float) -> Guide:
        """The guide that `denoise` applies for `labels` (B, heads) (see `prompt_labels`) at scale `scale`."""
        return classifier_guide(self._require_classifier(), labels, scale, self.scheduler_config)

    @torch.inference_mode()
    def upscale(
        self,
        images: Image.Image | Sequence[Image.Image],
        prompt: str | Sequence[str],
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        noise_level: int | None = None,
        seed: int | Sequence[int] | None = None,
        sampler: str | None = None,
        negative_prompt: str | Sequence[str] | None = None,
    ) -> list[Image.Image]:
        """`images` (all one size) made sr.factor times larger by the SR stage, each guided by its prompt (one
        prompt for all, or one per image); image i's noise is drawn from seed + i, or from seed[i] for a list."""
        sr = self._require_sr()
        images = [images] if isinstance(images, Image.Image) else list(images)
        if not images:
            raise T2IError("no image given to upscale")
        prompts = _as_prompt_list(prompt)
        prompts = prompts * len(images) if len(prompts) == 1 else prompts
        if len(prompts) != len(images):
            raise T2IError(f"got {len(prompts)} prompts for {len(images)} images; give one, or one per image")
        negatives = _as_negative_list(negative_prompt, len(images))
        if len({image.size for image in images}) > 1:
            raise T2IError("images to upscale together must have one size; got "
                           + ", ".join(sorted({f"{w}x{h}" for w, h in (image.size for image in images)})))
        width, height = images[0].size
        sr.check_size(height, width)
        defaults = sr.defaults
        guidance = guidance_scale if guidance_scale is not None else defaults["guidance_scale"]
        _check_number("guidance_scale", guidance, None, None)
        steps = num_inference_steps if num_inference_steps is not None else defaults["num_inference_steps"]
        trained = sr.scheduler_config["num_train_timesteps"]
        _check_number("num_inference_steps", steps, 1, trained, integer=True)
        noise_level = noise_level if noise_level is not None else defaults["noise_level"]
        _check_number("noise_level", noise_level, 0, None, integer=True)
        self.check_upscale_memory(len(images), height, width, guided=guidance != 1.0)
        pixels = torch.stack([torch.from_numpy(np.asarray(to_rgb8(image), dtype=np.float32))
                              for image in images]).permute(0, 3, 1, 2) / 127.5 - 1  # (B, 3, h, w) in [-1, 1]
        context = self.encode_prompts(prompts)
        negative_context = self.encode_prompts(negatives) if guidance != 1.0 else None
        with out_of_memory_named(f"upscaling to {height * sr.factor}x{width * sr.factor}", len(images), height,
                                 width, self.device):
            high = sr.sample(pixels, context, negative_context, _as_seed_list(seed, len(images)), steps, guidance,
                             noise_level, sampler or defaults["sampler"])
        return _to_pil(high)

    def _check_size(self, height: int, width: int) -> tuple[int, int]:
        factor = self.latent_factor
        for name, value in (("height", height), ("width", width)):
            _check_number(name, value, None, None, integer=True)
            if value < factor or value % factor:
                raise T2IError(f"{name} {value} is not a positive multiple of the VAE's latent factor {factor}")
        return height, width

    def check_memory(self, batch_size: int, height: int, width: int, guided: bool = False) -> None:
        """Refuse a size that cannot fit in the device's memory at all, rather than be killed by the OS part-way.

        The estimate is a floor (t2i.pipeline.memory): the activations that the U-Net's forward (on twice the batch
        when `guided`, as classifier-free guidance runs it) or the VAE decoder's must hold at once, whichever is
        more, with the attention matrix only where torch's attention backend for this device and dtype holds one."""
        quadratic = attention_is_quadratic(self.device, self.dtype)
        needed = generation_floor(self.unet.config, self.vae.config, self.latent_factor, batch_size, height, width,
                                  self.dtype.itemsize, guided, unet_quadratic=quadratic, vae_quadratic=quadratic)
        self._refuse_beyond_memory(needed, f"{height}x{width} at batch {batch_size}", "to sample and decode")

    def check_upscale_memory(self, batch_size: int, height: int, width: int, guided: bool = False) -> None:
        """As `check_memory`, for the SR stage making `batch_size` images sr.factor times a height x width input."""
        sr = self._require_sr()
        dtype = sr.unet.dtype
        needed = upscaler_floor(sr.unet.config, sr.patch_size, sr.factor, batch_size, height, width, dtype.itemsize,
                                guided, attention_is_quadratic(self.device, dtype))
        self._refuse_beyond_memory(needed, f"{height}x{width} at batch {batch_size}",
                                   f"to upscale to {height * sr.factor}x{width * sr.factor}")

    def _refuse_beyond_memory(self, needed: int, what: str, doing: str) -> None:
        available = device_memory(self.device)
        if needed > available:
            need, have = _gib(needed), _gib(available)
            if need == have:  # 24.4 GiB on a 24.0 GiB machine must not read "24 GiB, more than the 24 GiB"
                need, have = f"{needed / 2**30:.2f}", f"{available / 2**30:.2f}"
            raise T2IError(f"{what} needs at least {need} GiB {doing}, more than the {have} GiB "
                           f"of this {self.device.type} device; use a smaller size, or fewer images at once (a "
                           "smaller batch size)")

    @torch.inference_mode()
    def denoise(self, context: torch.Tensor, negative_context: torch.Tensor | None, seeds: list[int], steps: int,
                guidance: float, height: int, width: int, sampler: str, eta: float = 0.0,
                guidance_rescale: float = 0.0, dynamic_threshold: float | None = None,
                guide: Guide | None = None) -> torch.Tensor:
        """Latents (B, C, h, w) from token states (B, L, D) that callers may have encoded once and reused.

        `negative_context` is needed unless guidance is 1; the U-Net sees both halves in one batched forward.
        `guide` (see `classifier_guide`) shifts the guided prediction at every step: classifier guidance.
        """
        with out_of_memory_named("sampling", len(seeds), height, width, self.device):
            return self._denoise(context, negative_context, seeds, steps, guidance, height, width, sampler, eta,
                                 guidance_rescale, dynamic_threshold, guide)

    def _denoise(self, context: torch.Tensor, negative_context: torch.Tensor | None, seeds: list[int], steps: int,
                 guidance: float, height: int, width: int, sampler: str, eta: float, guidance_rescale: float,
                 dynamic_threshold: float | None, guide: Guide | None) -> torch.Tensor:
        if sampler in SCORE_SAMPLERS:
            if eta != 0.0:  # their noise is their own (Langevin steps, the SDE's); DDIM's η has no place in it
                raise T2IError(f"eta {eta} is DDIM's; sampler {sampler!r} takes none: use --sampler ddim")
            return self.denoise_with_score_sampler(context, negative_context, seeds, steps, guidance, height, width,
                                                   sampler, guidance_rescale, dynamic_threshold, guide)
        scheduler = make_scheduler(sampler, self.scheduler_config, dynamic_threshold)
        use_guidance = guidance != 1.0  # at w = 1 guidance is the conditional prediction: skip the ∅ pass
        context = _guided_context(context, negative_context, guidance)

        # Timesteps first: some schedulers (Euler) set init_noise_sigma from them.
        unet_timesteps = set_timesteps(scheduler, sampler, steps, self.device)
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        latents = self._initial_noise(generators, height, width) * scheduler.init_noise_sigma
        step_kwargs = seeded_step_kwargs(scheduler, seeds, generators, eta)
        # Checked once, after the loop: did the U-Net make non-finite predictions from finite latents? Once the
        # sampler's own arithmetic has made the latents non-finite, every later prediction is too, through no fault
        # of the U-Net.
        unet_failed = torch.zeros((), dtype=torch.bool, device=self.device)
        learned_variance = predicts_variance(self.scheduler_config)
        for t, unet_t in zip(scheduler.timesteps, unet_timesteps, strict=True):
            model_input = torch.cat([latents] * 2) if use_guidance else latents
            model_input = scheduler.scale_model_input(model_input, t).to(self.dtype)
            prediction = self.unet(model_input, unet_t, encoder_hidden_states=context).sample.float()
            unet_failed |= torch.isfinite(model_input).all() & ~torch.isfinite(prediction).all()
            if learned_variance:  # guidance acts on the prediction half alone
                prediction, variance = split_variance(prediction)
            if use_guidance:
                prediction = guide_batched(prediction, guidance, guidance_rescale)
            if guide is not None:
                prediction = guide(scheduler.scale_model_input(latents, t), unet_t, prediction, None)
            if predicts_variance(scheduler.config):  # `ddpm`: the conditional variance, as DeepFloyd IF's pipeline
                prediction = torch.cat([prediction, last_step_variance(scheduler, t, variance, use_guidance)], dim=1)
            latents = scheduler.step(prediction, t, latents, **step_kwargs).prev_sample
        if unet_failed:
            raise DivergedModel(f"the U-Net's predictions are not finite (in {str(self.dtype).split('.')[-1]}): "
                                  "its weights have diverged or overflow in this dtype")
        if not torch.isfinite(latents).all():
            raise NonFiniteSample(f"sampler {sampler!r} produced non-finite latents at {steps} steps; use more steps "
                                  "or another sampler")
        return latents

    @torch.inference_mode()
    def denoise_with_score_sampler(self, context: torch.Tensor, negative_context: torch.Tensor | None,
                                   seeds: list[int], steps: int, guidance: float, height: int, width: int,
                                   sampler: str, guidance_rescale: float = 0.0,
                                   dynamic_threshold: float | None = None, guide: Guide | None = None
                                   ) -> torch.Tensor:
        """`denoise` for the samplers written in t2i, which call the U-Net through a denoiser D(x, σ) that applies
        classifier-free guidance; same seeds, same starting noise, same σ ladder as the `euler` sampler."""
        denoise = unet_denoiser(self.unet, _guided_context(context, negative_context, guidance), guidance,
                                self.scheduler_config, guidance_rescale, dynamic_threshold, guide)
        sigmas = sampling_sigmas(self.scheduler_config, steps)
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        noise = self._initial_noise(generators, height, width)
        # x = x_T / √ᾱ_T: the unit Gaussian x_T scaled to σ-coordinates, as Euler's init_noise_sigma does.
        latents = SCORE_SAMPLERS[sampler](denoise, noise * (1 + sigmas[0] ** 2).sqrt().item(), sigmas, generators)
        if not torch.isfinite(latents).all():
            raise NonFiniteSample(f"sampler {sampler!r} produced non-finite latents at {steps} steps; use more steps "
                                  "or another sampler")
        return latents

    def _initial_noise(self, generators: list[torch.Generator], height: int, width: int) -> torch.Tensor:
        """x_T drawn as StableDiffusionPipeline draws it, in fp32: latents, guidance and the sampler's arithmetic
        stay fp32 whatever the U-Net computes in."""
        shape = (len(generators), self.unet.config.in_channels, height // self.latent_factor,
                 width // self.latent_factor)
        return randn_tensor(shape, generator=generators, device=self.device, dtype=torch.float32)

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        config = self.vae.config
        latents = latents / config.scaling_factor
        if getattr(config, "shift_factor", None):
            latents = latents + config.shift_factor
        height, width = (side * self.latent_factor for side in latents.shape[-2:])
        with out_of_memory_named("decoding", len(latents), height, width, self.device):
            pixels = self.vae.decode(latents.to(self.dtype)).sample
        if not torch.isfinite(pixels).all():
            raise NonFiniteSample(f"the VAE decoder's output is not finite (in {str(self.dtype).split('.')[-1]}): "
                                  "its weights are damaged or have diverged, or overflow in this dtype")
        return _to_pil(pixels)


def last_step_variance(scheduler, t, variance: torch.Tensor, use_guidance: bool) -> torch.Tensor:
    """The learned variance half that DDPMScheduler.step reads: the conditional one, and at the step to x_0 the
    lower end, β̃ = 0 (no noise, as the paper's chain ends). diffusers clamps that β̃ to 1e-20 and would extrapolate
    log-linearly from it for v > 1: a variance of about e^23 β."""
    variance = variance.chunk(2)[1] if use_guidance else variance
    return torch.full_like(variance, -1.0) if scheduler.previous_timestep(t) < 0 else variance


def _guided_context(context: torch.Tensor, negative_context: torch.Tensor | None, guidance: float) -> torch.Tensor:
    """[negative; positive] token states for one batched guided forward; the positive ones alone at guidance 1."""
    if guidance == 1.0:
        return context
    if negative_context is None:
        raise T2IError(f"guidance {guidance} needs the negative prompts' token states")
    return torch.cat([negative_context, context])


def _to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL images; fp32 before rounding, so that bf16 output loses no level of 255."""
    pixels = (pixels.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(image) for image in (pixels * 255).round().astype(np.uint8)]


def _as_prompt_list(prompt) -> list[str]:
    if not isinstance(prompt, (str, Iterable)):
        raise T2IError(f"prompt must be a string or a list of strings; got {type(prompt).__name__}")
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise T2IError("no prompt given: pass a non-empty string or a list of them")
    for i, text in enumerate(prompts):
        if not isinstance(text, str):
            raise T2IError(f"prompt {i} is a {type(text).__name__}, not a string")
        if not text.strip():
            raise T2IError("the prompt is empty" if len(prompts) == 1 else f"prompt {i} is empty")
    return prompts


def _as_negative_list(negative_prompt, count: int) -> list[str]:
    if negative_prompt is None or isinstance(negative_prompt, str):
        return [negative_prompt or ""] * count
    negatives = list(negative_prompt) if isinstance(negative_prompt, Iterable) else [negative_prompt]
    if len(negatives) != count:
        raise T2IError(f"got {len(negatives)} negative prompts for {count} prompts; give one, or one per prompt")
    for i, text in enumerate(negatives):
        if text is not None and not isinstance(text, str):
            raise T2IError(f"negative prompt {i} is a {type(text).__name__}, not a string")
    return [text or "" for text in negatives]


def _as_seed_list(seed, count: int) -> list[int]:
    if _is_integer_array(seed):
        seed = seed.tolist()  # an integer tensor or array holds the same seed(s) as its Python ints
    if seed is None:
        seed = int(torch.randint(0, 2**31 - count, ()).item())
    if _is_integer(seed):
        seeds = [int(seed) + i for i in range(count)]
    else:
        iterable = isinstance(seed, Iterable) and not isinstance(seed, str) and getattr(seed, "ndim", 1) > 0
        listed = list(seed) if iterable else []
        if len(listed) != count or not all(_is_integer(s) for s in listed):
            raise T2IError(f"seed must be an int or a list of {count} ints (one per image); got {seed!r}")
        seeds = [int(s) for s in listed]
    if not all(0 <= s <= MAX_SEED for s in seeds):
        raise T2IError(f"seeds must lie in 0..{MAX_SEED} (2**63 - 1); got {seed!r}"
                       + (f" for {count} images, seed + i for image i" if _is_integer(seed) and count > 1 else ""))
    return seeds


def _is_integer_array(value) -> bool:
    if isinstance(value, torch.Tensor):
        return not (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool)
    return isinstance(value, np.ndarray) and np.issubdtype(value.dtype, np.integer)


def _is_integer(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_number(name: str, value, low: float | None, high: float | None, integer: bool = False) -> None:
    """One line for an argument of the wrong type or outside [low, high] (None: unbounded), before any work."""
    kind_ok = _is_integer(value) if integer else (_is_integer(value) or isinstance(value, (float, np.floating)))
    if not kind_ok or (not _is_integer(value) and not math.isfinite(value)):
        raise T2IError(f"{name} must be {'an integer' if integer else 'a finite number'}; got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"at least {low}" if high is None else f"in [{low}, {high}]"
        raise T2IError(f"{name} must be {bounds}; got {value!r}")
