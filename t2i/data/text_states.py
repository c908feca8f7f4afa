"""Text-state caching: the frozen text encoder's token states of every distinct caption, computed once.

A U-Net stage with a frozen text encoder otherwise encodes every caption at every step. The states of all
distinct captions, and of the empty prompt that caption dropout uses, are computed before training, kept in
memory and, with a cache folder, on disk under a key of the text encoder's weights and settings and of the
captions. A changed encoder or caption list gives another key, so a stale cache is never read.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from t2i.data.latents import hash_weights, writing_cache
from t2i.models.text_encoder import TextEncoder

EMPTY_PROMPT = ""  # the unconditional prompt of classifier-free guidance, as caption dropout writes it


class TextStates:
    """Looks up the states (L, D) of known captions; `captions` must cover every caption asked for."""

    def __init__(self, captions: list[str], states: torch.Tensor):
        self.captions, self.states = captions, states
        self.index = {caption: i for i, caption in enumerate(captions)}

    def covers(self, captions: list[str]) -> bool:
        return all(caption in self.index for caption in captions)

    def __call__(self, captions: list[str], device: torch.device) -> torch.Tensor:
        rows = torch.tensor([self.index[caption] for caption in captions])
        return self.states[rows].to(device)  # (B, L, D)


@torch.no_grad()
def encode_captions(text_encoder: TextEncoder, captions: list[str], batch_size: int = 256) -> TextStates:
    """The states of `captions` (with the empty prompt added), each distinct caption once."""
    distinct = list(dict.fromkeys([EMPTY_PROMPT, *captions]))
    device = next(text_encoder.parameters()).device
    states = [text_encoder(text_encoder.tokenize(distinct[i:i + batch_size]).ids.to(device)).float().cpu()
              for i in tqdm(range(0, len(distinct), batch_size), desc="caching text states")]
    return TextStates(distinct, torch.cat(states))


def cached_text_states(text_encoder: TextEncoder, captions: list[str], cache_dir: Path | None) -> TextStates:
    """`encode_captions`, read from and written to `cache_dir` under its key (in memory only when None)."""
    if cache_dir is None:
        return encode_captions(text_encoder, captions)
    distinct = list(dict.fromkeys([EMPTY_PROMPT, *captions]))
    key = _cache_key(text_encoder, distinct)
    path = Path(cache_dir) / f"text-states-{key[:32]}.safetensors"
    if path.is_file():
        try:
            states = load_file(path)["states"]
            if states.shape[0] == len(distinct):
                print(f"text states read from the cache: {path}")
                return TextStates(distinct, states)
        except (OSError, SafetensorError, KeyError):
            print(f"text-state cache {path} is unreadable; encoding again")
    encoded = encode_captions(text_encoder, distinct)
    with writing_cache(path) as draft:
        save_file({"states": encoded.states.contiguous()}, draft, metadata={"key": key})
    return encoded


def _cache_key(text_encoder: TextEncoder, distinct: list[str]) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps([type(text_encoder).__name__, text_encoder.clip_skip, text_encoder.context_length])
                  .encode())
    hash_weights(digest, text_encoder)
    digest.update(json.dumps(distinct).encode())
    return digest.hexdigest()
