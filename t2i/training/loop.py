"""The one training loop every stage shares.

accelerate provides devices, mixed precision and multi-process training; this loop adds gradient
accumulation, clipping, LR warm-up and decay, EMA, metrics, sample grids, atomic checkpoints and exact
resume. A stage supplies only its model, its loss and (optionally) how to draw samples.

Exact resume: the data order and all training randomness are pure functions of (seed, micro-batch index),
so a run resumed from a checkpoint at step k computes exactly what an uninterrupted run computes after k.

Failing safe: a non-finite loss or gradient stops the stage at that step (or skips a bounded number of such
steps, `max_nonfinite_steps`), and no checkpoint or final model is written with non-finite weights. A first
SIGTERM or SIGINT finishes the step, writes a checkpoint and stops; every process agrees on that step.
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Protocol

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from diffusers.training_utils import EMAModel
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from t2i.atomic import write_folder
from t2i.config import TrainConfig
from t2i.data.loader import batch_to_device, loader_workers, loading_note, train_batches
from t2i.errors import T2IError
from t2i.models.cpu_attention import ShortKeysMatmulAttention
from t2i.pipeline.pipeline import NonFiniteSample
from t2i.pipeline.speed import compile_cache_dir
from t2i.precision import resolve_mixed_precision
from t2i.training.checkpoint import (
    TrainingState,
    batch_split,
    checkpoint_dir,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from t2i.training.interrupt import StopRequest, TrainingInterrupted, signal_name
from t2i.training.randomness import BatchRandomness

FINAL = "final"  # the stage's exported model, inside its run folder; present only once complete
# Large odd multiplier that spreads (seed, micro-batch) pairs over distinct generator seeds.
_SEED_STRIDE = 1_000_003


class Stage(Protocol):
    """What a training stage provides to the loop."""

    name: str
    model: torch.nn.Module  # the trained module: optimised, EMA'd, checkpointed

    def loss(self, model: torch.nn.Module, batch: dict, rng: BatchRandomness) -> tuple[torch.Tensor, dict]:
        """The loss to minimise and float metrics to log, for one micro-batch; every random draw from `rng`."""

    def sample(self, model: torch.nn.Module, path: Path) -> dict | None:
        """Write a sample grid to `path` (called with the EMA weights, when EMA is on); return metrics to log
        (a held-out validation loss, say), or None."""

    def save(self, model: torch.nn.Module, folder: Path) -> None:
        """Export the finished model (EMA weights, when EMA is on) in its loadable format."""


class DivergenceError(T2IError):
    """The loss, gradients or weights stopped being finite."""


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
        raise T2IError("mixed_precision 'fp16' needs a GPU; on the CPU use 'no', 'bf16' or 'auto' (bf16 where the "
                       "CPU has AMX)")
    # accelerate keeps mixed precision in a process-wide singleton; stages of one run may each set their own, so
    # clear it (keeping the distributed PartialState) before every stage.
    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(cpu=device.type == "cpu", mixed_precision=mixed_precision)


def train(stage: Stage, dataset: Dataset, config: TrainConfig, run_dir: Path, device: torch.device,
          resolved_config: dict, resume: bool = False, resume_weights_only: bool = False,
          stop: StopRequest | None = None) -> torch.nn.Module:
    """Train `stage.model` on `dataset` for `config.steps` optimiser steps; return it with its final weights
    (the EMA weights, when EMA is on), after `stage.save` has exported it to `run_dir / FINAL`."""
    loop = TrainLoop(stage, dataset, config, run_dir, device, resolved_config, stop or StopRequest())
    if resume or resume_weights_only:
        loop.resume(weights_only=resume_weights_only)
    return loop.run()


class TrainLoop:
    """One stage's training: `run_step` does one optimiser step; `run` repeats it, logs, samples and saves."""

    def __init__(self, stage: Stage, dataset: Dataset, config: TrainConfig, run_dir: Path, device: torch.device,
                 resolved_config: dict, stop: StopRequest):
        run_dir.mkdir(parents=True, exist_ok=True)
        if config.channels_last:
            stage.model.to(memory_format=torch.channels_last)
        self.stage, self.dataset, self.config, self.run_dir = stage, dataset, config, run_dir
        self.resolved_config, self.stop = resolved_config, stop
        self.mixed_precision = resolve_mixed_precision(config.mixed_precision, device)
        self.accelerator = make_accelerator(device, self.mixed_precision)
        if self.mixed_precision == "bf16" and device.type == "cpu" and hasattr(stage.model, "set_attn_processor"):
            # PyTorch's CPU flash-attention backward is slower in bf16 than batched matmuls on AMX, up to 256 keys.
            stage.model.set_attn_processor(ShortKeysMatmulAttention())
        if config.compile:
            compile_cache_dir()
            stage.model.compile()  # in place: parameter names, checkpoints and EMA are unchanged
        # The optimiser, EMA and checks see only these: frozen weights (a LoRA run's base U-Net) are left alone.
        self.trainable = [(name, p) for name, p in stage.model.named_parameters() if p.requires_grad]
        trainable = [p for _, p in self.trainable]
        # The fused kernel does the whole update in one pass: 10% of a demo U-Net step on a 2-core CPU.
        optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate,
                                      weight_decay=config.weight_decay, fused=device.type in ("cpu", "cuda"))
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, config))
        self.stage_loss, self.optimizer = self.accelerator.prepare(_StageLoss(stage), optimizer)
        self.model = self.accelerator.unwrap_model(self.stage_loss).model  # the bare network
        # foreach: one multi-tensor update instead of a Python loop over the parameters (4% of a demo U-Net step).
        self.ema = EMAModel(trainable, decay=config.ema_decay, foreach=True) if config.ema_decay else None
        self.state = TrainingState(step=0, micro_batches=0, processes=self.accelerator.num_processes)
        self.saved_step: int | None = None  # the step of the latest checkpoint, known alike to every process
        self.metrics_file = run_dir / "metrics.jsonl"
        self.is_main = self.accelerator.is_main_process

    def resume(self, weights_only: bool = False) -> None:
        checkpoint = latest_checkpoint(self.run_dir)
        if checkpoint is None:
            return
        self.state, ema_weights = load_checkpoint(checkpoint, self.model, self.optimizer, self.lr_scheduler,
                                                  weights_only=weights_only)
        resplit = self._check_batch_split(checkpoint)
        self.state.processes = self.accelerator.num_processes
        self.saved_step = self.state.step
        if self.ema is not None and ema_weights is not None:
            _load_ema(self.ema, self.trainable, ema_weights, self.state.step - self.state.skipped_steps)
        how = "weights only, fresh optimizer" if weights_only else resplit or "exact"
        self.accelerator.print(f"[{self.stage.name}] resumed from {checkpoint} at step {self.state.step} ({how})")

    def _check_batch_split(self, checkpoint: Path) -> str | None:
        """Resume only on micro-batches of the checkpoint's size: the data order, every random draw and the
        averaged gradient are then its global batch's, however many processes share it. Return a note when they
        are shared otherwise than in the checkpoint's run."""
        name = self.stage.name
        saved = batch_split(checkpoint, self.state, name)
        now = (self.accelerator.num_processes, self.config.batch_size)
        if saved[0] * saved[1] != now[0] * now[1]:
            raise T2IError(f"[{name}] checkpoint '{checkpoint}' was trained on micro-batches of {_split(saved)}; "
                           f"this run would take {_split(now)}, another training. Resume with "
                           f"{_fitting_split(saved, now[0], name)}")
        if saved == now:
            return None
        return (f"on micro-batches of {_split(now)}, where {_split(saved)} trained: the same training within "
                "rounding, not bit for bit")

    def run(self) -> torch.nn.Module:
        config, accelerator = self.config, self.accelerator
        workers = loader_workers(config.loader_workers, self.dataset)
        note = loading_note(self.dataset, workers)
        if note is not None:
            accelerator.print(f"[{self.stage.name}] {note}")
        batches = train_batches(self.dataset, config.batch_size, config.seed, self.state.micro_batches,
                                accelerator.process_index, accelerator.num_processes, workers=workers,
                                pin_memory=accelerator.device.type == "cuda")
        if self.is_main:
            _drop_metrics_after(self.metrics_file, self.state.step)  # logged by a run killed after its checkpoint
        tensorboard = _tensorboard_writer(self.run_dir) if self.is_main else None
        self.model.train()
        progress = tqdm(total=config.steps, initial=self.state.step, desc=self.stage.name,
                        disable=not self.is_main, dynamic_ncols=True)
        self.started = time.perf_counter() - self.state.elapsed_s
        if config.sample_at_start and self.state.step == 0:
            self._log_extra(self._sample(), tensorboard)
        try:
            while self.state.step < config.steps:
                logged, stop_signal = self.run_step(batches)
                progress.update(1)
                progress.set_postfix(loss=f"{logged['loss']:.4f}")
                self._log(logged, tensorboard)
                self._log_extra(self._sample_if_due(), tensorboard)
                if config.checkpoint_every and self.state.step % config.checkpoint_every == 0:
                    self.save_checkpoint()
                if stop_signal:
                    self._stop(stop_signal)
        finally:
            progress.close()
            if tensorboard is not None:
                tensorboard.close()
        if self.saved_step != self.state.step:
            self.save_checkpoint()
        return self.finish()

    def forward_backward(self, batches: Iterator[dict]) -> dict[str, float]:
        """Accumulate the gradients of `grad_accum_steps` micro-batches; return their mean metrics."""
        config, accelerator = self.config, self.accelerator
        logged: dict[str, float] = {}
        for micro in range(config.grad_accum_steps):
            # Seeded by the global micro-batch, alike in every process; each keeps its rows (randomness.py).
            generator = torch.Generator(accelerator.device).manual_seed(
                config.seed * _SEED_STRIDE + self.state.micro_batches)
            rng = BatchRandomness(generator, accelerator.process_index, accelerator.num_processes)
            batch = batch_to_device(next(batches), accelerator.device)
            last_micro = micro == config.grad_accum_steps - 1
            with (accelerator.no_sync(self.stage_loss) if not last_micro else nullcontext(),
                  accelerator.autocast()):
                loss, metrics = self.stage_loss(batch, rng)
                accelerator.backward(loss / config.grad_accum_steps)
            self.state.micro_batches += 1
            for key, value in {"loss": loss.item(), **metrics}.items():
                logged[key] = logged.get(key, 0.0) + value / config.grad_accum_steps
        return logged

    def run_step(self, batches: Iterator[dict]) -> tuple[dict[str, float], int]:
        """One optimiser step (or, for a non-finite one within `max_nonfinite_steps`, a skipped update).

        Returns the step's metrics and the signal every process agreed to stop on (0: none)."""
        logged = self.forward_backward(batches)
        logged["grad_norm"] = self._grad_norm()
        # fp16 loss scaling overflows on purpose now and then; its scaler skips those updates itself.
        checked = ("loss",) if self.mixed_precision == "fp16" else ("loss", "grad_norm")
        nonfinite, stop_signal = self._agree(any(not math.isfinite(logged[key]) for key in checked),
                                             self.stop.signum or 0)
        if nonfinite:
            self.state.skipped_steps += 1
            if self.state.skipped_steps > self.config.max_nonfinite_steps:
                raise DivergenceError(self._divergence_message(logged))
            logged["skipped_steps"] = self.state.skipped_steps
        else:
            self.optimizer.step()
            if self.ema is not None:
                self.ema.step(self._parameters())
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        return logged, stop_signal

    def _parameters(self) -> list[torch.nn.Parameter]:
        return [p for _, p in self.trainable]

    def _grad_norm(self) -> float:
        if self.config.grad_clip is not None:
            return float(self.accelerator.clip_grad_norm_(self._parameters(), self.config.grad_clip))
        grads = [p.grad for p in self._parameters() if p.grad is not None]
        return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0

    def _agree(self, nonfinite: bool, stop_signal: int) -> tuple[bool, int]:
        """Every process's verdicts, combined: a non-finite step or a stop anywhere holds everywhere."""
        if self.accelerator.num_processes == 1:
            return nonfinite, stop_signal
        flags = torch.tensor([float(nonfinite), float(stop_signal)], device=self.accelerator.device)
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        return bool(flags[0]), int(flags[1])

    def _divergence_message(self, logged: dict[str, float]) -> str:
        config, name = self.config, self.stage.name
        allowed = (f" after skipping {config.max_nonfinite_steps}" if config.max_nonfinite_steps else "")
        return (f"[{name}] training diverged at step {self.state.step + 1}: loss {logged['loss']:.4g}, gradient norm "
                f"{logged['grad_norm']:.4g}{allowed}; {self._diagnosis()}. To skip a few such steps instead, set "
                f"train.{name}.max_nonfinite_steps")

    def _diagnosis(self) -> str:
        """What was kept, and the likely causes of a divergence, for the stage's error line."""
        config, name = self.config, self.stage.name
        last = latest_checkpoint(self.run_dir)
        kept = f"the last good checkpoint, '{last}', is kept" if last else "no checkpoint had been written"
        causes = f"train.{name}.learning_rate ({config.learning_rate:g}) too high"
        if config.grad_clip is None:
            causes += f" with no train.{name}.grad_clip"
        if self.mixed_precision != "no":
            causes += f", or {self.mixed_precision} overflow (try train.{name}.mixed_precision: no or bf16)"
        return f"stopped, {kept}. Likely cause: {causes}"

    def _log(self, logged: dict[str, float], tensorboard) -> None:
        step = self.state.step
        if not self.is_main or (step % self.config.log_every and step != self.config.steps):
            return
        record = {"step": step, "lr": self.lr_scheduler.get_last_lr()[0],
                  "elapsed_s": round(time.perf_counter() - self.started, 2), **logged}
        with self.metrics_file.open("a") as f:
            f.write(json.dumps(_finite_or_none(record), allow_nan=False) + "\n")
        if tensorboard is not None:
            for key, value in logged.items():
                tensorboard.add_scalar(f"{self.stage.name}/{key}", value, step)

    def _log_extra(self, metrics: dict | None, tensorboard) -> None:
        """A record of its own for what `stage.sample` measured, such as a held-out validation loss."""
        if not metrics or not self.is_main:
            return
        with self.metrics_file.open("a") as f:
            f.write(json.dumps(_finite_or_none({"step": self.state.step, **metrics}), allow_nan=False) + "\n")
        if tensorboard is not None:
            for key, value in metrics.items():
                tensorboard.add_scalar(f"{self.stage.name}/{key}", value, self.state.step)

    def _sample_if_due(self) -> dict | None:
        """Every `sample_every` steps, and at the last step, so that the finished model has its grid and scores."""
        every, step = self.config.sample_every, self.state.step
        return self._sample() if every and (step % every == 0 or step == self.config.steps) else None

    def _sample(self) -> dict | None:
        """A sample grid of the current (EMA) weights, and what the stage measured with them (main process)."""
        if not self.is_main:
            return None
        try:
            with _ema_applied(self.ema, self._parameters()):
                metrics = self.stage.sample(self.model, self.run_dir / "samples" / f"step_{self.state.step:07d}.png")
        except NonFiniteSample as error:
            raise DivergenceError(f"[{self.stage.name}] the sample grid at step {self.state.step} is not finite "
                                  f"({error}); {self._diagnosis()}") from None
        self.model.train()
        return metrics

    def save_checkpoint(self) -> None:
        """Write a checkpoint of the current step (main process); refuse non-finite weights."""
        self.state.elapsed_s = round(time.perf_counter() - self.started, 2)
        if self.is_main:
            self._check_weights_finite()
            ema_weights = _ema_weights(self.ema, self.trainable) if self.ema else None
            save_checkpoint(self.run_dir, self.state, self.model, ema_weights, self.optimizer, self.lr_scheduler,
                            self.resolved_config, self.config.keep_checkpoints)
        self.saved_step = self.state.step
        self.accelerator.wait_for_everyone()

    def _check_weights_finite(self) -> None:
        tensors = self._parameters() + (list(self.ema.shadow_params) if self.ema else [])
        if not all(torch.isfinite(t).all() for t in tensors):
            last = latest_checkpoint(self.run_dir)
            raise DivergenceError(f"[{self.stage.name}] the weights are no longer finite at step {self.state.step}; "
                                  f"nothing was saved (last good checkpoint: {last or 'none'}). Lower "
                                  f"train.{self.stage.name}.learning_rate or set its grad_clip")

    def _stop(self, signum: int) -> None:
        if self.saved_step != self.state.step:
            self.save_checkpoint()
        where = checkpoint_dir(self.run_dir, self.state.step)
        raise TrainingInterrupted(signum, f"[{self.stage.name}] stopped by {signal_name(signum)} after step "
                                          f"{self.state.step} of {self.config.steps}; checkpoint saved to '{where}'")

    def finish(self) -> torch.nn.Module:
        """Swap in the EMA weights and export the finished model to `run_dir / FINAL`."""
        if self.ema is not None:
            self.ema.copy_to(self._parameters())
        self.model.eval()
        if self.is_main:
            self._check_weights_finite()
            with write_folder(self.run_dir / FINAL, f"the finished {self.stage.name} model") as staging:
                self.stage.save(self.model, staging)
        self.accelerator.wait_for_everyone()
        return self.model


class _StageLoss(torch.nn.Module):
    """Routes a stage's loss through `forward`, so that DistributedDataParallel sees (and syncs) every step."""

    def __init__(self, stage: Stage):
        super().__init__()
        self.model = stage.model
        self.loss = stage.loss

    def forward(self, batch: dict, rng: BatchRandomness) -> tuple[torch.Tensor, dict]:
        return self.loss(self.model, batch, rng)


def _processes(count: int) -> str:
    return f"{count} process{'es' if count > 1 else ''}"


def _split(split: tuple[int, int]) -> str:
    """'8 images (2 processes x batch_size 4)' for (processes, batch size)."""
    processes, batch_size = split
    return f"{processes * batch_size} images ({_processes(processes)} x batch_size {batch_size})"


def _fitting_split(saved: tuple[int, int], processes: int, stage: str) -> str:
    """How to resume on the saved micro-batch: as saved, or with this run's processes at the batch size that fits."""
    images = saved[0] * saved[1]
    how = (f"{_processes(saved[0])} at train.{stage}.batch_size={saved[1]} (local_processes, or accelerate launch "
           "--num_processes)")
    if images % processes == 0 and processes != saved[0]:
        how += f", or {_processes(processes)} at train.{stage}.batch_size={images // processes}"
    return how


def _finite_or_none(record: dict) -> dict:
    """metrics.jsonl stays strict JSON: a NaN or infinite value is written as null."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}


def _drop_metrics_after(metrics_file: Path, step: int) -> None:
    """Keep the records up to `step`; a line cut short by a kill is dropped too."""
    if not metrics_file.is_file():
        return
    kept = []
    for line in metrics_file.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    metrics_file.write_text("".join(line + "\n" for line in kept))


@contextmanager
def _ema_applied(ema: EMAModel | None, parameters: list[torch.nn.Parameter]):
    """Temporarily swap the EMA weights into `parameters` (a no-op without EMA)."""
    if ema is None:
        yield
        return
    ema.store(parameters)
    ema.copy_to(parameters)
    try:
        yield
    finally:
        ema.restore(parameters)


def _ema_weights(ema: EMAModel, trainable: list[tuple[str, torch.nn.Parameter]]) -> dict[str, torch.Tensor]:
    return {name: shadow for (name, _), shadow in zip(trainable, ema.shadow_params)}


def _load_ema(ema: EMAModel, trainable: list[tuple[str, torch.nn.Parameter]], weights: dict[str, torch.Tensor],
              updates: int) -> None:
    for (name, _), shadow in zip(trainable, ema.shadow_params):
        shadow.data.copy_(weights[name])
    ema.optimization_step = updates


def _tensorboard_writer(run_dir: Path):
    """TensorBoard logging when the package is installed; metrics.jsonl is always written."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))
