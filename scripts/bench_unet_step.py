"""Time one U-Net training step (forward + backward + AdamW) on random latents, for sizing CPU configs.

    python scripts/bench_unet_step.py --channels 64 128 --batch 32 --latent 8
"""
import argparse
import time

import torch

from t2i.config import UNetConfig
from t2i.models.unet import build_unet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--channels", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--cross-attention", type=int, nargs="+", default=None, help="1/0 per level")
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--latent", type=int, default=8)
    parser.add_argument("--latent-channels", type=int, default=4)
    parser.add_argument("--context", type=int, default=77)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    cross = tuple(bool(c) for c in (args.cross_attention or [1] * len(args.channels)))
    config = UNetConfig(block_out_channels=tuple(args.channels), layers_per_block=args.layers,
                        attention_heads=args.heads, cross_attention=cross)
    unet = build_unet(config, args.latent_channels, args.width, args.latent)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    x = torch.randn(args.batch, args.latent_channels, args.latent, args.latent)
    context = torch.randn(args.batch, args.context, args.width)
    t = torch.randint(0, 1000, (args.batch,))
    times = []
    for _ in range(args.steps + 2):
        started = time.perf_counter()
        loss = unet(x, t, encoder_hidden_states=context).sample.pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - started)
    params = sum(p.numel() for p in unet.parameters()) / 1e6
    median = sorted(times[2:])[len(times[2:]) // 2]
    print(f"channels={args.channels} cross={cross} batch={args.batch} latent={args.latent} context={args.context} "
          f"params={params:.2f}M step={median:.3f}s samples/s={args.batch / median:.1f}")


if __name__ == "__main__":
    main()
