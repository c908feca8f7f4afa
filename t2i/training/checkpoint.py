"""Training checkpoints: data, not code. safetensors weights (model and EMA), optimizer and LR-scheduler
state, the step, the RNG states and the resolved config, in a folder that only exists once complete."""
from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

CHECKPOINTS = "checkpoints"
STEP_PREFIX = "step_"


@dataclass
class TrainingState:
    """Everything a resumed run needs besides the model: where it was and what its RNGs held."""

    step: int
    micro_batches: int


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / CHECKPOINTS / f"{STEP_PREFIX}{step:07d}"


def _complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first; half-written `.tmp` folders are not among them."""
    folder = run_dir / CHECKPOINTS
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX)
                  and not p.name.endswith(".tmp"))


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The complete checkpoint with the highest step."""
    complete = _complete_checkpoints(run_dir)
    return complete[-1] if complete else None


def _tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().cpu().contiguous() for name, tensor in state.items()}


def save_checkpoint(run_dir: Path, state: TrainingState, model: torch.nn.Module, ema_weights: dict | None,
                    optimizer: torch.optim.Optimizer, lr_scheduler, config: dict, keep: int) -> Path:
    final = checkpoint_dir(run_dir, state.step)
    staging = final.with_name(final.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_file(_tensors(model.state_dict()), staging / "model.safetensors")
    if ema_weights is not None:
        save_file(_tensors(ema_weights), staging / "ema.safetensors")
    torch.save({"optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict()},
               staging / "optimizer.pt")
    torch.save(_rng_states(), staging / "rng.pt")
    (staging / "trainer_state.json").write_text(json.dumps(state.__dict__, indent=2))
    (staging / "config.json").write_text(json.dumps(config, indent=2))
    if final.exists():
        shutil.rmtree(final)
    staging.rename(final)
    _prune(run_dir, keep)
    return final


def load_checkpoint(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    lr_scheduler) -> tuple[TrainingState, dict | None]:
    """Restore model, optimizer, scheduler and RNGs in place; return the state and the EMA weights, if any."""
    model.load_state_dict(load_file(folder / "model.safetensors"))
    saved = torch.load(folder / "optimizer.pt", weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    lr_scheduler.load_state_dict(saved["lr_scheduler"])
    _set_rng_states(torch.load(folder / "rng.pt", weights_only=False))
    ema_file = folder / "ema.safetensors"
    ema_weights = load_file(ema_file) if ema_file.is_file() else None
    return TrainingState(**json.loads((folder / "trainer_state.json").read_text())), ema_weights


def _prune(run_dir: Path, keep: int) -> None:
    for old in _complete_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old)


def _rng_states() -> dict:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
