"""Text2ImagePipeline on tiny random models: seeds, guidance, samplers, save/load, and bad input."""
import logging

import numpy as np
import pytest
import torch

from conftest import build_tiny_pipeline

from t2i import Text2ImagePipeline
from t2i.diffusion.samplers import ALL_SAMPLERS
from t2i.errors import T2IError


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(image) for image in images]).astype(np.int16)


def test_images_are_pil_of_the_trained_size(tiny_pipeline):
    images = tiny_pipeline(["a large red circle", "a small blue square"], seed=0)
    assert len(images) == 2
    assert all(image.size == (32, 32) and image.mode == "RGB" for image in images)


def test_same_seed_same_image_and_different_seed_different_image(tiny_pipeline):
    first = pixels(tiny_pipeline("a large red circle", seed=3))
    again = pixels(tiny_pipeline("a large red circle", seed=3))
    other = pixels(tiny_pipeline("a large red circle", seed=4))
    assert np.array_equal(first, again)
    assert np.abs(first - other).max() > 10


def test_image_i_of_a_call_uses_seed_plus_i(tiny_pipeline):
    prompts = ["a large red circle", "a small blue square", "a white triangle at the top"]
    batch = pixels(tiny_pipeline(prompts, seed=11))
    singles = pixels([tiny_pipeline(prompt, seed=11 + i)[0] for i, prompt in enumerate(prompts)])
    assert np.abs(batch - singles).max() <= 2
    listed = pixels(tiny_pipeline(prompts, seed=[11, 12, 13]))
    assert np.abs(listed - batch).max() <= 2


def test_guidance_one_equals_the_conditional_prediction(tiny_pipeline):
    """At w = 1 the pipeline skips the unconditional pass; with ∅ = the prompt itself, CFG at any w gives ε(c)."""
    prompt = "a large green circle on the left"
    unguided = pixels(tiny_pipeline(prompt, guidance_scale=1.0, seed=5))
    self_guided = pixels(tiny_pipeline(prompt, negative_prompt=prompt, guidance_scale=4.0, seed=5))
    guided = pixels(tiny_pipeline(prompt, guidance_scale=4.0, seed=5))
    assert np.abs(unguided - self_guided).max() <= 1
    assert np.abs(unguided - guided).max() > 1


@pytest.mark.parametrize("sampler", ALL_SAMPLERS)
def test_every_sampler_samples(tiny_pipeline, sampler):
    image = tiny_pipeline("a small red square", sampler=sampler, num_inference_steps=4, seed=0)[0]
    assert image.size == (32, 32)
    assert np.asarray(image).std() > 0


def test_height_and_width_other_than_the_trained_size(tiny_pipeline):
    image = tiny_pipeline("a small red square", height=48, width=64, seed=0)[0]
    assert image.size == (64, 48)


def test_save_and_load_round_trip(tiny_pipeline, tmp_path):
    tiny_pipeline.save_pretrained(tmp_path / "pipe")
    loaded = Text2ImagePipeline.from_pretrained(tmp_path / "pipe", device="cpu")
    assert not (tmp_path / "pipe.tmp").exists()
    before = pixels(tiny_pipeline("a large yellow triangle", seed=2))
    after = pixels(loaded("a large yellow triangle", seed=2))
    assert np.array_equal(before, after)
    assert loaded.defaults["guidance_scale"] == tiny_pipeline.defaults["guidance_scale"]


def test_weights_rounded_by_a_cast_are_not_saved_unless_asked(tmp_path):
    from t2i.pipeline.export import export_diffusers

    pipe = Text2ImagePipeline.from_pretrained(_saved(build_tiny_pipeline(), tmp_path / "fp32"), device="cpu")
    pipe.to(torch.bfloat16).to(torch.float32)  # back in float32, but with the bf16-rounded values
    for save in (lambda: pipe.save_pretrained(tmp_path / "copy"), lambda: export_diffusers(pipe, tmp_path / "sd")):
        with pytest.raises(T2IError, match="fp32 weights were rounded to bf16 .* dtype=torch.float32"):
            save()
    assert not (tmp_path / "copy").exists() and not (tmp_path / "sd").exists()
    pipe.save_pretrained(tmp_path / "copy", allow_rounded=True)
    Text2ImagePipeline.from_pretrained(tmp_path / "fp32", device="cpu").save_pretrained(tmp_path / "again")


def _saved(pipe: Text2ImagePipeline, path) -> object:
    pipe.save_pretrained(path)
    return path


def test_bad_inputs_give_clear_errors(tiny_pipeline, tmp_path):
    with pytest.raises(T2IError, match="unknown sampler 'fast'; valid samplers: ddpm, ddim, dpmpp_2m"):
        tiny_pipeline("a red circle", sampler="fast")
    with pytest.raises(T2IError, match="prompt is empty"):
        tiny_pipeline("   ")
    with pytest.raises(T2IError, match="prompt 1 is empty"):
        tiny_pipeline(["a red circle", ""])
    with pytest.raises(T2IError, match="no prompt"):
        tiny_pipeline([])
    for prompt, kind in ((None, "NoneType"), (3, "int")):  # were TypeErrors from list()
        with pytest.raises(T2IError, match=f"prompt must be a string or a list of strings; got {kind}"):
            tiny_pipeline(prompt)
    with pytest.raises(T2IError, match="height 33 is not a positive multiple of the VAE's latent factor 2"):
        tiny_pipeline("a red circle", height=33)
    with pytest.raises(T2IError, match="seed must be an int or a list of 2 ints"):
        tiny_pipeline(["a", "b"], seed=[1])
    with pytest.raises(T2IError, match="2 negative prompts for 1 prompts"):
        tiny_pipeline("a", negative_prompt=["x", "y"])
    with pytest.raises(T2IError, match="model folder '.*missing' does not exist"):
        Text2ImagePipeline.from_pretrained(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(T2IError, match="neither a t2i pipeline"):
        Text2ImagePipeline.from_pretrained(tmp_path / "empty")


@pytest.mark.parametrize("arguments, message", [
    (dict(height=0), "height 0 is not a positive multiple"),
    (dict(width=16.0), "width must be an integer; got 16.0"),
    (dict(num_inference_steps=2.5), "num_inference_steps must be an integer; got 2.5"),
    (dict(num_inference_steps=0), r"num_inference_steps must be at least 1; got 0"),
    (dict(num_inference_steps=10**400), "more than the 1000 timesteps the model was trained on"),
    (dict(guidance_scale="7"), "guidance_scale must be a finite number; got '7'"),
    (dict(guidance_scale=float("nan")), "guidance_scale must be a finite number"),
    (dict(sampler="ddim", eta=5.0), r"eta must be in \[0, 1\]; got 5.0"),
    (dict(guidance_rescale=-0.5), r"guidance_rescale must be in \[0, 1\]"),
    (dict(sampler="ddim", dynamic_threshold=1.5), r"dynamic_threshold is a percentile in \(0, 1\]"),
    (dict(sampler="ddim", dynamic_threshold=0), r"dynamic_threshold is a percentile in \(0, 1\]"),
    (dict(seed=1.0), "seed must be an int or a list of 1 ints"),
    (dict(seed="7"), "seed must be an int or a list of 1 ints"),
    (dict(seed=-1), r"seeds must lie in 0\.\.9223372036854775807"),
    (dict(seed=2**70), r"seeds must lie in 0\.\."),
    (dict(height=2**20, width=2**20), r"1048576x1048576 at batch 1 needs at least \d+ GiB to sample and decode, more than"),
    (dict(batch_size=-1), r"batch_size must be at least 1; got -1"),
    (dict(batch_size=0), r"batch_size must be at least 1; got 0"),
    (dict(batch_size=1.5), r"batch_size must be an integer; got 1.5"),
    (dict(negative_prompt=3), r"negative prompt 0 is a int, not a string"),
    (dict(negative_prompt=[b"blue"]), r"negative prompt 0 is a bytes, not a string"),
])
def test_arguments_of_the_wrong_type_or_range_are_refused_before_any_work(tiny_pipeline, arguments, message):
    with pytest.raises(T2IError, match=message):
        tiny_pipeline("a red circle", num_inference_steps=arguments.pop("num_inference_steps", 1), **arguments)


def test_a_size_of_none_is_the_default_and_seeds_may_be_any_sequence(tiny_pipeline):
    size = tiny_pipeline.default_size
    assert tiny_pipeline("a", num_inference_steps=1, height=None)[0].size == (size, size)
    first = pixels(tiny_pipeline(["a", "b"], num_inference_steps=1, seed=(3, 4)))
    assert np.array_equal(first, pixels(tiny_pipeline(["a", "b"], num_inference_steps=1, seed=np.array([3, 4]))))
    for integer_tensor in (torch.tensor([3, 4]), torch.tensor(3), np.array(3)):  # 0-d ones were TypeErrors
        assert np.array_equal(first, pixels(tiny_pipeline(["a", "b"], num_inference_steps=1, seed=integer_tensor)))
    for not_integers in (torch.tensor(3.0), torch.tensor(True), torch.tensor([[3, 4]])):
        with pytest.raises(T2IError, match="seed must be an int or a list of 2 ints"):
            tiny_pipeline(["a", "b"], num_inference_steps=1, seed=not_integers)


@pytest.mark.parametrize("component", ["vae", "text_encoder"])
def test_non_finite_weights_outside_the_unet_are_named(tiny_pipeline, component):
    module = tiny_pipeline.vae.decoder if component == "vae" else tiny_pipeline.text_encoder
    weight = next(p for p in module.parameters() if p.ndim > 1)
    saved = weight.detach().clone()
    weight.data.fill_(float("nan"))
    try:
        with pytest.raises(T2IError, match="the VAE decoder's output is not finite" if component == "vae" else
                           "the text encoder's token states are not finite"):
            tiny_pipeline("a red circle", num_inference_steps=1)
    finally:
        weight.data.copy_(saved)


def test_over_long_prompt_is_truncated_and_reported(tiny_pipeline, caplog):
    long_prompt = "a red circle " + "and another word " * 20
    with caplog.at_level(logging.WARNING, logger="t2i"):
        images = tiny_pipeline(long_prompt, seed=0)
    assert len(images) == 1
    assert "truncated to the text encoder's 16 tokens" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="t2i"):
        tiny_pipeline([long_prompt] * 3, seed=0, num_inference_steps=1)
    assert len(caplog.records) == 1 and caplog.records[0].getMessage().endswith("and another word…'")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="t2i"):
        tiny_pipeline("a red circle", seed=0)
    assert "truncated" not in caplog.text


def test_asking_for_a_missing_gpu_is_a_clear_error(tiny_pipeline):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(T2IError, match="device 'cuda' was asked for, but PyTorch sees no CUDA GPU"):
        tiny_pipeline.to("cuda")
    assert tiny_pipeline.device.type == "cpu"


def test_to_takes_a_dtype_alone_and_refuses_bad_devices_and_dtypes_in_one_line():
    """pipe.to(torch.bfloat16), which diffusers' pipelines take, failed inside torch.device; so did 'gpu' or a dtype
    given as a string."""
    import torch

    pipe = build_tiny_pipeline()
    assert pipe.to(torch.bfloat16).dtype == torch.bfloat16 and pipe.device.type == "cpu"
    assert next(pipe.unet.parameters()).dtype == torch.bfloat16
    with pytest.raises(T2IError, match="unknown device 'gpu'; use 'cpu', 'cuda'"):
        pipe.to("gpu")
    for dtype in ("float32", "bf16", torch.int8):
        with pytest.raises(T2IError, match="dtype must be a floating-point torch.dtype"):
            pipe.to("cpu", dtype)


def test_clip_skip_is_saved_with_the_pipeline(tmp_path):
    pipe = build_tiny_pipeline()
    full_depth = pixels(pipe("a small red square", seed=3))
    pipe.text_encoder.clip_skip = 1
    skipped = pixels(pipe("a small red square", seed=3))
    assert not np.array_equal(full_depth, skipped)
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = Text2ImagePipeline.from_pretrained(tmp_path / "pipe", device="cpu")
    assert loaded.text_encoder.clip_skip == 1
    assert np.array_equal(pixels(loaded("a small red square", seed=3)), skipped)


@pytest.mark.parametrize("sampler", ["pc", "dpmpp_sde", "euler_a"])
def test_a_stochastic_sampler_draws_each_image_from_its_own_seed(tiny_pipeline, sampler):
    steps = 4
    together = tiny_pipeline(["a red circle", "a blue square"], seed=[4, 9], sampler=sampler, num_inference_steps=steps)
    alone = tiny_pipeline("a blue square", seed=9, sampler=sampler, num_inference_steps=steps)
    assert np.abs(pixels(together[1:]) - pixels(alone)).max() <= 1


def test_ddim_eta_adds_noise_and_other_samplers_refuse_it(tiny_pipeline):
    deterministic = pixels(tiny_pipeline("a red circle", sampler="ddim", seed=3, eta=0.0))
    assert np.array_equal(deterministic, pixels(tiny_pipeline("a red circle", sampler="ddim", seed=3)))
    noisy = pixels(tiny_pipeline("a red circle", sampler="ddim", seed=3, eta=1.0))
    assert np.abs(noisy - deterministic).max() > 1
    with pytest.raises(T2IError, match="eta 1.0 is DDIM's"):
        tiny_pipeline("a red circle", sampler="euler", eta=1.0)


@pytest.mark.parametrize("sampler", ["pc", "annealed_langevin", "pf_ode"])
def test_samplers_written_in_t2i_refuse_eta_instead_of_ignoring_it(tiny_pipeline, sampler):
    with pytest.raises(T2IError, match=f"eta 0.5 is DDIM's; sampler '{sampler}' takes none"):
        tiny_pipeline("a red circle", sampler=sampler, eta=0.5, num_inference_steps=1)


# Not "pc": on latent models it saturates the image whatever the prompt (docs/samplers.md, "Known problems").
@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_guidance_rescale_and_dynamic_thresholding_change_the_image(tiny_pipeline, sampler):
    plain = pixels(tiny_pipeline("a red circle", sampler=sampler, seed=3))
    rescaled = pixels(tiny_pipeline("a red circle", sampler=sampler, seed=3, guidance_rescale=0.7))
    thresholded = pixels(tiny_pipeline("a red circle", sampler=sampler, seed=3, dynamic_threshold=0.9))
    assert np.abs(rescaled - plain).max() > 1 and np.abs(thresholded - plain).max() > 1


def test_dynamic_thresholding_needs_a_sampler_that_sees_x0(tiny_pipeline):
    with pytest.raises(T2IError, match="sampler 'euler' cannot threshold"):
        tiny_pipeline("a red circle", sampler="euler", dynamic_threshold=0.995)


def test_latents_a_sampler_made_non_finite_are_blamed_on_the_sampler_not_the_unet(tiny_pipeline, monkeypatch):
    """diffusers' euler_a made NaN latents from finite predictions (σ_down² = σ_to² − σ_up² rounded below 0 at 3 steps of
    the cosine schedule); the next predictions were NaN too, and the message blamed the U-Net's weights."""
    from t2i.pipeline import pipeline as pipeline_module

    def failing(*args, **kwargs):
        scheduler = make_scheduler(*args, **kwargs)
        step = scheduler.step
        scheduler.step = lambda *a, **k: type(step(*a, **k))(prev_sample=torch.full_like(a[2], float("nan")))
        return scheduler

    make_scheduler = pipeline_module.make_scheduler
    monkeypatch.setattr(pipeline_module, "make_scheduler", failing)
    with pytest.raises(T2IError, match="sampler 'euler' produced non-finite latents at 3 steps"):
        tiny_pipeline("a red circle", sampler="euler", num_inference_steps=3)


def test_options_that_guidance_one_turns_off_are_reported(tiny_pipeline, caplog):
    """At guidance 1 the negative prompt and guidance_rescale did nothing, and nothing said so."""
    with caplog.at_level(logging.WARNING, logger="t2i"):
        tiny_pipeline("a red circle", negative_prompt="blue", guidance_scale=1.0, guidance_rescale=0.7,
                      num_inference_steps=1)
    assert caplog.messages == ["guidance_scale 1 turns classifier-free guidance off, so the negative prompt and "
                               "guidance_rescale are not used"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="t2i"):
        tiny_pipeline("a red circle", negative_prompt="blue", guidance_scale=2.0, num_inference_steps=1)
        tiny_pipeline(["a red circle"] * 2, negative_prompt=["", None], guidance_scale=1.0, num_inference_steps=1)
    assert caplog.messages == []
