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


def test_open_clip_clip_skip_selects_earlier_layers():
    encoder = OpenClipTextEncoder.from_config(TextEncoderConfig(width=32, heads=2, layers=2, context_length=8), 32)
    clip = encoder.clip
    ids = encoder.tokenize(["a red circle to the left of a blue square"]).ids
    embedded = clip.token_embedding(ids) + clip.positional_embedding
    # clip_skip 0: the whole text tower, exactly as open_clip runs it.
    assert torch.allclose(encoder(ids), clip.ln_final(clip.transformer(embedded, attn_mask=clip.attn_mask)),
                          atol=1e-6)
    # clip_skip 1: the output of the first of two layers.
    encoder.clip_skip = 1
    first_layer = clip.transformer.resblocks[0](embedded, attn_mask=clip.attn_mask)
    assert torch.allclose(encoder(ids), clip.ln_final(first_layer), atol=1e-6)
    # clip_skip = layers: context-free token + position embeddings, so a word's state ignores the words before it.
    encoder.clip_skip = 2
    green, blue = (encoder.tokenize([f"a {colour} triangle"]).ids for colour in ("green", "blue"))
    assert torch.equal(encoder(green)[0, 3], encoder(blue)[0, 3])  # "triangle" after either colour
    with pytest.raises(T2IError, match="clip_skip must be between 0 and the text encoder's 2 layers"):
        OpenClipTextEncoder(clip, encoder.model_config, clip_skip=3)
    # A scratch encoder built from a config takes the config's clip_skip, as the pretrained sources do.
    assert OpenClipTextEncoder.from_config(TextEncoderConfig(layers=2, clip_skip=2), 32).clip_skip == 2


def test_hf_clip_skip_equals_a_shallower_model(tmp_path):
    files = write_hf_tokenizer_files(tmp_path / "tok")
    tokenizer = CLIPTokenizer(str(files / "vocab.json"), str(files / "merges.txt"), pad_token="<|endoftext|>",
                              model_max_length=77)
    sizes = {"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 2,
             "max_position_embeddings": 77}
    torch.manual_seed(0)
    deep = CLIPTextModel(CLIPTextConfig(num_hidden_layers=3, **sizes)).eval()
    shallow = CLIPTextModel(CLIPTextConfig(num_hidden_layers=2, **sizes)).eval()
    shallow.load_state_dict(deep.state_dict(), strict=False)  # layer 2 of `deep` has no place in `shallow`
    ids = HFClipTextEncoder(shallow, tokenizer).tokenize(["a large red circle", "a white square above a black"]).ids

    skipped = HFClipTextEncoder(deep, tokenizer, clip_skip=1)(ids)
    assert torch.allclose(skipped, HFClipTextEncoder(shallow, tokenizer)(ids), atol=1e-5)
    assert not torch.allclose(skipped, HFClipTextEncoder(deep, tokenizer)(ids), atol=1e-3)
    with pytest.raises(T2IError, match="clip_skip must be between 0 and the text encoder's 3 layers"):
        HFClipTextEncoder(deep, tokenizer, clip_skip=4)
