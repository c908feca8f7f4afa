"""Pipeline folders on disk: t2i's own layout and diffusers' Stable Diffusion layout.

A t2i folder holds `t2i_pipeline.json` beside vae/, unet/, text_encoder/ (open_clip or Hugging Face CLIP),
tokenizer/ (Hugging Face only) and scheduler/. A folder is written under a temporary name and swapped in
when complete (t2i.atomic), so a crash never leaves a half-written pipeline, nor none, behind.
"""
from __future__ import annotations

import json
from pathlib import Path

from diffusers import AutoencoderKL, UNet2DConditionModel

from t2i.atomic import write_folder
from t2i.errors import T2IError
from t2i.models.text_encoder import HFClipTextEncoder, OpenClipTextEncoder, TextEncoder

MANIFEST = "t2i_pipeline.json"
DIFFUSERS_INDEX = "model_index.json"
SCHEDULER_CONFIG = Path("scheduler") / "scheduler_config.json"
FORMAT_VERSION = 1


def load_components(path: Path) -> dict:
    if not path.exists():
        raise T2IError(f"model folder '{path}' does not exist")
    if not path.is_dir():
        raise T2IError(f"model path '{path}' is a file; expected a pipeline folder")
    if (path / MANIFEST).is_file():
        return _load_t2i(path)
    if (path / DIFFUSERS_INDEX).is_file():
        return _load_diffusers(path)
    raise T2IError(f"'{path}' is neither a t2i pipeline (no {MANIFEST}) nor a diffusers Stable Diffusion "
                   f"folder (no {DIFFUSERS_INDEX})")


def _require(path: Path, *names: str) -> None:
    missing = [name for name in names if not (path / name).exists()]
    if missing:
        raise T2IError(f"pipeline folder '{path}' is incomplete: missing {', '.join(missing)}")


def _load_t2i(path: Path) -> dict:
    manifest = json.loads((path / MANIFEST).read_text())
    _require(path, "vae", "unet", "text_encoder", str(SCHEDULER_CONFIG))
    clip_skip = manifest.get("clip_skip", 0)
    if manifest.get("text_encoder") == HFClipTextEncoder.kind:
        text_encoder: TextEncoder = HFClipTextEncoder.from_folders(path / "text_encoder", path / "tokenizer",
                                                                   clip_skip)
    else:
        text_encoder = OpenClipTextEncoder.load(path / "text_encoder", clip_skip)
    return {
        "vae": AutoencoderKL.from_pretrained(path / "vae"),
        "text_encoder": text_encoder,
        "unet": UNet2DConditionModel.from_pretrained(path / "unet"),
        "scheduler_config": _read_scheduler_config(path),
        "defaults": manifest.get("defaults", {}),
    }


def _load_diffusers(path: Path) -> dict:
    _require(path, "vae", "unet", "text_encoder", "tokenizer", str(SCHEDULER_CONFIG))
    return {
        "vae": AutoencoderKL.from_pretrained(path / "vae"),
        "text_encoder": HFClipTextEncoder.from_folders(path / "text_encoder", path / "tokenizer"),
        "unet": UNet2DConditionModel.from_pretrained(path / "unet"),
        "scheduler_config": _read_scheduler_config(path),
        "defaults": {},
    }


def _read_scheduler_config(path: Path) -> dict:
    config = json.loads((path / SCHEDULER_CONFIG).read_text())
    return {key: value for key, value in config.items() if not key.startswith("_")}


def save_components(path: Path, vae: AutoencoderKL, text_encoder: TextEncoder, unet: UNet2DConditionModel,
                    scheduler_config: dict, defaults: dict) -> None:
    with write_folder(path, "pipeline") as staging:
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
