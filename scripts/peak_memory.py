"""Peak memory of one sampling step or one decode at a size, against the floor that `check_memory` refuses by.

    ulimit -v 12000000; python scripts/peak_memory.py unet bf16 2048          # configs/tiny.yaml, random weights
    ulimit -v 12000000; python scripts/peak_memory.py vae fp32 4096 --config configs/demo.yaml
    ulimit -v 8000000; python scripts/peak_memory.py attention fp32 16384 --math

`unet`: one guided U-Net call (batch 1, so 2 with guidance) through `pipe.denoise`; `vae`: one `vae.decode`; each
prints the peak RSS it added to the loaded pipeline (`ru_maxrss`, so one process per measurement) beside
t2i.pipeline.memory's floor for it. The networks run as `t2i generate --dtype` runs them (`speed_up`). Attention
is replaced by a stand-in that returns its output's shape, unless `--real-attention`: torch's CPU flash attention
adds a few MiB (`attention` below) but its time grows with tokens², hours at 4096² on two cores.
`attention`: one scaled_dot_product_attention of SIZE tokens at the tiny U-Net's shape (2 samples, 2 heads of 16),
with torch's own backend choice or `--math`, and the peak RSS it added beyond its inputs.

Run each under `ulimit -v` (kilobytes): a size that does not fit then fails with torch's allocation error instead
of drawing the OOM killer onto the machine's other processes.
"""
from __future__ import annotations

import argparse
import resource
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

MiB = 2**20
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports kilobytes


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["unet", "vae", "attention"])
    parser.add_argument("dtype", choices=sorted(DTYPES))
    parser.add_argument("size", type=int, help="image side in pixels; for `attention`, tokens")
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--real-attention", action="store_true")
    parser.add_argument("--math", action="store_true", help="attention: torch's math backend only")
    return parser.parse_args(argv)


def build_pipeline(config_path: str, overrides: list[str], dtype: str):
    from t2i.config import load_config
    from t2i.diffusion.schedules import scheduler_config
    from t2i.models.text_encoder import OpenClipTextEncoder
    from t2i.models.unet import build_unet
    from t2i.models.vae import build_vae
    from t2i.pipeline import Text2ImagePipeline
    from t2i.pipeline.speed import SpeedOptions

    config = load_config(config_path, overrides)
    torch.manual_seed(0)
    vae = build_vae(config.vae, config.data.resolution)
    text_encoder = OpenClipTextEncoder.from_config(config.text_encoder, config.data.resolution)
    unet = build_unet(config.unet, config.vae.latent_channels, text_encoder.hidden_size,
                      config.data.resolution // config.vae.latent_factor)
    schedule = scheduler_config(config.diffusion.schedule, config.diffusion.num_train_timesteps, "epsilon")
    pipe = Text2ImagePipeline(vae, text_encoder, unet, schedule).to("cpu")
    return pipe.speed_up(SpeedOptions(dtype=dtype))


@torch.inference_mode()
def measure_network(args: argparse.Namespace) -> str:
    from t2i.pipeline.memory import unet_floor, vae_decoder_floor

    if not args.real_attention:
        F.scaled_dot_product_attention = lambda query, key, value, *rest, **options: torch.zeros_like(query)
    pipe = build_pipeline(args.config, args.overrides, args.dtype)
    size, factor = args.size, pipe.latent_factor
    context, negative = pipe.encode_prompts(["a red circle"]), pipe.encode_prompts([""])
    latents = torch.randn(1, pipe.vae.config.latent_channels, size // factor, size // factor).to(pipe.dtype)
    base, started = peak_rss(), time.perf_counter()
    if args.part == "unet":
        pipe.denoise(context, negative, [0], 1, 7.5, size, size, "euler")
        floor = 2 * unet_floor(pipe.unet.config, size // factor, size // factor)
    else:
        pipe.vae.decode(latents)
        floor = vae_decoder_floor(pipe.vae.config, size, size)
    added, floor = peak_rss() - base, floor * pipe.dtype.itemsize
    return (f"{args.part} {args.dtype} {size}x{size}: +{added / MiB:,.0f} MiB peak RSS ({added / size**2:.0f} B/px), "
            f"floor {floor / MiB:,.0f} MiB ({floor / added:.2f} of it), {time.perf_counter() - started:.0f} s")


@torch.inference_mode()
def measure_attention(args: argparse.Namespace) -> str:
    query, key, value = (torch.randn(2, 2, args.size, 16, dtype=DTYPES[args.dtype]) for _ in range(3))
    torch.zeros_like(query)  # the output's pages, so that the baseline holds them
    base = peak_rss()
    backends = [SDPBackend.MATH] if args.math else [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]
    try:
        with sdpa_kernel(backends):
            F.scaled_dot_product_attention(query, key, value)
        outcome = "ran"
    except RuntimeError as error:
        outcome = f"failed: {str(error).splitlines()[0][:120]}"
    matrix = 2 * 2 * args.size**2 * 4
    return (f"attention {'math' if args.math else 'default'} {args.dtype} {args.size} tokens: "
            f"+{(peak_rss() - base) / MiB:,.0f} MiB beyond its inputs (an fp32 matrix: {matrix / MiB:,.0f} MiB), "
            f"{outcome}")


def main(argv=None) -> None:
    args = parse_args(argv)
    print(measure_attention(args) if args.part == "attention" else measure_network(args), flush=True)


if __name__ == "__main__":
    main()
