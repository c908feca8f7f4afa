"""The `t2i` command: demo, train, finetune, generate, upscale, batch, export, eval. Each command parses its options and
calls one library function.

Only the standard library and t2i's plain modules are imported at the top, so that `t2i --help` answers
without loading torch or diffusers; each command imports what it uses.
"""
from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import signal
import sys
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path

from t2i.diffusion.sampler_names import SAMPLER_NAMES, SCHEDULER_SAMPLER_NAMES
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
    demo.add_argument("--cascade", action="store_true",
                      help="also train a super-resolution stage (32 -> 64 px) and report the upscaled images beside "
                           "the base ones, judged again, with PSNR/SSIM against bicubic on held-out images")

    train = commands.add_parser(
        "train", help="train the stages of a run config",
        description="Train the stages listed in CONFIG (vae, clip, unet, sr, classifier) and save the pipeline to "
                    "RUN_DIR/pipeline. Checkpoints, metrics.jsonl and sample grids go to RUN_DIR/<stage>.")
    train.add_argument("config", type=Path, help="a run config in YAML (see configs/)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value with a dotted key, e.g. --set train.unet.learning_rate=1e-4 "
                            "(the value is read as YAML; repeatable)")
    train.add_argument("--resume", action="store_true",
                       help="continue the run in run_dir from its latest checkpoints, skipping finished stages")
    train.add_argument("--resume-weights-only", action="store_true",
                       help="like --resume, but take only the weights from the checkpoints and start the optimizer "
                            "afresh (for checkpoints written by an older t2i, or whose optimizer state is damaged)")

    finetune = commands.add_parser(
        "finetune", help="fine-tune a pretrained pipeline on your captioned images (full or LoRA)",
        description="Continue training the U-Net of MODEL (a t2i pipeline folder, a diffusers Stable Diffusion "
                    "folder, or a hub id when online) on DATA: an image folder (metadata.jsonl / metadata.csv with "
                    "file_name and a caption column, or x.png + x.txt captions), a `datasets` table (save_to_disk "
                    "folder, parquet/csv/json file, or hub name) or a folder of webdataset .tar shards. Bad files "
                    "are skipped and listed in OUT/quarantine.jsonl. The result goes to OUT/pipeline; LoRA "
                    "adapters also to OUT/finetune/final/lora in diffusers' layout.")
    finetune.add_argument("--model", required=True, help="the pipeline to start from")
    finetune.add_argument("--data", required=True, help="the captioned images (kind detected from what is there)")
    finetune.add_argument("--out", type=Path, required=True, help="run folder: checkpoints, metrics, pipeline")
    finetune.add_argument("--max-steps", type=int, help="optimiser steps (default: the config's, 200)")
    finetune.add_argument("--resolution", type=int, help="training image size in pixels (default: 32)")
    finetune.add_argument("--batch-size", type=int, help="images per step and process (default: 8)")
    finetune.add_argument("--lr", type=float, help="learning rate (default: 1e-4)")
    finetune.add_argument("--lora-rank", type=int,
                          help="train LoRA adapters of this rank on the attention projections; 0 trains the whole "
                               "U-Net (default: 0)")
    finetune.add_argument("--validation-prompts", type=Path,
                          help="a text file, one prompt a line ('#' lines are comments), rendered into "
                               "OUT/finetune/samples every sample_every steps (default: captions from the data)")
    finetune.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (default: 100)")
    finetune.add_argument("--image-column", help="a `datasets` table's image column (default: image)")
    finetune.add_argument("--caption-column", help="the caption column (default: text)")
    finetune.add_argument("--allow-pickle", action="store_true",
                          help="load the model's pickle weight files (.bin, .ckpt), which can run code; by default "
                               "only safetensors are read")
    finetune.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None,
                          help="where to train (default: auto)")
    finetune.add_argument("--config", type=Path, default=None,
                          help="a run config to start from instead of the packaged configs/finetune.yaml")
    finetune.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                          help="override any config value, e.g. --set finetune.lora.alpha=8 (repeatable; applied "
                               "after the options above)")
    finetune.add_argument("--resume", action="store_true", help="continue the run in OUT from its latest checkpoint")
    finetune.add_argument("--resume-weights-only", action="store_true",
                          help="like --resume, with a fresh optimizer (for an older or damaged checkpoint)")

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
    generate.add_argument("--seed", type=int, default=None, help="seed of the first image (default: 0)")
    generate.add_argument("--sampler", choices=SAMPLER_NAMES, default=None,
                          help="sampling method (default: the one saved with the pipeline); see docs/samplers.md")
    generate.add_argument("--eta", type=float, default=0.0,
                          help="DDIM's eta with --sampler ddim: 0 deterministic (default), 1 DDPM-like noise")
    generate.add_argument("--guidance-rescale", type=float, default=0.0, metavar="PHI",
                          help="rescale the guided prediction to the conditional one's spread (Lin et al. 2023); "
                               "0 off (default), 0.7 as in the paper")
    generate.add_argument("--dynamic-threshold", type=float, default=None, metavar="PERCENTILE",
                          help="Imagen's dynamic thresholding of the predicted latents at this percentile, e.g. "
                               "0.995 (default: off)")
    generate.add_argument("--classifier-guidance", type=float, default=0.0, metavar="SCALE",
                          help="classifier guidance (Dhariwal & Nichol 2021) towards the colour and shape the prompt "
                               "names, with the pipeline's classifier (classifier/); 0 off (default)")
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
    _add_speed_arguments(generate)
    generate.add_argument("--allow-pickle", action="store_true",
                          help="load pickle weight files (.bin, .ckpt, .pt, .pth), which can run code when loaded; "
                               "only for files you trust (default: safetensors only)")
    generate.add_argument("--upscale", action="store_true",
                          help="run the pipeline's super-resolution stage (sr/) on each image, with its own defaults")

    upscale = commands.add_parser(
        "upscale", help="upscale existing images with a pipeline's super-resolution stage",
        description="Make each IMAGE sr.factor times larger with the super-resolution stage (sr/) of the pipeline "
                    "MODEL, guided by PROMPT (what the images show). The images must have one size; image i uses "
                    "seed SEED+i. Writes OUT, or NAME-0.png, NAME-1.png, ... for several images.")
    upscale.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="images to upscale (PNG, JPEG, ...)")
    upscale.add_argument("--model", type=Path, required=True, help="pipeline folder with an sr/ stage")
    upscale.add_argument("--prompt", required=True, help="what the images show, e.g. 'a large red circle'")
    upscale.add_argument("--steps", type=int, default=None, help="denoising steps (default: the SR stage's)")
    upscale.add_argument("--guidance", type=float, default=None,
                         help="classifier-free guidance scale; 1 disables guidance (default: the SR stage's)")
    upscale.add_argument("--noise-level", type=int, default=None,
                         help="Gaussian noise level added to the low-resolution images first (0: none; default: the "
                              "SR stage's)")
    upscale.add_argument("--sampler", choices=SCHEDULER_SAMPLER_NAMES, default=None,
                         help="sampling method (default: the SR stage's)")
    upscale.add_argument("--seed", type=int, default=0, help="seed of the first image (default: 0)")
    upscale.add_argument("--out", type=Path, default=Path("t2i-upscaled.png"),
                         help="output PNG; with several images, NAME-0.png, NAME-1.png, ... (default: t2i-upscaled.png)")
    upscale.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to run (default: auto)")
    upscale.add_argument("--allow-pickle", action="store_true",
                         help="load pickle weight files, which can run code when loaded; only for files you trust")

    batch = commands.add_parser(
        "batch", help="generate images for every line of a prompt file; resumable and shardable",
        description="Generate the images that FILE asks for into OUT: images/<id>-<k>.png with their parameters "
                    "embedded, manifest.jsonl, job.json and index.html. FILE is .txt (one prompt a line; blank "
                    "lines and lines starting with '#' skipped), .jsonl or .csv with the fields id, prompt, "
                    "negative_prompt, seed, steps, guidance, sampler, height, width, num_images; the options give "
                    "the defaults for missing fields, the pipeline's saved defaults come after them. Rerunning the "
                    "same command makes only what is missing. Under `accelerate launch -m t2i.cli batch ...` items "
                    "are shared out between the processes.")
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
    _add_speed_arguments(batch)
    batch.add_argument("--merge", type=Path, default=None, metavar="DIR",
                       help="only merge DIR's manifest shards into manifest.jsonl and rewrite its index.html")

    export = commands.add_parser(
        "export", help="write a pipeline as a diffusers Stable Diffusion folder",
        description="Write the t2i (or diffusers) pipeline folder MODEL to OUT in diffusers' Stable Diffusion "
                    "layout, which diffusers.StableDiffusionPipeline.from_pretrained(OUT) loads and runs with the "
                    "same images. An open_clip text encoder becomes a CLIPTextModel + CLIPTokenizer, with clip_skip "
                    "built in.")
    export.add_argument("--model", type=Path, required=True, help="pipeline folder to export (t2i or diffusers SD)")
    export.add_argument("--out", type=Path, required=True, help="the diffusers folder to write (replaced whole)")
    export.add_argument("--sampler", choices=SCHEDULER_SAMPLER_NAMES, default=None,
                        help="the scheduler written to OUT/scheduler (default: the pipeline's sampler)")
    export.add_argument("--allow-pickle", action="store_true",
                        help="read pickle weight files, which can run code when loaded; only for files you trust")

    evaluate = commands.add_parser(
        "eval", help="measure a pipeline: --likelihood gives bits/dim of images",
        description="With --likelihood: an upper bound on the negative log-likelihood of 8-bit images under MODEL, "
                    "in bits per pixel dimension (3 x H x W): the VAE's evidence bound, with the U-Net's exact "
                    "density of the latent through the probability-flow ODE (unconditional: empty prompt, guidance "
                    "1) and a discretised Gaussian decoder whose one scale is fitted on the images. Image i draws "
                    "its latent and trace probe from SEED+i. See docs/samplers.md, \"Likelihood\".")
    evaluate.add_argument("--likelihood", action="store_true", help="measure bits/dim (the only measure so far)")
    evaluate.add_argument("--model", type=Path, required=True, help="pipeline folder (t2i or diffusers SD)")
    evaluate.add_argument("--data", default="shapes",
                          help="'shapes' (held-out images of the demo's shapes data, at the pipeline's size) or a "
                               "folder of images, centre-cropped to that size; unreadable files are counted and "
                               "skipped (default: shapes)")
    evaluate.add_argument("--num-images", type=int, default=64, help="how many images (default: 64)")
    evaluate.add_argument("--batch-size", type=int, default=16, help="images per ODE solve (default: 16)")
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the first image's draws (default: 0)")
    evaluate.add_argument("--tolerance", type=float, default=1e-5,
                          help="the ODE solver's rtol and atol (default: 1e-5, as Song et al. 2021)")
    evaluate.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                          help="where to run (default: auto)")
    evaluate.add_argument("--allow-pickle", action="store_true",
                          help="load pickle weight files, which can run code when loaded; only for files you trust")
    return parser


def _add_speed_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto",
                        help="the networks' number format; auto: bf16 on GPUs and on CPUs with AMX, else fp32 "
                             "(images differ by rounding only)")
    parser.add_argument("--compile", choices=("off", "blocks", "full"), default="off",
                        help="torch.compile the U-Net and VAE decoder, block by block or whole: faster per image, "
                             "tens of seconds at the first call (cached on disk for later runs)")


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
                 resume_weights_only=args.resume_weights_only, cascade=args.cascade)


def _train(args) -> None:
    from t2i.config import load_config

    _run_training(load_config(args.config, args.overrides), args)


def _run_training(config, args) -> None:
    """`t2i train` and `t2i finetune`: hold the run folder, train, say where the pipeline is."""
    with _run_folder_held(Path(config.run_dir)):
        from t2i.training.run import run_training

        pipeline = run_training(config, resume=args.resume, resume_weights_only=args.resume_weights_only)
    if pipeline is not None:
        print(f"pipeline saved to {pipeline}")


def _finetune_overrides(args) -> list[str]:
    """The command's options as config overrides; explicit `--set` values come last and win."""
    from t2i.data.build import detect_source

    options = {"finetune.model": args.model, "data.path": args.data, "data.dataset": detect_source(args.data),
               "run_dir": str(args.out), "device": args.device, "train.finetune.steps": args.max_steps,
               "data.resolution": args.resolution, "train.finetune.batch_size": args.batch_size,
               "train.finetune.learning_rate": args.lr, "finetune.lora.rank": args.lora_rank,
               "train.finetune.checkpoint_every": args.checkpoint_every, "data.image_column": args.image_column,
               "data.caption_column": args.caption_column, "finetune.allow_pickle": args.allow_pickle or None}
    if args.validation_prompts is not None:
        options["finetune.validation_prompts"] = json.dumps(_validation_prompts(args.validation_prompts))
    return [f"{key}={value}" for key, value in options.items() if value is not None] + args.overrides


def _validation_prompts(path: Path) -> list[str]:
    """The prompts of a --validation-prompts file, one a line (UTF-8, a byte-order mark dropped), blank lines and
    comments ('#' first) skipped as in `t2i batch`'s .txt files."""
    from t2i.jobs.items import is_prompt_line

    if not path.is_file():
        raise T2IError(f"--validation-prompts file '{path}' does not exist" if not path.exists() else
                       f"--validation-prompts '{path}' is not a file; give a text file of one prompt a line")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise T2IError(f"--validation-prompts file '{path}' is not UTF-8 text ({error.reason} at byte "
                       f"{error.start}); save it as UTF-8") from None
    prompts = [line.strip() for line in text.splitlines() if is_prompt_line(line)]
    if not prompts:
        raise T2IError(f"--validation-prompts file '{path}' holds no prompts (every line is blank or a comment); "
                       "write one a line, or leave the option out to preview captions from the data")
    return prompts


def _finetune(args) -> None:
    from t2i.config import PACKAGED_CONFIGS, load_config

    _run_training(load_config(args.config or PACKAGED_CONFIGS / "finetune.yaml", _finetune_overrides(args)), args)


def _generate(args) -> None:
    from t2i import Text2ImagePipeline

    if args.num_images < 1:
        raise T2IError(f"--num-images must be at least 1; got {args.num_images}")
    if args.from_image is not None:
        _take_parameters_from_image(args)
    elif args.prompt is None:
        raise T2IError("give a prompt, or --from-image PNG")
    args.seed = 0 if args.seed is None else args.seed
    from t2i.pipeline.speed import SpeedOptions

    paths = _image_paths(args.out, args.num_images)
    pipe = Text2ImagePipeline.from_pretrained(args.model, device=args.device, allow_pickle=args.allow_pickle)
    pipe.speed_up(SpeedOptions(dtype=args.dtype, compile=args.compile))
    images = pipe([args.prompt] * args.num_images, negative_prompt=args.negative, num_inference_steps=args.steps,
                  guidance_scale=args.guidance, height=args.height, width=args.width, seed=args.seed,
                  sampler=args.sampler, progress=True, upscale=args.upscale, eta=args.eta,
                  guidance_rescale=args.guidance_rescale, dynamic_threshold=args.dynamic_threshold,
                  classifier_guidance=args.classifier_guidance)
    _save_images(images, paths)


def _image_paths(out: Path, count: int) -> list[Path]:
    """OUT for one image; NAME-0.png, NAME-1.png, ... for several (.png when OUT has no extension). Checked before
    any work, so that a bad --out does not fail after the images are made."""
    from PIL import Image

    if out.is_dir():
        raise T2IError(f"--out '{out}' is a folder; give an image file name, such as '{out / 'image.png'}'")
    out = out if out.suffix else out.with_suffix(".png")
    Image.init()
    if Image.registered_extensions().get(out.suffix.lower()) not in Image.SAVE:
        raise T2IError(f"--out '{out}': '{out.suffix}' is not an image format PIL writes; use .png, .jpg or .webp")
    blocking = next((parent for parent in out.parents if parent.exists() and not parent.is_dir()), None)
    if blocking is not None:
        raise T2IError(f"--out '{out}': '{blocking}' is a file, not a folder")
    return [out] if count == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(count)]


def _save_images(images, paths: list[Path]) -> None:
    for image, path in zip(images, paths, strict=True):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path)
        except OSError as error:  # no permission, a full disk, a read-only or virtual file system
            raise T2IError(f"cannot write '{path}': {error.strerror or error}; give --out in a writable folder") from None
        print(path)


def _upscale(args) -> None:
    from PIL import Image, UnidentifiedImageError

    from t2i import Text2ImagePipeline
    from t2i.data.images import to_rgb8

    paths = _image_paths(args.out, len(args.images))
    images = []
    for path in args.images:
        try:
            with Image.open(path) as image:
                images.append(to_rgb8(image).copy())  # 16-bit scaled, not clipped white; alpha on white
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as error:
            raise T2IError(f"cannot read image '{path}': {error}") from None
    pipe = Text2ImagePipeline.from_pretrained(args.model, device=args.device, allow_pickle=args.allow_pickle)
    _save_images(pipe.upscale(images, args.prompt, num_inference_steps=args.steps, guidance_scale=args.guidance,
                              noise_level=args.noise_level, seed=args.seed, sampler=args.sampler), paths)


def _take_parameters_from_image(args) -> None:
    from t2i.jobs.parameters import model_hash, read_png_parameters

    if args.prompt is not None:
        raise T2IError("give a prompt or --from-image, not both")
    given = [option for option, value in (("--negative", args.negative), ("--steps", args.steps),
                                          ("--guidance", args.guidance), ("--seed", args.seed),
                                          ("--sampler", args.sampler), ("--height", args.height),
                                          ("--width", args.width)) if value is not None]
    if given:  # they would be overwritten by the image's own values
        raise T2IError(f"--from-image takes {', '.join(given)} from the image; leave "
                       f"{'it' if len(given) == 1 else 'them'} out")
    embedded = read_png_parameters(args.from_image)
    if embedded["model_hash"] and embedded["model_hash"] != model_hash(args.model):
        print(f"t2i: warning: {args.from_image} was made by model hash {embedded['model_hash']}, not "
              f"{args.model}'s {model_hash(args.model)}; the pixels will differ", file=sys.stderr)
    args.prompt, args.negative = embedded["prompt"], embedded["negative_prompt"] or None
    args.steps, args.guidance, args.seed = embedded["steps"], embedded["guidance"], embedded["seed"]
    args.sampler, args.height, args.width = embedded["sampler"], embedded["height"], embedded["width"]


def _batch(args) -> None:
    from t2i.jobs.run import BatchJob, ImagesFailed, merge, run_batch_job

    if args.merge is not None:
        records = merge(args.merge)
        if records is not None:
            print(f"{len(records)} images in {args.merge / 'manifest.jsonl'}; gallery {args.merge / 'index.html'}")
        return
    missing = [name for name in ("model", "prompts", "out") if getattr(args, name) is None]
    if missing:
        raise T2IError(f"batch needs {', '.join('--' + name for name in missing)} (or --merge DIR)")
    job = BatchJob(
        model=args.model, prompts=args.prompts, out=args.out, batch_size=args.batch_size, steps=args.steps,
        guidance=args.guidance, sampler=args.sampler, negative_prompt=args.negative, seed=args.seed,
        height=args.height, width=args.width, num_images=args.num_images, skip_invalid=args.skip_invalid,
        force=args.force, device=args.device, dtype=args.dtype, compile=args.compile)
    try:
        summary = run_batch_job(job)
    except ImagesFailed as failure:  # the job ran to its end: say what it made, then end with the error
        _print_batch_summary(failure.summary, args.out)
        raise
    _print_batch_summary(summary, args.out)


def _print_batch_summary(summary, out: Path) -> None:
    failed = f", {summary.failed} could not be made" if summary.failed else ""
    print(f"{summary.images} images: {summary.generated} generated ({summary.images_per_second:.2f} images/s), "
          f"{summary.already_done} already done{failed}, {summary.invalid_lines} invalid lines skipped; "
          f"{out / 'manifest.jsonl'}, {out / 'index.html'}", flush=True)


def _export(args) -> None:
    from t2i.pipeline.export import export_folder

    print(f"diffusers pipeline written to {export_folder(args.model, args.out, args.sampler, args.allow_pickle)}")


def _eval(args) -> None:
    if not args.likelihood:
        raise T2IError("say what to measure: --likelihood (bits/dim of images) is the only measure so far")
    from t2i.eval.likelihood import evaluate_likelihood

    described, result = evaluate_likelihood(args.model, args.data, args.num_images, args.batch_size, args.seed,
                                            args.tolerance, args.device, args.allow_pickle)
    print(described)
    print("\n".join(result.lines()))


def _quiet_libraries() -> None:
    """Show t2i's own warnings (e.g. prompt truncation) plainly; keep the libraries' chatter out."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("t2i: warning: %(message)s"))
    logger = logging.getLogger("t2i")
    logger.addHandler(handler)
    logger.propagate = False
    # Each library sets its own level when it is first imported (after this), from these variables.
    for name in ("diffusers", "transformers"):
        os.environ.setdefault(f"{name.upper()}_VERBOSITY", "error")
        logging.getLogger(name).setLevel(logging.ERROR)
    # diffusers' DPM++ SDE asks its Brownian tree for times a rounding outside the tree's span, at every step
    warnings.filterwarnings("ignore", message="Should have t", module="torchsde")


_CONTINUE = {"demo": "rerun the same `t2i demo` command to continue",
             "train": "rerun the same `t2i train` command with --resume to continue",
             "finetune": "rerun the same `t2i finetune` command with --resume to continue"}


# What to do after Ctrl-C or SIGTERM stopped a command that can be continued without a --resume flag.
_AFTER_STOP = {"batch": "; rerun the same command to continue (the images made so far are kept)"}


def _exit_at_the_next_ctrl_c() -> None:
    """After a stop, the interpreter still spends a second or so in libraries' exit handlers (torch's), where a
    second Ctrl-C printed their traceback. From the start of those handlers, Ctrl-C ends the process at once."""
    atexit.register(signal.signal, signal.SIGINT, signal.SIG_DFL)  # runs before the handlers registered earlier


def _stop_now(signum: int, frame) -> None:
    from t2i.training.interrupt import StopNow

    raise StopNow(signum)


def _report(line: str) -> None:
    """One line to stderr in one write: the ranks of a multi-process run share the stream, and print's separate
    write of the newline let two ranks' lines run into one."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _quiet_libraries()
    from t2i.training.interrupt import StopNow, TrainingInterrupted, signal_name

    # Outside a training loop (which saves a checkpoint first), SIGTERM stops like Ctrl-C: cleanly, at once.
    previous = signal.signal(signal.SIGTERM, _stop_now)
    try:
        commands = {"demo": _demo, "train": _train, "finetune": _finetune, "generate": _generate,
                    "upscale": _upscale, "batch": _batch, "export": _export, "eval": _eval}
        commands[args.command](args)
    except TrainingInterrupted as stopped:
        _report(f"t2i {args.command}: {stopped}; {_CONTINUE.get(args.command, 'rerun to continue')}")
        return stopped.exit_code
    except T2IError as error:
        _report(f"t2i {args.command}: error: {error}")
        return 2
    except StopNow as stopped:
        _report(f"t2i {args.command}: stopped by {signal_name(stopped.signum)}{_AFTER_STOP.get(args.command, '')}")
        _exit_at_the_next_ctrl_c()
        return 128 + stopped.signum
    except KeyboardInterrupt:
        _report(f"t2i {args.command}: interrupted{_AFTER_STOP.get(args.command, '')}")
        _exit_at_the_next_ctrl_c()
        return 128 + signal.SIGINT
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
