"""t2i's text encoders as a Hugging Face `CLIPTextModel` + `CLIPTokenizer`, the pair diffusers' pipelines load.

clip_skip is baked in: the exported model keeps only the first `layers - clip_skip` layers, so its
`last_hidden_state` (after the final layer norm) equals the states t2i conditions on, with no setting that
diffusers would have to read. A model may keep zero layers (the demo's clip_skip = layers): it is then the
token + position embeddings through the final layer norm.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from t2i.errors import T2IError
from t2i.models.text_encoder import HFClipTextEncoder, OpenClipTextEncoder, TextEncoder, write_hf_tokenizer_files

# open_clip pads with id 0 (the token "!"), and the U-Net attends to the padded positions' states. Stable
# Diffusion 2 pads with "!" itself, but a pad token is a special token to CLIPTokenizer, which then splits every
# "!" in a prompt out of its word ("hi!!" gives [hi, !, !], not open_clip's [hi, !!]). So the exported tokenizer
# pads with a token of its own, appended to the vocabulary, whose embedding is a copy of the embedding of "!".
PAD_TOKEN = "<|pad|>"
OPEN_CLIP_PAD_ID = 0
OPEN_CLIP_ACTIVATIONS = {False: "gelu", True: "quick_gelu"}  # by the model config's `quick_gelu`
# Text-tower options whose non-default values CLIPTextModel cannot express.
OPEN_CLIP_DEFAULTS = {"ls_init_value": None, "no_causal_mask": False, "embed_cls": False, "qk_norm": False,
                      "scaled_cosine_attn": False, "scale_heads": False, "scale_attn_inner": False,
                      "scale_attn": False, "scale_fc": False, "hf_model_name": None, "act_kwargs": None,
                      "norm_kwargs": None, "block_type": None}


def to_clip_text_model(text_encoder: TextEncoder) -> tuple[CLIPTextModel, CLIPTokenizer]:
    """A CLIPTextModel whose last_hidden_state equals `text_encoder`'s output, and the tokenizer that feeds it."""
    if isinstance(text_encoder, HFClipTextEncoder):
        return _truncated_hf_model(text_encoder), text_encoder.tokenizer
    return _open_clip_text_model(text_encoder), open_clip_tokenizer(text_encoder.context_length)


def open_clip_tokenizer(context_length: int) -> CLIPTokenizer:
    """A CLIPTokenizer giving the ids of open_clip's SimpleTokenizer, padded with PAD_TOKEN (see above)."""
    with tempfile.TemporaryDirectory() as folder:
        files = write_hf_tokenizer_files(folder)
        tokenizer = CLIPTokenizer(str(files / "vocab.json"), str(files / "merges.txt"), pad_token=PAD_TOKEN,
                                  model_max_length=context_length)
    return tokenizer


def write_vocab_and_merges(folder: Path) -> None:
    """vocab.json (with PAD_TOKEN) and merges.txt beside tokenizer.json, for CLIPTokenizers that read only these."""
    files = write_hf_tokenizer_files(folder)
    vocab = json.loads((files / "vocab.json").read_text())
    (files / "vocab.json").write_text(json.dumps({**vocab, PAD_TOKEN: len(vocab)}))


def _open_clip_text_model(encoder: OpenClipTextEncoder) -> CLIPTextModel:
    clip = encoder.clip
    text_config = encoder.model_config.get("text_cfg", {})
    unsupported = sorted(key for key, default in OPEN_CLIP_DEFAULTS.items() if text_config.get(key, default) != default)
    if unsupported:
        raise T2IError(f"cannot export this open_clip text tower to a CLIPTextModel: it sets {', '.join(unsupported)}")
    vocab_size, width = clip.token_embedding.weight.shape
    tokenizer_vocab = len(encoder.tokenizer.encoder)
    if vocab_size != tokenizer_vocab:
        raise T2IError(f"the open_clip text tower has {vocab_size} token embeddings but its tokenizer "
                       f"{tokenizer_vocab} tokens; cannot export it")
    blocks = list(clip.transformer.resblocks)[: len(clip.transformer.resblocks) - encoder.clip_skip]
    config = CLIPTextConfig(
        vocab_size=vocab_size + 1,  # + PAD_TOKEN
        hidden_size=width,
        intermediate_size=clip.transformer.resblocks[0].mlp.c_fc.out_features,
        num_hidden_layers=len(blocks),
        num_attention_heads=clip.transformer.resblocks[0].attn.num_heads,
        max_position_embeddings=encoder.context_length,
        hidden_act=OPEN_CLIP_ACTIVATIONS[bool(encoder.model_config.get("quick_gelu", False))],
        layer_norm_eps=clip.ln_final.eps,
        projection_dim=encoder.model_config.get("embed_dim", width),
        bos_token_id=encoder.tokenizer.sot_token_id,
        eos_token_id=encoder.tokenizer.eot_token_id,
        pad_token_id=vocab_size,
    )
    model = CLIPTextModel(config)
    model.load_state_dict(_open_clip_state(clip, blocks, hasattr(model, "text_model")))
    return model.eval()


def _open_clip_state(clip, blocks: list, nested: bool) -> dict[str, torch.Tensor]:
    """open_clip's text-tower weights under CLIPTextModel's names (in_proj split into q, k, v)."""
    prefix = "text_model." if nested else ""
    tokens = clip.token_embedding.weight
    state = {
        "embeddings.token_embedding.weight": torch.cat([tokens, tokens[OPEN_CLIP_PAD_ID: OPEN_CLIP_PAD_ID + 1]]),
        "embeddings.position_embedding.weight": clip.positional_embedding,
        "final_layer_norm.weight": clip.ln_final.weight,
        "final_layer_norm.bias": clip.ln_final.bias,
    }
    for i, block in enumerate(blocks):
        layer = f"encoder.layers.{i}."
        for name, weight, bias in zip(("q_proj", "k_proj", "v_proj"), block.attn.in_proj_weight.chunk(3),
                                      block.attn.in_proj_bias.chunk(3)):
            state[layer + f"self_attn.{name}.weight"], state[layer + f"self_attn.{name}.bias"] = weight, bias
        modules = {"self_attn.out_proj": block.attn.out_proj, "layer_norm1": block.ln_1, "layer_norm2": block.ln_2,
                   "mlp.fc1": block.mlp.c_fc, "mlp.fc2": block.mlp.c_proj}
        for name, module in modules.items():
            state[layer + f"{name}.weight"], state[layer + f"{name}.bias"] = module.weight, module.bias
    return {prefix + key: value.detach().clone() for key, value in state.items()}


def _truncated_hf_model(encoder: HFClipTextEncoder) -> CLIPTextModel:
    """The encoder's CLIPTextModel without its last clip_skip layers (itself when clip_skip is 0)."""
    if not encoder.clip_skip:
        return encoder.model
    config = CLIPTextConfig.from_dict({**encoder.model.config.to_dict(),
                                       "num_hidden_layers": encoder.model.config.num_hidden_layers - encoder.clip_skip})
    model = CLIPTextModel(config)
    kept = model.state_dict().keys()
    model.load_state_dict({key: value for key, value in encoder.model.state_dict().items() if key in kept})
    return model.eval()
