"""t2i finetune: a pretrained pipeline trained further on a folder of captioned images, full or LoRA."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from t2i import Text2ImagePipeline
from t2i.cli import main
from t2i.config import PACKAGED_CONFIGS, load_config
from t2i.data.build import detect_source
from t2i.errors import T2IError
from t2i.training.run import run_training
from t2i.training.stages.finetune import FinetuneStage

from conftest import REPO, TINY_CONFIG, killed_at_loss_call
from data_fixtures import clean_folder, good_images, planted_folder, write_shards

FINETUNED = "finetune/final/pipeline/unet/diffusion_pytorch_model.safetensors"
FINETUNED_TEXT_ENCODER = "finetune/final/pipeline/text_encoder/model.safetensors"


def finetune_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["finetune", "--model", str(model), "--data", str(data), "--out", str(out), "--max-steps", "4",
            "--batch-size", "4", "--device", "cpu", "--set", "train.finetune.sample_every=2", *extra]


def assert_trained_alike(trained_run: Path, first: Path, second: Path) -> None:
    """The two fine-tuned U-Nets (run folders) differ by under 1% of how far training moved the first from its
    source: the same training within rounding."""
    one, other = load_file(first / FINETUNED), load_file(second / FINETUNED)
    source = load_file(trained_run / "unet" / "final" / "diffusion_pytorch_model.safetensors")
    moved = max((one[k] - source[k]).abs().max().item() for k in one)
    difference = max((one[k] - other[k]).abs().max().item() for k in one)
    assert moved > 1e-4 and difference < moved * 1e-2, (moved, difference)


def test_lora_finetune_quarantines_the_bad_files_and_saves_a_loadable_pipeline(trained_run, tmp_path, capsys):
    folder = planted_folder(tmp_path)
    out = tmp_path / "run"
    assert main(finetune_args(trained_run / "pipeline", folder.root, out, "--lora-rank", "4",
                              "--set", "data.max_bad_fraction=1", "--set", "data.validation_fraction=0.2")) == 0
    printed = capsys.readouterr().out
    assert f"{len(folder.bad)} skipped" in printed
    quarantined = {json.loads(line)["file"]: json.loads(line)["reason"]
                   for line in (out / "quarantine.jsonl").read_text().splitlines()}
    assert quarantined == folder.bad
    records = [json.loads(line) for line in (out / "finetune" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "validation_loss" in r] == [0, 2, 4]  # before training, then every 2
    assert (out / "finetune" / "samples" / "step_0000002.png").is_file()
    assert (out / "finetune" / "final" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert not any("lora" in key for key in load_file(out / FINETUNED))  # merged: loadable without peft

    source = load_file(trained_run / "unet" / "final" / "diffusion_pytorch_model.safetensors")
    tuned = load_file(out / FINETUNED)
    changed = [k for k in source if not torch.equal(source[k], tuned[k])]
    assert changed and all("attn" in k for k in changed)  # only the adapted attention projections moved
    pipe = Text2ImagePipeline.from_pretrained(out / "pipeline", device="cpu")
    assert pipe("a red circle", num_inference_steps=2, seed=0)[0].size == (32, 32)
    for folder, hint in ((out, f"the pipeline is in '{out / 'pipeline'}'"),
                         (out / "finetune" / "final" / "lora", "it holds LoRA adapters .* only. Use the fine-tuned "
                          "pipeline with them merged in \\(OUT/pipeline")):
        with pytest.raises(T2IError, match=f"is neither a t2i pipeline .*; {hint}"):
            Text2ImagePipeline.from_pretrained(folder)


def test_too_many_bad_files_stop_the_run_before_training(trained_run, tmp_path, capsys):
    folder = planted_folder(tmp_path)
    assert main(finetune_args(trained_run / "pipeline", folder.root, tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert "t2i finetune: error:" in err and "max_bad_fraction" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "finetune").exists()


@pytest.mark.parametrize("lora_rank, text_encoder", [(0, False), (2, False), (2, True)])
def test_a_crashed_finetune_resumes_to_the_uninterrupted_weights(trained_run, tmp_path, lora_rank,
                                                                 text_encoder):
    data = clean_folder(tmp_path / "data", count=24).root
    settings = [f"finetune.model={trained_run / 'pipeline'}", f"data.path={data}", "data.dataset=imagefolder",
                "train.finetune.steps=6", "train.finetune.batch_size=4", "train.finetune.checkpoint_every=3",
                "train.finetune.sample_every=0", "train.finetune.ema_decay=0.9", f"finetune.lora.rank={lora_rank}",
                f"finetune.lora.text_encoder={str(text_encoder).lower()}", "device=cpu"]
    config = lambda run: load_config(PACKAGED_CONFIGS / "finetune.yaml", [*settings, f"run_dir={run}"])  # noqa: E731
    run_training(config(tmp_path / "uninterrupted"))

    with killed_at_loss_call(FinetuneStage, 5):  # inside step 5, after the step-3 checkpoint
        run_training(config(tmp_path / "crashed"))
    run_training(config(tmp_path / "crashed"), resume=True)
    for weights in (FINETUNED, FINETUNED_TEXT_ENCODER):
        resumed, uninterrupted = (load_file(tmp_path / run / weights) for run in ("crashed", "uninterrupted"))
        assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)


def stopped_at_step_2(trained_run: Path, tmp_path: Path):
    """A 4-step fine-tune at batch 4 on one process, stopped inside step 3 (after the step-2 checkpoint), and the
    config maker for resuming it (or running it whole) with more settings."""
    data = clean_folder(tmp_path / "data", count=16).root
    settings = [f"finetune.model={trained_run / 'pipeline'}", f"data.path={data}", "data.dataset=imagefolder",
                "train.finetune.steps=4", "train.finetune.checkpoint_every=1", "train.finetune.learning_rate=1e-3",
                "train.finetune.sample_every=0", "train.finetune.sample_at_start=false", "data.validation_fraction=0",
                "device=cpu"]
    config = lambda run, *more: load_config(PACKAGED_CONFIGS / "finetune.yaml",  # noqa: E731
                                            [*settings, f"run_dir={run}", *more])
    with killed_at_loss_call(FinetuneStage, 3):
        run_training(config(tmp_path / "stopped", "train.finetune.batch_size=4"))
    return config


def test_a_resume_on_other_micro_batches_is_refused_saying_how_to_resume(trained_run, tmp_path):
    config = stopped_at_step_2(trained_run, tmp_path)
    with pytest.raises(T2IError, match=r"micro-batches of 4 images \(1 process x batch_size 4\); this run would take "
                                       r"2 images \(1 process x batch_size 2\), another training. Resume with 1 "
                                       r"process at train.finetune.batch_size=4"):
        run_training(config(tmp_path / "stopped", "train.finetune.batch_size=2"), resume=True)


def test_a_resume_keeps_the_micro_batch_however_many_processes_share_it(trained_run, tmp_path, capfd):
    """Stopped on one process at batch 4, resumed by 2 processes at batch 2: the uninterrupted weights, within
    rounding."""
    config = stopped_at_step_2(trained_run, tmp_path)
    run_training(config(tmp_path / "stopped", "train.finetune.batch_size=2", "local_processes=2"), resume=True)
    assert ("at step 2 (on micro-batches of 4 images (2 processes x batch_size 2), where 4 images (1 process x "
            "batch_size 4) trained" in capfd.readouterr().out)
    run_training(config(tmp_path / "whole", "train.finetune.batch_size=4"))
    assert_trained_alike(trained_run, tmp_path / "whole", tmp_path / "stopped")


def test_a_resume_on_changed_data_says_it_will_not_end_where_an_uninterrupted_run_would(trained_run, tmp_path,
                                                                                         capsys):
    config = stopped_at_step_2(trained_run, tmp_path)
    with killed_at_loss_call(FinetuneStage, 1):  # resumed on the same data, and stopped again
        run_training(config(tmp_path / "stopped", "train.finetune.batch_size=4"), resume=True)
    assert "the data changed" not in capsys.readouterr().out
    folder = tmp_path / "data" / "clean_jsonl"
    with (folder / "metadata.jsonl").open("a") as metadata:  # the user adds images before resuming
        for name, caption in good_images(folder, count=4, prefix="added").items():
            metadata.write(json.dumps({"file_name": name, "text": caption}) + "\n")
    run_training(config(tmp_path / "stopped", "train.finetune.batch_size=4"), resume=True)
    assert ("[run] the data changed since this run last started (16 -> 20 training samples, 0 -> 0 held-out samples; "
            "or files edited): it resumes on the data as it is now" in capsys.readouterr().out)


def test_the_data_source_is_detected_from_what_is_there(tmp_path):
    folder = clean_folder(tmp_path / "images", count=2).root
    shards = write_shards(tmp_path / "shards", count=4, per_shard=2, bad=False).root
    (tmp_path / "table.parquet").write_bytes(b"")
    assert detect_source(str(folder)) == "imagefolder"
    assert detect_source(str(shards)) == "webdataset"
    assert detect_source(str(tmp_path / "table.parquet")) == "datasets"
    assert detect_source("someone/some-dataset") == "datasets"


def test_a_stream_whose_held_out_part_is_empty_says_there_is_no_validation_loss(trained_run, tmp_path, capsys):
    shards = write_shards(tmp_path / "shards", count=1, per_shard=4, bad=False).root
    assert main(finetune_args(trained_run / "pipeline", shards, tmp_path / "run", "--max-steps", "1")) == 0
    assert "no streamed sample fell in the held-out part" in capsys.readouterr().out
    records = (tmp_path / "run" / "finetune" / "metrics.jsonl").read_text()
    assert "validation_loss" not in records


def test_the_last_step_is_scored_and_drawn_whatever_the_sampling_interval(trained_run, tmp_path):
    folder = clean_folder(tmp_path / "images", count=8).root
    out = tmp_path / "run"
    assert main(finetune_args(trained_run / "pipeline", folder, out, "--max-steps", "3",
                              "--set", "data.validation_fraction=0.25")) == 0
    records = [json.loads(line) for line in (out / "finetune" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "validation_loss" in r] == [0, 2, 3]
    assert sorted(path.name for path in (out / "finetune" / "samples").iterdir()) == [
        "step_0000000.png", "step_0000002.png", "step_0000003.png"]


def test_an_empty_validation_prompts_file_is_refused(tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text("\n  \n  # only a comment\n")
    assert main(finetune_args(tmp_path / "model", tmp_path / "data", tmp_path / "run", "--validation-prompts",
                              str(tmp_path / "prompts.txt"))) == 2
    assert "holds no prompts (every line is blank or a comment)" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    assert main(finetune_args(tmp_path / "model", tmp_path / "data", tmp_path / "run", "--validation-prompts",
                              str(tmp_path))) == 2
    assert f"--validation-prompts '{tmp_path}' is not a file" in capsys.readouterr().err


def test_a_validation_prompts_file_not_in_utf8_is_refused_and_a_byte_order_mark_dropped(tmp_path, capsys):
    from t2i.cli import _validation_prompts

    (tmp_path / "latin1.txt").write_bytes("un café\n".encode("latin-1"))
    assert main(finetune_args(tmp_path / "model", tmp_path / "data", tmp_path / "run", "--validation-prompts",
                              str(tmp_path / "latin1.txt"))) == 2
    assert "is not UTF-8 text (invalid continuation byte at byte 6); save it as UTF-8" in capsys.readouterr().err
    (tmp_path / "excel.txt").write_bytes("\ufeff# previews\r\nun café ☕\r\na rocket\r\n".encode("utf-8"))
    assert _validation_prompts(tmp_path / "excel.txt") == ["un café ☕", "a rocket"]


def test_finetune_needs_a_model_and_runs_alone():
    with pytest.raises(T2IError, match="needs finetune.model"):
        load_config(PACKAGED_CONFIGS / "finetune.yaml", ["data.path=x"])
    with pytest.raises(T2IError, match="runs alone"):
        load_config(PACKAGED_CONFIGS / "finetune.yaml", ["data.path=x", "finetune.model=m", "stages=[unet,finetune]"])


def test_a_plain_install_carries_the_configs(tmp_path):
    """`pip install .` (not editable), then the packaged configs load from another folder."""
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 68:
        pytest.skip("building t2i needs setuptools >= 68 in this environment")
    source, target = tmp_path / "source", tmp_path / "site"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):  # pip builds in the source folder: a copy keeps the checkout clean
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "t2i", source / "t2i", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(source)], check=True, capture_output=True)
    code = ("from t2i.config import PACKAGED_CONFIGS, load_config\nfrom t2i.demo import default_config\n"
            "print(PACKAGED_CONFIGS)\nload_config(default_config('cpu'))\n"
            "load_config(PACKAGED_CONFIGS / 'finetune.yaml', ['finetune.model=m', 'data.path=d'])")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(target)})
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()) == target / "t2i" / "configs"


def test_two_processes_end_with_the_weights_of_one_with_the_same_global_batch(trained_run, tmp_path):
    data = clean_folder(tmp_path / "data", count=16).root
    settings = [f"finetune.model={trained_run / 'pipeline'}", f"data.path={data}", "data.dataset=imagefolder",
                "train.finetune.steps=3", "train.finetune.sample_every=0", "train.finetune.log_every=1",
                "train.finetune.learning_rate=1e-3", "device=cpu"]
    one = load_config(PACKAGED_CONFIGS / "finetune.yaml", [*settings, f"run_dir={tmp_path / 'one'}",
                                                           "train.finetune.batch_size=4"])
    two = load_config(PACKAGED_CONFIGS / "finetune.yaml", [*settings, f"run_dir={tmp_path / 'two'}",
                                                           "train.finetune.batch_size=2", "local_processes=2"])
    run_training(one)
    run_training(two)
    assert_trained_alike(trained_run, tmp_path / "one", tmp_path / "two")


def test_latents_cached_on_disk_are_reused_and_never_stale(tmp_path, monkeypatch, tiny_pipeline):
    import os

    from t2i.data import latents as latent_cache
    from t2i.data.build import build_datasets

    folder = clean_folder(tmp_path / "data", count=6).root
    data = load_config(PACKAGED_CONFIGS / "finetune.yaml", ["finetune.model=m", f"data.path={folder}"]).data
    dataset, _, _ = build_datasets(data)
    vae, cache = tiny_pipeline.vae, tmp_path / "cache"
    first = latent_cache.cached_latents(vae, dataset, cache)
    assert len(list(cache.glob("latents-*.safetensors"))) == 1

    monkeypatch.setattr(latent_cache, "encode_dataset", lambda *args: pytest.fail("encoded again"))
    again = latent_cache.cached_latents(vae, dataset, cache)
    assert torch.equal(again.mean, first.mean) and again.captions == first.captions
    monkeypatch.undo()

    key = latent_cache.cache_key(vae, dataset)
    os.utime(dataset.samples[0].image, ns=(1, 1))  # the same bytes, touched: the key changes all the same
    assert latent_cache.cache_key(vae, dataset) != key
    key = latent_cache.cache_key(vae, dataset)
    cropped, _, _ = build_datasets(load_config(PACKAGED_CONFIGS / "finetune.yaml", [
        "finetune.model=m", f"data.path={folder}", "data.resolution=16"]).data)
    assert latent_cache.cache_key(vae, cropped) != key
    with torch.no_grad():
        next(vae.parameters()).add_(1e-3)
    assert latent_cache.cache_key(vae, dataset) != key


def test_a_cache_folder_that_cannot_be_written_is_one_clear_line(tmp_path, tiny_pipeline):
    from t2i.data.build import build_datasets
    from t2i.data.latents import cached_latents
    from t2i.data.text_states import cached_text_states

    folder = clean_folder(tmp_path / "data", count=2).root
    dataset, _, _ = build_datasets(load_config(PACKAGED_CONFIGS / "finetune.yaml",
                                               ["finetune.model=m", f"data.path={folder}"]).data)
    (tmp_path / "a-file").write_text("")
    not_a_folder = tmp_path / "a-file" / "cache"
    message = "cannot write the cache file '.*a-file/cache/.*' \\(Not a directory\\): set latent_cache_dir to a writable"
    with pytest.raises(T2IError, match=message):
        cached_latents(tiny_pipeline.vae, dataset, not_a_folder)
    with pytest.raises(T2IError, match=message):
        cached_text_states(tiny_pipeline.text_encoder, ["a caption"], not_a_folder)


def test_bucketed_latents_are_cached_and_equal_those_encoded_at_every_step(tmp_path, monkeypatch, tiny_pipeline):
    from itertools import islice

    from t2i.data import latents as latent_cache
    from t2i.data.build import build_datasets
    from t2i.data.loader import train_batches

    folder = clean_folder(tmp_path / "data", count=10).root
    settings = ["finetune.model=m", f"data.path={folder}", "data.buckets.enabled=true"]
    images, _, _ = build_datasets(load_config(PACKAGED_CONFIGS / "finetune.yaml", settings).data)
    vae, cache = tiny_pipeline.vae, tmp_path / "cache"
    latents = latent_cache.cached_latents(vae, images, cache)
    assert latents.shapes == images.shapes and len(set(images.shapes)) >= 3
    for from_images, from_cache in zip(islice(train_batches(images, 2, seed=1), 12),
                                       islice(train_batches(latents, 2, seed=1), 12)):
        assert from_cache["caption"] == from_images["caption"]  # the same batches, bucket by bucket
        with torch.no_grad():
            encoded = vae.encode(from_images["pixel_values"]).latent_dist
        assert torch.allclose(from_cache["latent_mean"], encoded.mean, atol=1e-5)
        assert torch.allclose(from_cache["latent_std"], encoded.std, atol=1e-5)

    monkeypatch.setattr(latent_cache, "encode_dataset", lambda *args: pytest.fail("encoded again"))
    again = latent_cache.cached_latents(vae, images, cache)
    assert again.shapes == latents.shapes and again.captions == latents.captions
    assert all(torch.equal(a, b) for a, b in zip(again.mean, latents.mean))
    monkeypatch.undo()
    coarser, _, _ = build_datasets(load_config(PACKAGED_CONFIGS / "finetune.yaml",
                                               [*settings, "data.buckets.step=16"]).data)
    assert latent_cache.cache_key(vae, coarser) != latent_cache.cache_key(vae, images)


def test_a_bucketed_finetune_caches_its_latents_and_trains_as_without_the_cache(trained_run, tmp_path, capsys):
    data = clean_folder(tmp_path / "data", count=8).root
    settings = [f"finetune.model={trained_run / 'pipeline'}", f"data.path={data}", "data.dataset=imagefolder",
                "data.buckets.enabled=true", "train.finetune.steps=3", "train.finetune.batch_size=2",
                "train.finetune.learning_rate=1e-3", "train.finetune.sample_every=0",
                "train.finetune.sample_at_start=false", "data.validation_fraction=0", "device=cpu"]
    for cache in ("true", "false"):
        run_training(load_config(PACKAGED_CONFIGS / "finetune.yaml", [
            *settings, f"run_dir={tmp_path / cache}", f"cache_latents={cache}"]))
    assert "caching latents (24x40)" in capsys.readouterr().err
    assert_trained_alike(trained_run, tmp_path / "false", tmp_path / "true")


def test_latents_are_not_cached_under_random_flips_and_the_note_says_why(trained_run, tmp_path, capsys):
    from t2i.data.build import build_datasets
    from t2i.training.run import _latents_or_images

    data = clean_folder(tmp_path / "data", count=4).root
    config = load_config(PACKAGED_CONFIGS / "finetune.yaml", [
        "finetune.model=m", f"data.path={data}", "data.buckets.enabled=true", "data.random_flip=true"])
    images, _, _ = build_datasets(config.data)
    assert _latents_or_images(config, Text2ImagePipeline.from_pretrained(trained_run / "pipeline").vae,
                              images) is images
    assert ("latents are not cached: the images change from epoch to epoch (data.random_flip)"
            in capsys.readouterr().out)


def test_diffusers_load_lora_weights_reads_the_adapters(trained_run, tmp_path):
    """The exported base model plus diffusers' `load_lora_weights` is the merged t2i pipeline, weights and images."""
    import numpy as np
    from diffusers import StableDiffusionPipeline

    from t2i.pipeline.export import export_folder

    data = clean_folder(tmp_path / "data", count=16).root
    out = tmp_path / "run"
    assert main(finetune_args(trained_run / "pipeline", data, out, "--lora-rank", "4", "--lr", "1e-2",
                              "--set", "train.finetune.sample_every=0")) == 0
    base = StableDiffusionPipeline.from_pretrained(export_folder(trained_run / "pipeline", tmp_path / "base",
                                                                 sampler="euler"))
    base.set_progress_bar_config(disable=True)
    before = {k: v.clone() for k, v in base.unet.state_dict().items()}
    base.load_lora_weights(out / "finetune" / "final" / "lora")
    base.fuse_lora()
    base.unload_lora_weights()
    fused, merged = base.unet.state_dict(), load_file(out / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    assert fused.keys() == merged.keys()
    assert max((fused[k] - merged[k]).abs().max().item() for k in merged) < 1e-5
    assert max((before[k] - merged[k]).abs().max().item() for k in merged) > 1e-3  # the adapters did change it

    prompts = ["a large red circle", "an emoji of a dog"]
    generators = [torch.Generator("cpu").manual_seed(i) for i in range(len(prompts))]
    theirs = (base(prompts, num_inference_steps=4, guidance_scale=2.0, generator=generators,
                   output_type="np").images * 255).round().astype(np.int16)
    ours = Text2ImagePipeline.from_pretrained(out / "pipeline", device="cpu")(
        prompts, num_inference_steps=4, guidance_scale=2.0, seed=0, sampler="euler")
    assert np.abs(theirs - np.stack([np.asarray(image) for image in ours]).astype(np.int16)).max() <= 2


def test_text_states_computed_once_equal_those_of_every_step(trained_run, tmp_path, monkeypatch):
    from t2i.data import text_states as text_cache
    from t2i.models.text_encoder import OpenClipTextEncoder
    from t2i.training.randomness import BatchRandomness
    from t2i.training.stages.unet import UNetStage

    pipe = Text2ImagePipeline.from_pretrained(trained_run / "pipeline", device="cpu")
    captions = ["a large red circle", "a small blue square at the top", "a large red circle"]
    stage = UNetStage(pipe.unet, pipe.vae, pipe.text_encoder, load_config(PACKAGED_CONFIGS / "tiny.yaml").diffusion,
                      pipe.scheduler_config, [], torch.device("cpu"))
    batch = {"pixel_values": torch.rand(3, 3, 32, 32) * 2 - 1, "caption": captions}
    every_step, _ = stage.loss(pipe.unet, batch, BatchRandomness(torch.Generator().manual_seed(0)),
                               caption_dropout=0.5)
    stage.cache_text_states(captions, tmp_path / "cache")
    assert stage.text_states.captions == ["", "a large red circle", "a small blue square at the top"]
    once, _ = stage.loss(pipe.unet, batch, BatchRandomness(torch.Generator().manual_seed(0)), caption_dropout=0.5)
    assert torch.allclose(once, every_step, rtol=1e-5)

    monkeypatch.setattr(text_cache, "encode_captions", lambda *args: pytest.fail("encoded again"))
    again = text_cache.cached_text_states(pipe.text_encoder, captions, tmp_path / "cache")
    assert torch.equal(again.states, stage.text_states.states)
    monkeypatch.undo()
    other = OpenClipTextEncoder.load(trained_run / "pipeline" / "text_encoder", clip_skip=1)  # tiny uses 0
    text_cache.cached_text_states(other, captions, tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("text-states-*.safetensors"))) == 2


def test_lora_on_an_open_clip_text_encoder_moves_only_its_attention(trained_run, tmp_path):
    data = clean_folder(tmp_path / "data", count=16).root
    out = tmp_path / "run"
    assert main(finetune_args(trained_run / "pipeline", data, out, "--lora-rank", "4", "--lr", "1e-2",
                              "--set", "finetune.lora.text_encoder=true", "--set", "cache_text_states=true")) == 0
    source = load_file(trained_run / "pipeline" / "text_encoder" / "model.safetensors")
    tuned = load_file(out / "pipeline" / "text_encoder" / "model.safetensors")
    assert tuned.keys() == source.keys()  # adapters folded in: the plain open_clip layout
    changed = {k for k in source if not torch.equal(source[k], tuned[k])}
    assert changed and all(k.startswith("transformer.resblocks.") and ".attn." in k for k in changed)
    pipe = Text2ImagePipeline.from_pretrained(out / "pipeline", device="cpu")
    assert pipe("a red circle", num_inference_steps=2, seed=0)[0].size == (32, 32)


def test_a_pipeline_fine_tuned_at_another_resolution_draws_at_that_size_by_default(trained_run, tmp_path):
    data = clean_folder(tmp_path / "data", count=8).root
    out = tmp_path / "run"
    assert main(finetune_args(trained_run / "pipeline", data, out, "--max-steps", "1", "--resolution", "48",
                              "--set", "train.finetune.sample_every=0")) == 0
    pipe = Text2ImagePipeline.from_pretrained(out / "pipeline", device="cpu")
    assert pipe.default_size == 48
    assert pipe("a red circle", num_inference_steps=1, seed=0)[0].size == (48, 48)


def test_lora_on_a_hugging_face_text_encoder_loads_into_diffusers(tmp_path):
    from diffusers import StableDiffusionPipeline

    from conftest import save_tiny_sd_pipeline

    source = save_tiny_sd_pipeline(tmp_path / "sd")
    data = clean_folder(tmp_path / "data", count=16).root
    out = tmp_path / "run"
    assert main(finetune_args(source, data, out, "--lora-rank", "4", "--lr", "1e-2", "--resolution", "32",
                              "--set", "finetune.lora.text_encoder=true")) == 0
    lora = load_file(out / "finetune" / "final" / "lora" / "pytorch_lora_weights.safetensors")
    assert any(k.startswith("text_encoder.") for k in lora) and any(k.startswith("unet.") for k in lora)

    base = StableDiffusionPipeline.from_pretrained(source)
    base.load_lora_weights(out / "finetune" / "final" / "lora")
    base.fuse_lora()
    base.unload_lora_weights()
    merged_text_encoder = load_file(out / "pipeline" / "text_encoder" / "model.safetensors")
    fused = base.text_encoder.state_dict()
    assert max((fused[k] - merged_text_encoder[k]).abs().max().item() for k in merged_text_encoder) < 1e-5
    original = load_file(source / "text_encoder" / "model.safetensors")
    assert max((original[k] - merged_text_encoder[k]).abs().max().item() for k in original) > 1e-4


def test_gradient_checkpointing_trains_to_the_same_weights(trained_run, tmp_path):
    data = clean_folder(tmp_path / "data", count=8).root
    settings = [f"finetune.model={trained_run / 'pipeline'}", f"data.path={data}", "data.dataset=imagefolder",
                "train.finetune.steps=2", "train.finetune.batch_size=4", "train.finetune.sample_every=0",
                "train.finetune.sample_at_start=false", "data.validation_fraction=0", "device=cpu"]
    for name, checkpointing in (("plain", "false"), ("checkpointed", "true")):
        run_training(load_config(PACKAGED_CONFIGS / "finetune.yaml", [
            *settings, f"run_dir={tmp_path / name}", f"finetune.gradient_checkpointing={checkpointing}"]))
    plain, checkpointed = (load_file(tmp_path / name / FINETUNED) for name in ("plain", "checkpointed"))
    assert all(torch.allclose(plain[k], checkpointed[k], atol=1e-6) for k in plain)


def test_a_lora_rank_above_every_adapted_layers_rank_is_refused():
    from conftest import build_tiny_pipeline

    from t2i.config import LoRAConfig
    from t2i.training.stages.finetune import add_lora

    unet = build_tiny_pipeline().unet
    widest = max(min(m.in_features, m.out_features) for name, m in unet.named_modules()
                 if name.endswith(("to_q", "to_k", "to_v", "to_out.0")))
    with pytest.raises(T2IError, match=f"rank {widest + 1} is more than the full rank of every adapted layer "
                                       f"\\(at most {widest} here\\)"):
        add_lora(unet, LoRAConfig(rank=widest + 1))
    with pytest.raises(T2IError, match="name no linear layer"):
        add_lora(unet, LoRAConfig(rank=2, target_modules=("to_qq",)))
    add_lora(unet, LoRAConfig(rank=widest))
    assert any("lora" in name for name, _ in unet.named_parameters())


def test_a_bucket_step_the_models_vae_cannot_map_to_whole_latents_is_refused(trained_run, tmp_path, capsys):
    data = clean_folder(tmp_path / "data", count=4).root  # the tiny model's VAE shrinks images 2 times
    assert main(finetune_args(trained_run / "pipeline", data, tmp_path / "run", "--set", "data.buckets.enabled=true",
                              "--set", "data.buckets.step=3")) == 2
    assert ("data.buckets.step 3 must be a multiple of the model's VAE's latent factor 2, so that every bucket's "
            "sides map to whole latents") in capsys.readouterr().err


def test_a_resolution_or_bucket_step_the_vae_trained_here_cannot_map_is_refused():
    settings = ["data.dataset=imagefolder", "data.path=x", "vae.block_out_channels=[8,16,16,16]"]  # 8 times
    with pytest.raises(T2IError, match="data.buckets.step 4 must be a multiple of the VAE's latent factor 8"):
        load_config(TINY_CONFIG, [*settings, "data.buckets.enabled=true", "data.buckets.step=4"])
    with pytest.raises(T2IError, match="data.resolution 40 must be a multiple of the VAE's latent factor 16"):
        load_config(TINY_CONFIG, ["data.dataset=imagefolder", "data.path=x", "data.resolution=40",
                                  "vae.block_out_channels=[8,16,16,16,16]"])


def test_a_missing_source_model_is_named_before_the_data_is_scanned(tmp_path, capsys):
    data = clean_folder(tmp_path / "data", count=2).root
    assert main(finetune_args(tmp_path / "missing", data, tmp_path / "run")) == 2
    printed = capsys.readouterr()
    assert f"finetune.model '{tmp_path / 'missing'}' is not a folder" in printed.err
    assert "data:" not in printed.out and not (tmp_path / "run" / "config.yaml").exists()
