"""How fast the pipeline's networks run: switches that change images by rounding only.

Each switch is measured on its own in docs/performance.md (`scripts/bench_generate.py`). The defaults are the
ones that were faster on every size measured there; compilation is opt-in because its first call takes tens of
seconds (later processes start warm from Inductor's on-disk cache, see `compile_cache_dir`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from t2i.errors import T2IError
from t2i.models.cuda_graph import replay_as_cuda_graphs
from t2i.models.padded_attention import pad_cross_attention
from t2i.precision import bf16_is_fast

Compile = Literal["off", "blocks", "full"]
COMPILE_MODES: tuple[str, ...] = ("off", "blocks", "full")
NETWORK_DTYPES: tuple[str, ...] = ("auto", "fp32", "bf16")
SWITCH_VALUES: tuple[str, ...] = ("auto", "on", "off")
# Compiled graphs per code object: every block shape of SD-1.5's U-Net and VAE decoder at a few batch sizes.
GRAPHS_PER_FRAME = 128
# Where Inductor keeps compiled kernels between processes, unless TORCHINDUCTOR_CACHE_DIR says otherwise.
DEFAULT_COMPILE_CACHE = Path.home() / ".cache" / "t2i" / "inductor"


@dataclass(frozen=True)
class SpeedOptions:
    """`dtype`: the networks' number format: "auto" is bf16 where it is fast (GPUs, CPUs with AMX), else fp32.
    `compile`: "off"; "blocks" compiles each U-Net and VAE-decoder block on its own (blocks of one shape share
    their compiled code: the shortest cold start); "full" compiles the U-Net and the VAE decoder whole.
    `channels_last`: NHWC activations: oneDNN's fp32 convolutions run up to 2x faster on them, but in bf16 the
    GroupNorms (kept fp32) run 4x slower, so it is off by default (docs/performance.md).
    `fuse_qkv`: one projection for query, key and value (key and value in cross-attention).
    `cuda_graphs`: replay the U-Net's forward as one captured CUDA graph per shape (t2i.models.cuda_graph), so that
    launch-bound batches (batch 1 on a large GPU) stop waiting on the CPU; "auto": on CUDA devices.
    `pad_cross_attention`: pad the text's 77 keys to 80 and mask the padding (t2i.models.padded_attention), for
    torch's CPU flash attention, which is 2x slower at key lengths off its block; "auto": on CPUs only."""

    dtype: Literal["auto", "fp32", "bf16"] = "auto"
    compile: Compile = "off"
    channels_last: bool = False
    fuse_qkv: bool = False
    cuda_graphs: Literal["auto", "on", "off"] = "auto"
    pad_cross_attention: Literal["auto", "on", "off"] = "auto"

    def __post_init__(self):
        if self.dtype not in NETWORK_DTYPES:
            raise T2IError(f"dtype must be one of {', '.join(NETWORK_DTYPES)}; got {self.dtype!r}")
        if self.compile not in COMPILE_MODES:
            raise T2IError(f"compile must be one of {', '.join(COMPILE_MODES)}; got {self.compile!r}")
        if self.cuda_graphs not in SWITCH_VALUES:
            raise T2IError(f"cuda_graphs must be one of {', '.join(SWITCH_VALUES)}; got {self.cuda_graphs!r}")
        if self.pad_cross_attention not in SWITCH_VALUES:
            raise T2IError(f"pad_cross_attention must be one of {', '.join(SWITCH_VALUES)}; "
                           f"got {self.pad_cross_attention!r}")


def network_dtype(name: str, device: torch.device) -> torch.dtype:
    """The networks' dtype by name; "auto": bf16 where it is fast on `device` (t2i.precision), else fp32."""
    if name == "auto":
        return torch.bfloat16 if bf16_is_fast(device) else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def dtype_name(dtype: torch.dtype) -> str:
    """The `--dtype` name of a network dtype ("fp32", "bf16"); other dtypes by torch's name."""
    return {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(dtype, str(dtype).removeprefix("torch."))


def compile_cache_dir() -> Path:
    """Point Inductor's on-disk caches (kernels, FX graphs, AOTAutograd) at a folder that outlives /tmp."""
    folder = Path(os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(DEFAULT_COMPILE_CACHE)))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def apply_speed_options(unet: torch.nn.Module, vae: torch.nn.Module, options: SpeedOptions,
                        device: torch.device) -> None:
    """Set up `unet` and `vae` (in place) to run as `options` say; call after moving them to their device."""
    if options.cuda_graphs == "on" and device.type != "cuda":
        raise T2IError("cuda_graphs needs a CUDA device")
    cuda_graphs = options.cuda_graphs == "on" or (options.cuda_graphs == "auto" and device.type == "cuda")
    if options.fuse_qkv:
        unet.fuse_qkv_projections()
    if options.pad_cross_attention == "on" or (options.pad_cross_attention == "auto" and device.type == "cpu"):
        pad_cross_attention(unet)
    if options.channels_last:
        unet.to(memory_format=torch.channels_last)
        vae.to(memory_format=torch.channels_last)
    unet_forward = unet.forward
    if options.compile != "off":
        compile_cache_dir()
        allow_graphs_per_frame(GRAPHS_PER_FRAME)
        # Freezing folds the (inference-only) weights into the graph as constants, which lets Inductor pre-pack
        # them for oneDNN's convolutions and matmuls on the CPU. Static shapes: one specialised graph per shape
        # (a pipeline sees a few), not Dynamo's dynamic-shape graph from the second shape on.
        settings = {"dynamic": False, "options": {"freezing": True} if device.type == "cpu" else {}}
        if options.compile == "full":
            if cuda_graphs:  # the graphs capture the compiled forward
                unet_forward = torch.compile(unet.forward, fullgraph=True, **settings)
            else:
                unet.compile(fullgraph=True, **settings)
            vae.decoder.compile(**settings)
        else:
            for module in _blocks(unet) + _blocks(vae.decoder):
                module.compile(**settings)
    if cuda_graphs:
        replay_as_cuda_graphs(unet, unet_forward)


def allow_graphs_per_frame(count: int) -> None:
    """Raise Dynamo's recompile limit (8 by default) to `count` graphs per code object; past it, a function runs
    eagerly without a word but a log line. Compiled blocks of one kind share their forward's frame, and each shape
    they see is one more graph of it: SD-1.5's U-Net and VAE decoder have 20 ResNet-block shapes at one batch size.
    A whole compiled U-Net gets one graph per batch size and resolution it is called with."""
    import torch._dynamo

    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # renamed in torch 2.6
    setattr(config, name, max(getattr(config, name), count))


def _blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated building blocks of a diffusers U-Net or VAE decoder: ResNet blocks, attention blocks
    (transformers in the U-Net, plain attention in the VAE), up- and downsamplers."""
    from diffusers.models.attention_processor import Attention
    from diffusers.models.downsampling import Downsample2D
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel
    from diffusers.models.upsampling import Upsample2D

    kinds = (ResnetBlock2D, Transformer2DModel, Upsample2D, Downsample2D)
    blocks = [m for m in model.modules() if isinstance(m, kinds)]
    inside_transformer = {id(a) for t in blocks if isinstance(t, Transformer2DModel) for a in t.modules()}
    blocks += [m for m in model.modules() if isinstance(m, Attention) and id(m) not in inside_transformer]
    return blocks
