"""Stage finetune: continue training a pretrained pipeline's U-Net on the user's images, in full or through LoRA
adapters (Hu et al. 2021, via peft) on its attention projections. The VAE and text encoder stay frozen; the loss
is the unet stage's, on the source model's own noise schedule and parameterisation."""
from __future__ import annotations

import copy
from itertools import islice
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from torch.utils.data import DataLoader, Dataset

from t2i.config import DiffusionConfig, FinetuneConfig
from t2i.pipeline import Text2ImagePipeline
from t2i.training.randomness import BatchRandomness
from t2i.training.stages.unet import UNetStage

UNET, LORA = "unet", "lora"  # the stage's exported folders: the full (LoRA-merged) U-Net, and the adapters
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' `load_lora_weights` layout
VALIDATION_SEED = 0  # the same timesteps and noise every time the held-out loss is scored


def add_lora(unet: UNet2DConditionModel, rank: int, alpha: float | None, target_modules: tuple[str, ...],
             dropout: float) -> UNet2DConditionModel:
    """Freeze `unet` and give it trainable low-rank adapters (A random, B zero: the model starts unchanged)."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha or rank, lora_dropout=dropout,
                                target_modules=list(target_modules), init_lora_weights="gaussian"))
    return unet


def merged_unet(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """A plain U-Net with the adapters folded into its weights, loadable without peft."""
    merged = copy.deepcopy(unet)
    merged.fuse_lora()
    merged.unload_lora()
    return merged


class FinetuneStage(UNetStage):
    name = "finetune"

    def __init__(self, pipe: Text2ImagePipeline, finetune: FinetuneConfig, diffusion: DiffusionConfig,
                 preview_prompts: list[str], validation: Dataset | None, batch_size: int, device: torch.device):
        unet = pipe.unet  # loaded in fp32 on the device (run.load_source_pipeline): the master weights
        lora = finetune.lora
        if lora.rank:
            add_lora(unet, lora.rank, lora.alpha, lora.target_modules, lora.dropout)
        if finetune.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        super().__init__(unet, pipe.vae, pipe.text_encoder, diffusion, pipe.scheduler_config, preview_prompts, device,
                         preview_defaults=pipe.defaults)
        self.lora = lora.rank > 0
        self.validation = (list(islice(DataLoader(validation, batch_size=batch_size), finetune.validation_batches))
                           if validation is not None else [])

    @torch.no_grad()
    def validation_loss(self, model: UNet2DConditionModel) -> float:
        """The loss on the held-out batches, every caption kept, at fixed timesteps and noise."""
        was_training = model.training
        model.eval()
        device = self.alpha_bar.device
        rng = BatchRandomness(torch.Generator(device).manual_seed(VALIDATION_SEED))
        losses = [self.loss(model, {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()},
                            rng, caption_dropout=0.0)[0].item() for batch in self.validation]
        model.train(was_training)
        return sum(losses) / len(losses)

    def sample(self, model: UNet2DConditionModel, path: Path) -> dict | None:
        if self.preview_prompts:
            super().sample(model, path)
        return {"validation_loss": self.validation_loss(model)} if self.validation else None

    def save(self, model: UNet2DConditionModel, folder: Path) -> None:
        if not self.lora:
            model.save_pretrained(folder / UNET)
            return
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        StableDiffusionPipeline.save_lora_weights(
            folder / LORA, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(model)),
            safe_serialization=True)
        merged_unet(model).save_pretrained(folder / UNET)
