"""Class labels for stage classifier: the colour and shape of each shapes scene, read from the scene itself.

The scene, not its caption, is the truth: a partial caption ("a large triangle on the left") still shows one
colour. Only single-object scenes are labelled; a two-object scene shows two colours (and often two shapes), and a
single-label softmax cannot say both, so its labels are IGNORE_LABEL and cross-entropy skips it.
"""
from __future__ import annotations

import torch
from torch.utils.data import Dataset

from t2i.data.shapes import COLOURS, SHAPES, Scene
from t2i.models.classifier import IGNORE_LABEL

# Label name -> vocabulary; a saved classifier keeps these, and guidance reads a prompt's words against them.
SHAPES_LABELS: dict[str, list[str]] = {"colour": list(COLOURS), "shape": list(SHAPES)}


def scene_labels(scenes: list[Scene]) -> torch.Tensor:
    """(N, 2) labels (colour, shape) of `scenes`; IGNORE_LABEL for both in two-object scenes."""
    rows = []
    for scene in scenes:
        if len(scene.spec.objects) == 1:
            (obj,) = scene.spec.objects
            rows.append([SHAPES_LABELS["colour"].index(obj.colour), SHAPES_LABELS["shape"].index(obj.shape)])
        else:
            rows.append([IGNORE_LABEL, IGNORE_LABEL])
    return torch.tensor(rows, dtype=torch.long)


class LabelledDataset(Dataset):
    """Item i of `dataset` (images or cached latents, in the same order as `labels`) with "labels": (heads,)."""

    def __init__(self, dataset: Dataset, labels: torch.Tensor):
        if len(dataset) != len(labels):
            raise ValueError(f"{len(labels)} labels for a dataset of {len(dataset)} items")
        self.dataset, self.labels = dataset, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {**self.dataset[i], "labels": self.labels[i]}
