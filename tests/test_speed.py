"""The fast paths change results by rounding only, and each switch does what it says."""
import copy
import math

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from conftest import build_tiny_pipeline, tiny_config
from t2i.diffusion.samplers import HOST_TIMESTEP_SAMPLERS, SAMPLERS, set_timesteps
from t2i.errors import T2IError
from t2i.models.cpu_attention import ShortKeysMatmulAttention, key_length
from t2i.models.padded_attention import PaddedCrossAttention, pad_keys
from t2i.pipeline.speed import SpeedOptions, apply_speed_options, network_dtype
from t2i.precision import bf16_is_fast, resolve_mixed_precision

PROMPTS = ["a large red circle", "a small blue square on the left"]


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(image) for image in images]).astype(int)


def sample(pipe, sampler="dpmpp_2m"):
    return pixels(pipe(PROMPTS, num_inference_steps=6, guidance_scale=4.0, seed=3, sampler=sampler))


@pytest.fixture(scope="module")
def fp32_images():
    return sample(build_tiny_pipeline().to("cpu", torch.float32))


def test_bad_speed_options_are_clear_errors():
    with pytest.raises(T2IError, match="compile must be one of"):
        SpeedOptions(compile="fast")
    with pytest.raises(T2IError, match="cuda_graphs must be one of auto, on, off"):
        SpeedOptions(cuda_graphs=True)
    with pytest.raises(T2IError, match="dtype must be one of auto, fp32, bf16"):
        SpeedOptions(dtype="fp8")
    pipe = build_tiny_pipeline().to("cpu", torch.float32)
    with pytest.raises(T2IError, match="cuda_graphs needs a CUDA device"):
        apply_speed_options(pipe.unet, pipe.vae, SpeedOptions(cuda_graphs="on"), pipe.device)


def test_cuda_graphs_are_left_off_on_the_cpu_by_default():
    pipe = build_tiny_pipeline().to("cpu", torch.float32).speed_up(SpeedOptions(dtype="fp32"))
    assert "forward" not in vars(pipe.unet)  # the U-Net's own forward, not a graph replay


def test_graphed_unet_falls_back_to_its_forward_where_a_replay_would_be_wrong():
    """What the CUDA-graph wrapper must not replay: CPU tensors and calls that need gradients (training, classifier
    guidance through the U-Net); those run the U-Net's own forward, with the same output type."""
    from t2i.models.cuda_graph import replay_as_cuda_graphs

    unet = build_tiny_pipeline().to("cpu", torch.float32).unet
    sample_in = torch.randn(2, unet.config.in_channels, 8, 8)
    context = torch.randn(2, 77, unet.config.cross_attention_dim)
    with torch.no_grad():
        expected = unet(sample_in, torch.tensor(10), encoder_hidden_states=context).sample
    replay_as_cuda_graphs(unet)
    with torch.no_grad():
        plain = unet(sample_in, torch.tensor(10), encoder_hidden_states=context)
        as_tuple = unet(sample_in, torch.tensor(10), encoder_hidden_states=context, return_dict=False)
    assert torch.equal(plain.sample, expected) and torch.equal(as_tuple[0], expected)
    with_grad = unet(sample_in, torch.tensor(10), encoder_hidden_states=context).sample
    assert with_grad.requires_grad
    assert unet.forward.graphs == {}, "nothing may be captured off a CUDA device"


class OnDevice(torch.Tensor):
    """A CPU tensor that stands for one on a GPU: results of ops on it are on the device too, and every read of its
    value on the host (`.item()`, `if tensor:`, a host table indexed by it, ...), which on a GPU would wait for the
    device's queue to drain, is recorded."""

    reads: list[str] = []
    HOST_READS = {"item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__int__", "__float__", "__index__"}

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in cls.HOST_READS:
            cls.reads.append(name)
        elif name == "__getitem__" and not isinstance(args[0], OnDevice):
            cls.reads.append("a host table indexed by a device tensor")
        return super().__torch_function__(func, types, args, kwargs or {})


# Every sampler with a fixed number of steps; pf_ode's adaptive solver reads its error estimate at every evaluation.
@pytest.mark.parametrize("sampler", [*sorted(SAMPLERS), "pc", "annealed_langevin"])
def test_the_sampling_loop_reads_nothing_back_from_the_device_per_step(sampler, monkeypatch):
    """Latents, token states, predictions, the U-Net's timesteps and the schedulers' timesteps (but those of
    HOST_TIMESTEP_SAMPLERS) live on the device. The loop may read a fixed few values back (the finiteness checks
    after it), as many at 8 steps as at 4: none per step."""
    import t2i.pipeline.pipeline as pipeline_module

    def on_device(tensor):
        return tensor.as_subclass(OnDevice)

    def set_timesteps_on_the_device(scheduler, name, steps, device):
        unet_timesteps = set_timesteps(scheduler, name, steps, device)
        if name not in HOST_TIMESTEP_SAMPLERS:
            scheduler.timesteps = on_device(scheduler.timesteps)
        return on_device(unet_timesteps)

    pipe = build_tiny_pipeline().to("cpu", torch.float32)
    context, negative = on_device(pipe.encode_prompts(PROMPTS)), on_device(pipe.encode_prompts(["", ""]))
    monkeypatch.setattr(pipeline_module, "set_timesteps", set_timesteps_on_the_device)
    initial_noise = pipe._initial_noise
    monkeypatch.setattr(pipe, "_initial_noise", lambda *args: on_device(initial_noise(*args)))
    counts = {}
    for steps in (4, 8):
        OnDevice.reads.clear()
        latents = pipe.denoise(context, negative, [1, 2], steps, 4.0, 16, 16, sampler)
        assert isinstance(latents, OnDevice)
        counts[steps] = list(OnDevice.reads)
    assert counts[8] == counts[4], f"reads of device values per call: {counts}"


def test_bf16_networks_keep_latents_and_sampler_in_fp32(fp32_images):
    pipe = build_tiny_pipeline().to("cpu", torch.bfloat16)
    assert pipe.unet.dtype == torch.bfloat16
    context = pipe.encode_prompts(PROMPTS)
    latents = pipe.denoise(context, pipe.encode_prompts(["", ""]), [3, 4], 4, 4.0, 16, 16, "euler")
    assert latents.dtype == torch.float32
    difference = np.abs(sample(pipe) - fp32_images)
    assert difference.max() <= 8  # a random tiny model; the 18 M `small` one stays within 3 (performance.md)
    assert difference.mean() < 1.0


def test_channels_last_gives_the_plain_images(fp32_images):
    pipe = build_tiny_pipeline().to("cpu", torch.float32).speed_up(SpeedOptions(dtype="fp32", channels_last=True))
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert np.abs(sample(pipe) - fp32_images).max() <= 1


def test_fused_qkv_gives_the_plain_images(fp32_images):
    pipe = build_tiny_pipeline().to("cpu", torch.float32)
    pipe.speed_up(SpeedOptions(dtype="fp32", channels_last=False, fuse_qkv=True))
    assert any(getattr(module, "fused_projections", False) for module in pipe.unet.modules())
    assert np.abs(sample(pipe) - fp32_images).max() <= 1


def test_padded_keys_are_masked_so_cross_attention_is_unchanged():
    states = torch.randn(2, 77, 12)
    padded, mask = pad_keys(states, None)
    assert padded.shape == (2, 80, 12) and torch.equal(padded[:, :77], states) and not padded[:, 77:].any()
    assert mask.shape == (2, 1, 80) and not mask[..., :77].any() and (mask[..., 77:] < -1e30).all()
    assert pad_keys(padded, None) == (padded, None)  # already a multiple of 16
    torch.manual_seed(0)
    attention = Attention(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8).eval()
    queries = torch.randn(2, 64, 16)
    with torch.no_grad():
        plain = attention(queries, encoder_hidden_states=states)
        attention.set_processor(PaddedCrossAttention(AttnProcessor2_0()))
        padded_output = attention(queries, encoder_hidden_states=states)
        self_attention = Attention(query_dim=16, heads=2, dim_head=8).eval()
        expected = self_attention(queries)
        self_attention.set_processor(PaddedCrossAttention(AttnProcessor2_0()))
        assert torch.equal(self_attention(queries), expected)  # self-attention goes through untouched
        attention.set_processor(AttnProcessor2_0())
    assert torch.allclose(plain, padded_output, atol=1e-6)
    # Unmasked zero keys would take weight: the mask is what keeps the output unchanged.
    with torch.no_grad():
        unmasked = attention(queries, encoder_hidden_states=padded)
    assert not torch.allclose(plain, unmasked, atol=1e-3)


def test_padded_cross_attention_gives_the_plain_images_and_is_cpu_only_by_default(fp32_images):
    pipe = build_tiny_pipeline().to("cpu", torch.float32).speed_up(SpeedOptions(dtype="fp32"))
    assert all(isinstance(p, PaddedCrossAttention) for p in pipe.unet.attn_processors.values())
    assert np.abs(sample(pipe) - fp32_images).max() <= 1
    plain = build_tiny_pipeline().to("cpu", torch.float32).speed_up(SpeedOptions(dtype="fp32",
                                                                                 pad_cross_attention="off"))
    assert not any(isinstance(p, PaddedCrossAttention) for p in plain.unet.attn_processors.values())
    with pytest.raises(T2IError, match="pad_cross_attention must be one of auto, on, off"):
        SpeedOptions(pad_cross_attention="yes")


def test_compiled_blocks_give_the_plain_images_at_every_batch_size(fp32_images, tmp_path, monkeypatch):
    """Each block shape, at each batch size, gets its own compiled graph: two batch sizes make more ResNet-block
    shapes (14) than Dynamo's default recompile limit (8), past which blocks would silently run eagerly."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    pipe = build_tiny_pipeline().to("cpu", torch.float32).speed_up(SpeedOptions(dtype="fp32", compile="blocks"))
    compiled = [m for m in pipe.unet.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    assert compiled, "no block of the U-Net was compiled"
    frames_before = dict(counters["frames"])
    assert np.abs(sample(pipe) - fp32_images).max() <= 1
    one = pixels(pipe(PROMPTS[:1], num_inference_steps=6, guidance_scale=4.0, seed=3))
    assert np.abs(one - fp32_images[:1]).max() <= 1
    new_frames = {key: counters["frames"][key] - frames_before.get(key, 0) for key in ("total", "ok")}
    assert new_frames["total"] > 0 and new_frames["ok"] == new_frames["total"], \
        f"some block frames were not compiled (fell back to eager): {new_frames}"
    assert any((tmp_path / "inductor").iterdir()), "Inductor wrote nothing to its on-disk cache"


def test_auto_mixed_precision_follows_the_hardware(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_mixed_precision("no", cpu) == "no"
    assert resolve_mixed_precision("bf16", cpu) == "bf16"
    monkeypatch.setattr("t2i.precision.bf16_is_fast", lambda device: True)
    assert resolve_mixed_precision("auto", cpu) == "bf16"
    monkeypatch.setattr("t2i.precision.bf16_is_fast", lambda device: False)
    assert resolve_mixed_precision("auto", cpu) == "no"
    assert isinstance(bf16_is_fast(cpu), bool)
    assert network_dtype("auto", cpu) == (torch.bfloat16 if bf16_is_fast(cpu) else torch.float32)


def test_loading_keeps_the_stored_precision_and_speed_up_picks_the_fast_one(tmp_path):
    build_tiny_pipeline().save_pretrained(tmp_path / "pipe")
    from t2i import Text2ImagePipeline

    pipe = Text2ImagePipeline.from_pretrained(tmp_path / "pipe", device="cpu")
    assert pipe.unet.dtype == torch.float32  # export and fine-tuning save what they load
    pipe.speed_up(SpeedOptions(dtype="auto"))
    assert pipe.unet.dtype == pipe.dtype == network_dtype("auto", torch.device("cpu"))


class _Recording:
    """An attention processor that notes each call, then runs `inner`."""

    def __init__(self, inner, calls: list, name: str):
        self.inner, self.calls, self.name = inner, calls, name

    def __call__(self, *args, **kwargs):
        self.calls.append(self.name)
        return self.inner(*args, **kwargs)


@pytest.mark.parametrize("image_input", [False, True], ids=["tokens", "feature-map"])
def test_short_keys_go_to_matmul_attention_long_ones_to_sdpa_with_the_same_output(image_input):
    torch.manual_seed(0)
    calls = []
    dispatcher = ShortKeysMatmulAttention(max_keys=16)
    dispatcher.matmul = _Recording(dispatcher.matmul, calls, "matmul")
    dispatcher.sdpa = _Recording(dispatcher.sdpa, calls, "sdpa")
    self_attention = Attention(query_dim=8, heads=2, dim_head=4, residual_connection=image_input).eval()
    cross_attention = Attention(query_dim=8, cross_attention_dim=6, heads=2, dim_head=4).eval()
    # 16 positions (4 x 4) are at the limit, 25 (5 x 5) over it; the text's 16 and 17 tokens likewise.
    for side, expected in ((4, "matmul"), (5, "sdpa")):
        image = torch.randn(2, 8, side, side) if image_input else torch.randn(2, side * side, 8)
        assert key_length(image, None) == side * side
        with torch.no_grad():
            reference = self_attention(image)
            self_attention.set_processor(dispatcher)
            output = self_attention(image)
            self_attention.set_processor(AttnProcessor2_0())
        assert calls.pop() == expected and torch.allclose(output, reference, atol=1e-5)
    queries = torch.randn(2, 25, 8)
    for tokens, expected in ((16, "matmul"), (17, "sdpa")):
        text = torch.randn(2, tokens, 6)
        assert key_length(queries, text) == tokens
        with torch.no_grad():
            reference = cross_attention(queries, encoder_hidden_states=text)
            cross_attention.set_processor(dispatcher)
            output = cross_attention(queries, encoder_hidden_states=text)
            cross_attention.set_processor(AttnProcessor2_0())
        assert calls.pop() == expected and torch.allclose(output, reference, atol=1e-5)
    assert not calls


def test_bf16_training_on_cpu_uses_matmul_attention_over_short_keys(tmp_path):
    from t2i.training.interrupt import StopRequest
    from t2i.training.loop import TrainLoop

    pipe = build_tiny_pipeline().to("cpu", torch.float32)
    config = tiny_config(tmp_path)
    stage = _ToyStage(pipe.unet)
    TrainLoop(stage, [], _with(config.train.unet, mixed_precision="bf16"), tmp_path / "bf16", pipe.device, {},
              StopRequest())
    assert all(isinstance(p, ShortKeysMatmulAttention) for p in pipe.unet.attn_processors.values())
    fp32_unet = build_tiny_pipeline().to("cpu", torch.float32).unet
    TrainLoop(_ToyStage(fp32_unet), [], _with(config.train.unet, mixed_precision="no"), tmp_path / "fp32",
              pipe.device, {}, StopRequest())
    assert all(isinstance(p, AttnProcessor2_0) for p in fp32_unet.attn_processors.values())


def test_compiled_training_compiles_the_network_in_place(tmp_path, monkeypatch):
    """train.*.compile compiles the stage's network without renaming its parameters (checkpoints and EMA stay the
    same). Running the compiled step is left to scripts/bench_train.py: its first compilation takes a minute."""
    from t2i.training.interrupt import StopRequest
    from t2i.training.loop import TrainLoop

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    config = tiny_config(tmp_path, "train.unet.compile=true").train.unet
    unet = build_tiny_pipeline().to("cpu", torch.float32).unet
    names = list(unet.state_dict())
    loop = TrainLoop(_ToyStage(unet), [], config, tmp_path / "run", torch.device("cpu"), {}, StopRequest())
    assert unet._compiled_call_impl is not None and list(loop.model.state_dict()) == names
    plain = build_tiny_pipeline().to("cpu", torch.float32).unet
    TrainLoop(_ToyStage(plain), [], _with(config, compile=False), tmp_path / "plain", torch.device("cpu"), {},
              StopRequest())
    assert plain._compiled_call_impl is None


def test_channels_last_training_matches_plain_training(tmp_path):
    """The loop puts the model in NHWC; its loss and gradients equal NCHW's up to rounding. (Weights after a few
    Adam steps are no test: Adam turns the rounding of near-zero gradients into whole learning-rate steps.)"""
    from t2i.data.build import build_datasets
    from t2i.data.loader import train_batches
    from t2i.training.interrupt import StopRequest
    from t2i.training.loop import TrainLoop
    from t2i.training.randomness import BatchRandomness
    from t2i.training.run import STAGES, StageInputs

    config = tiny_config(tmp_path)
    dataset, validation, _ = build_datasets(config.data, tmp_path, True)
    batch = next(train_batches(dataset, 4, seed=0))
    results = {}
    for channels_last in (False, True):
        torch.manual_seed(0)
        stage, _ = STAGES["vae"](StageInputs(config, tmp_path, dataset, validation, torch.device("cpu")))
        train_config = _with(config.train.vae, channels_last=channels_last)
        TrainLoop(stage, dataset, train_config, tmp_path / f"cl-{channels_last}", torch.device("cpu"), {},
                  StopRequest())
        assert stage.model.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last) == channels_last
        rng = BatchRandomness(torch.Generator().manual_seed(0), 0, 1)
        loss, _ = stage.loss(stage.model, batch, rng)
        loss.backward()
        results[channels_last] = loss.item(), [p.grad.clone() for p in stage.model.parameters()]
    assert results[True][0] == pytest.approx(results[False][0], rel=1e-5)
    for plain, nhwc in zip(results[False][1], results[True][1]):
        assert torch.allclose(plain, nhwc, atol=1e-5 * float(plain.abs().max()) + 1e-8, rtol=1e-3)


def test_trimmed_text_tower_equals_open_clips_encode_text():
    text_encoder = build_tiny_pipeline().to("cpu", torch.float32).text_encoder
    ids = text_encoder.tokenize(["a red circle", "a large blue square on the left of a small green triangle", ""]).ids
    expected = text_encoder.clip.encode_text(ids)
    assert torch.allclose(text_encoder.pooled_features(ids), expected, atol=1e-5)
    assert math.isclose(float(expected.norm()), float(text_encoder.pooled_features(ids).norm()), rel_tol=1e-5)


class _ToyStage:
    name = "toy"

    def __init__(self, model):
        self.model = model

    def loss(self, model, batch, rng):
        raise AssertionError("not trained here")


def _with(train_config, **changes):
    from dataclasses import replace

    return replace(copy.deepcopy(train_config), **changes)
