"""Export a t2i pipeline as a diffusers Stable Diffusion folder, which `StableDiffusionPipeline` loads and runs.

The VAE and U-Net are diffusers models already and are saved as they are. The text encoder becomes a
`CLIPTextModel` + `CLIPTokenizer` with clip_skip baked in (t2i.models.convert). The scheduler is the pipeline's
default sampler over its own noise schedule. A U-Net with learned variances goes whole with `ddpm`, whose
DDPMScheduler reads them (`variance_type="learned_range"`); with any other sampler, which diffusers' pipeline would
hand all 2C channels, it goes without its variance half. A super-resolution stage goes along as sr/ and a classifier as
classifier/, which diffusers ignores and t2i reads back, as it does t2i_defaults.json: the pipeline's generation
defaults, with the exported sampler. The folder is written whole (t2i.atomic).
"""
from __future__ import annotations

import json
from pathlib import Path

import diffusers
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from t2i.atomic import check_replaceable, write_folder
from t2i.diffusion.samplers import LEARNED_VARIANCE_SAMPLERS, SAMPLERS, SCORE_SAMPLERS, diffusers_class
from t2i.diffusion.vlb import predicts_variance
from t2i.errors import T2IError
from t2i.models.convert import to_clip_text_model, write_vocab_and_merges
from t2i.models.text_encoder import OpenClipTextEncoder, without_transformers_bars
from t2i.pipeline.pipeline import Text2ImagePipeline
from t2i.pipeline.storage import CLASSIFIER, DIFFUSERS_DEFAULTS, PIPELINE_MARKERS, SCHEDULER_CONFIG, SR


def export_folder(model: str | Path, out: str | Path, sampler: str | None = None, allow_pickle: bool = False) -> Path:
    """Export the t2i or diffusers pipeline folder `model` to the diffusers folder `out`."""
    if Path(out).resolve() == Path(model).resolve():
        raise T2IError(f"--out '{out}' is the model folder itself; export to another folder")
    pipe = Text2ImagePipeline.from_pretrained(model, device="cpu", allow_pickle=allow_pickle)
    return export_diffusers(pipe, out, sampler)


def export_diffusers(pipe: Text2ImagePipeline, out: str | Path, sampler: str | None = None) -> Path:
    """Write `pipe` to `out` in diffusers' Stable Diffusion layout, with `sampler` (default: the pipeline's)."""
    check_no_adapters(pipe)
    pipe.check_unrounded()
    out = Path(out)
    check_replaceable(out, PIPELINE_MARKERS, "the diffusers pipeline")
    sampler = sampler or pipe.defaults["sampler"]
    text_encoder, tokenizer = to_clip_text_model(pipe.text_encoder)
    if sampler in SCORE_SAMPLERS:
        raise T2IError(f"sampler {sampler!r} is written in t2i and has no diffusers scheduler; export with --sampler "
                       f"one of {', '.join(SAMPLERS)}")
    unet, scheduler_config = pipe.unet, pipe.scheduler_config
    if predicts_variance(scheduler_config) and sampler not in LEARNED_VARIANCE_SAMPLERS:
        unet, scheduler_config = without_variance(unet), {k: v for k, v in scheduler_config.items()
                                                          if k != "variance_type"}
    scheduler = diffusers_class(sampler).from_config({**scheduler_config, **SAMPLERS[sampler][1]})
    exported = StableDiffusionPipeline(vae=pipe.vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    with write_folder(out, "the diffusers pipeline") as staging, without_transformers_bars():
        exported.save_pretrained(staging, safe_serialization=True)
        if pipe.sr is not None:
            pipe.sr.save_pretrained(staging / SR)
        if pipe.classifier is not None:
            pipe.classifier.save_pretrained(staging / CLASSIFIER)
        _write_scheduler_config(staging, sampler, scheduler_config)
        defaults = {**pipe.defaults, "sampler": sampler}
        (staging / DIFFUSERS_DEFAULTS).write_text(json.dumps(defaults, indent=2) + "\n")
        if isinstance(pipe.text_encoder, OpenClipTextEncoder):
            write_vocab_and_merges(staging / "tokenizer")
    return out


def without_variance(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """A copy of a learned-variance U-Net that outputs its prediction half alone: the first C filters of conv_out,
    the only layer that makes the variance half."""
    channels = unet.config.in_channels
    state = unet.state_dict()
    for name in ("conv_out.weight", "conv_out.bias"):
        state[name] = state[name][:channels]
    mean_only = UNet2DConditionModel.from_config({**unet.config, "out_channels": channels})
    mean_only.load_state_dict(state)
    return mean_only.to(device=unet.device, dtype=unet.dtype).eval()


def _write_scheduler_config(folder: Path, sampler: str, scheduler_config: dict) -> None:
    """Only the noise schedule and the sampler's own settings, not every default of the scheduler class.

    A scheduler's saved config lists all its defaults, some of which other scheduler classes read differently;
    keeping to the pipeline's keys means a sampler built later from this folder equals one built from the source.
    """
    settings = SAMPLERS[sampler][1]
    config = {"_class_name": diffusers_class(sampler).__name__, "_diffusers_version": diffusers.__version__,
              **scheduler_config, **settings}
    (folder / SCHEDULER_CONFIG).write_text(json.dumps(config, indent=2))


def check_no_adapters(pipe: Text2ImagePipeline) -> None:
    """The hook for LoRA export, which is not built yet: refuse a U-Net carrying peft adapters.

    Saved as it is, such a U-Net would mix adapter tensors into the base weights' file. LoRA export goes here:
    write the adapters with `StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=...)`, the
    layout diffusers' `load_lora_weights` reads, beside (or merged into) the base weights.
    """
    if getattr(pipe.unet, "peft_config", None):
        raise T2IError("this pipeline's U-Net carries LoRA adapters, and exporting them is not supported yet; "
                       "merge them into the U-Net first")
