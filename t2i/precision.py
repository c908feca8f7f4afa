"""Which number format is fast where: bf16 matmuls and convolutions run on GPUs with bf16 and on CPUs with AMX
(Intel Sapphire Rapids and later) at several times fp32's speed; elsewhere on CPUs bf16 is emulated and several
times slower than fp32 (figures in docs/performance.md)."""
from __future__ import annotations

import torch


def bf16_is_fast(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        # torch.cpu has no public query for AMX; the private one asks the kernel for the tile state as well.
        is_amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
        init_amx = getattr(torch.cpu, "_init_amx", None)
        return bool(is_amx and init_amx and is_amx() and init_amx())
    return False


def resolve_mixed_precision(mixed_precision: str, device: torch.device) -> str:
    """'auto' becomes 'bf16' where bf16 is fast on `device`, else 'no'; other values are kept."""
    if mixed_precision != "auto":
        return mixed_precision
    return "bf16" if bf16_is_fast(device) else "no"
