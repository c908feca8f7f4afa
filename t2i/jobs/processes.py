"""Which process this is and which items it owns, alone or under `accelerate launch` (any GPUs, any nodes).

An item belongs to the process that its id hashes to, not to its position, so adding, removing or reordering
lines never moves another item to another process.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Processes:
    rank: int
    world_size: int
    device: object  # torch.device
    wait_for_everyone: Callable[[], None]

    def owns(self, item_id: str) -> bool:
        return owner_rank(item_id, self.world_size) == self.rank


def owner_rank(item_id: str, world_size: int) -> int:
    return int.from_bytes(hashlib.sha256(item_id.encode()).digest()[:8], "big") % world_size


def current_processes(device: str) -> Processes:
    """One process, or the group that accelerate (or torchrun-style RANK/WORLD_SIZE variables) describes."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        from t2i.pipeline.pipeline import resolve_device

        return Processes(0, 1, resolve_device(device), lambda: None)
    from accelerate import PartialState

    state = PartialState(cpu=device == "cpu")
    return Processes(state.process_index, state.num_processes, state.device, state.wait_for_everyone)
