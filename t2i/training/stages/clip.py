"""Stage clip: train an open_clip CLIP from scratch with the contrastive loss of Radford et al. (2021) on the
dataset's image-caption pairs; its text tower then conditions the U-Net."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from t2i.models.text_encoder import OpenClipTextEncoder
from t2i.training.randomness import BatchRandomness


class ClipStage:
    name = "clip"

    def __init__(self, text_encoder: OpenClipTextEncoder):
        self.model = text_encoder
        self.contrastive = ClipLoss()

    def loss(self, model: OpenClipTextEncoder, batch: dict, rng: BatchRandomness) -> tuple[torch.Tensor, dict]:
        images = batch["pixel_values"]
        captions = list(batch["caption"])
        ids = model.tokenize(captions).ids.to(images.device)
        image_features = model.clip.encode_image(images, normalize=True)
        text_features = F.normalize(model.pooled_features(ids), dim=-1)
        loss = self.contrastive(image_features, text_features, model.clip.logit_scale.exp())
        # A pick counts as right when its caption equals the true one: batches repeat captions.
        picks = (image_features @ text_features.T).argmax(dim=1).tolist()
        accuracy = sum(captions[p] == c for p, c in zip(picks, captions)) / len(captions)
        return loss, {"image_to_text_accuracy": accuracy}

    def sample(self, model: OpenClipTextEncoder, path: Path) -> None:
        """A text encoder has no image to show; its accuracy is logged instead."""

    def save(self, model: OpenClipTextEncoder, folder: Path) -> None:
        model.save(folder)
