"""The typed configuration of a t2i run: one frozen dataclass per concern, loaded from YAML.

    config = load_config("configs/demo.yaml", overrides=["train.unet.steps=200"])
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from t2i.config_io import apply_overrides, from_dict, read_yaml

# The run configs shipped as package data: present after a plain `pip install .`, whatever the working folder.
PACKAGED_CONFIGS = Path(__file__).resolve().parent / "configs"

Device = Literal["auto", "cpu", "cuda"]
# "auto": bf16 where it is fast (GPUs with bf16, CPUs with AMX), else "no" (t2i.precision).
MixedPrecision = Literal["no", "fp16", "bf16", "auto"]
# Sizes the shapes dataset is rendered at: 32 and 64 for the base model, 128 too as the target of a 4x stage sr.
SHAPES_RESOLUTIONS = (32, 64, 128)
Stage = Literal["vae", "clip", "unet", "sr", "finetune", "classifier"]


@dataclass(frozen=True)
class BucketConfig:
    """Aspect-ratio buckets (as sd-scripts): every batch one shape, shapes of about resolution² pixels."""

    enabled: bool = False
    # Bucket sides are multiples of this, which must be a multiple of the VAE's latent factor (checked).
    step: int = 8
    # The widest bucket is at most this many times wider than tall (and the tallest likewise).
    max_aspect_ratio: float = 2.0

    def __post_init__(self):
        _check(self.step >= 1, "data.buckets.step must be at least 1")
        _check(self.max_aspect_ratio >= 1.0, "data.buckets.max_aspect_ratio must be at least 1")


@dataclass(frozen=True)
class DataConfig:
    """Where training images come from: the procedural `shapes` set, or the user's captioned images."""

    dataset: Literal["shapes", "imagefolder", "datasets", "webdataset"] = "shapes"
    size: int = 20_000
    resolution: int = 32
    seed: int = 0
    # (colour shape) pairs never shown in training, in any scene, to measure compositional generalisation.
    held_out: tuple[str, ...] = ("green triangle", "yellow circle", "white square")
    two_object_fraction: float = 0.3
    paraphrase_prob: float = 0.2
    # Captions that leave some attributes unsaid ("a large triangle on the left"), for compositionality.
    partial_caption_prob: float = 0.0
    # Which attributes a partial caption may leave unsaid (see t2i.data.shapes.partial_caption).
    partial_caption_omits: tuple[Literal["size", "colour", "shape"], ...] = ("size", "colour", "shape")

    # The user's images (every dataset but shapes). imagefolder: a folder with metadata.jsonl or metadata.csv
    # (`file_name` + caption column), else sidecar captions (x.png + x.txt). datasets: a save_to_disk folder,
    # a data file, or a hub name. webdataset: a folder of .tar shards (key.jpg + key.txt), streamed.
    path: str | None = None
    image_column: str = "image"
    caption_column: str = "text"
    # Which split of a `datasets` DatasetDict to train on.
    split: str = "train"
    crop: Literal["center", "random"] = "center"
    random_flip: bool = False
    # Images whose shorter side is below this are skipped; None: half the resolution (more upscaling blurs).
    min_image_size: int | None = None
    max_caption_length: int = 1000
    # Stop before training when more than this fraction of the entries is bad.
    max_bad_fraction: float = 0.05
    # Entries held out for validation, chosen by a hash of their name (stable as files are added); round(fraction *
    # entries) of them, so a set too small for that to reach one holds none out.
    validation_fraction: float = 0.0
    # webdataset: samples mixed in memory at once when shuffling the stream.
    shuffle_buffer: int = 1000
    buckets: BucketConfig = field(default_factory=BucketConfig)

    def __post_init__(self):
        _check(self.size >= 1, "data.size must be at least 1")
        if self.dataset == "shapes":
            _check(self.resolution in SHAPES_RESOLUTIONS,
                   "data.resolution must be 32 or 64 for the shapes dataset (128 only as stage sr's target)")
            _check(not self.buckets.enabled, "data.buckets apply to user images, not the shapes dataset")
        else:
            _check(self.path is not None, f"data.dataset '{self.dataset}' needs data.path")
            _check(self.resolution >= 8 and self.resolution % 8 == 0,
                   "data.resolution must be a positive multiple of 8")
        _check(0.0 <= self.two_object_fraction <= 1.0, "data.two_object_fraction must lie in [0, 1]")
        _check(0.0 <= self.paraphrase_prob <= 1.0, "data.paraphrase_prob must lie in [0, 1]")
        _check(0.0 <= self.partial_caption_prob <= 1.0, "data.partial_caption_prob must lie in [0, 1]")
        _check(len(self.partial_caption_omits) > 0, "data.partial_caption_omits must name at least one attribute")
        for pair in self.held_out:
            _check(len(pair.split()) == 2, f"data.held_out entries look like 'green triangle'; got {pair!r}")
        _check(self.min_image_size is None or self.min_image_size >= 1, "data.min_image_size must be at least 1")
        _check(self.max_caption_length >= 1, "data.max_caption_length must be at least 1")
        _check(0.0 <= self.max_bad_fraction <= 1.0, "data.max_bad_fraction must lie in [0, 1]")
        _check(0.0 <= self.validation_fraction < 1.0, "data.validation_fraction must lie in [0, 1)")
        _check(self.shuffle_buffer >= 1, "data.shuffle_buffer must be at least 1")
        _check(self.dataset != "webdataset" or not self.buckets.enabled,
               "data.buckets need the image sizes up front; a streamed webdataset cannot use them")

    @property
    def held_out_pairs(self) -> tuple[tuple[str, str], ...]:
        return tuple(tuple(pair.split()) for pair in self.held_out)  # type: ignore[misc]

    @property
    def smallest_image_side(self) -> int:
        return self.min_image_size if self.min_image_size is not None else self.resolution // 2


@dataclass(frozen=True)
class VAEConfig:
    """diffusers AutoencoderKL; the latent factor is 2 ** (len(block_out_channels) - 1)."""

    block_out_channels: tuple[int, ...] = (8, 16, 32)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 4
    l1_weight: float = 0.5
    kl_weight: float = 1e-6

    def __post_init__(self):
        _check_levels("vae", self.block_out_channels, self.layers_per_block, self.norm_num_groups)
        _check(all(c % self.norm_num_groups == 0 for c in self.block_out_channels),
               "vae.norm_num_groups must divide every entry of vae.block_out_channels")
        _check(self.latent_channels >= 1, "vae.latent_channels must be at least 1")

    @property
    def latent_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


@dataclass(frozen=True)
class TextEncoderConfig:
    """Where the text encoder comes from: trained here (`scratch`, stage clip) or loaded pretrained."""

    source: Literal["scratch", "open_clip", "hf_clip"] = "scratch"
    # scratch: an open_clip CLIP built from these sizes and trained contrastively on the data.
    width: int = 64
    layers: int = 2
    heads: int = 4
    context_length: int = 77
    embed_dim: int = 64
    vision_width: int = 64
    vision_layers: int = 2
    vision_patch_size: int = 4
    # open_clip: a model name (e.g. ViT-B-32) and a local weights file; hf_clip: a CLIPTextModel folder.
    open_clip_name: str | None = None
    weights_path: str | None = None
    hf_path: str | None = None
    # Condition the U-Net on the states this many layers before the last (diffusers' `clip_skip`), through the
    # final layer norm. With clip_skip = layers the U-Net sees context-free token (+ position) embeddings.
    clip_skip: int = 0
    # scratch: keep the token embeddings at their random init while stage clip trains the rest. With clip_skip =
    # layers the U-Net reads exactly these vectors, and contrastive training writes the data's colour-shape
    # correlations (held-out pairs included) into them (docs/demo-tuning.md, fin5 and fin6).
    freeze_token_embedding: bool = False

    def __post_init__(self):
        if self.source == "open_clip":
            _check(self.open_clip_name is not None and self.weights_path is not None,
                   "text_encoder.source 'open_clip' needs text_encoder.open_clip_name and text_encoder.weights_path")
        if self.source == "hf_clip":
            _check(self.hf_path is not None, "text_encoder.source 'hf_clip' needs text_encoder.hf_path")
        _check(self.width % self.heads == 0, "text_encoder.heads must divide text_encoder.width")
        _check(self.clip_skip >= 0, "text_encoder.clip_skip must be >= 0")
        _check(self.source != "scratch" or self.clip_skip <= self.layers,
               "text_encoder.clip_skip cannot exceed text_encoder.layers")
        _check(self.source == "scratch" or not self.freeze_token_embedding,
               "text_encoder.freeze_token_embedding applies to a text encoder trained here (source 'scratch')")


@dataclass(frozen=True)
class UNetConfig:
    """diffusers UNet2DConditionModel with cross-attention on the text encoder's token states."""

    block_out_channels: tuple[int, ...] = (64, 128)
    layers_per_block: int = 1
    attention_heads: int = 4
    norm_num_groups: int = 32
    # Cross-attention blocks at every level by default; False leaves that level convolution-only.
    cross_attention: tuple[bool, ...] = (True, True)

    def __post_init__(self):
        _check_levels("unet", self.block_out_channels, self.layers_per_block, self.norm_num_groups)
        _check(self.attention_heads >= 1, "unet.attention_heads must be at least 1")
        _check(len(self.cross_attention) == len(self.block_out_channels),
               "unet.cross_attention needs one entry per unet.block_out_channels entry")
        _check(all(c % self.norm_num_groups == 0 for c in self.block_out_channels),
               "unet.norm_num_groups must divide every entry of unet.block_out_channels")


@dataclass(frozen=True)
class SRConfig:
    """Stage sr: a super-resolution diffusion U-Net in pixel space (cascaded diffusion, Ho et al. 2021).

    It denoises the image `factor` times larger than data.resolution, conditioned on the low-resolution image
    (bicubic-upsampled and concatenated on channels), on the text through cross-attention, and on the level of
    Gaussian noise added to that image (the class embedding, as diffusers' StableDiffusionUpscalePipeline
    passes `noise_level`). Noise schedule, parameterisation and caption dropout come from `diffusion`.
    """

    factor: Literal[2, 4] = 2
    block_out_channels: tuple[int, ...] = (32, 64, 128)
    layers_per_block: int = 1
    attention_heads: int = 4
    norm_num_groups: int = 8
    cross_attention: tuple[bool, ...] = (False, False, True)
    # Space-to-depth before the U-Net (pixel_unshuffle, as "simple diffusion", Hoogeboom et al. 2023, does with
    # wavelets): the stock U-Net then runs at 1/patch_size of the resolution, patch_size² fewer positions.
    patch_size: Literal[1, 2, 4] = 2
    # Denoise the residual over the bicubic-upsampled low-resolution image (SRDiff, Li et al. 2022) instead of
    # the image itself: an untrained model already gives bicubic, and training spends itself on the edges.
    residual: bool = True
    # Training: the conditioning-augmentation level is drawn uniformly from 0..max_noise_level per sample; level
    # l noises the low-resolution image as l forward steps of the noise schedule do (0: left exact).
    max_noise_level: int = 250
    # Min-SNR-γ weighting of the loss, or null for the plain one. Unlike the base stage's, it is off by default:
    # it weights x̂_0's error at high noise by SNR → 0, and there, where the sampler starts, an SR stage must learn
    # its sharp posterior mean E[high | low] (docs/cascade.md).
    min_snr_gamma: float | None = None
    # Sampling defaults, saved with the pipeline: the augmentation level, steps, guidance scale and sampler.
    noise_level: int = 50
    steps: int = 20
    guidance_scale: float = 1.0
    sampler: str = "dpmpp_2m"

    def __post_init__(self):
        _check_levels("sr", self.block_out_channels, self.layers_per_block, self.norm_num_groups)
        _check(self.attention_heads >= 1, "sr.attention_heads must be at least 1")
        _check(len(self.cross_attention) == len(self.block_out_channels),
               "sr.cross_attention needs one entry per sr.block_out_channels entry")
        _check(all(c % self.norm_num_groups == 0 for c in self.block_out_channels),
               "sr.norm_num_groups must divide every entry of sr.block_out_channels")
        _check(self.max_noise_level >= 0, "sr.max_noise_level must be >= 0")
        _check(self.min_snr_gamma is None or self.min_snr_gamma > 0, "sr.min_snr_gamma must be > 0, or null")
        _check(0 <= self.noise_level <= self.max_noise_level,
               "sr.noise_level must lie in [0, sr.max_noise_level]: levels the stage was trained on")
        _check(self.steps >= 1, "sr.steps must be at least 1")
        _check_sampler("sr.sampler", self.sampler)

    @property
    def alignment(self) -> int:
        """High-resolution sides must be multiples of this: the patch size times the U-Net's downsampling."""
        return self.patch_size * 2 ** (len(self.block_out_channels) - 1)


@dataclass(frozen=True)
class ClassifierConfig:
    """Stage classifier: a noise-aware classifier of the U-Net's noisy latents, p(colour, shape | x_t, t), for
    classifier guidance (Dhariwal & Nichol 2021, §4; t2i.models.classifier). Trained on the shapes data, whose
    single-object scenes carry their colour and shape; the noise schedule is the U-Net's (`diffusion`)."""

    # The sizes measured on the demo (docs/samplers.md, "Classifier guidance"): 0.4 M parameters.
    block_out_channels: tuple[int, ...] = (64, 128)
    layers_per_block: int = 1
    norm_num_groups: int = 16

    def __post_init__(self):
        _check_levels("classifier", self.block_out_channels, self.layers_per_block, self.norm_num_groups)
        _check(all(c % self.norm_num_groups == 0 for c in self.block_out_channels),
               "classifier.norm_num_groups must divide every entry of classifier.block_out_channels")
        _check(self.layers_per_block >= 1, "classifier.layers_per_block must be at least 1")


@dataclass(frozen=True)
class DiffusionConfig:
    schedule: Literal["linear", "scaled_linear", "cosine"] = "cosine"
    prediction: Literal["epsilon", "v_prediction", "sample"] = "v_prediction"  # sample: the network predicts x_0
    num_train_timesteps: int = 1000
    # Probability of training on the empty prompt, so that classifier-free guidance works.
    caption_dropout: float = 0.1
    # Min-SNR-gamma loss weighting (Hang et al. 2023); None weighs every timestep equally.
    min_snr_gamma: float | None = None
    # Offset noise (Guttenberg 2023): add this times a per-channel constant to the noise, so that the model
    # learns to change an image's mean brightness. 0 is plain DDPM noise.
    noise_offset: float = 0.0
    # Rescale the schedule to zero SNR at t = T (Lin et al. 2023, Alg. 1), so that the model learns to start from
    # pure noise, as sampling does. Needs v or x_0 prediction: at SNR 0 the noise says nothing about ε's image.
    zero_terminal_snr: bool = False
    # Learn the reverse process's variances too (Nichol & Dhariwal 2021, "Improved DDPM", §3.1): the U-Net outputs
    # twice the latent channels and trains on L_simple + vlb_weight · L_vlb; the `ddpm` sampler then samples with
    # them (fewer steps), every other sampler uses the prediction half alone.
    learned_variance: bool = False
    # λ of L_hybrid (their eq. 16): 0.001 keeps L_vlb from swamping L_simple. Read only with learned_variance.
    vlb_weight: float = 0.001

    def __post_init__(self):
        _check(not (self.zero_terminal_snr and self.prediction == "epsilon"),
               "diffusion.zero_terminal_snr needs diffusion.prediction v_prediction or sample: at SNR 0, ε-prediction "
               "cannot say what the image is (Lin et al. 2023, §3.2)")
        _check(0.0 <= self.caption_dropout < 1.0, "diffusion.caption_dropout must lie in [0, 1)")
        _check(self.num_train_timesteps >= 2, "diffusion.num_train_timesteps must be at least 2")
        _check(self.noise_offset >= 0.0, "diffusion.noise_offset must be >= 0")
        _check(self.vlb_weight > 0 or not self.learned_variance,
               "diffusion.vlb_weight must be positive with diffusion.learned_variance: at 0 the variances never train")


@dataclass(frozen=True)
class TrainConfig:
    """How one stage trains; the loop shared by every stage reads it."""

    steps: int = 1000
    batch_size: int = 32
    learning_rate: float = 1e-3
    final_learning_rate_fraction: float = 0.1
    lr_schedule: Literal["constant", "cosine", "linear"] = "cosine"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_accum_steps: int = 1
    grad_clip: float | None = 1.0
    ema_decay: float | None = None
    mixed_precision: MixedPrecision = "no"
    # Convolution weights and activations in NHWC: oneDNN's convolutions run up to 2x faster on it than on NCHW
    # (docs/performance.md); the result differs from NCHW by rounding only.
    channels_last: bool = True
    # torch.compile the stage's network (Inductor, kernels cached on disk for later runs). The first steps pay the
    # compilation: on the demo's 2-core CPU about a minute, more than it saves in a 1,700-step stage.
    compile: bool = False
    # Worker processes that load, decode and augment batches ahead of the step. None: as many as suit the data
    # (t2i.data.loader.loader_workers): none for data held in memory; for images read from disk, the cores but two,
    # at most 4 (for streamed tar shards threads of the training process, which reads them in one sequence).
    loader_workers: int | None = None
    seed: int = 0
    log_every: int = 10
    sample_every: int = 0
    # Also sample (and, for stage finetune, score the held-out loss) before the first step: the starting point.
    sample_at_start: bool = False
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    # Optimiser steps with a non-finite loss or gradient to skip (no update, as fp16 loss scaling does) before the
    # stage stops as diverged; 0 stops at the first.
    max_nonfinite_steps: int = 0

    def __post_init__(self):
        _check(self.steps >= 1, "steps must be at least 1")
        _check(self.batch_size >= 1, "batch_size must be at least 1")
        _check(self.grad_accum_steps >= 1, "grad_accum_steps must be at least 1")
        _check(self.learning_rate > 0, "learning_rate must be positive")
        _check(0.0 <= self.final_learning_rate_fraction <= 1.0, "final_learning_rate_fraction must lie in [0, 1]")
        _check(self.warmup_steps >= 0, "warmup_steps must be >= 0")
        _check(self.weight_decay >= 0, "weight_decay must be >= 0")
        # torch's clip_grad_norm_ takes a negative bound as a scale < 0: it would turn descent into ascent.
        _check(self.grad_clip is None or self.grad_clip > 0, "grad_clip must be positive, or null for no clipping")
        _check(self.log_every >= 1, "log_every must be at least 1")
        _check(self.sample_every >= 0, "sample_every must be >= 0 (0: never)")
        _check(self.checkpoint_every >= 0, "checkpoint_every must be >= 0 (0: at the end and on a stop only)")
        _check(self.ema_decay is None or 0.0 < self.ema_decay < 1.0, "ema_decay must lie in (0, 1)")
        _check(self.keep_checkpoints >= 1, "keep_checkpoints must be at least 1")
        _check(self.max_nonfinite_steps >= 0, "max_nonfinite_steps must be >= 0")
        _check(self.loader_workers is None or self.loader_workers >= 0, "loader_workers must be >= 0 (or null: auto)")


@dataclass(frozen=True)
class StageTrainConfigs:
    vae: TrainConfig = field(default_factory=lambda: TrainConfig(steps=600, learning_rate=4e-3))
    clip: TrainConfig = field(default_factory=lambda: TrainConfig(steps=200, batch_size=128, learning_rate=2e-3))
    unet: TrainConfig = field(default_factory=TrainConfig)
    sr: TrainConfig = field(default_factory=lambda: TrainConfig(steps=600, batch_size=32, learning_rate=1e-3))
    finetune: TrainConfig = field(default_factory=lambda: TrainConfig(steps=500, batch_size=4, learning_rate=1e-4))
    classifier: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=4000, batch_size=128, learning_rate=1e-3, warmup_steps=100, ema_decay=0.999))


@dataclass(frozen=True)
class LoRAConfig:
    """Low-rank adapters (Hu et al. 2021) through peft on the U-Net's attention projections; rank 0 trains the
    whole U-Net instead."""

    rank: int = 0
    alpha: float | None = None  # None: alpha = rank, a scale of 1
    target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    dropout: float = 0.0
    # Adapters of the same rank on the text encoder's attention too, trained with the U-Net's (open_clip: each
    # text block's attention; Hugging Face CLIP: q/k/v/out projections).
    text_encoder: bool = False

    def __post_init__(self):
        _check(self.rank >= 0, "finetune.lora.rank must be >= 0 (0: full fine-tune)")
        _check(self.rank > 0 or not self.text_encoder, "finetune.lora.text_encoder needs finetune.lora.rank > 0")
        _check(self.alpha is None or self.alpha > 0, "finetune.lora.alpha must be positive")
        _check(len(self.target_modules) > 0, "finetune.lora.target_modules must name at least one module")
        _check(0.0 <= self.dropout < 1.0, "finetune.lora.dropout must lie in [0, 1)")


@dataclass(frozen=True)
class FinetuneConfig:
    """Stage finetune: continue training a pretrained pipeline's U-Net (fully, or through LoRA) on `data`."""

    # A t2i pipeline folder, a diffusers-format Stable Diffusion folder, or a hub id when online.
    model: str | None = None
    # Load pickle weight files (.bin, .ckpt) of the model, which can run code; safetensors only by default.
    allow_pickle: bool = False
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    # Recompute activations in the backward pass: less memory, about a third more time.
    gradient_checkpointing: bool = False
    # Rendered into a grid every `train.finetune.sample_every` steps; empty: captions from the data.
    validation_prompts: tuple[str, ...] = ()
    # Held-out validation batches scored every `train.finetune.sample_every` steps (with `data.validation_fraction`).
    validation_batches: int = 4


@dataclass(frozen=True)
class SamplingConfig:
    """Defaults saved with the pipeline and used by reports."""

    steps: int = 30
    guidance_scale: float = 2.0
    sampler: str = "dpmpp_2m"
    # How many images (seeds) per prompt the demo judges: one image per prompt makes a 24-prompt fraction
    # move by ±0.1 between seeds alone.
    samples_per_prompt: int = 1

    def __post_init__(self):
        _check(self.steps >= 1, "sampling.steps must be at least 1")
        _check_sampler("sampling.sampler", self.sampler)
        _check(self.samples_per_prompt >= 1, "sampling.samples_per_prompt must be at least 1")


@dataclass(frozen=True)
class RunConfig:
    run_dir: str = "runs/t2i"
    device: Device = "auto"
    stages: tuple[Stage, ...] = ("vae", "clip", "unet")
    # Encode the whole dataset with the frozen VAE once before the unet stage, instead of every step.
    cache_latents: bool = True
    # Keep those latents on disk here between runs, keyed by the VAE's weights and dtype and by the data with its
    # resolution and augmentation (t2i.data.latents); None keeps them in memory for the run only.
    latent_cache_dir: str | None = None
    # U-Net stages: encode every distinct caption once with the frozen text encoder, instead of at every step
    # (kept in latent_cache_dir too, when set). Batched encoding may round differently from per-step encoding.
    cache_text_states: bool = False
    # CPU only: train as this many data-parallel processes on this machine, sharing its cores (batch sizes are
    # per process). For GPUs and several machines, start `t2i train` under `accelerate launch` instead.
    local_processes: int = 1
    data: DataConfig = field(default_factory=DataConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: StageTrainConfigs = field(default_factory=StageTrainConfigs)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    sr: SRConfig = field(default_factory=SRConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)

    def __post_init__(self):
        _check(self.local_processes >= 1, "local_processes must be at least 1")
        _check(len(self.stages) >= 1, "stages is empty: list the stages to train, e.g. stages: [vae, clip, unet]")
        if "finetune" in self.stages:
            _check(self.finetune.model is not None, "stage 'finetune' needs finetune.model: a pipeline folder to "
                                                    "start from")
            _check(self.stages == ("finetune",), "stage 'finetune' runs alone: stages: [finetune]")
            _check(not self.diffusion.learned_variance,
                   "diffusion.learned_variance applies to a U-Net trained here (stage unet); stage 'finetune' keeps "
                   "the variances of finetune.model")
        else:
            for problem in data_size_problems(self.data, self.vae.latent_factor, "the VAE's"):
                _check(False, problem)
        if "clip" in self.stages:
            _check(self.text_encoder.source == "scratch",
                   "stage 'clip' trains a text encoder from scratch; drop it from 'stages' when "
                   "text_encoder.source is pretrained")
        if "classifier" in self.stages:
            _check(self.data.dataset == "shapes", "stage 'classifier' needs labelled images: data.dataset 'shapes' "
                                                  "(user images carry captions, not colour and shape labels)")
        if "sr" in self.stages:
            high = self.data.resolution * self.sr.factor
            _check(self.data.dataset != "shapes" or high in SHAPES_RESOLUTIONS,
                   f"stage 'sr' renders shapes at data.resolution x sr.factor = {high}; shapes are drawn at "
                   f"{', '.join(map(str, SHAPES_RESOLUTIONS))} px")
            _check(high % self.sr.alignment == 0,
                   f"stage 'sr' trains at {high} px, which must be a multiple of {self.sr.alignment} (sr.patch_size "
                   "times 2 per extra sr.block_out_channels level)")


def data_size_problems(data: DataConfig, latent_factor: int, whose: str) -> list[str]:
    """What keeps the images' sizes from mapping to whole latents of a VAE that shrinks them `latent_factor` times
    (for user images: the resolution, and the bucket step when buckets are on)."""
    problems = []
    if data.resolution % latent_factor:
        problems.append(f"data.resolution {data.resolution} must be a multiple of {whose} latent factor {latent_factor}")
    if data.buckets.enabled and data.buckets.step % latent_factor:
        problems.append(f"data.buckets.step {data.buckets.step} must be a multiple of {whose} latent factor "
                        f"{latent_factor}, so that every bucket's sides map to whole latents")
    return problems


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _check_levels(section: str, block_out_channels: tuple[int, ...], layers_per_block: int,
                  norm_num_groups: int) -> None:
    """A network's levels: at least one, each with a positive width and at least one layer."""
    _check(len(block_out_channels) >= 1, f"{section}.block_out_channels needs at least one entry")
    _check(all(c >= 1 for c in block_out_channels), f"{section}.block_out_channels entries must be positive")
    _check(layers_per_block >= 1, f"{section}.layers_per_block must be at least 1")
    _check(norm_num_groups >= 1, f"{section}.norm_num_groups must be at least 1")


def _check_sampler(key: str, name: str) -> None:
    from t2i.diffusion.sampler_names import SAMPLER_NAMES

    _check(name in SAMPLER_NAMES, f"{key} {name!r} is not a sampler; valid: {', '.join(SAMPLER_NAMES)}")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a RunConfig from YAML (or the defaults, when `path` is None) and apply `key=value` overrides."""
    data = read_yaml(path) if path is not None else {}
    return from_dict(RunConfig, apply_overrides(data, overrides or []))
