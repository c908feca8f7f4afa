"""A floor on the memory that sampling and decoding one batch take, counted from the networks' configs (diffusers'
UNet2DConditionModel and AutoencoderKL), so that a size too large for the device is refused before any work.

A floor, not an estimate: it counts only activations that the forward holds at one time by construction (the
U-Net's skip connections, a block's input with its normalised and activated copies, a transformer's feed-forward)
and leaves out the weights, allocator slack, oneDNN's reordered copies and the attention kernels' buffers. On
configs/tiny.yaml's and configs/demo.yaml's networks it came to 0.50-0.86 of the peak RSS that a guided U-Net call
or a decode added, 1024² to 4096², bf16 and fp32 (docs/performance.md, "How large an image fits"). There the
U-Net's activations, not the VAE decoder's, set the peak: 326-373 bytes per image pixel in bf16 against 143-188.

Attention adds no tokens × tokens matrix where torch's scaled_dot_product_attention takes a fused backend (flash on
CPUs, flash, memory-efficient or cuDNN on GPUs), whose buffers grow with tokens alone; only its math backend
holds the matrix, and only then is it counted.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch.nn.attention import SDPBackend

from t2i.errors import T2IError

# A ResNet block's input, its GroupNorm and its SiLU, alive together before its first convolution.
RESNET_COPIES = 3
# diffusers' BasicTransformerBlock feed-forward (GEGLU, 4x inner width) at its gating product: the transformer's
# residual, the block's own, the normalised input (1 each), the projection to value and gate (2 x 4), gelu(gate)
# and value x gelu(gate) (4 each), in channels per token.
FEED_FORWARD_COPIES = 3 + 2 * 4 + 4 + 4
# What an attention holds beside a materialised tokens x tokens matrix: its residual, normalised input, q, k, v.
ATTENTION_INPUTS = 5
# And the VAE's mid-block attention at its output: those five and the output, channels per latent pixel.
VAE_ATTENTION_COPIES = ATTENTION_INPUTS + 1

QuadraticAttention = Callable[[int], bool]  # head dim -> does self-attention of that head dim hold the matrix?


def never_quadratic(head_dim: int) -> bool:
    return False


def unet_floor(config, latent_height: int, latent_width: int,
               quadratic: QuadraticAttention = never_quadratic) -> int:
    """Elements alive at once per sample in a UNet2DConditionModel's forward on a (latent_height, latent_width)
    input. At level l (l downsamplings), the up path holds every skip connection of levels 0..l (the level's input
    and each of its layers' outputs) while its first ResNet block takes the level below's output concatenated with
    a skip; at a level with a transformer, its feed-forward instead, or the attention matrix (heads x tokens²) where
    `quadratic` says that the backend materialises it. The largest level's count."""
    channels = list(config.block_out_channels)
    levels = len(channels)
    layers = _per_level(config.layers_per_block, levels)
    heads = _per_level(config.num_attention_heads or config.attention_head_dim, levels)
    attends = ["CrossAttn" in kind for kind in config.down_block_types]
    attends[-1] |= "CrossAttn" in (config.mid_block_type or "")  # the mid block runs at the lowest level
    held = largest = 0
    for level, level_channels in enumerate(channels):
        pixels = (latent_height >> level) * (latent_width >> level)
        held += pixels * (channels[max(level - 1, 0)] + layers[level] * level_channels)
        below = channels[min(level + 1, levels - 1)]  # the lowest level's up path starts from the mid block
        block = RESNET_COPIES * (below + level_channels) * pixels
        if attends[level]:
            block = max(block, FEED_FORWARD_COPIES * level_channels * pixels)
            if quadratic(level_channels // heads[level]):
                block = max(block, ATTENTION_INPUTS * level_channels * pixels + heads[level] * pixels**2)
        largest = max(largest, held + block)
    return largest


def vae_decoder_floor(config, height: int, width: int, quadratic: QuadraticAttention = never_quadratic) -> int:
    """Elements alive at once per image in an AutoencoderKL's decoder making a height x width image: at each level,
    the first ResNet block's input (the channels of the level below, upsampled) with its normalised and activated
    copies; at the latent level, the mid block's single-head attention over latent pixels, or its tokens² matrix
    where `quadratic` says that the backend materialises it."""
    channels = list(config.block_out_channels)
    levels = len(channels)
    largest = max(RESNET_COPIES * channels[min(level + 1, levels - 1)] * (height >> level) * (width >> level)
                  for level in range(levels))
    if config.get("mid_block_add_attention", True):
        top, pixels = channels[-1], (height >> (levels - 1)) * (width >> (levels - 1))
        largest = max(largest, VAE_ATTENTION_COPIES * top * pixels)
        if quadratic(top):
            largest = max(largest, ATTENTION_INPUTS * top * pixels + pixels**2)
    return largest


def generation_floor(unet_config, vae_config, latent_factor: int, batch_size: int, height: int, width: int,
                     element_bytes: int, guided: bool = False, unet_quadratic: QuadraticAttention = never_quadratic,
                     vae_quadratic: QuadraticAttention = never_quadratic) -> int:
    """Bytes that sampling or decoding `batch_size` height x width images must hold at once, whichever is more;
    `guided`: classifier-free guidance, which runs the U-Net on twice the batch."""
    unet_batch = batch_size * (2 if guided else 1)
    unet = unet_batch * unet_floor(unet_config, height // latent_factor, width // latent_factor, unet_quadratic)
    vae = batch_size * vae_decoder_floor(vae_config, height, width, vae_quadratic)
    return max(unet, vae) * element_bytes


def upscaler_floor(unet_config, patch_size: int, factor: int, batch_size: int, height: int, width: int,
                   element_bytes: int, guided: bool = False, quadratic: QuadraticAttention = never_quadratic) -> int:
    """Bytes that the cascade's SR U-Net must hold at once to make `batch_size` images `factor` times a height x
    width input. It runs in pixel space on patch_size² patches (space to depth), so it sees an input of
    (factor·height/patch_size, factor·width/patch_size): at 2x on 2x2 patches, one the size of the low-resolution
    image, with no VAE to shrink it."""
    side_height, side_width = height * factor // patch_size, width * factor // patch_size
    unet_batch = batch_size * (2 if guided else 1)
    return unet_batch * unet_floor(unet_config, side_height, side_width, quadratic) * element_bytes


def attention_is_quadratic(device: torch.device, dtype: torch.dtype) -> QuadraticAttention:
    """Whether torch's scaled_dot_product_attention, asked of a few tokens of each head dim on `device` in `dtype`,
    picks its math backend (which holds the tokens x tokens matrix). Where torch cannot say, no: the floor then
    counts no matrix, and stays a floor."""
    choose = getattr(torch, "_fused_sdp_choice", None)  # private, but the one place that choice is made

    def quadratic(head_dim: int) -> bool:
        if choose is None:
            return False
        query = torch.zeros(1, 1, 8, head_dim, device=device, dtype=dtype)
        try:
            return SDPBackend(choose(query, query, query)) == SDPBackend.MATH
        except (RuntimeError, ValueError):
            return False

    return quadratic


@contextmanager
def out_of_memory_named(doing: str, batch_size: int, height: int, width: int, device: torch.device):
    """Torch running out of memory inside (CUDA's OutOfMemoryError, the CPU allocator refusing an allocation larger
    than the machine can give) raises one T2IError that names the size and batch, past the floor's refusal."""
    try:
        yield
    except (RuntimeError, MemoryError) as error:
        message = str(error)
        if not (isinstance(error, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in message
                or "out of memory" in message.lower()):
            raise
        cpu_request = re.search(r"tried to allocate (\d+) bytes", message)  # the CPU allocator counts bytes
        reason = (f"torch could not allocate {int(cpu_request[1]) / 2**30:.2f} GiB more" if cpu_request
                  else message.strip().splitlines()[0] if message.strip() else type(error).__name__)
        raise T2IError(f"{height}x{width} at batch {batch_size} ran out of memory while {doing} on this {device.type} "
                       f"device ({reason}); use a smaller size, or fewer images at once (a smaller batch "
                       "size)") from None


def _per_level(value: int | tuple[int, ...] | list[int], levels: int) -> list[int]:
    """diffusers' per-level settings are an int for every level or one entry per level."""
    return list(value) if isinstance(value, (tuple, list)) else [value] * levels
