"""Export to diffusers: StableDiffusionPipeline loads the folder and draws t2i's images; the tokenizer's ids equal."""
import dataclasses
import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from transformers import CLIPTokenizer

from t2i import Text2ImagePipeline
from t2i.cli import main
from t2i.config import load_config
from t2i.errors import T2IError
from t2i.data.shapes import prompt_suite
from t2i.models.convert import open_clip_tokenizer, to_clip_text_model
from t2i.models.text_encoder import OpenClipTextEncoder
from t2i.pipeline.export import export_diffusers

from conftest import TINY_CONFIG, build_tiny_pipeline, save_tiny_sd_pipeline

PROMPTS = ["a large red circle!", "a small blue square on the left, above a green triangle and more words"]
NEGATIVES = ["a green triangle", ""]
ODD_PROMPTS = ["A Blue SQUARE, above  a yellow triangle!!", "hi!", "! ! !", "café naïve 123 4.5 's don't",
               "  tabs\tand\nnewlines ", "emoji 🙂 and 日本語", "x" * 200, "it's 3:45pm (roughly) -- ok?",
               "a red circle " * 30]


def tiny_pipeline_with_clip(layers: int, clip_skip: int) -> Text2ImagePipeline:
    """The tiny pipeline with an open_clip text tower of `layers` layers, read `clip_skip` layers early."""
    pipe = build_tiny_pipeline(seed=1)
    config = load_config(TINY_CONFIG)
    text_config = dataclasses.replace(config.text_encoder, layers=layers, clip_skip=clip_skip)
    pipe.text_encoder = OpenClipTextEncoder.from_config(text_config, config.data.resolution).eval()
    return pipe


def images_as_array(images) -> np.ndarray:
    return np.stack([np.asarray(image) for image in images]).astype(np.int16)


@pytest.mark.parametrize("layers, clip_skip", [(1, 0), (1, 1), (2, 1)])
def test_stable_diffusion_pipeline_draws_the_same_images(tmp_path, layers, clip_skip):
    pipe = tiny_pipeline_with_clip(layers, clip_skip)
    out = export_diffusers(pipe, tmp_path / "sd", sampler="euler_a")

    reference = StableDiffusionPipeline.from_pretrained(out)
    reference.set_progress_bar_config(disable=True)
    assert {"vocab.json", "merges.txt", "tokenizer.json"} <= {path.name for path in (out / "tokenizer").iterdir()}
    slow_files = CLIPTokenizer(str(out / "tokenizer" / "vocab.json"), str(out / "tokenizer" / "merges.txt"),
                               pad_token="<|pad|>", model_max_length=16)
    assert slow_files(PROMPTS, padding="max_length", truncation=True).input_ids == \
        reference.tokenizer(PROMPTS, padding="max_length", truncation=True).input_ids
    assert reference.text_encoder.config.num_hidden_layers == layers - clip_skip
    generators = [torch.Generator("cpu").manual_seed(5 + i) for i in range(len(PROMPTS))]
    expected = reference(PROMPTS, negative_prompt=NEGATIVES, num_inference_steps=4, guidance_scale=3.0,
                         generator=generators, output_type="np").images
    expected = (expected * 255).round().astype(np.int16)
    ours = images_as_array(pipe(PROMPTS, negative_prompt=NEGATIVES, num_inference_steps=4, guidance_scale=3.0, seed=5,
                                sampler="euler_a"))

    assert ours.shape == expected.shape == (2, 32, 32, 3)
    assert np.abs(ours - expected).max() <= 2
    assert ours.std() > 0


@torch.no_grad()
def test_exported_text_encoder_gives_t2i_states():
    pipe = tiny_pipeline_with_clip(2, 1)
    prompts = [*PROMPTS, *ODD_PROMPTS]
    model, tokenizer = to_clip_text_model(pipe.text_encoder)
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    torch.testing.assert_close(model(ids).last_hidden_state, pipe.encode_prompts(prompts))


def test_tokenizer_gives_open_clip_ids(tmp_path):
    """On the demo's prompts and odd ones: equal ids, except that padding uses the exported pad token."""
    encoder = OpenClipTextEncoder.from_config(load_config(TINY_CONFIG).text_encoder, 32)
    open_clip_tokenizer(16).save_pretrained(tmp_path / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path / "tokenizer")
    prompts = [prompt for prompt, _ in prompt_suite()] + ODD_PROMPTS
    for context in (16, 77):
        encoder.context_length, encoder.tokenizer.context_length = context, context
        expected = encoder.tokenize(prompts).ids
        ids = tokenizer(prompts, padding="max_length", max_length=context, truncation=True, return_tensors="pt").input_ids
        end = (expected == encoder.tokenizer.eot_token_id).int().argmax(1, keepdim=True)
        after_end = torch.arange(context) > end
        assert torch.equal(ids == tokenizer.pad_token_id, after_end)
        assert torch.equal(ids.masked_fill(after_end, 0), expected)


def test_diffusers_folder_exports_to_an_equal_folder(tmp_path, capsys):
    source = save_tiny_sd_pipeline(tmp_path / "source")
    out = tmp_path / "copy"
    capsys.readouterr()
    assert main(["export", "--model", str(source), "--out", str(out), "--sampler", "euler"]) == 0
    assert capsys.readouterr().err == ""  # transformers drew a "Writing model shards" bar for one file

    first, again = (StableDiffusionPipeline.from_pretrained(folder) for folder in (source, out))
    for name in ("vae", "unet", "text_encoder"):
        ours, theirs = getattr(first, name).state_dict(), getattr(again, name).state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[key], theirs[key]) for key in ours)
    assert first.tokenizer(ODD_PROMPTS).input_ids == again.tokenizer(ODD_PROMPTS).input_ids
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "EulerDiscreteScheduler" and scheduler["beta_schedule"] == "scaled_linear"
    index = json.loads((out / "model_index.json").read_text())
    assert index["safety_checker"] == [None, None] and index["requires_safety_checker"] is False


def test_exported_folder_loads_back_into_t2i(tmp_path):
    pipe = tiny_pipeline_with_clip(1, 1)
    export_diffusers(pipe, tmp_path / "sd")
    again = Text2ImagePipeline.from_pretrained(tmp_path / "sd", device="cpu")
    first = images_as_array(pipe(PROMPTS, num_inference_steps=3, guidance_scale=3.0, seed=2))
    second = images_as_array(again(PROMPTS, num_inference_steps=3, guidance_scale=3.0, seed=2))
    assert np.abs(first - second).max() <= 2


def test_export_replaces_a_previous_pipeline_whole(tmp_path):
    out = tmp_path / "sd"
    export_diffusers(build_tiny_pipeline(), out)
    (out / "stale.txt").write_text("old")
    (tmp_path / "sd.tmp").mkdir()  # a user's folder that happens to have the name of a staging folder
    export_diffusers(build_tiny_pipeline(), out)
    assert not (out / "stale.txt").exists() and (out / "model_index.json").is_file()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["sd", "sd.tmp"]


def test_export_refuses_a_folder_of_other_files_a_file_and_the_model_folder_itself(tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "notes.txt").write_text("important")
    with pytest.raises(T2IError, match=r"already holds other files \(notes.txt\).*give a new or empty folder"):
        export_diffusers(build_tiny_pipeline(), notes)
    assert [path.name for path in notes.iterdir()] == ["notes.txt"]
    (tmp_path / "file").write_text("keep")
    with pytest.raises(T2IError, match="'.*file': it is a file"):
        export_diffusers(build_tiny_pipeline(), tmp_path / "file")
    assert (tmp_path / "file").read_text() == "keep"
    build_tiny_pipeline().save_pretrained(tmp_path / "pipe")
    assert main(["export", "--model", str(tmp_path / "pipe"), "--out", str(tmp_path / "pipe")]) == 2
    assert (tmp_path / "pipe" / "t2i_pipeline.json").is_file()


def test_an_exported_folder_keeps_the_pipelines_defaults_with_its_sampler(tmp_path):
    pipe = build_tiny_pipeline()
    pipe.defaults = {"num_inference_steps": 7, "guidance_scale": 2.5, "sampler": "euler_a"}
    export_diffusers(pipe, tmp_path / "sd", sampler="heun_karras")
    again = Text2ImagePipeline.from_pretrained(tmp_path / "sd", device="cpu")
    assert again.defaults == {"num_inference_steps": 7, "guidance_scale": 2.5, "sampler": "heun_karras"}


@pytest.mark.parametrize("sampler", ["euler", "heun", "heun_karras", "dpmpp_2m"])
def test_a_diffusers_folder_without_t2i_defaults_samples_with_its_own_scheduler(tmp_path, sampler):
    export_diffusers(build_tiny_pipeline(), tmp_path / "sd", sampler=sampler)
    (tmp_path / "sd" / "t2i_defaults.json").unlink()
    assert Text2ImagePipeline.from_pretrained(tmp_path / "sd", device="cpu").defaults["sampler"] == sampler


def test_a_unet_with_adapters_is_refused_until_lora_export_exists(tmp_path):
    pipe = build_tiny_pipeline()
    pipe.unet.peft_config = {"default": object()}  # what peft's inject_adapter leaves on a model
    with pytest.raises(T2IError, match="LoRA adapters"):
        export_diffusers(pipe, tmp_path / "sd")
    assert not (tmp_path / "sd").exists()
