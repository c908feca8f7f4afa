"""The `t2i` command: demo, train, generate, batch. Each command parses its options and calls one library function.

Only the standard library and t2i's plain modules are imported at the top, so that `t2i --help` answers
without loading torch or diffusers; each command imports what it uses.
"""
from __future__ import annotations

import argparse
import logging
import sys
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

    generate = commands.add_parser(
        "generate", help="generate images from a prompt with a saved pipeline",
        description="Generate images for PROMPT with a t2i pipeline folder or a diffusers Stable Diffusion "
                    "folder. Image i uses seed SEED+i.")
    generate.add_argument("prompt", nargs="?", default=None,
                          help="what to draw, e.g. 'a large red circle' (or use --from-image)")
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
    generate.add_argument("--from-image", type=Path, default=None, metavar="PNG",
                          help="take prompt, negative prompt, steps, sampler, guidance, seed and size from the "
                               "parameters embedded in PNG (by t2i batch or A1111) instead of the options")

    batch = commands.add_parser(
        "batch", help="generate images for every line of a prompt file; resumable and shardable",
        description="Generate the images that FILE asks for into OUT: images/<id>-<k>.png with their parameters "
                    "embedded, manifest.jsonl, job.json and index.html. FILE is .txt (one prompt a line; blank "
                    "lines skipped), .jsonl or .csv with the fields id, prompt, negative_prompt, seed, steps, "
                    "guidance, sampler, height, width, num_images; the options give the defaults for missing "
                    "fields, the pipeline's saved defaults come after them. Rerunning the same command makes only "
                    "what is missing. Under `accelerate launch -m t2i.cli batch ...` items are shared out "
                    "between the processes.")
    batch.add_argument("--model", type=Path, help="pipeline folder (t2i or diffusers SD)")
    batch.add_argument("--prompts", type=Path, metavar="FILE", help="prompt file: .txt, .jsonl or .csv")
    batch.add_argument("--out", type=Path, help="output folder; rerun into it to resume")
    batch.add_argument("--batch-size", type=int, default=4, help="images per forward pass (default: 4)")
    batch.add_argument("--steps", type=int, default=None, help="denoising steps (default: the pipeline's)")
    batch.add_argument("--guidance", type=float, default=None,
                       help="classifier-free guidance scale; 1 disables guidance (default: the pipeline's)")
    batch.add_argument("--sampler", choices=SAMPLER_NAMES, default=None,
                       help="sampling method (default: the pipeline's)")
    batch.add_argument("--negative", default="", help="negative prompt for items without one (default: none)")
    batch.add_argument("--seed", type=int, default=0,
                       help="job seed: an item without a seed draws image k from a seed derived from this, its "
                            "id and k (default: 0)")
    batch.add_argument("--height", type=int, default=None, help="image height in pixels (default: trained size)")
    batch.add_argument("--width", type=int, default=None, help="image width in pixels (default: trained size)")
    batch.add_argument("--num-images", type=int, default=1, help="images per item without num_images (default: 1)")
    batch.add_argument("--skip-invalid", action="store_true",
                       help="report invalid lines and run the rest, instead of stopping before any work")
    batch.add_argument("--force", action="store_true",
                       help="go on in an OUT made with another model or other defaults, remaking changed images")
    batch.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                       help="where to run, with one process (default: auto)")
    batch.add_argument("--merge", type=Path, default=None, metavar="DIR",
                       help="only merge DIR's manifest shards into manifest.jsonl and rewrite its index.html")
    return parser


def _demo(args) -> None:
    from t2i.demo import run_demo

    run_demo(args.out, device=args.device, config_path=args.config, overrides=args.overrides)


def _train(args) -> None:
    from t2i.config import load_config
    from t2i.training.run import run_training

    pipeline = run_training(load_config(args.config, args.overrides), resume=args.resume)
    print(f"pipeline saved to {pipeline}")


def _generate(args) -> None:
    from t2i import Text2ImagePipeline

    if args.num_images < 1:
        raise T2IError(f"--num-images must be at least 1; got {args.num_images}")
    if args.from_image is not None:
        _take_parameters_from_image(args)
    elif args.prompt is None:
        raise T2IError("give a prompt, or --from-image PNG")
    pipe = Text2ImagePipeline.from_pretrained(args.model, device=args.device)
    images = pipe([args.prompt] * args.num_images, negative_prompt=args.negative, num_inference_steps=args.steps,
                  guidance_scale=args.guidance, height=args.height, width=args.width, seed=args.seed,
                  sampler=args.sampler, progress=True)
    out = args.out if args.out.suffix else args.out.with_suffix(".png")
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out] if len(images) == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(len(images))]
    for image, path in zip(images, paths):
        image.save(path)
        print(path)


def _take_parameters_from_image(args) -> None:
    from t2i.jobs.parameters import model_hash, read_png_parameters

    if args.prompt is not None:
        raise T2IError("give a prompt or --from-image, not both")
    embedded = read_png_parameters(args.from_image)
    if embedded["model_hash"] and embedded["model_hash"] != model_hash(args.model):
        print(f"t2i: warning: {args.from_image} was made by model hash {embedded['model_hash']}, not "
              f"{args.model}'s {model_hash(args.model)}; the pixels will differ", file=sys.stderr)
    args.prompt, args.negative = embedded["prompt"], embedded["negative_prompt"] or None
    args.steps, args.guidance, args.seed = embedded["steps"], embedded["guidance"], embedded["seed"]
    args.sampler, args.height, args.width = embedded["sampler"], embedded["height"], embedded["width"]


def _batch(args) -> None:
    from t2i.jobs.run import BatchJob, finish, run_batch_job

    if args.merge is not None:
        records = finish(args.merge)
        print(f"{len(records)} images in {args.merge / 'manifest.jsonl'}; gallery {args.merge / 'index.html'}")
        return
    missing = [name for name in ("model", "prompts", "out") if getattr(args, name) is None]
    if missing:
        raise T2IError(f"batch needs {', '.join('--' + name for name in missing)} (or --merge DIR)")
    summary = run_batch_job(BatchJob(
        model=args.model, prompts=args.prompts, out=args.out, batch_size=args.batch_size, steps=args.steps,
        guidance=args.guidance, sampler=args.sampler, negative_prompt=args.negative, seed=args.seed,
        height=args.height, width=args.width, num_images=args.num_images, skip_invalid=args.skip_invalid,
        force=args.force, device=args.device))
    print(f"{summary.images} images: {summary.generated} generated ({summary.images_per_second:.2f} images/s), "
          f"{summary.already_done} already done, {summary.invalid_lines} invalid lines skipped; "
          f"{args.out / 'manifest.jsonl'}, {args.out / 'index.html'}")


def _quiet_libraries() -> None:
    """Show t2i's own warnings (e.g. prompt truncation) plainly; keep the libraries' chatter out."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("t2i: warning: %(message)s"))
    logger = logging.getLogger("t2i")
    logger.addHandler(handler)
    logger.propagate = False
    for name in ("diffusers", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _quiet_libraries()
    try:
        {"demo": _demo, "train": _train, "generate": _generate, "batch": _batch}[args.command](args)
    except T2IError as error:
        print(f"t2i {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
