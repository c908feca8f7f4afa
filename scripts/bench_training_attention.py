"""Attention's forward and backward under bf16 autocast, as training runs it on a CPU: matmul against SDPA.

    python scripts/bench_training_attention.py                       # heads of dim 8, 40, 80, 160; 16 to 4,096 keys
    python scripts/bench_training_attention.py --dims 40 --tokens 1024 4096

For each (head dim, positions) it times one diffusers `Attention` layer, self-attention over the positions and
cross-attention over 77 text tokens, with diffusers' `AttnProcessor` (softmax(QKᵀ)V by batched matmuls) and
`AttnProcessor2_0` (scaled_dot_product_attention, flash on a CPU), and marks which one t2i's training loop
picks (`t2i.models.cpu_attention`: matmul up to `MATMUL_MAX_KEYS` keys). The batch shrinks as the positions grow
(`--rows` positions in all, at most 48 images), as a U-Net's batch does at higher resolutions.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import WARMUP_RUNS, timed_call, warm_median  # noqa: E402
from t2i.models.cpu_attention import MATMUL_MAX_KEYS  # noqa: E402

TEXT_TOKENS, TEXT_WIDTH, HEADS = 77, 64, 8


def step_ms(attention: Attention, image: torch.Tensor, text: torch.Tensor | None, repeats: int) -> float:
    """Median milliseconds of one forward and backward under bf16 autocast."""
    def step():
        with torch.autocast("cpu", torch.bfloat16):
            output = attention(image, encoder_hidden_states=text)
        output.float().square().mean().backward()

    return warm_median([timed_call("cpu", step)[0] for _ in range(repeats + WARMUP_RUNS)]) * 1e3


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", type=int, nargs="+", default=[8, 40, 80, 160], help="head dims (8 heads)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[16, 64, 256, 512, 1024, 4096],
                        help="image positions (latent height × width)")
    parser.add_argument("--rows", type=int, default=4096, help="batch × positions")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ms per forward + backward (bf16 autocast), "
          f"* = t2i's pick (matmul up to {MATMUL_MAX_KEYS} keys)")
    print("| kind | head dim | batch | positions | keys | matmul | SDPA | matmul / SDPA |")
    print("|---|---|---|---|---|---|---|---|")
    for dim in args.dims:
        for tokens in args.tokens:
            batch = max(1, min(48, args.rows // tokens))
            for kind in ("self", "cross"):
                cross = kind == "cross"
                attention = Attention(HEADS * dim, cross_attention_dim=TEXT_WIDTH if cross else None, heads=HEADS,
                                      dim_head=dim)
                image = torch.randn(batch, tokens, HEADS * dim, requires_grad=True)
                text = torch.randn(batch, TEXT_TOKENS, TEXT_WIDTH) if cross else None
                keys = TEXT_TOKENS if cross else tokens
                times = {}
                for name, processor in (("matmul", AttnProcessor()), ("sdpa", AttnProcessor2_0())):
                    attention.set_processor(processor)
                    times[name] = step_ms(attention, image, text, args.repeats)
                pick = "matmul" if keys <= MATMUL_MAX_KEYS else "sdpa"
                cells = [f"{times[name]:.2f}{'*' if name == pick else ''}" for name in ("matmul", "sdpa")]
                print(f"| {kind} | {dim} | {batch} | {tokens} | {keys} | {cells[0]} | {cells[1]} | "
                      f"{times['matmul'] / times['sdpa']:.2f} |")


if __name__ == "__main__":
    main()
