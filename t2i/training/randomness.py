"""The random draws of a micro-batch, the same however many processes share the global batch.

Process r of N trains on rows r, r+N, r+2N, ... of each global batch (`ResumableBatchSampler`). `BatchRandomness`
draws every tensor for the whole global batch, from a generator that all processes seed alike, and keeps those
same rows. So N processes draw, row for row, what one process with the same global batch draws, and their
averaged gradients equal its gradient up to rounding. With one process the draws are plain generator calls.
"""
from __future__ import annotations

import torch


class BatchRandomness:
    def __init__(self, generator: torch.Generator, rank: int = 0, world_size: int = 1):
        self.generator, self.rank, self.world_size = generator, rank, world_size

    @property
    def device(self) -> torch.device:
        return self.generator.device

    def _mine(self, rows: torch.Tensor) -> torch.Tensor:
        return rows if self.world_size == 1 else rows[self.rank::self.world_size]

    def _global(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (shape[0] * self.world_size, *shape[1:])

    def randn(self, shape: tuple[int, ...], dtype: torch.dtype | None = None,
              device: torch.device | None = None) -> torch.Tensor:
        """Standard normal draws, shape[0] being this process's batch size."""
        draws = torch.randn(self._global(shape), generator=self.generator, device=self.device, dtype=dtype)
        return self._mine(draws).to(device or self.device)

    def rand(self, count: int) -> torch.Tensor:
        """Uniform draws in [0, 1), one per row."""
        return self._mine(torch.rand(count * self.world_size, generator=self.generator, device=self.device))

    def randint(self, high: int, count: int) -> torch.Tensor:
        """Integers in [0, high), one per row."""
        return self._mine(torch.randint(0, high, (count * self.world_size,), generator=self.generator,
                                        device=self.device))
