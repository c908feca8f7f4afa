"""Stage classifier: train the noise-aware classifier of classifier guidance (Dhariwal & Nichol 2021, §4) on the
U-Net's noisy latents: cross-entropy of each label head at timesteps drawn uniformly, noised with the U-Net's own
schedule (`scheduler_config`), so that p_φ(y | x_t, t) is known at every step a sampler visits. Items labelled
IGNORE_LABEL (two-object scenes, t2i.data.labels) add nothing. The VAE is frozen."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from t2i.diffusion.parameterization import add_noise
from t2i.diffusion.schedules import scheduler_alphas_cumprod
from t2i.models.classifier import IGNORE_LABEL, NoisyLatentClassifier
from t2i.training.randomness import BatchRandomness
from t2i.training.stages.unet import sample_latents

# Training timesteps (fractions of the schedule) at which sample() measures held-out accuracy.
PREVIEW_NOISE_FRACTIONS = (0.25, 0.5, 0.75)
PREVIEW_SEED = 0


class ClassifierStage:
    name = "classifier"

    def __init__(self, classifier: NoisyLatentClassifier, vae: AutoencoderKL, scheduler_config: dict,
                 preview: dict, device: torch.device):
        """`preview`: a held-out batch ({"pixel_values", "labels"}) whose accuracy sample() measures."""
        self.model = classifier
        self.vae = vae.requires_grad_(False).eval().to(device)
        self.alpha_bar = scheduler_alphas_cumprod(scheduler_config).float().to(device)
        self.preview = preview

    def loss(self, model: NoisyLatentClassifier, batch: dict, rng: BatchRandomness) -> tuple[torch.Tensor, dict]:
        x0 = sample_latents(self.vae, batch, rng)  # (B, C, h, w)
        t = rng.randint(len(self.alpha_bar), x0.shape[0]).to(x0.device)
        noise = rng.randn(x0.shape, dtype=x0.dtype, device=x0.device)
        logits = model(add_noise(x0, noise, self.alpha_bar[t]), t)  # {head: (B, classes)}
        labels = batch["labels"]  # (B, heads)
        loss, metrics = x0.new_zeros(()), {}
        for head, name in enumerate(model.label_names):
            head_loss, accuracy = _head_loss(logits[name], labels[:, head])
            loss = loss + head_loss
            metrics[f"{name}_accuracy"] = accuracy
        return loss, metrics

    @torch.no_grad()
    def sample(self, model: NoisyLatentClassifier, path: Path) -> dict:
        """Held-out accuracy per head at a few noise levels (a classifier has nothing to draw; `path` is unused)."""
        model.eval()
        device = self.alpha_bar.device
        x0 = self.vae.encode(self.preview["pixel_values"].to(device)).latent_dist.mean * self.vae.config.scaling_factor
        generator = torch.Generator(device).manual_seed(PREVIEW_SEED)
        labels = self.preview["labels"].to(device)
        metrics = {}
        for fraction in PREVIEW_NOISE_FRACTIONS:
            t = torch.full((x0.shape[0],), int(fraction * (len(self.alpha_bar) - 1)), device=device)
            noise = torch.randn(x0.shape, generator=generator, device=device)
            logits = model(add_noise(x0, noise, self.alpha_bar[t]), t)
            for head, name in enumerate(model.label_names):
                metrics[f"{name}_accuracy_t{t[0].item()}"] = _head_loss(logits[name], labels[:, head])[1]
        return metrics

    def save(self, model: NoisyLatentClassifier, folder: Path) -> None:
        model.save_pretrained(folder)


def _head_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Mean cross-entropy over the labelled items (0 when none is) and their accuracy."""
    known = labels != IGNORE_LABEL
    count = int(known.sum())
    loss = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_LABEL, reduction="sum") / max(count, 1)
    correct = (logits.argmax(dim=-1) == labels) & known
    return loss, (float(correct.sum()) / count if count else float("nan"))
