"""The `t2i` command: demo, train, generate, export. Each command parses its options and calls one library function.

Only the standard library and t2i's plain modules are imported at the top, so that `t2i --help` answers
without loading torch or diffusers; each command imports what it uses.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path

from t2i.diffusion.sampler_names import SAMPLER_NAMES
from t2i.errors import T2IError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="t2i", description="Latent text-to-image diffusion: train and sample.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo", help="generate the shapes dataset, train VAE, CLIP and U-Net, sample, judge and report",
        description="The main job: with no downloads, train a small text-to-image model on the procedural "
                    "shapes dataset, save it to OUT/pipeline, render a fixed prompt list (including held-out "
                    "combinations), judge every image and write OUT/grid.png and OUT/report.html. "
                    "Re-running with the same OUT resumes.")
    demo.add_argument("--out", type=Path, default=Path("t2i-demo"),
                      help="folder for the run, the pipeline, grid.png and report.html (default: t2i-demo)")
    demo.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                      help="where to train and sample; cuda trains a larger configuration (default: auto)")
    demo.add_argument("--config", type=Path, default=None,
                      help="a run config to use instead of configs/demo.yaml (or demo_gpu.yaml on cuda)")
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config value, e.g. --set train.unet.steps=500 (repeatable)")
    demo.add_argument("--resume-weights-only", action="store_true",
                      help="resume from checkpoints' weights with a fresh optimizer (for checkpoints written by an "
                           "older t2i, or whose optimizer state is damaged)")

    train = commands.add_parser(
        "train", help="train the stages of a run config",
        description="Train the stages listed in CONFIG (vae, clip, unet) and save the pipeline to "
                    "RUN_DIR/pipeline. Checkpoints, metrics.jsonl and sample grids go to RUN_DIR/<stage>.")
    train.add_argument("config", type=Path, help="a run config in YAML (see configs/)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value with a dotted key, e.g. --set train.unet.lr=1e-4 "
                            "(the value is read as YAML; repeatable)")
    train.add_argument("--resume", action="store_true",
                       help="continue the run in run_dir from its latest checkpoints, skipping finished stages")
    train.add_argument("--resume-weights-only", action="store_true",
                       help="like --resume, but take only the weights from the checkpoints and start the optimizer "
                            "afresh (for checkpoints written by an older t2i, or whose optimizer state is damaged)")

    generate = commands.add_parser(
        "generate", help="generate images from a prompt with a saved pipeline",
        description="Generate images for PROMPT with a t2i pipeline folder or a diffusers Stable Diffusion "
                    "folder. Image i uses seed SEED+i.")
    generate.add_argument("prompt", help="what to draw, e.g. 'a large red circle'")
    generate.add_argument("--model", type=Path, required=True, help="pipeline folder (t2i or diffusers SD)")
    generate.add_argument("--negative", default=None, help="negative prompt: what to steer away from")
    generate.add_argument("--steps", type=int, default=None, help="denoising steps (default: the pipeline's)")
    generate.add_argument("--guidance", type=float, default=None,
                          help="classifier-free guidance scale; 1 disables guidance (default: the pipeline's)")
    generate.add_argument("--seed", type=int, default=0, help="seed of the first image (default: 0)")
    generate.add_argument("--sampler", choices=SAMPLER_NAMES, default=None,
                          help="sampling method (default: the pipeline's, dpmpp_2m)")
    generate.add_argument("--num-images", type=int, default=1, help="how many images (default: 1)")
    generate.add_argument("--height", type=int, default=None, help="image height in pixels (default: trained size)")
    generate.add_argument("--width", type=int, default=None, help="image width in pixels (default: trained size)")
    generate.add_argument("--out", type=Path, default=Path("t2i.png"),
                          help="output PNG; with several images, NAME-0.png, NAME-1.png, ... (default: t2i.png)")
    generate.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                          help="where to run (default: auto)")
    generate.add_argument("--allow-pickle", action="store_true",
                          help="load pickle weight files (.bin, .ckpt, .pt, .pth), which can run code when loaded; "
                               "only for files you trust (default: safetensors only)")

    export = commands.add_parser(
        "export", help="write a pipeline as a diffusers Stable Diffusion folder",
        description="Write the t2i (or diffusers) pipeline folder MODEL to OUT in diffusers' Stable Diffusion "
                    "layout, which diffusers.StableDiffusionPipeline.from_pretrained(OUT) loads and runs with the "
                    "same images. An open_clip text encoder becomes a CLIPTextModel + CLIPTokenizer, with clip_skip "
                    "built in.")
    export.add_argument("--model", type=Path, required=True, help="pipeline folder to export (t2i or diffusers SD)")
    export.add_argument("--out", type=Path, required=True, help="the diffusers folder to write (replaced whole)")
    export.add_argument("--sampler", choices=SAMPLER_NAMES, default=None,
                        help="the scheduler written to OUT/scheduler (default: the pipeline's sampler)")
    export.add_argument("--allow-pickle", action="store_true",
                        help="read pickle weight files, which can run code when loaded; only for files you trust")
    return parser


@contextmanager
def _run_folder_held(run_dir: Path):
    """Lock the run folder before loading torch, so that a second run into it is refused in a moment.

    Under a launcher (accelerate launch, torchrun) every process runs the command; the training then takes the
    lock in the main process, for all of them.
    """
    from t2i.training import run_lock
    from t2i.training.launch import is_launched

    with nullcontext() if is_launched() else run_lock.hold(run_dir):
        yield


def _demo(args) -> None:
    with _run_folder_held(args.out):
        from t2i.demo import run_demo

        run_demo(args.out, device=args.device, config_path=args.config, overrides=args.overrides,
                 resume_weights_only=args.resume_weights_only)


def _train(args) -> None:
    from t2i.config import load_config

    config = load_config(args.config, args.overrides)
    with _run_folder_held(Path(config.run_dir)):
        from t2i.training.run import run_training

        pipeline = run_training(config, resume=args.resume, resume_weights_only=args.resume_weights_only)
    print(f"pipeline saved to {pipeline}")


def _generate(args) -> None:
    from t2i import Text2ImagePipeline

    if args.num_images < 1:
        raise T2IError(f"--num-images must be at least 1; got {args.num_images}")
    pipe = Text2ImagePipeline.from_pretrained(args.model, device=args.device, allow_pickle=args.allow_pickle)
    images = pipe([args.prompt] * args.num_images, negative_prompt=args.negative, num_inference_steps=args.steps,
                  guidance_scale=args.guidance, height=args.height, width=args.width, seed=args.seed,
                  sampler=args.sampler, progress=True)
    out = args.out if args.out.suffix else args.out.with_suffix(".png")
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out] if len(images) == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(len(images))]
    for image, path in zip(images, paths):
        image.save(path)
        print(path)


def _export(args) -> None:
    from t2i.pipeline.export import export_folder

    print(f"diffusers pipeline written to {export_folder(args.model, args.out, args.sampler, args.allow_pickle)}")


def _quiet_libraries() -> None:
    """Show t2i's own warnings (e.g. prompt truncation) plainly; keep the libraries' chatter out."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("t2i: warning: %(message)s"))
    logger = logging.getLogger("t2i")
    logger.addHandler(handler)
    logger.propagate = False
    for name in ("diffusers", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)


_CONTINUE = {"demo": "rerun the same `t2i demo` command to continue",
             "train": "rerun the same `t2i train` command with --resume to continue"}


def _stop_now(signum: int, frame) -> None:
    from t2i.training.interrupt import StopNow

    raise StopNow(signum)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _quiet_libraries()
    from t2i.training.interrupt import StopNow, TrainingInterrupted, signal_name

    # Outside a training loop (which saves a checkpoint first), SIGTERM stops like Ctrl-C: cleanly, at once.
    previous = signal.signal(signal.SIGTERM, _stop_now)
    try:
        {"demo": _demo, "train": _train, "generate": _generate, "export": _export}[args.command](args)
    except TrainingInterrupted as stopped:
        print(f"t2i {args.command}: {stopped}; {_CONTINUE.get(args.command, 'rerun to continue')}", file=sys.stderr)
        return stopped.exit_code
    except T2IError as error:
        print(f"t2i {args.command}: error: {error}", file=sys.stderr)
        return 2
    except StopNow as stopped:
        print(f"t2i {args.command}: stopped by {signal_name(stopped.signum)}", file=sys.stderr)
        return 128 + stopped.signum
    except KeyboardInterrupt:
        print(f"t2i {args.command}: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
