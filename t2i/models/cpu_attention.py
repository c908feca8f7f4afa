"""Attention for bf16 training on a CPU: softmax(QKᵀ)V by batched matmuls over short key sequences, SDPA over long.

A thin dispatcher between two diffusers processors, because neither is the faster everywhere (forward and backward
under bf16 autocast on an AMX CPU, `scripts/bench_training_attention.py`): PyTorch's CPU flash attention takes
1.1-3.5x the time of matmul attention up to 256 keys (the demo's self- and cross-attention), while from 512 keys of
self-attention on matmul attention takes up to 2.1x SDPA's and keeps the whole score matrix for the backward.
"""
from __future__ import annotations

import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

MATMUL_MAX_KEYS = 256


def key_length(hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None) -> int:
    """Keys an attention call attends over: the text's tokens, or the image's positions ((B, N, C) or (B, C, H, W))."""
    if encoder_hidden_states is not None:
        return encoder_hidden_states.shape[1]
    return hidden_states.shape[1] if hidden_states.ndim == 3 else hidden_states.shape[2] * hidden_states.shape[3]


class ShortKeysMatmulAttention:
    """diffusers' `AttnProcessor` (batched matmuls) for calls over at most `max_keys` keys, `AttnProcessor2_0`
    (scaled_dot_product_attention) for longer ones."""

    def __init__(self, max_keys: int = MATMUL_MAX_KEYS):
        self.max_keys = max_keys
        self.matmul, self.sdpa = AttnProcessor(), AttnProcessor2_0()

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs):
        short = key_length(hidden_states, encoder_hidden_states) <= self.max_keys
        processor = self.matmul if short else self.sdpa
        return processor(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
