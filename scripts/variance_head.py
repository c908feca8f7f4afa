"""Give a trained fixed-variance pipeline learned variances by training the variance half alone (Improved DDPM's
L_vlb, eq. 16's second term), so that fixed and learned variance sample from the very same mean predictions.

    python scripts/variance_head.py /tmp/dfinal/pipeline /tmp/lv-head/pipeline --steps 300

The U-Net gets the 2C-channel output of `diffusion.learned_variance`: its prediction half is the source's conv_out,
its variance half a new one (zero at first: v = 0, half-way between β̃_t and β_t in log). Only that half trains, on
the demo config's data, through the unet stage's own loss (t2i.training.stages.unet); its L_simple gradient, which
reaches the prediction filters alone, is masked out. A cheap stand-in for training the whole U-Net with
`--set diffusion.learned_variance=true` (stage unet), which differs in that the mean then trains on L_hybrid too.
"""
import argparse
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from t2i.config import PACKAGED_CONFIGS, load_config
from t2i.data.build import build_datasets
from t2i.data.latents import cached_latents
from t2i.diffusion.vlb import LEARNED_RANGE
from t2i.pipeline import Text2ImagePipeline
from t2i.training.randomness import BatchRandomness
from t2i.training.stages.unet import UNetStage


def with_variance_half(unet):
    """A copy of `unet` whose conv_out also outputs a variance half, zero-initialised; only that half trains."""
    from diffusers import UNet2DConditionModel

    channels = unet.config.out_channels
    learned = UNet2DConditionModel.from_config({**unet.config, "out_channels": 2 * channels})
    state = unet.state_dict()
    for name in ("conv_out.weight", "conv_out.bias"):
        state[name] = torch.cat([state[name], torch.zeros_like(state[name])])
    learned.load_state_dict(state)
    learned.requires_grad_(False)
    learned.conv_out.requires_grad_(True)
    mask = torch.cat([torch.zeros(channels), torch.ones(channels)])
    learned.conv_out.weight.register_hook(lambda grad: grad * mask.reshape(-1, 1, 1, 1))
    learned.conv_out.bias.register_hook(lambda grad: grad * mask)
    return learned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="a trained t2i pipeline folder (fixed variance)")
    parser.add_argument("out", type=Path, help="where the learned-variance pipeline goes")
    parser.add_argument("--config", default=str(PACKAGED_CONFIGS / "demo.yaml"), help="its run config (the data)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()
    config = load_config(args.config, ["diffusion.learned_variance=true"])
    source = Text2ImagePipeline.from_pretrained(args.source, device="cpu", dtype=torch.float32)
    unet = with_variance_half(source.unet).train()
    scheduler_config = {**source.scheduler_config, "variance_type": LEARNED_RANGE}
    stage = UNetStage(unet, source.vae, source.text_encoder, config.diffusion, scheduler_config, [],
                      torch.device("cpu"))
    dataset, _, _ = build_datasets(config.data)
    stage.cache_text_states(dataset.captions, None)
    data = cached_latents(source.vae, dataset, None)
    generator = torch.Generator().manual_seed(0)
    batches = iter(DataLoader(data, batch_size=args.batch_size, shuffle=True, generator=generator, drop_last=True))
    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        loss, metrics = stage.loss(unet, next(batches), BatchRandomness(torch.Generator().manual_seed(step)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 20 == 0:
            print(f"step {step}: L_vlb {metrics['vlb_bits_per_dim']:.5f} bits/dim, "
                  f"{time.perf_counter() - started:.0f} s", flush=True)
    Text2ImagePipeline(source.vae, source.text_encoder, unet.eval(), scheduler_config,
                       source.defaults).save_pretrained(args.out)


if __name__ == "__main__":
    main()
