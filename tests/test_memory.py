"""The memory floor that refuses a size before any work (t2i.pipeline.memory), against peak RSS measured on the tiny
pipeline, and torch's own out-of-memory errors as one line."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from t2i.errors import T2IError
from t2i.pipeline import pipeline as pipeline_module
from t2i.pipeline.memory import (attention_is_quadratic, generation_floor, unet_floor, upscaler_floor,
                                  vae_decoder_floor)

GiB, MiB = 2**30, 2**20
# Peak RSS that one guided U-Net call (batch 1, fp32) added to configs/tiny.yaml's loaded pipeline on the project's
# CPU, the least of the runs in docs/performance.md ("How large an image fits"): sizes that ran.
RAN_IN = {1024: 697 * MiB, 2048: 2632 * MiB}


def reports_memory(monkeypatch, size: int) -> None:
    monkeypatch.setattr(pipeline_module, "device_memory", lambda device: size)


def test_the_unet_sets_the_floor_of_the_tiny_pipeline(tiny_pipeline):
    # U-Net (32, 32), one layer per level, at its top level: the skips (conv_in's and the layer's, 32 each), then the
    # first up ResNet's input (the level below's 32 concatenated with a skip's 32), its GroupNorm and its SiLU.
    assert unet_floor(tiny_pipeline.unet.config, 64, 64) == (2 * 32 + 3 * 64) * 64 * 64
    # VAE (8, 16): at full size, the first ResNet's input is the 16 channels upsampled from below, with two copies.
    assert vae_decoder_floor(tiny_pipeline.vae.config, 128, 128) == 3 * 16 * 128 * 128
    floor = generation_floor(tiny_pipeline.unet.config, tiny_pipeline.vae.config, 2, 1, 128, 128, 4)
    assert floor == 4 * 256 * 64 * 64  # the U-Net's 256 channels per latent pixel, over the VAE's 48 per pixel


def test_a_size_whose_unet_cannot_fit_is_refused_though_its_decoding_would(tiny_pipeline, monkeypatch):
    # 4096² unguided in fp32 added 5,286 MiB of peak RSS (the VAE decoder's 5 GiB floor came to 1.5 GiB, and
    # passed): on a device of 3 GiB it is refused before any work.
    reports_memory(monkeypatch, 3 * GiB)
    with pytest.raises(T2IError, match=r"^4096x4096 at batch 1 needs at least 4.0 GiB to sample and decode, more than "
                                       r"the 3.0 GiB of this cpu device; use a smaller size, "
                                       r"or fewer images at once \(a smaller batch size\)$"):
        tiny_pipeline.check_memory(1, 4096, 4096)


def test_a_need_just_over_the_memory_does_not_read_as_equal_to_it(tiny_pipeline, monkeypatch):
    """Rounded to whole GiB, 100,000 images at 32x32 read "needs at least 24 GiB, more than the 24 GiB"."""
    reports_memory(monkeypatch, 24 * GiB)
    with pytest.raises(T2IError, match=r"needs at least 24.40 GiB to do it, more than the 24.00 GiB of this"):
        tiny_pipeline._refuse_beyond_memory(int(24.4 * GiB), "it", "to do it")
    with pytest.raises(T2IError, match=r"needs at least 30 GiB to do it, more than the 24 GiB of this"):
        tiny_pipeline._refuse_beyond_memory(30 * GiB, "it", "to do it")


@pytest.mark.parametrize("size", sorted(RAN_IN))
def test_a_size_that_ran_is_not_refused_on_a_device_of_its_measured_peak(tiny_pipeline, monkeypatch, size):
    reports_memory(monkeypatch, RAN_IN[size])
    tiny_pipeline.check_memory(1, size, size, guided=True)
    reports_memory(monkeypatch, RAN_IN[size] // 2)  # and guidance, which doubles the U-Net's batch, is counted
    with pytest.raises(T2IError, match=f"{size}x{size} at batch 1 needs at least"):
        tiny_pipeline.check_memory(1, size, size, guided=True)


def test_the_attention_matrix_counts_only_where_the_backend_holds_it(tiny_pipeline, monkeypatch):
    # On CPUs torch takes flash attention, whose buffers do not grow with tokens²; its math backend holds the
    # heads x tokens² matrix: at 2048², that of the VAE's one head over 1024² latent pixels is 4 TiB in fp32.
    assert not attention_is_quadratic(tiny_pipeline.device, torch.float32)(16)
    with sdpa_kernel(SDPBackend.MATH):
        assert attention_is_quadratic(tiny_pipeline.device, torch.float32)(16)
        reports_memory(monkeypatch, 24 * GiB)
        with pytest.raises(T2IError, match=r"2048x2048 at batch 1 needs at least \d{3,} GiB"):
            tiny_pipeline.check_memory(1, 2048, 2048)
    tiny_pipeline.check_memory(1, 2048, 2048)


@pytest.mark.parametrize("network, doing", [("unet", "sampling"), ("vae", "decoding")])
def test_torch_running_out_of_memory_is_one_line_naming_the_size(tiny_pipeline, monkeypatch, network, doing):
    def fail(message):
        def forward(*args, **kwargs):
            raise RuntimeError(message)
        return forward

    method = "forward" if network == "unet" else "decode"
    monkeypatch.setattr(getattr(tiny_pipeline, network), method, fail(
        "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to "
        "allocate 268435456 bytes. Error code 12 (Cannot allocate memory)"))
    with pytest.raises(T2IError, match=rf"^32x32 at batch 2 ran out of memory while {doing} on this cpu device "
                                       r"\(torch could not allocate 0.25 GiB more\); use a smaller size, "
                                       r"or fewer images at once \(a smaller batch size\)$"):
        tiny_pipeline(["a", "b"], num_inference_steps=1, height=32, width=32)
    monkeypatch.setattr(getattr(tiny_pipeline, network), method, fail("mat1 and mat2 shapes cannot be multiplied"))
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):  # other errors are not renamed
        tiny_pipeline("a", num_inference_steps=1, height=32, width=32)


def test_the_sr_stage_has_a_floor_of_its_own_and_refuses_before_any_work(monkeypatch):
    """The SR U-Net runs in pixel space (no VAE to shrink its input): generate(upscale=True) and upscale() passed
    the base stage's floor and went on to the SR stage whatever its size."""
    from PIL import Image

    from conftest import build_tiny_pipeline
    from test_sr import tiny_upscaler

    pipe = build_tiny_pipeline()
    pipe.sr = tiny_upscaler(pipe)
    sr_config = pipe.sr.unet.config  # 2x, on 2x2 patches: its input is the low-resolution image's size
    assert upscaler_floor(sr_config, 2, 2, 1, 512, 512, 4) == unet_floor(sr_config, 512, 512) * 4
    assert upscaler_floor(sr_config, 2, 2, 3, 512, 512, 4, guided=True) == 6 * unet_floor(sr_config, 512, 512) * 4
    sr_bytes = upscaler_floor(sr_config, 2, 2, 1, 1024, 1024, 4)
    base_bytes = generation_floor(pipe.unet.config, pipe.vae.config, pipe.latent_factor, 1, 1024, 1024, 4)
    assert sr_bytes > base_bytes
    reports_memory(monkeypatch, (sr_bytes + base_bytes) // 2)
    pipe.check_memory(1, 1024, 1024)  # the base stage fits, unguided
    called = []
    monkeypatch.setattr(pipe, "denoise", lambda *args, **kwargs: called.append(args))
    with pytest.raises(T2IError, match=r"^1024x1024 at batch 1 needs at least [\d.]+ GiB to upscale to 2048x2048, "
                                       r"more than the [\d.]+ GiB of this cpu device; use a smaller size, "
                                       r"or fewer images at once \(a smaller batch size\)$"):
        pipe("a red circle", height=1024, width=1024, upscale=True, guidance_scale=1.0)
    with pytest.raises(T2IError, match="to upscale to 2048x2048"):
        pipe.upscale(Image.new("RGB", (1024, 1024)), "a red circle")
    assert not called
