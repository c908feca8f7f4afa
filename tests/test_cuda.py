"""The GPU paths: sampling in bf16 and fp32 against the CPU, the fast switches, CUDA graphs, and training in bf16
autocast and with a compiled step.

Skipped where PyTorch sees no CUDA GPU (CI); run on a lent GPU with `python -m pytest tests/test_cuda.py`."""
import json

import numpy as np
import pytest
import torch

from conftest import build_tiny_pipeline, tiny_config
from t2i import Text2ImagePipeline
from t2i.pipeline.speed import SpeedOptions

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PROMPTS = ["a large red circle", "a small blue square on the left"]


def sample(pipe) -> np.ndarray:
    images = pipe(PROMPTS, num_inference_steps=6, guidance_scale=4.0, seed=3, sampler="dpmpp_2m")
    return np.stack([np.asarray(image) for image in images]).astype(int)


@pytest.fixture(scope="module")
def cpu_images() -> np.ndarray:
    return sample(build_tiny_pipeline().to("cpu", torch.float32))


def test_cuda_pipeline_loads_in_bf16_and_matches_the_cpu(cpu_images):
    pipe = build_tiny_pipeline().to("cuda")
    assert pipe.dtype == torch.bfloat16 and pipe.unet.device.type == "cuda"
    difference = np.abs(sample(pipe) - cpu_images)
    assert difference.max() <= 8 and difference.mean() < 1.0  # the CPU's bf16 tolerance (test_speed.py)


def test_cuda_fp32_matches_the_cpu(cpu_images):
    pipe = build_tiny_pipeline().to("cuda", torch.float32)
    assert np.abs(sample(pipe) - cpu_images).max() <= 2  # cuDNN's TF32 convolutions round a little


@pytest.mark.parametrize("options", [SpeedOptions(compile="blocks", cuda_graphs="off"), SpeedOptions(cuda_graphs="on"),
                                     SpeedOptions(compile="blocks", cuda_graphs="on"),
                                     SpeedOptions(compile="full", cuda_graphs="on"),
                                     SpeedOptions(fuse_qkv=True, channels_last=True, cuda_graphs="off")],
                         ids=["compile-blocks", "cuda-graphs", "compile-blocks-cuda-graphs", "compile-full-cuda-graphs",
                              "fuse-qkv-channels-last"])
def test_cuda_fast_switches_give_the_plain_images(options):
    plain = sample(build_tiny_pipeline().to("cuda").speed_up(SpeedOptions(cuda_graphs="off")))
    fast = build_tiny_pipeline().to("cuda").speed_up(options)
    first, second = sample(fast), sample(fast)  # the second call replays what the first compiled or captured
    difference = np.abs(first - plain)
    assert difference.max() <= 8 and difference.mean() < 1.0 and np.array_equal(first, second)


def test_cuda_training_runs_every_stage_in_bf16(tmp_path):
    from t2i.training.run import run_training

    run_dir = tmp_path / "run"
    run_training(tiny_config(run_dir, "device=cuda", "train.unet.mixed_precision=bf16"))

    pipe = Text2ImagePipeline.from_pretrained(run_dir / "pipeline", device="cuda")
    images = pipe(PROMPTS, num_inference_steps=4, seed=0)
    assert len(images) == 2 and all(np.isfinite(np.asarray(image, dtype=float)).all() for image in images)


def test_cuda_compiled_training_step_matches_eager(tmp_path):
    from t2i.training.run import run_training

    losses = {}
    for compiled in (False, True):
        run_dir = tmp_path / f"compiled-{compiled}"
        run_training(tiny_config(run_dir, "device=cuda", "train.unet.mixed_precision=no",
                                 f"train.unet.compile={str(compiled).lower()}"))
        lines = (run_dir / "unet" / "metrics.jsonl").read_text().splitlines()
        losses[compiled] = [record["loss"] for record in map(json.loads, lines) if "loss" in record]
    assert losses[True] and np.allclose(losses[True], losses[False], rtol=2e-2)


def test_cuda_graphed_unet_runs_its_own_forward_when_gradients_are_needed():
    pipe = build_tiny_pipeline().to("cuda").speed_up(SpeedOptions(cuda_graphs="on"))
    unet = pipe.unet
    latents = torch.randn(1, unet.config.in_channels, 8, 8, device="cuda", dtype=pipe.dtype, requires_grad=True)
    context = pipe.encode_prompts(["a red circle"]).clone()  # a plain tensor, usable where autograd records
    output = unet(latents, torch.tensor(10, device="cuda"), encoder_hidden_states=context).sample
    assert output.grad_fn is not None and not unet.forward.graphs  # no graph captured, gradients flow
    with torch.inference_mode():
        unet(latents.detach(), torch.tensor(10, device="cuda"), encoder_hidden_states=context)
    assert len(unet.forward.graphs) == 1


def test_cuda_loader_workers_hand_over_pinned_batches(tmp_path):
    """For a GPU the workers' batches come in pinned memory, so that the copy to the device overlaps the step;
    the values are the in-process ones."""
    from itertools import islice

    from data_fixtures import clean_folder
    from t2i.config import DataConfig
    from t2i.data.build import build_datasets
    from t2i.data.loader import batch_to_device, train_batches

    folder = clean_folder(tmp_path, count=6)
    train, _, _ = build_datasets(DataConfig(dataset="imagefolder", path=str(folder.root), resolution=16,
                                            crop="random", random_flip=True))
    plain = list(islice(train_batches(train, 2, seed=1), 4))
    pinned = list(islice(train_batches(train, 2, seed=1, workers=2, pin_memory=True), 4))
    for expected, got in zip(plain, pinned):
        assert got["pixel_values"].is_pinned()
        on_device = batch_to_device(got, torch.device("cuda"))
        assert torch.equal(on_device["pixel_values"].cpu(), expected["pixel_values"])


def test_cuda_streamed_shards_hand_over_pinned_batches(tmp_path):
    """Streamed shards' worker threads pin their batches too; the values are the in-line ones."""
    from itertools import islice

    from data_fixtures import write_shards
    from t2i.config import DataConfig
    from t2i.data.build import build_datasets
    from t2i.data.loader import train_batches

    config = DataConfig(dataset="webdataset", path=str(write_shards(tmp_path).root), resolution=16,
                        shuffle_buffer=5, max_bad_fraction=0.5, crop="random", random_flip=True)
    plain = list(islice(train_batches(build_datasets(config, main_process=False)[0], 2, seed=1), 4))
    stream = build_datasets(config, main_process=False)[0]
    pinned = list(islice(train_batches(stream, 2, seed=1, workers=2, pin_memory=True), 4))
    for expected, got in zip(plain, pinned, strict=True):
        assert got["pixel_values"].is_pinned()
        assert torch.equal(got["pixel_values"], expected["pixel_values"])
