"""Text encoders: open_clip from scratch, open_clip pretrained from a local file, Hugging Face CLIP folders."""
import json

import open_clip
import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from t2i.config import TextEncoderConfig
from t2i.errors import T2IError
from t2i.models.text_encoder import (
    HFClipTextEncoder, OpenClipTextEncoder, build_text_encoder, write_hf_tokenizer_files,
)

TINY_OPEN_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 20, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def test_scratch_encoder_gives_token_states_and_reports_truncation():
    encoder = OpenClipTextEncoder.from_config(TextEncoderConfig(width=32, heads=2, layers=1, context_length=8), 32)
    tokens = encoder.tokenize(["a red circle", "", "one two three four five six seven eight"])
    assert tokens.ids.shape == (3, 8)
    assert tokens.truncated == (False, False, True)
    assert tokens.ids[2, -1].item() == encoder.tokenizer.eot_token_id  # a cut prompt still ends in <eot>
    states = encoder(tokens.ids)
    assert states.shape == (3, 8, 32)
    assert not torch.allclose(states[0], states[1])


def test_open_clip_pretrained_from_a_local_weights_file(tmp_path):
    config_dir = tmp_path / "configs"
    config_dir.mkdir()
    (config_dir / "t2i-test-tiny.json").write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(config_dir)
    torch.manual_seed(0)
    reference = open_clip.create_model("t2i-test-tiny")
    torch.save(reference.state_dict(), tmp_path / "weights.pt")

    config = TextEncoderConfig(source="open_clip", open_clip_name="t2i-test-tiny",
                               weights_path=str(tmp_path / "weights.pt"))
    encoder = build_text_encoder(config, image_size=32)
    ids = encoder.tokenize(["a large blue square"]).ids
    assert torch.equal(encoder.clip.token_embedding.weight, reference.token_embedding.weight)
    assert encoder(ids).shape == (1, 20, 32)
    pooled = encoder.clip.encode_text(ids)
    assert torch.allclose(pooled, reference.encode_text(ids))

    encoder.save(tmp_path / "saved")
    again = OpenClipTextEncoder.load(tmp_path / "saved")
    assert torch.allclose(again(ids), encoder(ids))

    with pytest.raises(T2IError, match="weights file .* does not exist"):
        build_text_encoder(TextEncoderConfig(source="open_clip", open_clip_name="t2i-test-tiny",
                                             weights_path=str(tmp_path / "missing.pt")), 32)
    with pytest.raises(T2IError, match="unknown open_clip model"):
        build_text_encoder(TextEncoderConfig(source="open_clip", open_clip_name="no-such-model",
                                             weights_path=str(tmp_path / "weights.pt")), 32)


def test_hugging_face_clip_folder(tmp_path):
    files = write_hf_tokenizer_files(tmp_path / "tok")
    tokenizer = CLIPTokenizer(str(files / "vocab.json"), str(files / "merges.txt"), pad_token="<|endoftext|>",
                              model_max_length=77)
    model = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=37,
                                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77))
    model.save_pretrained(tmp_path / "clip")
    tokenizer.save_pretrained(tmp_path / "clip")

    encoder = build_text_encoder(TextEncoderConfig(source="hf_clip", hf_path=str(tmp_path / "clip")), 32)
    assert isinstance(encoder, HFClipTextEncoder)
    tokens = encoder.tokenize(["a red circle", "word " * 100])
    assert tokens.truncated == (False, True)
    assert encoder(tokens.ids).shape == (2, 77, 32)
    with pytest.raises(T2IError, match="text encoder folder .* does not exist"):
        build_text_encoder(TextEncoderConfig(source="hf_clip", hf_path=str(tmp_path / "nope")), 32)


def test_hf_tokenizer_files_reproduce_open_clip_tokens(tmp_path):
    files = write_hf_tokenizer_files(tmp_path)
    hf = CLIPTokenizer(str(files / "vocab.json"), str(files / "merges.txt"))
    ours = open_clip.tokenizer.SimpleTokenizer()
    for text in ["a small yellow triangle at the bottom", "a white square above a black circle"]:
        assert hf(text).input_ids == [ours.sot_token_id, *ours.encode(text), ours.eot_token_id]
