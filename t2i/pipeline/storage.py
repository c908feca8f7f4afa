"""Pipeline folders on disk: t2i's own layout and diffusers' Stable Diffusion layout.

A t2i folder holds `t2i_pipeline.json` beside vae/, unet/, text_encoder/ (open_clip or Hugging Face CLIP),
tokenizer/ (Hugging Face only) and scheduler/. A diffusers folder's generation defaults are those `t2i export` wrote
to `t2i_defaults.json` (diffusers ignores the file), else the sampler its scheduler describes. Either layout may
hold sr/, the cascade's optional super-resolution stage (t2i.pipeline.upscaler), and classifier/, the optional
noise-aware classifier of classifier guidance (t2i.models.classifier), which diffusers itself ignores. A folder is
written under a temporary name and swapped in when complete (t2i.atomic), so a crash never leaves a half-written
pipeline, nor none, behind.
"""
from __future__ import annotations

import json
from pathlib import Path

from diffusers import AutoencoderKL, UNet2DConditionModel

from t2i.atomic import check_replaceable, write_folder
from t2i.diffusion.samplers import sampler_of_scheduler
from t2i.errors import T2IError
from t2i.models import weight_files
from t2i.models.classifier import NoisyLatentClassifier
from t2i.models.text_encoder import HFClipTextEncoder, OpenClipTextEncoder, TextEncoder
from t2i.pipeline.upscaler import Upscaler

MANIFEST = "t2i_pipeline.json"
DIFFUSERS_INDEX = "model_index.json"
DIFFUSERS_DEFAULTS = "t2i_defaults.json"
SCHEDULER_CONFIG = Path("scheduler") / "scheduler_config.json"
FORMAT_VERSION = 1
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' LoRA file, as `t2i finetune` writes it
PIPELINE_MARKERS = (MANIFEST, DIFFUSERS_INDEX)  # a folder holding either is a pipeline, which a new one may replace
SR = "sr"
CLASSIFIER = "classifier"
COMPONENT_NAMES = {"vae": "VAE", "unet": "U-Net", CLASSIFIER: "classifier"}


def load_components(path: Path, allow_pickle: bool = False) -> dict:
    """The components of a t2i or diffusers pipeline folder; pickle weights only when `allow_pickle`."""
    if not path.exists():
        raise T2IError(f"model folder '{path}' does not exist")
    if not path.is_dir():
        raise T2IError(f"model path '{path}' is a file; expected a pipeline folder")
    if (path / MANIFEST).is_file():
        return {**_load_t2i(path, allow_pickle), **_load_optional(path, allow_pickle)}
    if (path / DIFFUSERS_INDEX).is_file():
        return {**_load_diffusers(path, allow_pickle), **_load_optional(path, allow_pickle)}
    raise T2IError(f"'{path}' is neither a t2i pipeline (no {MANIFEST}) nor a diffusers Stable Diffusion "
                   f"folder (no {DIFFUSERS_INDEX}){_what_it_is(path)}")


def _what_it_is(path: Path) -> str:
    """For a folder that is not a pipeline, what it holds instead when a user may have taken it for one: a
    fine-tune's LoRA adapters, or a run folder with its pipeline inside."""
    if (path / LORA_WEIGHTS).is_file():
        return (f"; it holds LoRA adapters ({LORA_WEIGHTS}) only. Use the fine-tuned pipeline with them merged in "
                "(OUT/pipeline of `t2i finetune`), or load them onto their base model with diffusers' "
                "load_lora_weights")
    inner = path / "pipeline"
    if any((inner / marker).is_file() for marker in PIPELINE_MARKERS):
        return f"; the pipeline is in '{inner}'"
    return ""


def _require(path: Path, *names: str) -> None:
    missing = [name for name in names if not (path / name).exists()]
    if missing:
        raise T2IError(f"pipeline folder '{path}' is incomplete: missing {', '.join(missing)}")


def _load_t2i(path: Path, allow_pickle: bool) -> dict:
    manifest = weight_files.check_json(path / MANIFEST, path)
    _require(path, "vae", "unet", "text_encoder", str(SCHEDULER_CONFIG))
    clip_skip = manifest.get("clip_skip", 0)
    if manifest.get("text_encoder") == HFClipTextEncoder.kind:
        text_encoder: TextEncoder = _load_hf_text_encoder(path, allow_pickle, clip_skip)
    else:
        weight_files.check_component(path / "text_encoder", path, allow_pickle)
        with weight_files.loading(path, "open_clip text encoder", path / "text_encoder"):
            text_encoder = OpenClipTextEncoder.load(path / "text_encoder", clip_skip)
    return {
        "vae": _load_diffusers_model(AutoencoderKL, path, "vae", allow_pickle),
        "text_encoder": text_encoder,
        "unet": _load_diffusers_model(UNet2DConditionModel, path, "unet", allow_pickle),
        "scheduler_config": _read_scheduler_config(path),
        "defaults": manifest.get("defaults", {}),
    }


def _load_diffusers(path: Path, allow_pickle: bool) -> dict:
    weight_files.check_json(path / DIFFUSERS_INDEX, path)
    _require(path, "vae", "unet", "text_encoder", "tokenizer", str(SCHEDULER_CONFIG))
    return {
        "vae": _load_diffusers_model(AutoencoderKL, path, "vae", allow_pickle),
        "text_encoder": _load_hf_text_encoder(path, allow_pickle),
        "unet": _load_diffusers_model(UNet2DConditionModel, path, "unet", allow_pickle),
        "scheduler_config": _read_scheduler_config(path),
        "defaults": _diffusers_defaults(path),
    }


def _diffusers_defaults(path: Path) -> dict:
    if (path / DIFFUSERS_DEFAULTS).is_file():
        return weight_files.check_json(path / DIFFUSERS_DEFAULTS, path)
    sampler = sampler_of_scheduler(weight_files.check_json(path / SCHEDULER_CONFIG, path))
    return {} if sampler is None else {"sampler": sampler}


def _load_diffusers_model(model_class, path: Path, component: str, allow_pickle: bool):
    folder = path / component
    weight_files.check_component(folder, path, allow_pickle)
    with weight_files.loading(path, COMPONENT_NAMES[component], folder):
        # use_safetensors=None prefers safetensors and falls back to pickle; True refuses pickle.
        return model_class.from_pretrained(folder, use_safetensors=None if allow_pickle else True)


def _load_hf_text_encoder(path: Path, allow_pickle: bool, clip_skip: int = 0) -> HFClipTextEncoder:
    for component in ("text_encoder", "tokenizer"):
        if (path / component).is_dir():
            weight_files.check_component(path / component, path, allow_pickle)
    with weight_files.loading(path, "text encoder and tokenizer", path / "text_encoder", path / "tokenizer"):
        return HFClipTextEncoder.from_folders(path / "text_encoder", path / "tokenizer", clip_skip, allow_pickle)


def _load_optional(path: Path, allow_pickle: bool) -> dict:
    """The components a folder of either layout may hold beside the diffusers ones: sr/ and classifier/."""
    return {"sr": _load_sr(path, allow_pickle), "classifier": _load_classifier(path, allow_pickle)}


def _load_sr(path: Path, allow_pickle: bool) -> Upscaler | None:
    return Upscaler.from_pretrained(path / SR, path, allow_pickle) if (path / SR).is_dir() else None


def _load_classifier(path: Path, allow_pickle: bool) -> NoisyLatentClassifier | None:
    if not (path / CLASSIFIER).is_dir():
        return None
    return _load_diffusers_model(NoisyLatentClassifier, path, CLASSIFIER, allow_pickle)


def _read_scheduler_config(path: Path) -> dict:
    config = weight_files.check_json(path / SCHEDULER_CONFIG, path)
    return {key: value for key, value in config.items() if not key.startswith("_")}


def save_components(path: Path, vae: AutoencoderKL, text_encoder: TextEncoder, unet: UNet2DConditionModel,
                    scheduler_config: dict, defaults: dict, sr: Upscaler | None = None,
                    classifier: NoisyLatentClassifier | None = None) -> None:
    check_replaceable(path, PIPELINE_MARKERS, "a pipeline")
    with write_folder(path, "pipeline") as staging:
        if sr is not None:
            sr.save_pretrained(staging / SR)
        if classifier is not None:
            classifier.save_pretrained(staging / CLASSIFIER)
        vae.save_pretrained(staging / "vae")
        unet.save_pretrained(staging / "unet")
        if isinstance(text_encoder, HFClipTextEncoder):
            text_encoder.save(staging / "text_encoder", staging / "tokenizer")
        else:
            text_encoder.save(staging / "text_encoder")
        (staging / SCHEDULER_CONFIG).parent.mkdir()
        (staging / SCHEDULER_CONFIG).write_text(json.dumps(scheduler_config, indent=2))
        manifest = {"format": "t2i-pipeline", "version": FORMAT_VERSION, "text_encoder": text_encoder.kind,
                    "clip_skip": text_encoder.clip_skip, "defaults": defaults}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
