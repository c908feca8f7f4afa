"""Generation speed: t2i against diffusers' StableDiffusionPipeline on the same weights, side by side.

    python scripts/bench_generate.py --size small                  # CPU; the table in docs/performance.md
    python scripts/bench_generate.py --size small --dtype fp32     # one switch at a time: --compile, ...
    python scripts/bench_generate.py --size sd15 --device cuda --steps 30 --guidance 7.5

A random-weight Stable Diffusion folder of the named size (scripts/bench_models.py) is built once and loaded by
both pipelines. In one process, runs alternate between them on the same prompts and seeds: images/s at batch 8
and seconds per image at batch 1, and the worst pixel difference between their images. Then fresh processes
time the cold start (load plus the first image, compilation included) with an empty and with a warm compile
cache, and report peak memory (a batch of `--batch` after the first image).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_models import SIZES, build_pipeline_folder  # noqa: E402

PROMPTS = ["a red circle on a blue background", "a watercolor of a lighthouse at dusk", "a small green cube",
           "portrait of a cat wearing a hat", "a city street in the rain", "a bowl of fruit, oil painting",
           "an astronaut riding a horse", "mountains above a lake at sunrise"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=3, help="alternating timed runs of each pipeline")
    parser.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                        help="t2i's network dtype (auto: t2i's default for the device)")
    parser.add_argument("--compile", choices=["off", "blocks", "full"], default="off")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--fuse-qkv", action="store_true")
    parser.add_argument("--cuda-graphs", choices=["auto", "on", "off"], default="auto",
                        help="replay the U-Net as CUDA graphs (auto: on CUDA)")
    parser.add_argument("--pad-cross-attention", choices=["auto", "on", "off"], default="auto")
    parser.add_argument("--models-dir", type=Path, default=Path(tempfile.gettempdir()) / "t2i-bench-models")
    parser.add_argument("--no-cold", action="store_true", help="skip the cold-start processes")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--cold", choices=["t2i", "diffusers"], help=argparse.SUPPRESS)  # child process mode
    return parser.parse_args(argv)


def load_diffusers(folder: Path, device: str, dtype: torch.dtype | None = None):
    from diffusers import StableDiffusionPipeline

    from t2i.diffusion.samplers import SAMPLERS

    # diffusers as its users run it: fp32 on the CPU, bf16 on a GPU.
    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    pipe = StableDiffusionPipeline.from_pretrained(folder, dtype=dtype, safety_checker=None,
                                                   requires_safety_checker=False).to(device)
    scheduler_class, settings = SAMPLERS["dpmpp_2m"]
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config, **settings)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_t2i(folder: Path, args: argparse.Namespace):
    from t2i import Text2ImagePipeline
    from t2i.pipeline.speed import SpeedOptions

    options = SpeedOptions(dtype=args.dtype, compile=args.compile, channels_last=args.channels_last,
                           fuse_qkv=args.fuse_qkv, cuda_graphs=args.cuda_graphs,
                           pad_cross_attention=args.pad_cross_attention)
    return Text2ImagePipeline.from_pretrained(folder, device=args.device).speed_up(options)


def generate(name: str, pipe, count: int, args: argparse.Namespace) -> np.ndarray:
    """`count` images as uint8 (N, H, W, 3); image i from seed i in both pipelines."""
    prompts = (PROMPTS * count)[:count]
    if name == "diffusers":
        generators = [torch.Generator("cpu").manual_seed(i) for i in range(count)]
        images = pipe(prompts, num_inference_steps=args.steps, guidance_scale=args.guidance, generator=generators,
                      output_type="np").images
        return (images * 255).round().astype(np.uint8)
    images = pipe(prompts, num_inference_steps=args.steps, guidance_scale=args.guidance, seed=list(range(count)),
                  sampler="dpmpp_2m")
    return np.stack([np.asarray(image) for image in images])


def timed_call(device: str | torch.device, work):
    """(wall seconds, result) of `work()`, waiting for the device's queue before and after."""
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    started = time.perf_counter()
    result = work()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - started, result


WARMUP_RUNS = 2


def warm_median(times: list[float]) -> float:
    """The median of `times` after its first WARMUP_RUNS (allocations, kernel choice, caches)."""
    warm = sorted(times[WARMUP_RUNS:])
    return warm[len(warm) // 2]


def timed(name: str, pipe, count: int, args: argparse.Namespace) -> tuple[float, np.ndarray]:
    return timed_call(args.device, lambda: generate(name, pipe, count, args))


def t2i_parts(pipe, args: argparse.Namespace) -> dict[str, float]:
    """Median seconds of each part of one t2i image (batch 1): the text encoder (prompt and negative prompt), the
    denoising loop, the VAE decoder; so that the batch-1 time can be spent where it goes."""
    size = pipe.default_size
    parts: dict[str, list[float]] = {"text": [], "denoise": [], "decode": []}
    for _ in range(args.repeats):
        elapsed, (context, negative) = timed_call(
            args.device, lambda: (pipe.encode_prompts(PROMPTS[:1]), pipe.encode_prompts([""])))
        parts["text"].append(elapsed)
        elapsed, latents = timed_call(args.device, lambda: pipe.denoise(
            context, negative, [0], args.steps, args.guidance, size, size, "dpmpp_2m"))
        parts["denoise"].append(elapsed)
        parts["decode"].append(timed_call(args.device, lambda: pipe.decode(latents))[0])
    return {name: float(np.median(times)) for name, times in parts.items()}


def peak_memory_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    # VmHWM: this process's own peak; getrusage's ru_maxrss would carry the parent's over exec.
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cold_start(name: str, folder: Path, args: argparse.Namespace) -> None:
    """Child process: load, first image (timed together), then one batch for the peak memory; print JSON."""
    started = time.perf_counter()
    pipe = load_diffusers(folder, args.device) if name == "diffusers" else load_t2i(folder, args)
    with torch.inference_mode():
        timed(name, pipe, 1, args)
        cold = time.perf_counter() - started
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        timed(name, pipe, args.batch, args)
    print(json.dumps({"cold_start_s": cold, "peak_memory_mb": peak_memory_mb(args.device)}))


def run_cold(name: str, cache_dir: Path, argv: list[str]) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache_dir)}
    result = subprocess.run([sys.executable, __file__, *argv, "--cold", name], env=env, capture_output=True,
                            text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"the cold-start process for {name} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    folder = build_pipeline_folder(args.size, args.models_dir / args.size)
    if args.cold:
        cold_start(args.cold, folder, args)
        return
    pipes = {"diffusers": load_diffusers(folder, args.device), "t2i": load_t2i(folder, args)}
    times: dict[str, dict[int, list[float]]] = {name: {args.batch: [], 1: []} for name in pipes}
    images: dict[str, np.ndarray] = {}
    with torch.inference_mode():
        for name, pipe in pipes.items():  # warm-up (and, for t2i with --compile, compilation)
            generate(name, pipe, args.batch, args)
            generate(name, pipe, 1, args)
        for _ in range(args.repeats):
            for count in (args.batch, 1):
                for name, pipe in pipes.items():
                    elapsed, batch_images = timed(name, pipe, count, args)
                    times[name][count].append(elapsed)
                    if count == args.batch:
                        images[name] = batch_images
        parts = t2i_parts(pipes["t2i"], args)
    figures = {name: {"images_per_s": args.batch / float(np.median(times[name][args.batch])),
                      "s_per_image_b1": float(np.median(times[name][1]))} for name in pipes}
    figures["t2i"]["parts_b1_s"] = parts
    del pipes
    worst = worst_differences(images, folder, args)
    if not args.no_cold:
        child_argv = [a for a in argv if a != "--no-cold"]
        for name in ("diffusers", "t2i"):
            with tempfile.TemporaryDirectory() as cache:
                empty = run_cold(name, Path(cache), child_argv)
                warm = run_cold(name, Path(cache), child_argv)
            figures[name].update(cold_start_empty_s=empty["cold_start_s"], cold_start_warm_s=warm["cold_start_s"],
                                 peak_memory_mb=warm["peak_memory_mb"])
    report(args, figures, worst)


def worst_differences(images: dict[str, np.ndarray], folder: Path, args: argparse.Namespace) -> dict[str, int]:
    """The worst pixel difference of each pipeline's batch from diffusers' fp32 images (the reference).

    On the CPU diffusers' timed run is the fp32 reference. On a GPU it runs in bf16 with bf16 latents, whose
    rounding alone moves its own images; so an fp32 diffusers run makes the reference there, and both are compared
    with it."""
    if args.device == "cpu":
        return {"t2i": int(np.abs(images["t2i"].astype(int) - images["diffusers"].astype(int)).max())}
    reference_pipe = load_diffusers(folder, args.device, torch.float32)
    with torch.inference_mode():
        reference = generate("diffusers", reference_pipe, args.batch, args).astype(int)
    del reference_pipe
    return {name: int(np.abs(batch.astype(int) - reference).max()) for name, batch in images.items()}


def report(args: argparse.Namespace, figures: dict, worst: dict[str, int]) -> None:
    size = SIZES[args.size]
    print(f"\nsize {args.size} ({size.resolution} px), device {args.device}, {torch.get_num_threads()} threads, "
          f"batch {args.batch}, {args.steps} DPM++ 2M steps, CFG {args.guidance}; t2i: dtype {args.dtype}, "
          f"compile {args.compile}, channels_last {args.channels_last}, fuse_qkv {args.fuse_qkv}, "
          f"pad_cross_attention {args.pad_cross_attention}, cuda_graphs {args.cuda_graphs}")
    rows = [("images/s, batch %d" % args.batch, "images_per_s", True), ("s/image, batch 1", "s_per_image_b1", False),
            ("cold start, empty cache, s", "cold_start_empty_s", False),
            ("cold start, warm cache, s", "cold_start_warm_s", False), ("peak memory, MiB", "peak_memory_mb", False)]
    print(f"| {'':<28} | {'diffusers':>10} | {'t2i':>10} | {'t2i/diffusers':>13} |")
    print(f"|{'-' * 30}|{'-' * 12}|{'-' * 12}|{'-' * 15}|")
    for label, key, _ in rows:
        if key not in figures["t2i"]:
            continue
        ours, theirs = figures["t2i"][key], figures["diffusers"][key]
        print(f"| {label:<28} | {theirs:>10.3f} | {ours:>10.3f} | {ours / theirs:>12.2f}× |")
    if "diffusers" in worst:
        print(f"| {'worst pixel diff. from fp32':<28} | {worst['diffusers']:>6}/255 | {worst['t2i']:>6}/255 | "
              f"{'':>13} |")
    else:
        print(f"| {'worst pixel difference':<28} | {'':>10} | {worst['t2i']:>6}/255 | {'':>13} |")
    parts = figures["t2i"]["parts_b1_s"]
    print(f"\nt2i's batch-1 image in parts: text encoder {parts['text'] * 1e3:.1f} ms (prompt and negative), "
          f"denoising {parts['denoise'] * 1e3:.1f} ms ({parts['denoise'] * 1e3 / args.steps:.2f} ms per step), "
          f"VAE decoder {parts['decode'] * 1e3:.1f} ms")
    print("\n" + target_line(args, figures, worst["t2i"]))
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "figures": figures,
                                         "worst_pixel_difference": worst}, indent=2))


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def target_line(args: argparse.Namespace, figures: dict, worst_t2i: int) -> str:
    """Issue 17's targets for this device: set for `--size small` on a CPU and `--size sd15` on an H100."""
    t2i = figures["t2i"]
    speedup = t2i["images_per_s"] / figures["diffusers"]["images_per_s"]
    if args.device.startswith("cuda"):
        parts = [f"targets (H100, sd15, 30 steps with CFG): t2i ≥ 2× diffusers' images/s at batch {args.batch}: "
                 f"{speedup:.2f}× {verdict(speedup >= 2)}",
                 f"batch 1 ≤ 0.35 s per image: {t2i['s_per_image_b1']:.3f} s {verdict(t2i['s_per_image_b1'] <= 0.35)}"]
        if "cold_start_empty_s" in t2i:
            cold = t2i["cold_start_empty_s"]
            parts.append(f"cold start ≤ 90 s: {cold:.1f} s {verdict(cold <= 90)}")
    else:
        parts = [f"targets (CPU, small): t2i ≥ 2× diffusers' images/s: {speedup:.2f}× {verdict(speedup >= 2)}",
                 f"worst pixel difference ≤ 4/255: {worst_t2i}/255 {verdict(worst_t2i <= 4)}"]
        if "cold_start_warm_s" in t2i:
            warm = t2i["cold_start_warm_s"]
            parts.append(f"cold start with a warm cache ≤ 30 s: {warm:.1f} s {verdict(warm <= 30)}")
    target_size = "sd15" if args.device.startswith("cuda") else "small"
    if args.size != target_size:
        parts.append(f"(set for size {target_size}, not {args.size})")
    return "; ".join(parts)


if __name__ == "__main__":
    main()
