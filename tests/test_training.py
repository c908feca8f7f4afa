"""The shared training loop: every stage runs, checkpoints are complete, and resuming is exact."""
import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from t2i.data.sampler import ResumableBatchSampler
from t2i.errors import T2IError
from t2i.models.text_encoder import OpenClipTextEncoder
from t2i.training.checkpoint import latest_checkpoint
from t2i.training.run import run_training
from t2i.training.randomness import BatchRandomness
from t2i.training.stages.unet import UNetStage, drop_captions

from conftest import killed_at_loss_call, tiny_config


def test_a_run_trains_every_stage_and_saves_the_pipeline(trained_run):
    for stage in ("vae", "clip", "unet"):
        records = [json.loads(line) for line in (trained_run / stage / "metrics.jsonl").read_text().splitlines()]
        assert records and all("loss" in r and "lr" in r for r in records)
        assert torch.isfinite(torch.tensor([r["loss"] for r in records])).all()
        assert (trained_run / stage / "final").is_dir()
    clip_records = (trained_run / "clip" / "metrics.jsonl").read_text()
    assert "image_to_text_accuracy" in clip_records
    assert (trained_run / "unet" / "samples" / "step_0000003.png").is_file()
    assert (trained_run / "pipeline" / "t2i_pipeline.json").is_file()
    assert (trained_run / "config.yaml").is_file()
    vae_config = json.loads((trained_run / "vae" / "final" / "config.json").read_text())
    assert vae_config["scaling_factor"] != 0.18215  # measured on the data, not SD's constant


def test_checkpoints_are_complete_and_pruned(trained_run):
    checkpoints = sorted((trained_run / "unet" / "checkpoints").iterdir())
    assert [c.name for c in checkpoints] == ["step_0000003", "step_0000006"]
    assert sorted(p.name for p in checkpoints[-1].iterdir()) == [
        "config.json", "ema.safetensors", "model.safetensors", "optimizer.json", "optimizer.safetensors",
        "rng.json", "rng.safetensors", "trainer_state.json"]
    state = json.loads((checkpoints[-1] / "trainer_state.json").read_text())
    assert state.pop("elapsed_s") > 0
    assert state == {"step": 6, "micro_batches": 6, "skipped_steps": 0, "processes": 1}
    assert json.loads((checkpoints[-1] / "config.json").read_text())["train"]["unet"]["steps"] == 6


def test_half_written_checkpoints_are_ignored(tmp_path):
    (tmp_path / "checkpoints" / "step_0000002").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step_0000004.tmp").mkdir()
    assert latest_checkpoint(tmp_path).name == "step_0000002"


def test_resumed_run_ends_with_the_same_weights(trained_run, tmp_path):
    """Stop the unet stage after its step-3 checkpoint (as a kill would), resume, compare with the full run."""
    config = tiny_config(tmp_path / "run")
    with killed_at_loss_call(UNetStage, 5):  # inside step 5, after the step-3 checkpoint
        run_training(config)
    assert latest_checkpoint(tmp_path / "run" / "unet").name == "step_0000003"
    trained_before = json.loads((latest_checkpoint(tmp_path / "run" / "unet") / "trainer_state.json").read_text())
    run_training(config, resume=True)

    records = [json.loads(line) for line in (tmp_path / "run" / "unet" / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records] == [2, 4, 6]  # step 4, logged before the kill, is logged once
    elapsed = [record["elapsed_s"] for record in records]  # the resumed run's clock goes on from the checkpoint's
    assert elapsed == sorted(elapsed) and elapsed[1] >= trained_before["elapsed_s"] > 0
    for name in ("final/diffusion_pytorch_model.safetensors", "checkpoints/step_0000006/model.safetensors",
                 "checkpoints/step_0000006/ema.safetensors"):
        resumed = load_file(tmp_path / "run" / "unet" / name)
        uninterrupted = load_file(trained_run / "unet" / name)
        assert resumed.keys() == uninterrupted.keys()
        assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed), name


def test_an_existing_run_needs_resume(trained_run):
    with pytest.raises(T2IError, match="already holds a run; pass --resume"):
        run_training(tiny_config(trained_run))


def _run_folder(tmp_path: Path, started=(), finished=(), **settings) -> tuple[Path, dict]:
    """A run folder whose config.yaml holds `settings` (nested dicts), with stage folders begun or finished."""
    import yaml

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump(settings))
    for stage in (*started, *finished):
        (run_dir / stage).mkdir()
    for stage in finished:
        (run_dir / stage / "final").mkdir()
    return run_dir, settings


def test_a_folder_of_other_files_or_with_a_run_is_refused_and_a_failed_start_may_start_again(tmp_path):
    from t2i.training.run_folder import check_run_folder

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(T2IError, match=r"already holds other files \(notes.txt\); give a new or empty folder"):
        check_run_folder(tmp_path / "mine", {}, resume=False)
    run_dir, settings = _run_folder(tmp_path, train={"unet": {"steps": 6}})  # stopped before any stage began
    (run_dir / "quarantine.jsonl").write_text("")
    assert check_run_folder(run_dir, {"train": {"unet": {"steps": 9}}}, resume=False) is None
    (run_dir / "unet").mkdir()
    with pytest.raises(T2IError, match="already holds a run; pass --resume to continue it, or choose another"):
        check_run_folder(run_dir, settings, resume=False)
    assert "nothing to resume" in check_run_folder(tmp_path / "new", settings, resume=True)


def test_a_resume_with_settings_that_change_the_training_is_refused(tmp_path):
    from t2i.training.run_folder import check_run_folder

    run_dir, settings = _run_folder(tmp_path, started=["unet"], finished=["vae"], data={"path": "a"},
                                    train={"unet": {"learning_rate": 1e-4, "steps": 300, "log_every": 10},
                                           "sr": {"learning_rate": 1e-3}}, sampling={"steps": 30}, stages=["vae"])
    changed = {**settings, "train": {**settings["train"], "unet": {**settings["train"]["unet"],
                                                                   "learning_rate": 5e-3}}}
    with pytest.raises(T2IError, match=r"started with other settings: train.unet.learning_rate was 0.0001, now "
                                       r"0.005\. A resumed run continues the same training"):
        check_run_folder(run_dir, changed, resume=True)
    with pytest.raises(T2IError, match="data.path was 'a', now 'b'"):
        check_run_folder(run_dir, {**settings, "data": {"path": "b"}}, resume=True)
    free = {**settings, "train": {"unet": {**settings["train"]["unet"], "log_every": 1}, "sr": {"learning_rate": 1}},
            "sampling": {"steps": 20}, "stages": ["vae", "unet", "sr"]}  # sr has not started
    assert check_run_folder(run_dir, free, resume=True) is None
    longer = {**settings, "train": {**settings["train"], "unet": {**settings["train"]["unet"], "steps": 400}}}
    assert check_run_folder(run_dir, longer, resume=True) == "train.unet.steps: 300 -> 400"
    (run_dir / "unet" / "final").mkdir()
    with pytest.raises(T2IError, match="stage unet in '.*' finished at 300 steps, and --resume does not extend"):
        check_run_folder(run_dir, longer, resume=True)


def test_resume_skips_finished_stages_and_reads_no_data(trained_run, capsys, monkeypatch):
    def no_data(*args, **kwargs):
        raise AssertionError("a finished run resumed built its datasets")  # the demo's 20,000 shapes: 2-12 s

    monkeypatch.setattr("t2i.training.run.build_datasets", no_data)
    run_training(tiny_config(trained_run), resume=True)
    out = capsys.readouterr().out
    assert "[vae] already trained" in out and "[unet] already trained" in out


def test_accumulation_and_bf16_autocast_run_on_cpu(tmp_path):
    config = tiny_config(tmp_path / "run", "stages=[vae]", "train.vae.grad_accum_steps=2",
                         "train.vae.mixed_precision=bf16", "train.vae.steps=2", "train.vae.log_every=1")
    assert run_training(config) is None  # a vae-only run has no pipeline to assemble
    records = [json.loads(line) for line in (tmp_path / "run" / "vae" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert json.loads((tmp_path / "run" / "vae" / "checkpoints" / "step_0000002" / "trainer_state.json")
                      .read_text())["micro_batches"] == 4


def test_clip_stage_can_keep_the_token_embeddings_at_their_init(tmp_path):
    config = tiny_config(tmp_path / "run", "stages=[clip]", "text_encoder.freeze_token_embedding=true")
    assert run_training(config) is None
    trained = OpenClipTextEncoder.load(tmp_path / "run" / "clip" / "final").clip
    torch.manual_seed(config.train.clip.seed)
    initial = OpenClipTextEncoder.from_config(config.text_encoder, config.data.resolution).clip
    assert torch.equal(trained.token_embedding.weight, initial.token_embedding.weight)
    assert not torch.equal(trained.positional_embedding, initial.positional_embedding)
    assert not torch.equal(trained.ln_final.weight, initial.ln_final.weight)


def test_a_stage_without_the_stages_it_builds_on_is_refused_before_anything_trains(tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(T2IError, match=r"stage 'unet' builds on trained 'vae', 'clip' .*list 'vae', 'clip' "
                                       r"before 'unet' in stages"):
        run_training(tiny_config(run_dir, "stages=[unet,vae,clip]"))
    assert not (run_dir / "vae").exists() and not (run_dir / "unet").exists()
    with pytest.raises(T2IError, match=r"stage 'classifier' builds on trained 'vae'"):
        run_training(tiny_config(tmp_path / "other", "stages=[classifier]"))
    with pytest.raises(T2IError, match=r"stage 'sr' builds on trained 'clip'"):
        run_training(tiny_config(tmp_path / "other", "stages=[sr]"))


def test_the_pipeline_a_partial_run_leaves_for_later_holds_the_extra_stage_it_trained(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert run_training(tiny_config(run_dir, "stages=[clip,sr]", "train.sr.steps=2", "train.clip.steps=2")) is None
    assert "--resume --set stages=[vae,unet]" in capsys.readouterr().out
    run_training(tiny_config(run_dir, "stages=[vae,unet]", "train.sr.steps=2", "train.clip.steps=2"), resume=True)
    assert (run_dir / "pipeline" / "sr").is_dir()


def test_a_run_of_some_stages_says_what_the_pipeline_still_needs_and_a_resume_completes_it(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert run_training(tiny_config(run_dir, "stages=[vae]")) is None
    assert "no pipeline yet: it also needs clip, unet. Train them in this run folder with --resume --set " \
           "stages=[clip,unet]" in capsys.readouterr().out
    assert not (run_dir / "pipeline").exists()
    assert run_training(tiny_config(run_dir, "stages=[clip,unet]"), resume=True) == run_dir / "pipeline"
    assert (run_dir / "pipeline" / "t2i_pipeline.json").is_file()


def test_fp16_on_cpu_is_refused(tmp_path):
    config = tiny_config(tmp_path / "run", "stages=[vae]", "train.vae.mixed_precision=fp16")
    with pytest.raises(T2IError, match="'fp16' needs a GPU"):
        run_training(config)


def test_batch_sampler_resumes_and_shards():
    full = ResumableBatchSampler(10, 3, seed=1)
    batches = [b for _, b in zip(range(7), full)]
    assert sorted(sum(batches[:3], [])) == sorted(set(sum(batches[:3], [])))  # an epoch repeats nothing
    resumed = ResumableBatchSampler(10, 3, seed=1, start_batch=4)
    assert [b for _, b in zip(range(3), resumed)] == batches[4:7]
    rank0 = next(iter(ResumableBatchSampler(10, 2, seed=1, rank=0, world_size=2)))
    rank1 = next(iter(ResumableBatchSampler(10, 2, seed=1, rank=1, world_size=2)))
    assert len(rank0) == len(rank1) == 2 and not set(rank0) & set(rank1)
    with pytest.raises(T2IError, match="fewer than one batch"):
        ResumableBatchSampler(2, 3)


def test_two_processes_draw_the_rows_one_process_draws():
    whole = BatchRandomness(torch.Generator().manual_seed(3))
    ranks = [BatchRandomness(torch.Generator().manual_seed(3), rank, 2) for rank in (0, 1)]
    draws = [(r.randn((2, 3)), r.rand(2), r.randint(1000, 2)) for r in ranks]
    expected = (whole.randn((4, 3)), whole.rand(4), whole.randint(1000, 4))
    for kind in range(3):
        interleaved = torch.stack([draws[0][kind], draws[1][kind]], dim=1).flatten(0, 1)  # rows 0, 1, 2, 3
        assert torch.equal(interleaved, expected[kind])


def test_caption_dropout_rate():
    generator = torch.Generator().manual_seed(0)
    captions = drop_captions(["a red circle"] * 10_000, 0.1, BatchRandomness(generator))
    assert 0.08 < captions.count("") / len(captions) < 0.12
    assert drop_captions(["x"] * 100, 0.0, BatchRandomness(generator)) == ["x"] * 100


@pytest.mark.parametrize("schedule, prediction", [("linear", "epsilon"), ("scaled_linear", "v_prediction"),
                                                  ("cosine", "epsilon")])
def test_unet_stage_trains_with_every_schedule_and_parameterisation(trained_run, schedule, prediction):
    from diffusers import UNet2DConditionModel

    from t2i.training.run import load_text_encoder, load_vae, pipeline_scheduler_config

    config = tiny_config(trained_run, f"diffusion.schedule={schedule}", f"diffusion.prediction={prediction}",
                         "diffusion.min_snr_gamma=5")
    unet = UNet2DConditionModel.from_pretrained(trained_run / "unet" / "final")
    stage = UNetStage(unet, load_vae(trained_run), load_text_encoder(config, trained_run), config.diffusion,
                      pipeline_scheduler_config(config), [], torch.device("cpu"))
    batch = {"pixel_values": torch.rand(4, 3, 32, 32) * 2 - 1, "caption": ["a large red circle"] * 4}
    loss, _ = stage.loss(unet, batch, BatchRandomness(torch.Generator().manual_seed(0)))
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    assert all(p.grad is not None for p in unet.parameters() if p.requires_grad)
    scheduler = pipeline_scheduler_config(config)
    assert scheduler["prediction_type"] == prediction
    assert scheduler["beta_schedule"] == {"linear": "linear", "scaled_linear": "scaled_linear",
                                          "cosine": "squaredcos_cap_v2"}[schedule]


def test_scaled_latents_have_unit_variance(trained_run):
    from t2i.data.build import build_datasets
    from t2i.training.run import load_vae

    vae = load_vae(trained_run)
    dataset, _, _ = build_datasets(tiny_config(trained_run).data)
    images = torch.stack([dataset[i]["pixel_values"] for i in range(256)])
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.sample(torch.Generator().manual_seed(1))
    assert (latents * vae.config.scaling_factor).std().item() == pytest.approx(1.0, abs=0.1)


def test_the_unet_gets_contiguous_latents_from_a_channels_last_vae_output(trained_run):
    """The VAE's attention leaves its moments channels-last; the U-Net's input must not carry that along (its
    convolutions would follow it, and bf16 GroupNorm is slow on it), cached or encoded on the fly."""
    from t2i.data.build import build_datasets
    from t2i.data.latents import encode_dataset
    from t2i.training.run import load_vae
    from t2i.training.stages.unet import sample_latents

    vae = load_vae(trained_run)
    dataset, _, _ = build_datasets(tiny_config(trained_run).data)
    images = torch.stack([dataset[i]["pixel_values"] for i in range(4)])
    with torch.no_grad():
        moments = vae.encode(images).latent_dist.mean
    assert moments.stride(1) == 1 and not moments.is_contiguous()  # channels innermost, as in NHWC
    cached = encode_dataset(vae, torch.utils.data.Subset(dataset, range(4)))
    batches = [{"latent_mean": cached.mean, "latent_std": cached.std}, {"pixel_values": images}]
    for batch in batches:
        latents = sample_latents(vae, batch, BatchRandomness(torch.Generator().manual_seed(0)))
        assert latents.shape == moments.shape and latents.is_contiguous()


def test_two_local_cpu_processes_train_data_parallel(tmp_path):
    run_dir = tmp_path / "run"
    pipeline = run_training(tiny_config(run_dir, "local_processes=2"))
    assert (pipeline / "t2i_pipeline.json").is_file()
    for stage, steps in (("vae", 4), ("clip", 4), ("unet", 6)):
        records = [json.loads(line) for line in (run_dir / stage / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == list(range(2, steps + 1, 2))  # written by the main process alone
        assert (run_dir / stage / "final").is_dir()


def test_an_error_in_a_local_process_is_reported_as_such(tmp_path):
    # 2 processes x batch 8 need 16 examples; the error is raised inside the workers.
    config = tiny_config(tmp_path / "run", "local_processes=2", "data.size=12")
    with pytest.raises(T2IError, match="fewer than one batch of 16"):
        run_training(config)


def test_a_failing_local_process_ends_the_others_within_a_bounded_time():
    from launch_helpers import rank_one_fails

    from t2i.training.launch import FAILED_RANK_GRACE_S, launch_local

    started = time.perf_counter()
    with pytest.raises(T2IError, match="rank 1 failed"):
        launch_local(rank_one_fails, (), 2)
    assert time.perf_counter() - started < 2 * FAILED_RANK_GRACE_S + 15  # two grace periods, plus starting up


def test_noise_offset_shifts_each_channel_of_the_noise(trained_run):
    from diffusers import UNet2DConditionModel

    from t2i.training.run import load_text_encoder, load_vae, pipeline_scheduler_config

    losses = []
    for offset in (0.0, 0.5):
        config = tiny_config(trained_run, f"diffusion.noise_offset={offset}")
        unet = UNet2DConditionModel.from_pretrained(trained_run / "unet" / "final")
        stage = UNetStage(unet, load_vae(trained_run), load_text_encoder(config, trained_run), config.diffusion,
                          pipeline_scheduler_config(config), [], torch.device("cpu"))
        batch = {"pixel_values": torch.zeros(4, 3, 32, 32), "caption": ["a large red circle"] * 4}
        with torch.no_grad():
            losses.append(stage.loss(unet, batch, BatchRandomness(torch.Generator().manual_seed(0)))[0].item())
    assert losses[0] != losses[1]
