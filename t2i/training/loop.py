"""The one training loop every stage shares.

accelerate provides devices, mixed precision and multi-process training; this loop adds gradient
accumulation, clipping, LR warm-up and decay, EMA, metrics, sample grids, atomic checkpoints and exact
resume. A stage supplies only its model, its loss and (optionally) how to draw samples.

Exact resume: the data order and all training randomness are pure functions of (seed, micro-batch index),
so a run resumed from a checkpoint at step k computes exactly what an uninterrupted run computes after k.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Protocol

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from diffusers.training_utils import EMAModel
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from t2i.config import TrainConfig
from t2i.data.sampler import ResumableBatchSampler
from t2i.errors import T2IError
from t2i.training.checkpoint import (
    TrainingState,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)

FINAL = "final"  # the stage's exported model, inside its run folder; present only once complete
# Large odd multiplier that spreads (seed, micro-batch) pairs over distinct generator seeds.
_SEED_STRIDE = 1_000_003


class Stage(Protocol):
    """What a training stage provides to the loop."""

    name: str
    model: torch.nn.Module  # the trained module: optimised, EMA'd, checkpointed

    def loss(self, model: torch.nn.Module, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        """The loss to minimise and float metrics to log, for one micro-batch."""

    def sample(self, model: torch.nn.Module, path: Path) -> None:
        """Write a sample grid to `path` (called with the EMA weights, when EMA is on)."""

    def save(self, model: torch.nn.Module, folder: Path) -> None:
        """Export the finished model (EMA weights, when EMA is on) in its loadable format."""


def lr_multiplier(step: int, config: TrainConfig) -> float:
    """Linear warm-up to 1, then constant, cosine or linear decay to `final_learning_rate_fraction`."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        return 1.0
    progress = min(1.0, (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps))
    floor = config.final_learning_rate_fraction
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if config.lr_schedule == "cosine" else 1 - progress
    return floor + (1 - floor) * shape


def make_accelerator(device: torch.device, mixed_precision: str) -> Accelerator:
    if device.type == "cpu" and mixed_precision == "fp16":
        raise T2IError("mixed_precision 'fp16' needs a GPU; on the CPU use 'no' (fastest there) or 'bf16'")
    # accelerate keeps mixed precision in a process-wide singleton; stages of one run may each set their own, so
    # clear it (keeping the distributed PartialState) before every stage.
    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(cpu=device.type == "cpu", mixed_precision=mixed_precision)


def train(stage: Stage, dataset: Dataset, config: TrainConfig, run_dir: Path, device: torch.device,
          resolved_config: dict, resume: bool = False) -> torch.nn.Module:
    """Train `stage.model` on `dataset` for `config.steps` optimiser steps; return it with its final weights
    (the EMA weights, when EMA is on), after `stage.save` has exported it to `run_dir / FINAL`."""
    run_dir.mkdir(parents=True, exist_ok=True)
    accelerator = make_accelerator(device, config.mixed_precision)
    trainable = [p for p in stage.model.parameters() if p.requires_grad]
    # The fused kernel does the whole update in one pass: 10% of a demo U-Net step on a 2-core CPU.
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate,
                                  weight_decay=config.weight_decay, fused=device.type in ("cpu", "cuda"))
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, config))
    stage_loss, optimizer = accelerator.prepare(_StageLoss(stage), optimizer)
    model = accelerator.unwrap_model(stage_loss).model  # the bare network: checkpointed, EMA'd, sampled
    ema = EMAModel(model.parameters(), decay=config.ema_decay) if config.ema_decay else None

    state = TrainingState(step=0, micro_batches=0)
    checkpoint = latest_checkpoint(run_dir) if resume else None
    if checkpoint is not None:
        state, ema_weights = load_checkpoint(checkpoint, model, optimizer, lr_scheduler)
        if ema is not None and ema_weights is not None:
            _load_ema(ema, model, ema_weights, state.step)
        accelerator.print(f"[{stage.name}] resumed from {checkpoint} at step {state.step}")

    sampler = ResumableBatchSampler(len(dataset), config.batch_size, seed=config.seed,
                                    start_batch=state.micro_batches, rank=accelerator.process_index,
                                    world_size=accelerator.num_processes)
    batches = iter(DataLoader(dataset, batch_sampler=sampler))
    metrics_file = run_dir / "metrics.jsonl"
    if accelerator.is_main_process:
        _drop_metrics_after(metrics_file, state.step)  # logged by a run killed after its last checkpoint
    tensorboard = _tensorboard_writer(run_dir) if accelerator.is_main_process else None

    def checkpoint_now() -> None:
        if accelerator.is_main_process:
            ema_weights = _ema_weights(ema, model) if ema else None
            save_checkpoint(run_dir, state, model, ema_weights, optimizer, lr_scheduler,
                            resolved_config, config.keep_checkpoints)

    model.train()
    progress = tqdm(total=config.steps, initial=state.step, desc=stage.name, disable=not accelerator.is_main_process,
                    dynamic_ncols=True)
    started = time.perf_counter()
    while state.step < config.steps:
        logged: dict[str, float] = {}
        for micro in range(config.grad_accum_steps):
            generator = torch.Generator(accelerator.device).manual_seed(
                config.seed * _SEED_STRIDE + state.micro_batches * accelerator.num_processes
                + accelerator.process_index)
            batch = _to_device(next(batches), accelerator.device)
            last_micro = micro == config.grad_accum_steps - 1
            with accelerator.no_sync(stage_loss) if not last_micro else nullcontext(), accelerator.autocast():
                loss, metrics = stage_loss(batch, generator)
                accelerator.backward(loss / config.grad_accum_steps)
            state.micro_batches += 1
            for key, value in {"loss": loss.item(), **metrics}.items():
                logged[key] = logged.get(key, 0.0) + value / config.grad_accum_steps
        if config.grad_clip is not None:
            logged["grad_norm"] = float(accelerator.clip_grad_norm_(model.parameters(), config.grad_clip))
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(model.parameters())
        state.step += 1
        progress.update(1)
        progress.set_postfix(loss=f"{logged['loss']:.4f}")

        if accelerator.is_main_process and (state.step % config.log_every == 0 or state.step == config.steps):
            record = {"step": state.step, "lr": lr_scheduler.get_last_lr()[0],
                      "elapsed_s": round(time.perf_counter() - started, 2), **logged}
            with metrics_file.open("a") as f:
                f.write(json.dumps(record) + "\n")
            if tensorboard is not None:
                for key, value in logged.items():
                    tensorboard.add_scalar(f"{stage.name}/{key}", value, state.step)
        if config.sample_every and state.step % config.sample_every == 0 and accelerator.is_main_process:
            with _ema_applied(ema, model):
                stage.sample(model, run_dir / "samples" / f"step_{state.step:07d}.png")
            model.train()
        if config.checkpoint_every and state.step % config.checkpoint_every == 0 and state.step < config.steps:
            checkpoint_now()
    progress.close()
    checkpoint_now()

    if ema is not None:
        ema.copy_to(model.parameters())
    model.eval()
    if accelerator.is_main_process:
        _save_atomically(stage, model, run_dir / FINAL)
    accelerator.wait_for_everyone()
    if tensorboard is not None:
        tensorboard.close()
    return model


class _StageLoss(torch.nn.Module):
    """Routes a stage's loss through `forward`, so that DistributedDataParallel sees (and syncs) every step."""

    def __init__(self, stage: Stage):
        super().__init__()
        self.model = stage.model
        self.loss = stage.loss

    def forward(self, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        return self.loss(self.model, batch, generator)


def _save_atomically(stage: Stage, model: torch.nn.Module, folder: Path) -> None:
    staging = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    stage.save(model, staging)
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)


def _drop_metrics_after(metrics_file: Path, step: int) -> None:
    if not metrics_file.is_file():
        return
    kept = [line for line in metrics_file.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    metrics_file.write_text("".join(line + "\n" for line in kept))


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@contextmanager
def _ema_applied(ema: EMAModel | None, model: torch.nn.Module):
    """Temporarily swap the EMA weights into `model` (a no-op without EMA)."""
    if ema is None:
        yield
        return
    ema.store(model.parameters())
    ema.copy_to(model.parameters())
    try:
        yield
    finally:
        ema.restore(model.parameters())


def _ema_weights(ema: EMAModel, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    names = [name for name, _ in model.named_parameters()]
    return dict(zip(names, ema.shadow_params))


def _load_ema(ema: EMAModel, model: torch.nn.Module, weights: dict[str, torch.Tensor], step: int) -> None:
    names = [name for name, _ in model.named_parameters()]
    for name, shadow in zip(names, ema.shadow_params):
        shadow.data.copy_(weights[name])
    ema.optimization_step = step


def _tensorboard_writer(run_dir: Path):
    """TensorBoard logging when the package is installed; metrics.jsonl is always written."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))
