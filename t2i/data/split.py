"""Holding entries out for validation, by a hash of their name: stable as files are added, the same on every
process, and usable on a stream (a member's name decides, without knowing the rest)."""
from __future__ import annotations

import hashlib
from collections import Counter

from t2i.data.scan import Sample


def holdout_score(name: str) -> float:
    """A number in [0, 1) fixed by the entry's name alone, so adding files never moves another file."""
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_validation(samples: list[Sample], fraction: float) -> tuple[list[Sample], list[Sample]]:
    """(train, validation): the samples of the names of lowest `holdout_score`, taken until they number
    round(fraction * n), each list in its original order. A set too small for that to reach one holds nothing out
    (one of 5 images would be 20% of a user's data, not 5%). The samples of one name (an image with several
    captions) all go to one side, and the name of highest score always trains."""
    names = sorted({sample.name for sample in samples}, key=holdout_score)
    count = round(fraction * len(samples))
    if count == 0 or len(names) < 2:
        return samples, []
    per_name = Counter(sample.name for sample in samples)
    held: set[str] = set()
    for name in names[:-1]:
        if sum(per_name[held_name] for held_name in held) >= count:
            break
        held.add(name)
    return ([s for s in samples if s.name not in held], [s for s in samples if s.name in held])
