"""Holding entries out for validation, by a hash of their name: stable as files are added, the same on every
process, and usable on a stream (a member's name decides, without knowing the rest)."""
from __future__ import annotations

import hashlib

from t2i.data.scan import Sample


def holdout_score(name: str) -> float:
    """A number in [0, 1) fixed by the entry's name alone, so adding files never moves another file."""
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_validation(samples: list[Sample], fraction: float) -> tuple[list[Sample], list[Sample]]:
    """(train, validation): the round(fraction * n) samples (at least one, when fraction > 0) of lowest
    `holdout_score`, each list in its original order."""
    if fraction == 0.0 or len(samples) < 2:
        return samples, []
    count = min(len(samples) - 1, max(1, round(fraction * len(samples))))
    held = set(sorted(range(len(samples)), key=lambda i: holdout_score(samples[i].name))[:count])
    return ([s for i, s in enumerate(samples) if i not in held], [s for i, s in enumerate(samples) if i in held])
