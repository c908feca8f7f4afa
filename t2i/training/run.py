"""A whole training run: the configured stages in order, each in its own folder, then the pipeline.

    run_dir/config.yaml          the resolved config
    run_dir/vae/final            AutoencoderKL (diffusers format, measured scaling factor)
    run_dir/clip/final           open_clip text encoder (when trained here)
    run_dir/unet/final           UNet2DConditionModel
    run_dir/sr/final             the cascade's super-resolution stage (t2i.pipeline.upscaler)
    run_dir/classifier/final     the noise-aware classifier of classifier guidance (t2i.models.classifier)
    run_dir/finetune/final       the fine-tuned pipeline (pipeline/) and its LoRA adapters (lora/, diffusers' layout)
    run_dir/<stage>/checkpoints  resumable checkpoints; metrics.jsonl, samples/
    run_dir/pipeline             the assembled Text2ImagePipeline
    run_dir/quarantine.jsonl     user images skipped as bad, each with its reason
    run_dir/data.json            the user's data at the run's last start: a resume on changed data says so
    run_dir/t2i.lock             while a run is in progress: who holds the folder

One run at a time per folder: the main process holds the folder's lock for every process of the run. A first
SIGTERM or SIGINT stops the stage in training after its current step, with a checkpoint to resume from.
"""
from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import yaml
from accelerate import PartialState
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch.utils.data import DataLoader, Dataset

from t2i.atomic import write_folder
from t2i.config import RunConfig, data_size_problems
from t2i.config_io import to_dict
from t2i.data.build import build_datasets
from t2i.data.image_captions import ImageCaptionDataset
from t2i.data.labels import SHAPES_LABELS, LabelledDataset, scene_labels
from t2i.data.latents import cached_latents, data_fingerprint
from t2i.data.shapes import ShapesDataset, prompt_suite
from t2i.diffusion.schedules import scheduler_config
from t2i.diffusion.super_resolution import residual_scale
from t2i.diffusion.vlb import LEARNED_RANGE
from t2i.errors import T2IError
from t2i.models.classifier import NoisyLatentClassifier, build_classifier
from t2i.models.sr_unet import build_sr_unet
from t2i.models.text_encoder import OpenClipTextEncoder, TextEncoder, build_text_encoder
from t2i.models.unet import build_unet
from t2i.models.vae import build_vae
from t2i.pipeline import Text2ImagePipeline
from t2i.pipeline.hub import is_hub_name, resolve_model
from t2i.pipeline.pipeline import resolve_device
from t2i.pipeline.upscaler import Upscaler
from t2i.training import run_lock
from t2i.training.interrupt import StopRequest
from t2i.training.launch import is_launched, launch_local
from t2i.training.loop import FINAL, train
from t2i.training.run_folder import (CONFIG, check_run_folder, check_stage_inputs, data_change_note, is_trained,
                                     missing_for_pipeline)
from t2i.training.stages.classifier import ClassifierStage
from t2i.training.stages.clip import ClipStage
from t2i.training.stages.finetune import PIPELINE as FINETUNED_PIPELINE
from t2i.training.stages.finetune import FinetuneStage
from t2i.training.stages.sr import SRStage
from t2i.training.stages.unet import UNetStage
from t2i.training.stages.vae import VAEStage

PREVIEW_PROMPTS = 8
RESIDUAL_SAMPLE_SIZE = 1024  # images the SR stage's residual scale is measured on
CLASSIFIER_PREVIEW_SIZE = 256  # held-out single-object scenes (data.seed + 1) the classifier's accuracy is logged on


def load_vae(run_dir: Path) -> AutoencoderKL:
    folder = run_dir / "vae" / FINAL
    if not folder.is_dir():
        raise T2IError(f"no trained VAE at '{folder}': add 'vae' to stages, or train it first")
    return AutoencoderKL.from_pretrained(folder)


def load_text_encoder(config: RunConfig, run_dir: Path) -> TextEncoder:
    if config.text_encoder.source != "scratch":
        return build_text_encoder(config.text_encoder, config.data.resolution)
    folder = run_dir / "clip" / FINAL
    if not folder.is_dir():
        raise T2IError(f"no trained text encoder at '{folder}': add 'clip' to stages, or train it first")
    return OpenClipTextEncoder.load(folder, config.text_encoder.clip_skip)


def load_sr(config: RunConfig, run_dir: Path) -> Upscaler:
    """The trained SR stage, with the sampling defaults of the config (which may have changed since)."""
    folder = run_dir / "sr" / FINAL
    if not folder.is_dir():
        raise T2IError(f"no trained SR stage at '{folder}': add 'sr' to stages, or train it first")
    upscaler = Upscaler.from_pretrained(folder)
    upscaler.defaults.update(sr_defaults(config))
    return upscaler


def pipeline_scheduler_config(config: RunConfig) -> dict:
    diffusion = config.diffusion
    return scheduler_config(diffusion.schedule, diffusion.num_train_timesteps, diffusion.prediction,
                            diffusion.zero_terminal_snr)


def unet_scheduler_config(config: RunConfig) -> dict:
    """The base U-Net's scheduler config: the pipeline's, recording learned variances where the U-Net has them
    (a loaded pipeline then samples with them); the SR stage's never has them."""
    scheduler = pipeline_scheduler_config(config)
    return {**scheduler, "variance_type": LEARNED_RANGE} if config.diffusion.learned_variance else scheduler


def run_training(config: RunConfig, resume: bool = False, resume_weights_only: bool = False) -> Path | None:
    """Train every configured stage (skipping finished ones when resuming) and save the pipeline; return its
    folder, or None when the run folder does not yet hold every part of one (a run of `stages: [vae]`).

    `resume_weights_only` resumes each stage from its latest checkpoint's weights with a fresh optimizer: for
    checkpoints whose optimizer state cannot be read (written by an older t2i, or damaged).
    """
    device = resolve_device(config.device)
    run_dir = Path(config.run_dir)
    resume = resume or resume_weights_only
    if config.local_processes > 1 and not is_launched():
        if device.type != "cpu":
            raise T2IError("local_processes > 1 splits CPU training between processes; on GPUs start "
                           "`t2i train` under `accelerate launch` instead")
        assembles = check_stage_inputs(config, run_dir)
        with run_lock.hold(run_dir):
            launch_local(_train_stages, (config, device, resume, resume_weights_only), config.local_processes)
        return run_dir / "pipeline" if assembles else None
    processes = PartialState(cpu=device.type == "cpu")
    with (run_lock.hold_for_group(run_dir, "run folder", processes.is_main_process, processes.num_processes),
          StopRequest().installed() as stop):
        return _train_stages(config, device, resume, resume_weights_only, stop=stop)


def _train_stages(config: RunConfig, device: torch.device, resume: bool, resume_weights_only: bool,
                  stop: StopRequest) -> Path | None:
    run_dir = Path(config.run_dir)
    # Under `accelerate launch` every process runs this; the main one alone writes shared files.
    processes = PartialState(cpu=device.type == "cpu")
    resolved = to_dict(config)
    if "finetune" in config.stages and not is_trained(run_dir, "finetune"):
        _check_finetune_source(config)
    note = check_run_folder(run_dir, resolved, resume)
    assembles = check_stage_inputs(config, run_dir)
    if note is not None and processes.is_main_process:
        print(f"[run] {note}")
    processes.wait_for_everyone()
    if processes.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / CONFIG).write_text(yaml.safe_dump(resolved, sort_keys=False))
    untrained = [name for name in config.stages if not is_trained(run_dir, name)]
    if untrained:  # a finished run resumed (a demo run again) reads no data
        dataset, validation, _ = build_datasets(config.data, run_dir, processes.is_main_process)
        if processes.is_main_process and (record := data_record(dataset, validation)) is not None:
            if (changed := data_change_note(run_dir, record, resume)) is not None:
                print(f"[run] {changed}")
        inputs = StageInputs(config, run_dir, dataset, validation, device)

    for name in config.stages:
        stage_dir = run_dir / name
        if name not in untrained:
            print(f"[{name}] already trained: {stage_dir / FINAL}")
            continue
        train_config = getattr(config.train, name)
        torch.manual_seed(train_config.seed)  # the same initial weights on every run
        stage, stage_data = STAGES[name](inputs)
        train(stage, stage_data, train_config, stage_dir, device, resolved, resume=resume,
              resume_weights_only=resume_weights_only, stop=stop)
    if not assembles:
        missing = missing_for_pipeline(config, run_dir)
        if processes.is_main_process:
            print(f"[run] trained {', '.join(config.stages)}; no pipeline yet: it also needs "
                  f"{', '.join(missing)}. Train {'them' if len(missing) > 1 else 'it'} in this run folder with "
                  f"--resume --set stages=[{','.join(missing)}]")
        return None
    if processes.is_main_process:
        (assemble_finetuned if "finetune" in config.stages else assemble_pipeline)(config, run_dir)
    processes.wait_for_everyone()
    return run_dir / "pipeline"


def _check_finetune_source(config: RunConfig) -> None:
    """A missing local source model is named before anything is written, and before the data is scanned and its
    latents cached (minutes, on a large set). A hub name is fetched once, by the stage (`load_source_pipeline`)."""
    path = Path(config.finetune.model)
    if not path.is_dir() and (path.exists() or not is_hub_name(config.finetune.model)):
        raise T2IError(f"finetune.model '{config.finetune.model}' is not a folder: give a t2i pipeline or diffusers "
                       "Stable Diffusion folder")


def data_record(dataset: Dataset, validation: Dataset | None) -> dict | None:
    """How many samples the user's scanned images hold, and a fingerprint of their files, captions and settings;
    None for data that is not scanned up front (the shapes set, streamed shards)."""
    if not isinstance(dataset, ImageCaptionDataset):
        return None
    held_out = validation if isinstance(validation, ImageCaptionDataset) else None
    fingerprint = data_fingerprint(dataset) + (data_fingerprint(held_out) if held_out is not None else "")
    return {"training samples": len(dataset), "held-out samples": len(held_out) if held_out is not None else 0,
            "fingerprint": hashlib.sha256(fingerprint.encode()).hexdigest()}


@dataclass(frozen=True)
class StageInputs:
    """What every stage builder may draw on."""

    config: RunConfig
    run_dir: Path
    dataset: Dataset
    validation: Dataset | None
    device: torch.device


def _vae_stage(inputs: StageInputs):
    config = inputs.config
    return VAEStage(build_vae(config.vae, config.data.resolution), config.vae, inputs.dataset), inputs.dataset


def _clip_stage(inputs: StageInputs):
    config = inputs.config
    text_encoder = OpenClipTextEncoder.from_config(config.text_encoder, config.data.resolution)
    text_encoder.clip.token_embedding.requires_grad_(not config.text_encoder.freeze_token_embedding)
    return ClipStage(text_encoder), inputs.dataset


def _unet_stage(inputs: StageInputs):
    config, run_dir = inputs.config, inputs.run_dir
    vae = load_vae(run_dir)  # UNetStage moves it to the device, before the latents are cached
    text_encoder = load_text_encoder(config, run_dir)
    unet = build_unet(config.unet, vae.config.latent_channels, text_encoder.hidden_size,
                      config.data.resolution // config.vae.latent_factor, config.diffusion.learned_variance)
    preview = [prompt for prompt, _ in prompt_suite(config.data.held_out_pairs)][:PREVIEW_PROMPTS]
    stage = UNetStage(unet, vae, text_encoder, config.diffusion, unet_scheduler_config(config), preview,
                      inputs.device)
    return stage, _prepared_data(config, stage, inputs.dataset)


def _finetune_stage(inputs: StageInputs):
    config = inputs.config
    source = load_source_pipeline(config, inputs.device)
    if problems := data_size_problems(config.data, source.latent_factor, "the model's VAE's"):
        raise T2IError("; ".join(problems))
    trained_at_resolution(source, config.data.resolution)
    preview = list(config.finetune.validation_prompts) or _preview_captions(inputs.validation or inputs.dataset)
    stage = FinetuneStage(source, config.finetune, config.diffusion, preview, inputs.validation,
                          config.train.finetune.batch_size, inputs.device)
    return stage, _prepared_data(config, stage, inputs.dataset)


def _sr_stage(inputs: StageInputs):
    """The super-resolution stage, on the data rendered (or loaded) at sr.factor x data.resolution."""
    config = inputs.config
    high_data, _, _ = build_datasets(replace(config.data, resolution=sr_resolution(config)), None, False)
    text_encoder = load_text_encoder(config, inputs.run_dir)
    unet = build_sr_unet(config.sr, text_encoder.hidden_size, sr_resolution(config))
    measured = next(iter(DataLoader(high_data, batch_size=RESIDUAL_SAMPLE_SIZE)))["pixel_values"]
    upscaler = Upscaler(unet, pipeline_scheduler_config(config), config.sr.factor, config.sr.patch_size,
                        config.sr.residual, config.sr.max_noise_level, sr_defaults(config),
                        residual_scale(measured, config.sr.factor) if config.sr.residual else 1.0)
    preview = next(iter(DataLoader(high_data, batch_size=PREVIEW_PROMPTS)))
    stage = SRStage(upscaler, text_encoder, config.diffusion, preview, inputs.device, config.sr.min_snr_gamma)
    if config.cache_text_states and (captions := _all_captions(high_data)) is not None:
        stage.cache_text_states(captions, _cache_dir(config))
    return stage, high_data


def _classifier_stage(inputs: StageInputs):
    """The noise-aware classifier, on the U-Net's latents of the shapes data, labelled by their scenes."""
    config = inputs.config
    vae = load_vae(inputs.run_dir)
    latent_size = config.data.resolution // config.vae.latent_factor
    classifier = build_classifier(config.classifier, SHAPES_LABELS, vae.config.latent_channels, latent_size)
    held_out = ShapesDataset(CLASSIFIER_PREVIEW_SIZE, config.data.resolution, config.data.seed + 1,
                             config.data.held_out_pairs, two_object_fraction=0.0)
    preview = {"pixel_values": torch.stack([held_out[i]["pixel_values"] for i in range(len(held_out))]),
               "labels": scene_labels(held_out.scenes)}
    stage = ClassifierStage(classifier, vae, pipeline_scheduler_config(config), preview, inputs.device)
    dataset = inputs.dataset
    labels = scene_labels(dataset.scenes)  # the config admits only the shapes data to this stage
    return stage, LabelledDataset(_latents_or_images(config, stage.vae, dataset), labels)


def load_classifier(run_dir: Path) -> NoisyLatentClassifier:
    folder = run_dir / "classifier" / FINAL
    if not folder.is_dir():
        raise T2IError(f"no trained classifier at '{folder}': add 'classifier' to stages, or train it first")
    return NoisyLatentClassifier.from_pretrained(folder)


def sr_resolution(config: RunConfig) -> int:
    return config.data.resolution * config.sr.factor


def sr_defaults(config: RunConfig) -> dict:
    """The SR stage's sampling defaults, saved with it."""
    sr = config.sr
    return {"num_inference_steps": sr.steps, "guidance_scale": sr.guidance_scale, "sampler": sr.sampler,
            "noise_level": sr.noise_level}


# Stage name -> builder of (stage, the data it trains on); a new stage is one builder and one line here.
STAGES: dict[str, Callable[[StageInputs], tuple]] = {
    "vae": _vae_stage, "clip": _clip_stage, "unet": _unet_stage, "sr": _sr_stage, "finetune": _finetune_stage,
    "classifier": _classifier_stage}


def _prepared_data(config: RunConfig, stage: UNetStage, dataset: Dataset) -> Dataset:
    """The data a U-Net stage trains on, with its latents (and text states) computed once where asked and possible."""
    data = _latents_or_images(config, stage.vae, dataset)
    if config.cache_text_states:
        captions = _all_captions(dataset)
        if captions is None:
            print("text states are not cached: a streamed dataset's captions are not known up front")
        else:
            stage.cache_text_states(captions, _cache_dir(config))
    return data


def _cache_dir(config: RunConfig) -> Path | None:
    return Path(config.latent_cache_dir) if config.latent_cache_dir else None


def _all_captions(dataset: Dataset) -> list[str] | None:
    if isinstance(dataset, ShapesDataset):
        return dataset.captions
    if isinstance(dataset, ImageCaptionDataset):
        return [sample.caption for sample in dataset.samples]
    return None


def _latents_or_images(config: RunConfig, vae: AutoencoderKL, dataset: Dataset) -> Dataset:
    """The dataset encoded once by the frozen VAE, when `cache_latents` is on and every item is fixed."""
    if not config.cache_latents:
        return dataset
    if (reason := _why_items_change(dataset)) is not None:
        print(f"latents are not cached: {reason}")
        return dataset
    return cached_latents(vae, dataset, _cache_dir(config))


def _why_items_change(dataset: Dataset) -> str | None:
    """Why item i is not the same image every epoch (so that its latents cannot be computed once), or None when
    it is: the shapes data, and user images centre-cropped and unflipped, square or in aspect-ratio buckets."""
    if isinstance(dataset, ShapesDataset):
        return None
    if not isinstance(dataset, ImageCaptionDataset):
        return "a streamed dataset's images are not known up front"
    augmentations = [name for name, on in (("data.crop: random", dataset.crop != "center"),
                                           ("data.random_flip", dataset.random_flip)) if on]
    if augmentations:
        return (f"the images change from epoch to epoch ({' and '.join(augmentations)}); with data.crop: center and "
                "data.random_flip: false they are cached")
    return None


def _preview_captions(dataset: Dataset) -> list[str]:
    """Preview prompts from the data: the first captions of a map-style dataset (none from a stream)."""
    if not hasattr(dataset, "__len__"):
        return []
    return [dataset[i]["caption"] for i in range(min(PREVIEW_PROMPTS, len(dataset)))]


def load_source_pipeline(config: RunConfig, device: torch.device) -> Text2ImagePipeline:
    """The pretrained pipeline a fine-tune starts from, in fp32 (training keeps fp32 master weights)."""
    return Text2ImagePipeline.from_pretrained(resolve_model(config.finetune.model), device=device,
                                              dtype=torch.float32, allow_pickle=config.finetune.allow_pickle)


def trained_at_resolution(pipe: Text2ImagePipeline, resolution: int) -> None:
    """Record the fine-tune's training size in the U-Net's config: the fine-tuned pipeline's default image size
    (`t2i generate` without --height/--width) and that of its preview grids, instead of the source model's."""
    pipe.unet.register_to_config(sample_size=resolution // pipe.latent_factor)


def assemble_finetuned(config: RunConfig, run_dir: Path) -> Path:
    """The fine-tuned pipeline (adapters folded in) that stage finetune exported, copied to run_dir/pipeline."""
    with write_folder(run_dir / "pipeline", "pipeline") as staging:
        shutil.copytree(run_dir / "finetune" / FINAL / FINETUNED_PIPELINE, staging, dirs_exist_ok=True)
    return run_dir / "pipeline"


def assemble_pipeline(config: RunConfig, run_dir: Path) -> Path:
    unet_folder = run_dir / "unet" / FINAL
    if not unet_folder.is_dir():
        raise T2IError(f"no trained U-Net at '{unet_folder}': add 'unet' to stages")
    sampling = config.sampling
    pipe = Text2ImagePipeline(
        load_vae(run_dir), load_text_encoder(config, run_dir), UNet2DConditionModel.from_pretrained(unet_folder),
        unet_scheduler_config(config),
        defaults={"num_inference_steps": sampling.steps, "guidance_scale": sampling.guidance_scale,
                  "sampler": sampling.sampler},
        # Every optional stage trained in the folder, listed in this run's stages or an earlier one's.
        sr=load_sr(config, run_dir) if is_trained(run_dir, "sr") else None,
        classifier=load_classifier(run_dir) if is_trained(run_dir, "classifier") else None,
    )
    pipe.save_pretrained(run_dir / "pipeline")
    return run_dir / "pipeline"
