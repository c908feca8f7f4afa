"""What a run folder holds, and whether a run may start or resume in it with a given config.

A folder holds a run once a stage has started training in it (a stage folder exists). A folder holding only the
config.yaml (and data scan report) of a run that stopped before any training (a wrong model path, unreadable data)
may start afresh. A resumed run continues the same computation, so its settings must be those it was started with,
except settings that do not change what is computed (logging, checkpoints, workers, device, compilation, the stage
list, the saved sampling defaults), settings read only by stages not yet started, and the step count of a stage not
yet finished, which moves where it ends.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import get_args

import yaml

from t2i.config import RunConfig, Stage
from t2i.data.quarantine import QUARANTINE_FILE
from t2i.errors import T2IError, first_few
from t2i.training import run_lock
from t2i.training.loop import FINAL

CONFIG = "config.yaml"
DATA_RECORD = "data.json"  # what the user's data held when the run last started or resumed (data_change_note)
FAILED_START_FILES = {CONFIG, QUARANTINE_FILE, DATA_RECORD}  # what a run writes before its first stage begins
STAGE_FOLDERS: tuple[str, ...] = get_args(Stage)  # each stage trains in a folder of its name
# Settings free to change on resume: by the last part of their dotted key, or whole.
# local_processes and batch_size may change together, keeping each micro-batch's images: the loop checks that
# against the checkpoint it resumes from (TrainLoop._check_batch_split).
FREE_SETTINGS = {"log_every", "sample_every", "sample_at_start", "checkpoint_every", "keep_checkpoints",
                 "loader_workers", "max_nonfinite_steps", "compile", "batch_size"}
FREE_KEYS = {"run_dir", "device", "latent_cache_dir", "stages", "local_processes"}
FREE_SECTIONS = {"sampling"}
# The stages that read a config section (by the first part of a key); a section not listed is read by all.
READERS = {"vae": {"vae"}, "text_encoder": {"clip", "unet", "sr", "finetune"}, "unet": {"unet"}, "sr": {"sr"},
           "classifier": {"classifier"}, "finetune": {"finetune"},
           "diffusion": {"unet", "sr", "classifier", "finetune"}, "cache_latents": {"unet", "sr", "finetune"},
           "cache_text_states": {"unet", "sr", "finetune"}}


def check_run_folder(run_dir: Path, resolved: dict, resume: bool) -> str | None:
    """Refuse a folder this run must not start or resume in; return a note to print, or None."""
    started = [name for name in STAGE_FOLDERS if (run_dir / name).is_dir()]
    if not resume:
        if started:
            raise T2IError(f"run folder '{run_dir}' already holds a run; pass --resume to continue it, or choose "
                           "another run folder")
        others = _other_files(run_dir)
        if others:
            raise T2IError(f"run folder '{run_dir}' already holds other files ({first_few(others)}); give a new or "
                           "empty folder for the run")
        return None
    if not started:
        return f"nothing to resume in '{run_dir}' yet: starting the run"
    previous = _previous_config(run_dir)
    if previous is None:
        return None
    changes = [change for change in _changes(previous, resolved) if not _free(change[0], set(started))]
    steps = {key: change for key, *change in changes if _is_steps(key)}
    finished = [key for key in steps if is_trained(run_dir, key.split(".")[1])]
    if finished:
        stage = finished[0].split(".")[1]
        raise T2IError(f"stage {stage} in '{run_dir}' finished at {steps[finished[0]][0]} steps, and --resume does "
                       f"not extend a finished stage; to train further, start a new run from its pipeline "
                       f"('{run_dir / 'pipeline'}')")
    others = [change for change in changes if not _is_steps(change[0])]
    if others:
        listing = first_few([f"{key} was {old!r}, now {new!r}" for key, old, new in others], separator="; ")
        raise T2IError(f"run folder '{run_dir}' was started with other settings: {listing}. A resumed run "
                       f"continues the same training: resume with the settings in '{run_dir / CONFIG}', or start a "
                       "new run in another folder")
    if steps:
        return "; ".join(f"{key}: {old} -> {new}" for key, (old, new) in steps.items())
    return None


def _other_files(run_dir: Path) -> list[str]:
    """What a folder holds besides a failed start's files and the lock: none in a new or empty folder."""
    if not run_dir.is_dir():
        return []
    return sorted(path.name for path in run_dir.iterdir()
                  if path.name not in FAILED_START_FILES and not path.name.startswith(run_lock.LOCK_NAME))


def _previous_config(run_dir: Path) -> dict | None:
    try:
        previous = yaml.safe_load((run_dir / CONFIG).read_text())
    except (OSError, yaml.YAMLError):
        return None
    return previous if isinstance(previous, dict) else None


def _changes(old: dict, new: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    """(dotted key, old value, new value) for every leaf that differs."""
    changes = []
    for key in sorted(set(old) | set(new), key=str):
        before, after, dotted = old.get(key), new.get(key), f"{prefix}{key}"
        if isinstance(before, dict) and isinstance(after, dict):
            changes.extend(_changes(before, after, dotted + "."))
        elif before != after:
            changes.append((dotted, before, after))
    return changes


def _free(key: str, started: set[str]) -> bool:
    parts = key.split(".")
    if key in FREE_KEYS or parts[0] in FREE_SECTIONS or parts[-1] in FREE_SETTINGS:
        return True
    readers = {parts[1]} if parts[0] == "train" and len(parts) > 1 else READERS.get(parts[0], set(STAGE_FOLDERS))
    return not readers & started


def _is_steps(key: str) -> bool:
    parts = key.split(".")
    return len(parts) == 3 and parts[0] == "train" and parts[2] == "steps"


def is_trained(run_dir: Path, stage: str) -> bool:
    """Has `stage` finished in `run_dir` (its exported model is there)?"""
    return (run_dir / stage / FINAL).is_dir()


def stage_needs(config: RunConfig) -> dict[str, tuple[str, ...]]:
    """The stages whose trained weights each stage builds on, and those the assembled 'pipeline' is made of."""
    text = ("clip",) if config.text_encoder.source == "scratch" else ()
    return {"unet": ("vae", *text), "sr": text, "classifier": ("vae",), "pipeline": ("vae", *text, "unet")}


def check_stage_inputs(config: RunConfig, run_dir: Path) -> bool:
    """Refuse, before anything trains, a stage that would lack a stage it builds on (trained earlier in this run
    folder, or listed before it); return whether the run ends with a pipeline, which a run of some parts only
    (stages: [vae]) does not."""
    if "finetune" in config.stages:  # it starts from a whole pipeline
        return True
    needs = stage_needs(config)
    ready = {name for name in STAGE_FOLDERS if is_trained(run_dir, name)}
    for name in config.stages:
        missing = [need for need in needs.get(name, ()) if need not in ready]
        if missing:
            listed = ", ".join(repr(need) for need in missing)
            raise T2IError(f"stage '{name}' builds on trained {listed} (not yet trained in '{run_dir}'): list "
                           f"{listed} before '{name}' in stages, or train {'them' if len(missing) > 1 else 'it'} "
                           "first in this run folder")
        ready.add(name)
    return all(need in ready for need in needs["pipeline"])


def missing_for_pipeline(config: RunConfig, run_dir: Path) -> list[str]:
    """The stages still to train in `run_dir` before its pipeline can be assembled."""
    return [need for need in stage_needs(config)["pipeline"] if not is_trained(run_dir, need)]


def data_change_note(run_dir: Path, record: dict, resume: bool) -> str | None:
    """Keep `record` (the samples of the user's data and their fingerprint) in the run folder; on a resume, a note
    when the data differs from the record of the run's last start: a resumed run then trains on other batches
    than an uninterrupted one would have (fixed bad files, added or edited images), so its weights differ."""
    path = run_dir / DATA_RECORD
    try:
        before = json.loads(path.read_text()) if resume else None
    except (OSError, ValueError):
        before = None
    path.write_text(json.dumps(record))
    if not isinstance(before, dict) or before == record:
        return None
    counts = ", ".join(f"{before.get(part, 0)} -> {record[part]} {part}" for part in record if part != "fingerprint")
    return (f"the data changed since this run last started ({counts}; or files edited): it resumes on the data as "
            "it is now, so it will not end on the weights of an uninterrupted run")
