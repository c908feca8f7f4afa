"""Text encoders that turn prompts into the token states the U-Net cross-attends to.

Two families behind one interface (`tokenize` then `forward`):
- `OpenClipTextEncoder`: an open_clip CLIP, trained here from scratch (stage clip) or loaded pretrained;
- `HFClipTextEncoder`: a Hugging Face `CLIPTextModel` + `CLIPTokenizer`, as in Stable Diffusion folders.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import text_global_pool
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.utils import logging as transformers_logging

from t2i.config import TextEncoderConfig
from t2i.errors import T2IError

logger = logging.getLogger("t2i")

OPEN_CLIP_CONFIG = "open_clip_config.json"
WEIGHTS = "model.safetensors"


@dataclass(frozen=True)
class Tokens:
    ids: torch.Tensor  # (B, context_length) int64
    truncated: tuple[bool, ...]  # per prompt: did it lose tokens to the context length?


TRUNCATED_PROMPT_SHOWN = 80  # characters of a truncated prompt its warning quotes


def report_truncation(prompts: list[str], tokens: Tokens, context_length: int) -> None:
    """One warning for each distinct prompt cut to the context (a prompt drawn N times is one), naming its start."""
    for prompt in dict.fromkeys(prompt for prompt, cut in zip(prompts, tokens.truncated) if cut):
        shown = prompt if len(prompt) <= TRUNCATED_PROMPT_SHOWN else prompt[:TRUNCATED_PROMPT_SHOWN] + "…"
        logger.warning("prompt truncated to the text encoder's %d tokens: %r", context_length, shown)


def check_clip_skip(clip_skip: int, layers: int) -> int:
    if not 0 <= clip_skip <= layers:
        raise T2IError(f"clip_skip must be between 0 and the text encoder's {layers} layers, got {clip_skip}")
    return clip_skip


class OpenClipTextEncoder(nn.Module):
    """An open_clip CLIP model whose text tower gives per-token states (after the final layer norm)."""

    kind = "open_clip"

    def __init__(self, clip: open_clip.CLIP, model_config: dict, clip_skip: int = 0):
        super().__init__()
        self.clip = clip
        self.clip_skip = check_clip_skip(clip_skip, len(clip.transformer.resblocks))
        self.model_config = model_config
        self.context_length = clip.context_length
        self.hidden_size = clip.transformer.width
        self.tokenizer = SimpleTokenizer(context_length=self.context_length)

    @classmethod
    def from_config(cls, config: TextEncoderConfig, image_size: int) -> "OpenClipTextEncoder":
        """A fresh, randomly initialised CLIP of the configured sizes (trained by stage clip)."""
        model_config = {
            "embed_dim": config.embed_dim,
            "vision_cfg": {"image_size": image_size, "layers": config.vision_layers, "width": config.vision_width,
                           "patch_size": config.vision_patch_size, "head_width": config.vision_width // config.heads},
            "text_cfg": {"context_length": config.context_length, "vocab_size": 49408, "width": config.width,
                         "heads": config.heads, "layers": config.layers},
        }
        return cls(open_clip.model.CLIP(**model_config), model_config, config.clip_skip)

    @classmethod
    def from_open_clip(cls, name: str, weights_path: str | Path, clip_skip: int = 0) -> "OpenClipTextEncoder":
        """A pretrained open_clip model by architecture name, with weights from a local file."""
        model_config = open_clip.get_model_config(name)
        if model_config is None:
            raise T2IError(f"unknown open_clip model {name!r}; see open_clip.list_models()")
        if not Path(weights_path).is_file():
            raise T2IError(f"open_clip weights file '{weights_path}' does not exist")
        clip = open_clip.create_model(name, pretrained=str(weights_path))
        return cls(clip, model_config, clip_skip)

    def tokenize(self, prompts: list[str]) -> Tokens:
        """Token ids padded with 0; an over-long prompt keeps its first tokens and ends in <end_of_text>."""
        sot, eot = self.tokenizer.sot_token_id, self.tokenizer.eot_token_id
        ids = torch.zeros(len(prompts), self.context_length, dtype=torch.long)
        truncated = []
        for row, prompt in enumerate(prompts):
            tokens = [sot, *self.tokenizer.encode(prompt), eot]
            truncated.append(len(tokens) > self.context_length)
            tokens = tokens[: self.context_length]
            tokens[-1] = eot
            ids[row, : len(tokens)] = torch.tensor(tokens)
        return Tokens(ids, tuple(truncated))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # open_clip's encode_text pools to one vector; cross-attention needs every token, so we stop before pooling.
        clip = self.clip
        x = clip.token_embedding(ids) + clip.positional_embedding  # (B, L, D)
        if not clip.transformer.batch_first:
            x = x.transpose(0, 1)
        for block in clip.transformer.resblocks[: len(clip.transformer.resblocks) - self.clip_skip]:
            x = block(x, attn_mask=clip.attn_mask)
        if not clip.transformer.batch_first:
            x = x.transpose(0, 1)
        return clip.ln_final(x)  # (B, L, D)

    def pooled_features(self, ids: torch.Tensor) -> torch.Tensor:
        """open_clip's `encode_text` (unnormalised), computed over the tokens up to the longest prompt's end.

        The text tower is causal, so the padding after a prompt changes none of the states before it: dropping
        the columns that are padding in every row is exact, and CLIP training's short captions run ~5x faster.
        """
        clip = self.clip
        length = int((ids != 0).sum(dim=1).max())  # pad id 0; every row starts with <start_of_text>
        ids = ids[:, :length]  # (B, l)
        x = clip.token_embedding(ids) + clip.positional_embedding[:length]
        x = clip.ln_final(clip.transformer(x, attn_mask=clip.attn_mask[:length, :length]))  # (B, l, D)
        pooled = text_global_pool(x, ids, clip.text_pool_type, eos_token_id=getattr(clip, "text_eos_id", None))
        if isinstance(clip.text_projection, nn.Linear):
            return clip.text_projection(pooled)
        return pooled @ clip.text_projection if clip.text_projection is not None else pooled

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / OPEN_CLIP_CONFIG).write_text(json.dumps(self.model_config, indent=2))
        state = {k: v.detach().contiguous() for k, v in self.clip.state_dict().items()}
        save_file(state, folder / WEIGHTS)

    @classmethod
    def load(cls, folder: Path, clip_skip: int = 0) -> "OpenClipTextEncoder":
        model_config = json.loads((folder / OPEN_CLIP_CONFIG).read_text())
        clip = open_clip.model.CLIP(**model_config)
        clip.load_state_dict(load_file(folder / WEIGHTS))
        return cls(clip, model_config, clip_skip)


class HFClipTextEncoder(nn.Module):
    """A Hugging Face CLIPTextModel; its `last_hidden_state` conditions the U-Net, as in Stable Diffusion."""

    kind = "hf_clip"

    def __init__(self, model, tokenizer, clip_skip: int = 0):
        super().__init__()
        self.model = model
        self.clip_skip = check_clip_skip(clip_skip, model.config.num_hidden_layers)
        self.tokenizer = tokenizer
        self.context_length = tokenizer.model_max_length
        self.hidden_size = model.config.hidden_size

    @classmethod
    def from_folders(cls, model_folder: str | Path, tokenizer_folder: str | Path | None = None,
                     clip_skip: int = 0, allow_pickle: bool = False) -> "HFClipTextEncoder":
        """Load from safetensors weights; pickle weights (which can run code) only when `allow_pickle`."""
        from transformers import CLIPTextModel, CLIPTokenizer

        model_folder = Path(model_folder)
        tokenizer_folder = Path(tokenizer_folder) if tokenizer_folder else model_folder
        for folder in (model_folder, tokenizer_folder):
            if not folder.is_dir():
                raise T2IError(f"text encoder folder '{folder}' does not exist")
        # Missing or mismatched tensors would be left randomly initialised; they are reported below instead.
        with without_transformers_bars():
            model, info = CLIPTextModel.from_pretrained(model_folder, use_safetensors=None if allow_pickle else True,
                                                        output_loading_info=True, ignore_mismatched_sizes=True)
        unmatched = sorted(map(str, [*info["missing_keys"], *info["mismatched_keys"]]))
        if unmatched:
            raise T2IError(f"the text encoder config '{model_folder / 'config.json'}' does not match its weights: "
                           f"{len(unmatched)} tensors are missing or of another shape (e.g. {unmatched[0]})")
        return cls(model, CLIPTokenizer.from_pretrained(tokenizer_folder), clip_skip)

    def tokenize(self, prompts: list[str]) -> Tokens:
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.context_length, truncation=True,
                             return_tensors="pt").input_ids
        full_lengths = [len(ids) for ids in self.tokenizer(prompts).input_ids]
        return Tokens(ids, tuple(n > self.context_length for n in full_lengths))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.to(self.model.device)
        if not self.clip_skip:
            return self.model(ids)[0]  # (B, L, D) last_hidden_state
        # As diffusers' `clip_skip`: an earlier layer's states, through the final layer norm. (transformers 5 dropped
        # the `text_model` wrapper that diffusers' own clip_skip code still reaches through.)
        hidden = self.model(ids, output_hidden_states=True).hidden_states[-(self.clip_skip + 1)]
        return getattr(self.model, "text_model", self.model).final_layer_norm(hidden)

    def save(self, folder: Path, tokenizer_folder: Path) -> None:
        with without_transformers_bars():
            self.model.save_pretrained(folder)
        self.tokenizer.save_pretrained(tokenizer_folder)


@contextmanager
def without_transformers_bars() -> Iterator[None]:
    """transformers draws "Loading weights" and "Writing model shards" bars for the text encoder's one local file,
    which take no visible time; t2i's own output says what it loaded and wrote."""
    was_active = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_active:
            transformers_logging.enable_progress_bar()


TextEncoder = OpenClipTextEncoder | HFClipTextEncoder


def build_text_encoder(config: TextEncoderConfig, image_size: int) -> TextEncoder:
    match config.source:
        case "scratch":
            return OpenClipTextEncoder.from_config(config, image_size)
        case "open_clip":
            return OpenClipTextEncoder.from_open_clip(config.open_clip_name, config.weights_path, config.clip_skip)
        case "hf_clip":
            return HFClipTextEncoder.from_folders(config.hf_path, clip_skip=config.clip_skip)
    raise ValueError(f"unknown text encoder source {config.source!r}")


def write_hf_tokenizer_files(folder: str | Path) -> Path:
    """Write vocab.json + merges.txt for transformers' CLIPTokenizer from the BPE file open_clip ships.

    Both tokenizers are OpenAI's CLIP BPE; this lets a `CLIPTokenizer` be made with no download.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = SimpleTokenizer()
    renamed = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {renamed.get(token, token): index for token, index in tokenizer.encoder.items()}
    merges = sorted(tokenizer.bpe_ranks, key=tokenizer.bpe_ranks.get)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(pair) for pair in merges) + "\n")
    return folder
