"""The batch job: prompt file in; images, manifest, job.json and gallery out; restartable at any point.

Exact resume: an image's pixels are a pure function of its task (prompt, negative prompt, seed, steps,
guidance, sampler, size) and the batch size, never of which other images share its batch (batches are padded
to full size and each prompt is encoded alone); and an image is done exactly when images/<id>-<k>.png exists,
which only the rename of a complete file creates, and is still whole (a file damaged since is made again). So a rerun after a crash at any point makes exactly the
missing images, equal to those an uninterrupted run would have made; the manifest is rebuilt from the files.
"""
from __future__ import annotations

import logging
import math
import sys
import time
from collections import Counter, OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

from t2i.errors import T2IError
from t2i.jobs import outputs
from t2i.jobs.gallery import write_gallery
from t2i.jobs.items import (ImageTask, Item, JobDefaults, Problem, check_defaults, check_job_size, image_tasks,
                            read_items)
from t2i.jobs.parameters import format_parameters, model_hash, parse_parameters
from t2i.jobs.processes import current_processes
from t2i.jobs.writer import ImageWriter

PROMPT_CACHE_SIZE = 256  # encoded prompts kept: batches are grouped, so a prompt's images mostly run together
# Padding beyond this share of the images a run computes is said before it starts: a small job at a large
# --batch-size otherwise pays for it silently (3 images at batch size 8 compute 8).
PADDING_NOTICE_SHARE = 0.25


@dataclass(frozen=True)
class BatchJob:
    """A job as the command line describes it; None means: the pipeline's saved default."""

    model: Path
    prompts: Path
    out: Path
    batch_size: int = 4
    steps: int | None = None
    guidance: float | None = None
    sampler: str | None = None
    negative_prompt: str = ""
    seed: int = 0
    height: int | None = None
    width: int | None = None
    num_images: int = 1
    skip_invalid: bool = False
    force: bool = False
    device: str = "auto"
    # How the networks run (t2i.pipeline.speed): their dtype ("auto": the device's default) and compilation.
    dtype: str = "auto"
    compile: str = "off"
    progress: bool = True


@dataclass(frozen=True)
class JobSummary:
    images: int  # this process's share of the job
    generated: int
    already_done: int
    invalid_lines: int
    seconds: float
    failed: int = 0  # images whose batch went non-finite: neither generated nor done

    @property
    def images_per_second(self) -> float:
        return self.generated / self.seconds if self.seconds else 0.0


class ImagesFailed(T2IError):
    """Some images could not be made; the rest of the job is done, and `summary` counts it, so that the command
    still reports what was made before it ends with the error."""

    def __init__(self, message: str, summary: JobSummary):
        super().__init__(message)
        self.summary = summary


def run_batch_job(job: BatchJob) -> JobSummary:
    from t2i.pipeline import Text2ImagePipeline
    from t2i.pipeline.speed import SpeedOptions, dtype_name

    if job.batch_size < 1:
        raise T2IError(f"--batch-size must be at least 1; got {job.batch_size}")
    if job.out.exists() and not job.out.is_dir():
        raise T2IError(f"--out '{job.out}' is a file; give a folder for the job's images")
    processes = current_processes(job.device)
    pipe = Text2ImagePipeline.from_pretrained(job.model, device=processes.device)
    pipe.speed_up(SpeedOptions(dtype=job.dtype, compile=job.compile))
    defaults = _resolve_defaults(job, pipe)
    check_defaults(defaults, pipe.latent_factor)
    _check_default_size_fits(pipe, job.batch_size, defaults)
    items, problems = read_items(job.prompts, defaults, pipe.latent_factor)
    items, too_large = _items_that_fit(pipe, job.batch_size, items)
    problems = sorted(problems + too_large, key=lambda problem: problem.line)
    if problems:
        listing = "\n".join(f"  {job.prompts}: {problem}" for problem in problems)
        if not job.skip_invalid:
            raise T2IError(f"{len(problems)} invalid line(s) in '{job.prompts}'; nothing was generated "
                           f"(--skip-invalid runs the valid ones):\n{listing}")
        if processes.rank == 0:
            print(f"skipping {len(problems)} invalid line(s):\n{listing}", file=sys.stderr)
    if not items:
        raise T2IError(f"prompt file '{job.prompts}' has no {_why_no_items(job.prompts, problems)}; nothing was "
                       "generated and its output folder was left as it is")
    check_job_size(items, job.prompts)

    model = {"name": job.model.resolve().name, "hash": model_hash(job.model)}
    # The number format the networks ran in, resolved: an "auto" job resumed on a machine whose default differs
    # would otherwise mix images of both (outputs.check_job_file). Compilation is recorded, not checked: it keeps
    # images within rounding.
    job_record = {"model": str(job.model.resolve()), "model_hash": model["hash"], "prompts": str(job.prompts),
                  "defaults": asdict(defaults), "batch_size": job.batch_size,
                  "dtype": dtype_name(pipe.dtype), "compile": job.compile}
    with output_folder_held(job.out, processes):
        outputs.check_job_file(job.out, job_record, job.force)
        outputs.make_images_folder(job.out)
        if processes.rank == 0:
            outputs.write_job_file(job.out, job_record)

        tasks = [task for item in items if processes.owns(item.id) for task in image_tasks(item, defaults.seed)]
        shard = outputs.shard_name(processes.rank)
        outputs.repair_shard(job.out / shard)
        writer = ImageWriter(job.out, shard, model)
        try:
            pending = _pending_tasks(job.out, tasks, model, writer, job.force)
            notice = padding_notice(pending, job.batch_size, suggest=len(pending) == len(tasks))
            if notice and processes.rank == 0:
                print(notice, file=sys.stderr)
            started = time.perf_counter()
            failed = _generate(pipe, pending, job.batch_size, writer, job.progress and processes.rank == 0)
        finally:
            writer.close()
        seconds = time.perf_counter() - started
        processes.wait_for_everyone()
        if processes.rank == 0:
            finish(job.out, {(item.id, k) for item in items for k in range(item.num_images)}, job.prompts)
    summary = JobSummary(len(tasks), len(pending) - len(failed), len(tasks) - len(pending), len(problems), seconds,
                         len(failed))
    if failed:
        raise _failed_images_error(failed, {item.id: item.line for item in items}, job.prompts, summary)
    return summary


EMPTY_FILE = {".txt": "every line is blank or a comment", ".csv": "no rows below a heading line"}


def _why_no_items(prompts: Path, problems: list[Problem]) -> str:
    if problems:
        return "valid items"
    return "prompts (" + EMPTY_FILE.get(prompts.suffix.lower(), "every line is blank") + ")"


def _failed_images_error(failed: list[tuple[ImageTask, str]], lines: dict[str, int], prompts: Path,
                         summary: JobSummary) -> ImagesFailed:
    first, reason = failed[0]
    return ImagesFailed(f"{len(failed)} image(s) could not be made: {reason} (first: {first.file}, line "
                        f"{lines[first.id]} of '{prompts}'); the other {summary.images - len(failed)} are done and "
                        "listed. Change those items (more steps, another sampler, a smaller guidance) and rerun the "
                        "same command", summary)


def _check_default_size_fits(pipe, batch_size: int, defaults: JobDefaults) -> None:
    """A --height/--width (or --batch-size) too large for this device is one error naming the options,
    not a problem blamed on every line that leaves its size out."""
    try:
        pipe.check_memory(batch_size, defaults.height, defaults.width, guided=defaults.guidance != 1.0)
    except T2IError as error:
        raise T2IError(f"--height/--width/--batch-size: {error}") from None


def _items_that_fit(pipe, batch_size: int, items: list[Item]) -> tuple[list[Item], list[Problem]]:
    """The items whose size this device can decode at this batch size, and a problem for each other one: found
    before any work, rather than by the OS killing the job when it reaches them."""
    fitting, problems, refusals = [], [], {}
    for item in items:
        shape = (item.height, item.width, item.guidance != 1.0)  # guidance runs the U-Net on twice the batch
        if shape not in refusals:
            try:
                pipe.check_memory(batch_size, item.height, item.width, guided=shape[2])
                refusals[shape] = None
            except T2IError as error:
                refusals[shape] = str(error)
        if refusals[shape] is None:
            fitting.append(item)
        else:
            problems.append(Problem(item.line, refusals[shape]))
    return fitting, problems


def output_folder_held(out: Path, processes):
    """One job (or merge) in an output folder at a time: a second is refused, naming the first's pid and command.
    A lock left by a killed process is taken over with a line saying so. The processes of one `accelerate launch`
    share the folder by design (each owns its items): their main process holds the lock for all of them."""
    from t2i.training import run_lock

    return run_lock.hold_for_group(out, "output folder", processes.rank == 0, processes.world_size)


def merge(out: Path) -> list[dict] | None:
    """`t2i batch --merge DIR`: fold leftover shards into manifest.jsonl and rewrite index.html, unless a job runs.
    Under `accelerate launch` the main process merges and returns the records; the others wait for it and return
    None."""
    outputs.check_output_folder(out)
    processes = current_processes("auto")
    with output_folder_held(out, processes):
        records = finish(out) if processes.rank == 0 else None
        processes.wait_for_everyone()
    return records


def finish(out: Path, wanted: set[tuple[str, int]] | None = None, prompts: Path | None = None) -> list[dict]:
    """Merge the manifest shards into manifest.jsonl and write index.html. With `wanted`, the (id, k) of every image
    the prompt file `prompts` asks for now, both describe those images alone; images of items since removed from
    the file stay on disk untouched, and a line says how many."""
    records = outputs.merge_manifests(out, wanted)
    write_gallery(out, records)
    unlisted = outputs.unlisted_images(out, records)
    if unlisted:
        reason = f"belong to no item of '{prompts}'" if prompts is not None else "have no record in the manifest"
        print(f"{len(unlisted)} image(s) in '{out / outputs.IMAGES}' {reason} (first: {unlisted[0]}); they are left "
              "as they are and not listed", file=sys.stderr)
    return records


def _resolve_defaults(job: BatchJob, pipe) -> JobDefaults:
    saved = pipe.defaults
    return JobDefaults(
        negative_prompt=job.negative_prompt, seed=job.seed,
        steps=job.steps if job.steps is not None else saved["num_inference_steps"],
        guidance=float(job.guidance if job.guidance is not None else saved["guidance_scale"]),
        sampler=job.sampler or saved["sampler"],
        height=pipe.default_size if job.height is None else job.height,
        width=pipe.default_size if job.width is None else job.width, num_images=job.num_images)


def _pending_tasks(out: Path, tasks: list[ImageTask], model: dict, writer: ImageWriter,
                   force: bool) -> list[ImageTask]:
    """The tasks without a finished image; finished images missing from the manifest (or changed since it
    recorded them) are recorded now, and damaged ones (not a whole PNG) are made again, with a count."""
    records = outputs.all_records(out)
    pending, stale, damaged = [], [], []
    for task in tasks:
        path = out / task.file
        outputs.temporary_path(path).unlink(missing_ok=True)
        if not path.is_file():
            pending.append(task)
            continue
        record = records.get((task.id, task.k))
        expected = writer.record(task)
        # The weights' hash decides, not the model folder's name: a copied or moved model makes the same images.
        if (record is not None and all(record.get(key) == value for key, value in expected.items() if key != "model")
                and _as_recorded(path, record)):
            continue
        whole, parameters = _read_parameters(path)
        if not whole:
            damaged.append(task)
        elif _made_for(parameters, task, model["hash"]):
            writer.record_existing(task, path)
        else:
            stale.append(task)
    if damaged:
        print(f"{len(damaged)} image(s) in '{out}' are damaged (not a whole PNG: first {damaged[0].file}); making "
              "them again", file=sys.stderr)
    if stale and not force:
        raise T2IError(f"{len(stale)} image(s) in '{out}' were made with other parameters than their items now ask "
                       f"for (first: {stale[0].file}); give changed items new ids, use another --out, or --force "
                       "to remake them")
    return pending + damaged + stale


def _as_recorded(path: Path, record: dict) -> bool:
    """Is the file the size its record says (a cut or overwritten file is not)? A record from before sizes were
    recorded is checked by its sha256, reading the file; by size, a rerun of a large job reads no image."""
    if "bytes" in record:
        return path.stat().st_size == record["bytes"]
    return record["sha256"] == outputs.sha256_of_file(path)


def _made_for(parameters: str | None, task: ImageTask, weights_hash: str) -> bool:
    """Whether an image's embedded parameters are `task`'s with these weights, whatever its model's name was."""
    try:
        name = parse_parameters(parameters)["model"] if parameters else None
    except T2IError:
        return False
    return name is not None and parameters == format_parameters(task, name, weights_hash)


def _read_parameters(path: Path) -> tuple[bool, str | None]:
    """Whether `path` is a whole image (every chunk present and its checksum right), and its embedded parameters."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            parameters = image.info.get("parameters")
            image.verify()
    except (OSError, SyntaxError, ValueError):  # PIL reports a broken PNG chunk as SyntaxError
        return False, None
    return True, parameters


def _generate(pipe, tasks: list[ImageTask], batch_size: int, writer: ImageWriter,
              progress: bool) -> list[tuple[ImageTask, str]]:
    """Make and hand over every task's image; a batch whose sampling goes non-finite (an extreme guidance, too few
    steps for its sampler) is skipped with a line, and its tasks are returned with the reason, so that one bad item
    does not stop a long job. A model whose networks give non-finite values (`DivergedModel`) stops the job: every
    batch would fail alike."""
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from t2i.pipeline.pipeline import DivergedModel, NonFiniteSample

    encoder = PromptEncoder(pipe)
    failed = []
    # t2i's warnings (a truncated prompt) go above the bar, on lines of their own, not into it.
    with (logging_redirect_tqdm(loggers=[logging.getLogger("t2i")]),
          tqdm(total=len(tasks), unit="img", desc="t2i batch", disable=not progress or not tasks) as bar):
        for batch in plan_batches(tasks, batch_size):
            padded = batch + [batch[-1]] * (batch_size - len(batch))  # a full batch: same math for every image
            first = batch[0]
            context = encoder.encode([task.prompt for task in padded])
            negative = encoder.encode([task.negative_prompt for task in padded]) if first.guidance != 1.0 else None
            try:
                latents = pipe.denoise(context, negative, [task.seed for task in padded], first.steps,
                                       first.guidance, first.height, first.width, first.sampler)
            except DivergedModel:
                raise
            except NonFiniteSample as error:
                bar.write(f"t2i batch: skipping {len(batch)} image(s) from {first.file}: {error}", file=sys.stderr)
                failed += [(task, str(error)) for task in batch]
            else:
                writer.submit(batch, pipe.decode(latents)[:len(batch)])
            bar.update(len(batch))
    return failed


def padding_notice(tasks: list[ImageTask], batch_size: int, suggest: bool) -> str | None:
    """A line saying how many of the images computed are padding, when more than PADDING_NOTICE_SHARE of them are;
    with `suggest`, it names the smallest batch size that makes as many batches (as many sampling calls) with less.
    A resumed job is not told to change its batch size: its images so far were made at this one."""
    padding = _padding(tasks, batch_size)
    computed = len(tasks) + padding
    if padding <= PADDING_NOTICE_SHARE * computed:
        return None
    line = (f"t2i batch: {len(tasks)} images in batches of {batch_size}: {padding} of the {computed} images computed "
            "are padding (batches are padded to full size so that each image's pixels are the same in any rerun)")
    smaller = _smallest_batch_size_with_as_many_batches(tasks, batch_size)
    if suggest and smaller < batch_size:
        left = _padding(tasks, smaller)
        line += (f"; --batch-size {smaller} would make as many batches, with "
                 f"{f'{left} image(s) of padding' if left else 'no padding'}")
    return line


def _padding(tasks: list[ImageTask], batch_size: int) -> int:
    return sum(batch_size - len(batch) for batch in plan_batches(tasks, batch_size))


def _smallest_batch_size_with_as_many_batches(tasks: list[ImageTask], batch_size: int) -> int:
    """A group of g images makes ceil(g / b) batches, never fewer for a smaller b; so the total stays the same
    exactly when every group's count does, and the smallest b that keeps a group's n batches is ceil(g / n)."""
    group_sizes = Counter(task.group for task in tasks).values()
    return max(math.ceil(size / math.ceil(size / batch_size)) for size in group_sizes)


def plan_batches(tasks: list[ImageTask], batch_size: int) -> list[list[ImageTask]]:
    """Tasks grouped by (size, steps, sampler, guidance), in file order within a group, cut into batches."""
    groups: dict[tuple, list[ImageTask]] = {}
    for task in tasks:
        groups.setdefault(task.group, []).append(task)
    return [group[start:start + batch_size] for _, group in sorted(groups.items())
            for start in range(0, len(group), batch_size)]


class PromptEncoder:
    """Token states per distinct prompt, each encoded alone (so equal whatever it is batched with) and cached."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.cache: OrderedDict[str, object] = OrderedDict()

    def encode(self, prompts: list[str]):
        import torch

        states = []
        for prompt in prompts:
            if prompt in self.cache:
                self.cache.move_to_end(prompt)
            else:
                self.cache[prompt] = self.pipe.encode_prompts([prompt])
                if len(self.cache) > PROMPT_CACHE_SIZE:
                    self.cache.popitem(last=False)
            states.append(self.cache[prompt])
        return torch.cat(states)
