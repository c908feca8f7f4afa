"""Stage finetune: continue training a pretrained pipeline's U-Net on the user's images, in full or through LoRA
adapters (Hu et al. 2021, via peft) on its attention projections, optionally on the text encoder's attention too.
The VAE stays frozen; the loss is the unet stage's, on the source model's own noise schedule and parameterisation.
The stage exports a whole pipeline, adapters folded in, and the adapters alone in diffusers' LoRA layout."""
from __future__ import annotations

import copy
from itertools import islice
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from torch import nn
from torch.utils.data import DataLoader, Dataset

from t2i.config import DiffusionConfig, FinetuneConfig, LoRAConfig
from t2i.data.loader import batch_to_device
from t2i.errors import T2IError
from t2i.models.text_encoder import HFClipTextEncoder, OpenClipTextEncoder, TextEncoder
from t2i.pipeline import Text2ImagePipeline
from t2i.training.randomness import BatchRandomness
from t2i.training.stages.unet import UNetStage

# The stage's exported folders: the fine-tuned pipeline, and the adapters in the layout (pytorch_lora_weights
# .safetensors) that diffusers' `load_lora_weights` reads.
PIPELINE, LORA = "pipeline", "lora"
VALIDATION_SEED = 0  # the same timesteps and noise every time the held-out loss is scored


def _lora_config(lora: LoRAConfig, target_modules: list[str]):
    from peft import LoraConfig

    return LoraConfig(r=lora.rank, lora_alpha=lora.alpha or lora.rank, lora_dropout=lora.dropout,
                      target_modules=target_modules, init_lora_weights="gaussian")


def add_lora(unet: UNet2DConditionModel, lora: LoRAConfig) -> UNet2DConditionModel:
    """Freeze `unet` and give it trainable low-rank adapters (A random, B zero: the model starts unchanged)."""
    check_rank(unet, lora)
    unet.requires_grad_(False)
    unet.add_adapter(_lora_config(lora, list(lora.target_modules)))
    return unet


def check_rank(model: nn.Module, lora: LoRAConfig) -> None:
    """Refuse a rank above every adapted layer's full rank: it adds parameters (and memory) but no capacity."""
    ranks = [min(module.in_features, module.out_features) for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and any(name == target or name.endswith("." + target)
                                                      for target in lora.target_modules)]
    if not ranks:
        raise T2IError(f"finetune.lora.target_modules ({', '.join(lora.target_modules)}) name no linear layer of the "
                       "U-Net")
    if lora.rank > max(ranks):
        raise T2IError(f"finetune.lora.rank {lora.rank} is more than the full rank of every adapted layer (at most "
                       f"{max(ranks)} here): use a rank of at most {max(ranks)}, or 0 to fine-tune the whole U-Net")


def add_text_encoder_lora(text_encoder: TextEncoder, lora: LoRAConfig) -> TextEncoder:
    """Adapters on the text tower's attention: open_clip's fused `attn` blocks, or CLIP's q/k/v/out projections."""
    from peft import inject_adapter_in_model

    text_encoder.requires_grad_(False)
    if isinstance(text_encoder, OpenClipTextEncoder):  # the text tower only, not the image tower beside it
        inject_adapter_in_model(_lora_config(lora, ["attn"]), text_encoder.clip.transformer)
    else:
        inject_adapter_in_model(_lora_config(lora, ["q_proj", "k_proj", "v_proj", "out_proj"]), text_encoder.model)
    return text_encoder


def fold_adapters(module: nn.Module) -> nn.Module:
    """A copy of `module` with every adapter merged into the weight it adapts and removed: loadable without peft."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    folded = copy.deepcopy(module)
    for layer in folded.modules():
        if isinstance(layer, BaseTunerLayer) and not layer.merged:
            layer.merge()
    for name, layer in reversed(list(folded.named_modules())):  # innermost first: adapters can nest
        if isinstance(layer, BaseTunerLayer):
            parent, _, child = name.rpartition(".")
            setattr(folded.get_submodule(parent) if parent else folded, child, layer.get_base_layer())
    return folded


class UNetAndTextEncoder(nn.Module):
    """What trains when the text encoder has adapters too: one module, so the loop optimises and saves both."""

    def __init__(self, unet: UNet2DConditionModel, text_encoder: TextEncoder):
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder


class FinetuneStage(UNetStage):
    name = "finetune"

    def __init__(self, pipe: Text2ImagePipeline, finetune: FinetuneConfig, diffusion: DiffusionConfig,
                 preview_prompts: list[str], validation: Dataset | None, batch_size: int, device: torch.device):
        unet = pipe.unet  # loaded in fp32 on the device (run.load_source_pipeline): the master weights
        self.lora = finetune.lora
        if self.lora.rank:
            add_lora(unet, self.lora)
        if finetune.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        super().__init__(unet, pipe.vae, pipe.text_encoder, diffusion, pipe.scheduler_config, preview_prompts, device,
                         preview_defaults=pipe.defaults)
        if self.lora.text_encoder:
            add_text_encoder_lora(self.text_encoder, self.lora)
            self.model = UNetAndTextEncoder(unet, self.text_encoder)
        self.validation = (list(islice(DataLoader(validation, batch_size=batch_size), finetune.validation_batches))
                           if validation is not None else [])
        if validation is not None and not self.validation:  # a stream holds out by name hash, with no minimum
            print("validation: no streamed sample fell in the held-out part (data.validation_fraction), so no "
                  "validation loss is logged; raise data.validation_fraction to have one")

    def _unet(self, model: nn.Module) -> UNet2DConditionModel:
        return model.unet if isinstance(model, UNetAndTextEncoder) else model

    def loss(self, model: nn.Module, batch: dict, rng: BatchRandomness,
             caption_dropout: float | None = None) -> tuple[torch.Tensor, dict]:
        if not isinstance(model, UNetAndTextEncoder):
            return super().loss(model, batch, rng, caption_dropout)

        def encode(captions: list[str], device: torch.device) -> torch.Tensor:  # with gradients, for the adapters
            return model.text_encoder(model.text_encoder.tokenize(captions).ids.to(device))

        return self.denoising_loss(model.unet, encode, batch, rng, caption_dropout)

    def cache_text_states(self, captions: list[str], cache_dir: Path | None) -> None:
        if self.lora.text_encoder:
            print("text states are not cached: the text encoder trains")
            return
        super().cache_text_states(captions, cache_dir)

    @torch.no_grad()
    def validation_loss(self, model: nn.Module) -> float:
        """The loss on the held-out batches, every caption kept, at fixed timesteps and noise."""
        was_training = model.training
        model.eval()
        device = self.alpha_bar.device
        rng = BatchRandomness(torch.Generator(device).manual_seed(VALIDATION_SEED))
        losses = [self.loss(model, batch_to_device(batch, device), rng, caption_dropout=0.0)[0].item()
                  for batch in self.validation]
        model.train(was_training)
        return sum(losses) / len(losses)

    def sample(self, model: nn.Module, path: Path) -> dict | None:
        if self.preview_prompts:  # through self.text_encoder: the adapted one, when it trains
            super().sample(self._unet(model), path)
        return {"validation_loss": self.validation_loss(model)} if self.validation else None

    def save(self, model: nn.Module, folder: Path) -> None:
        unet = self._unet(model)
        if self.lora.rank:
            self._save_adapters(unet, folder / LORA)
        text_encoder = fold_adapters(self.text_encoder) if self.lora.text_encoder else self.text_encoder
        Text2ImagePipeline(self.vae, text_encoder, fold_adapters(unet) if self.lora.rank else unet,
                           self.scheduler_config, self.preview_defaults).save_pretrained(folder / PIPELINE)

    def _save_adapters(self, unet: UNet2DConditionModel, folder: Path) -> None:
        """diffusers' LoRA layout: the U-Net's adapters, and a Hugging Face text encoder's (an open_clip text
        encoder's adapters have no place there; they are folded into the exported pipeline)."""
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        layers = {"unet_lora_layers": convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))}
        if self.lora.text_encoder and isinstance(self.text_encoder, HFClipTextEncoder):
            layers["text_encoder_lora_layers"] = convert_state_dict_to_diffusers(
                get_peft_model_state_dict(self.text_encoder.model))
        StableDiffusionPipeline.save_lora_weights(folder, safe_serialization=True, **layers)
