"""Generation parameters as the PNG text chunk `parameters` that AUTOMATIC1111 and ComfyUI read, and back.

    a large red circle
    Negative prompt: blurry
    Steps: 30, Sampler: Euler a, CFG scale: 7.5, Seed: 42, Size: 512x512, Model hash: 1a2b3c4d5e, Model: pipeline

A value holding ',', ':' or a newline is written as a JSON string, as A1111 does. Guidance is written with all
its digits, so that parsing gives back the exact float and `t2i generate --from-image` the exact image.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from t2i.errors import T2IError

PNG_KEY = "parameters"
MODEL_HASH_LENGTH = 10  # as A1111's "Model hash"
A1111_SAMPLERS = {"ddpm": "DDPM", "ddim": "DDIM", "dpmpp_2m": "DPM++ 2M", "dpmpp_sde": "DPM++ SDE", "euler": "Euler",
                  "euler_a": "Euler a", "heun": "Heun", "heun_karras": "Heun Karras", "lms": "LMS", "unipc": "UniPC",
                  # Samplers A1111 lacks keep t2i's own names, so that the text still names them exactly.
                  "pc": "pc", "annealed_langevin": "annealed_langevin", "pf_ode": "pf_ode"}
T2I_SAMPLERS = {a1111: name for name, a1111 in A1111_SAMPLERS.items()}
NEGATIVE_PREFIX = "Negative prompt: "
# A1111's own pattern for one "Key: value" pair of the last line.
PAIR = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def model_hash(model_dir: Path) -> str:
    """sha256 of the U-Net weights file, truncated: cheap next to loading, and stable across copies."""
    if not model_dir.is_dir():
        raise T2IError(f"model folder '{model_dir}' does not exist")
    weights = sorted((model_dir / "unet").glob("*.safetensors")) or sorted((model_dir / "unet").glob("*.bin"))
    if not weights:
        raise T2IError(f"no U-Net weights file in '{model_dir / 'unet'}'")
    digest = hashlib.sha256()
    with open(weights[0], "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:MODEL_HASH_LENGTH]


def format_parameters(task, model_name: str, model_hash: str) -> str:
    pairs = {"Steps": task.steps, "Sampler": A1111_SAMPLERS[task.sampler], "CFG scale": _exact(task.guidance),
             "Seed": task.seed, "Size": f"{task.width}x{task.height}", "Model hash": model_hash, "Model": model_name}
    lines = [task.prompt]
    if task.negative_prompt:
        lines.append(NEGATIVE_PREFIX + task.negative_prompt)
    lines.append(", ".join(f"{key}: {_quoted(str(value))}" for key, value in pairs.items()))
    return "\n".join(lines)


def parse_parameters(text: str) -> dict:
    """The generation arguments of a `parameters` text: prompt, negative_prompt, steps, guidance, seed, ..."""
    *head, last = text.strip("\n").split("\n")
    pairs = {key.strip(): _unquoted(value) for key, value in PAIR.findall(last)}
    missing = [key for key in ("Steps", "Sampler", "CFG scale", "Seed", "Size") if key not in pairs]
    if not head or missing:
        raise T2IError(f"the image's parameters lack {', '.join(missing) or 'a prompt'}; is it a t2i or A1111 PNG?")
    negative_at = next((i for i, line in enumerate(head) if line.startswith(NEGATIVE_PREFIX)), len(head))
    negative = "\n".join(head[negative_at:])[len(NEGATIVE_PREFIX):]
    if pairs["Sampler"] not in T2I_SAMPLERS:
        raise T2IError(f"sampler {pairs['Sampler']!r} has no t2i equivalent; t2i has {', '.join(T2I_SAMPLERS)}")
    try:
        width, height = (int(side) for side in pairs["Size"].split("x"))
        return {"prompt": "\n".join(head[:negative_at]), "negative_prompt": negative,
                "steps": int(pairs["Steps"]), "sampler": T2I_SAMPLERS[pairs["Sampler"]],
                "guidance": float(pairs["CFG scale"]), "seed": int(pairs["Seed"]), "height": height, "width": width,
                "model_hash": pairs.get("Model hash"), "model": pairs.get("Model")}
    except ValueError as error:
        raise T2IError(f"the image's parameters are malformed: {error}") from None


def read_png_parameters(path: Path) -> dict:
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise T2IError(f"image '{path}' " + ("is a folder, not an image file" if path.is_dir() else "does not exist"))
    try:
        with Image.open(path) as image:
            text = image.info.get(PNG_KEY) if image.format == "PNG" else None
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as error:
        raise T2IError(f"cannot read image '{path}': {error}") from None
    if text is None:
        raise T2IError(f"'{path}' holds no '{PNG_KEY}' text chunk; only PNGs written by t2i batch or A1111 do")
    return parse_parameters(text)


def _exact(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _quoted(value: str) -> str:
    return json.dumps(value) if any(char in value for char in ',:\n"') else value


def _unquoted(value: str) -> str:
    value = value.strip()
    if not value.startswith('"'):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        raise T2IError(f"the image's parameters are malformed: unterminated quoted value {value!r}") from None
