"""Attention at the U-Net's shapes: each of torch's SDPA backends against the one torch picks by itself.

    python scripts/bench_attention.py                                  # CPU, the `small` U-Net's shapes
    python scripts/bench_attention.py --size sd15 --device cuda        # what a GPU's default leaves on the table

The U-Net calls `scaled_dot_product_attention` with no mask in self-attention (queries = keys = the latent's
positions) and cross-attention (77 text keys). torch picks a backend by a fixed priority; this prints, for each
shape at the batch of one guided image and of `--batch` guided images, the forward's milliseconds per backend
(blank where the backend refuses the shape) and marks the default's pick, so that a switch can be justified.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import WARMUP_RUNS, timed_call, warm_median  # noqa: E402
from bench_models import SIZES  # noqa: E402

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
TEXT_TOKENS = 77


def attention_shapes(size_name: str) -> list[tuple[str, int, int, int, int]]:
    """(kind, query length, key length, heads, head dim) of every attention level of the size's U-Net: the
    levels with cross-attention (all but the lowest), at the latent resolution halved per level."""
    size = SIZES[size_name]
    latent = size.resolution // 2 ** (len(size.vae_channels) - 1)
    shapes = []
    for level, channels in enumerate(size.unet_channels[:-1]):
        heads = size.unet_heads if isinstance(size.unet_heads, int) else size.unet_heads[level]
        tokens = (latent // 2 ** level) ** 2
        shapes += [("self", tokens, tokens, heads, channels // heads),
                   ("cross", tokens, TEXT_TOKENS, heads, channels // heads)]
    return shapes


def forward_ms(query, key, value, backend, device: str, repeats: int) -> float | None:
    """Median milliseconds of one forward under `backend`; None if it refuses the inputs."""
    try:
        with sdpa_kernel([backend]), torch.inference_mode():
            times = [timed_call(device, lambda: F.scaled_dot_product_attention(query, key, value))[0]
                     for _ in range(repeats + WARMUP_RUNS)]
    except RuntimeError:  # "No available kernel": this backend does not take this shape, dtype or device
        return None
    return warm_median(times) * 1e3


def default_backend(query, key, value) -> str:
    """The backend torch picks by itself: the one whose forward gives the same output bits as the default's."""
    with torch.inference_mode():
        reference = F.scaled_dot_product_attention(query, key, value)
        for name, backend in BACKENDS.items():
            try:
                with sdpa_kernel([backend]):
                    if torch.equal(F.scaled_dot_product_attention(query, key, value), reference):
                        return name
            except RuntimeError:
                continue
    return "?"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--batch", type=int, default=8, help="guided images: the attention batch is twice this")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    print(f"size {args.size}, device {args.device}, {args.dtype}, torch {torch.__version__}; ms per forward, "
          "* = torch's own pick")
    print(f"| {'kind':<5} | {'batch':>5} | {'queries':>7} | {'keys':>5} | {'heads x dim':>11} | "
          + " | ".join(f"{name:>9}" for name in BACKENDS) + " |")
    print("|" + "---|" * (5 + len(BACKENDS)))
    generator = torch.Generator(args.device).manual_seed(0)
    for kind, queries, keys, heads, dim in attention_shapes(args.size):
        for batch in (2, 2 * args.batch):
            def draw(length):
                return torch.randn(batch, heads, length, dim, device=args.device, dtype=dtype, generator=generator)
            query, key, value = draw(queries), draw(keys), draw(keys)
            picked = default_backend(query, key, value)
            cells = []
            for name, backend in BACKENDS.items():
                ms = forward_ms(query, key, value, backend, args.device, args.repeats)
                cells.append(f"{'' if ms is None else f'{ms:.3f}'}{'*' if name == picked else ' '}")
            print(f"| {kind:<5} | {batch:>5} | {queries:>7} | {keys:>5} | {f'{heads} x {dim}':>11} | "
                  + " | ".join(f"{cell:>9}" for cell in cells) + " |")


if __name__ == "__main__":
    main()
