"""Training that fails safe: no pickle, divergence caught, one run per folder, signals save, writes are atomic."""
import errno
import json
import math
import os
import pickle
import random
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from t2i import atomic
from t2i.cli import main
from t2i.errors import T2IError
from t2i.training import run_lock
from t2i.training.checkpoint import TrainingState, latest_checkpoint, save_checkpoint
from t2i.training.interrupt import StopNow, StopRequest
from t2i.training.plain_state import load_state, save_state
from t2i.training.run import run_training
from t2i.training.stages.unet import UNetStage

from conftest import REPO, TINY_CONFIG, tiny_config

UNET_WEIGHTS = "final/diffusion_pytorch_model.safetensors"


def unet_only_run(trained_run: Path, run_dir: Path) -> Path:
    """A copy of the trained tiny run whose VAE and CLIP are done and whose U-Net has yet to train."""
    shutil.copytree(trained_run, run_dir)
    shutil.rmtree(run_dir / "unet")
    shutil.rmtree(run_dir / "pipeline")
    return run_dir


def strict_json_lines(path: Path) -> list[dict]:
    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def all_finite(path: Path) -> bool:
    return all(torch.isfinite(t).all() for t in load_file(path).values())


# ---------------------------------------------------------------- checkpoints hold no pickle

def test_the_code_base_loads_no_pickle():
    sources = {p: p.read_text() for p in (REPO / "t2i").rglob("*.py")}
    for forbidden in ("torch.load(", "pickle.load", "import pickle", "weights_only=False"):
        assert [p for p, text in sources.items() if forbidden in text] == [], forbidden


def test_optimizer_scheduler_and_rng_states_round_trip_as_plain_data(tmp_path):
    parameter = torch.nn.Parameter(torch.randn(3))
    optimizer = torch.optim.AdamW([parameter], lr=1e-3, fused=True)
    parameter.grad = torch.ones(3)
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "python": random.getstate(), "numpy": np.random.get_state(legacy=False),
             "torch": torch.get_rng_state(), "odd": {3: (math.inf, None, "x")}}
    save_state(state, tmp_path, "state")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json", "state.safetensors"]
    loaded = load_state(tmp_path, "state")
    assert loaded["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]  # betas stay a tuple
    assert all(torch.equal(loaded["optimizer"]["state"][0][k], v) for k, v in state["optimizer"]["state"][0].items())
    assert loaded["scheduler"] == state["scheduler"]
    assert loaded["odd"] == {3: (math.inf, None, "x")}
    random.setstate((loaded["python"][0], tuple(loaded["python"][1]), loaded["python"][2]))
    np.random.set_state(loaded["numpy"])
    torch.set_rng_state(loaded["torch"])
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    assert expected == (random.random(), np.random.rand(), torch.rand(1))


class _WritesMarker:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_poisoned_pickle_in_an_old_checkpoint_is_never_unpickled(trained_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    shutil.rmtree(run_dir / "pipeline")
    shutil.rmtree(run_dir / "unet" / "final")
    shutil.rmtree(run_dir / "unet" / "checkpoints" / "step_0000006")
    old = run_dir / "unet" / "checkpoints" / "step_0000003"
    for name in ("optimizer.json", "optimizer.safetensors", "rng.json", "rng.safetensors"):
        (old / name).unlink()
    marker = tmp_path / "unpickled"
    for name in ("optimizer.pt", "rng.pt"):
        (old / name).write_bytes(pickle.dumps(_WritesMarker(marker)))
    command = ["train", str(TINY_CONFIG), "--set", f"run_dir={run_dir}"]

    assert main([*command, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "written by an older t2i" in err and "--resume-weights-only" in err
    assert len([line for line in err.splitlines() if line.startswith("t2i train")]) == 1
    assert "Traceback" not in err

    assert main([*command, "--resume-weights-only"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert not marker.exists()
    assert all_finite(run_dir / "unet" / UNET_WEIGHTS)
    assert json.loads((run_dir / "unet" / "checkpoints" / "step_0000006" / "trainer_state.json").read_text())[
        "step"] == 6


@pytest.mark.parametrize("damaged", ["model.safetensors", "optimizer.json", "rng.safetensors", "trainer_state.json"])
def test_a_damaged_checkpoint_file_is_named_and_the_previous_checkpoint_offered(trained_run, tmp_path, capsys,
                                                                                 damaged):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    shutil.rmtree(run_dir / "pipeline")
    shutil.rmtree(run_dir / "unet" / "final")
    latest = run_dir / "unet" / "checkpoints" / "step_0000006"
    data = (latest / damaged).read_bytes()
    (latest / damaged).write_bytes(data[: len(data) // 2])  # truncated
    assert main(["train", str(TINY_CONFIG), "--set", f"run_dir={run_dir}", "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"{latest / damaged}" in err and "corrupt or truncated" in err
    assert "step_0000003" in err and "Traceback" not in err


# ---------------------------------------------------------------- divergence

def test_divergence_stops_the_stage_at_once_and_saves_nothing_non_finite(trained_run, tmp_path):
    run_dir = unet_only_run(trained_run, tmp_path / "run")
    config = tiny_config(run_dir, "train.unet.learning_rate=1e9", "train.unet.grad_clip=null",
                         "train.unet.checkpoint_every=1", "train.unet.log_every=1", "train.unet.sample_every=0",
                         "train.unet.steps=20")
    with pytest.raises(T2IError, match=r"\[unet\] training diverged at step (\d+)") as error:
        run_training(config, resume=True)
    message = str(error.value)
    assert "learning_rate (1e+09) too high with no train.unet.grad_clip" in message
    diverged_at = int(message.split("diverged at step ")[1].split(":")[0])
    records = strict_json_lines(run_dir / "unet" / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, diverged_at))  # stopped within the step
    checkpoints = sorted((run_dir / "unet" / "checkpoints").iterdir())
    assert checkpoints, "the steps before divergence were checkpointed"
    for checkpoint in checkpoints:
        assert all_finite(checkpoint / "model.safetensors") and all_finite(checkpoint / "ema.safetensors")
    assert not (run_dir / "unet" / "final").exists() and not (run_dir / "pipeline").exists()


def test_a_diverged_sample_grid_blames_the_training_not_the_sampler(trained_run, tmp_path):
    run_dir = unet_only_run(trained_run, tmp_path / "run")
    config = tiny_config(run_dir, "train.unet.learning_rate=1e9", "train.unet.grad_clip=null",
                         "train.unet.sample_every=1", "train.unet.steps=20")
    with pytest.raises(T2IError, match=r"\[unet\] the sample grid at step 1 is not finite \(the U-Net's predictions "
                                       r"are not finite .*learning_rate \(1e\+09\) too high"):
        run_training(config, resume=True)


def test_a_bounded_number_of_non_finite_steps_can_be_skipped(trained_run, tmp_path, monkeypatch):
    real_loss = UNetStage.loss
    calls = {"n": 0}

    def loss_nan_at_step_2(self, *args):
        calls["n"] += 1
        loss, metrics = real_loss(self, *args)
        return (loss * math.nan if calls["n"] == 2 else loss), metrics

    monkeypatch.setattr(UNetStage, "loss", loss_nan_at_step_2)
    run_dir = unet_only_run(trained_run, tmp_path / "skip")
    run_training(tiny_config(run_dir, "train.unet.max_nonfinite_steps=1", "train.unet.log_every=1",
                             "train.unet.sample_every=0"), resume=True)
    records = strict_json_lines(run_dir / "unet" / "metrics.jsonl")
    assert records[1]["step"] == 2 and records[1]["loss"] is None and records[1]["skipped_steps"] == 1
    assert all(r["loss"] is not None for r in records if r["step"] != 2)
    assert all_finite(run_dir / "unet" / UNET_WEIGHTS)
    state = json.loads((latest_checkpoint(run_dir / "unet") / "trainer_state.json").read_text())
    assert {key: state[key] for key in ("step", "micro_batches", "skipped_steps")} == {
        "step": 6, "micro_batches": 6, "skipped_steps": 1}

    calls["n"] = 0
    run_dir = unet_only_run(trained_run, tmp_path / "stop")
    with pytest.raises(T2IError, match=r"diverged at step 2: loss nan"):
        run_training(tiny_config(run_dir, "train.unet.sample_every=0"), resume=True)


# ---------------------------------------------------------------- one run per folder

def _live_process() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def _write_lock(run_dir: Path, **holder) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    fields = {"host": socket.gethostname(), "pid": 1, "started": "2026-01-01 00:00:00", "command": "t2i train x",
              "process_start": None, **holder}
    (run_dir / run_lock.LOCK_NAME).write_text(json.dumps(fields))


@pytest.mark.parametrize("command", ["train", "demo"])
def test_a_busy_run_folder_is_refused_naming_its_holder(tmp_path, capsys, command):
    holder = _live_process()
    try:
        _write_lock(tmp_path / "run", pid=holder.pid)
        args = (["train", str(TINY_CONFIG), "--set", f"run_dir={tmp_path / 'run'}", "--resume"] if command == "train"
                else ["demo", "--out", str(tmp_path / "run"), "--config", str(TINY_CONFIG)])
        started = time.perf_counter()
        assert main(args) == 2
        assert time.perf_counter() - started < 10
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err
    assert f"is in use by pid {holder.pid} on {socket.gethostname()}" in err and "t2i train x" in err
    assert [p.name for p in (tmp_path / "run").iterdir()] == [run_lock.LOCK_NAME]  # nothing else written


def test_a_lock_held_on_another_host_is_respected(tmp_path):
    _write_lock(tmp_path, host="some-other-node", pid=os.getpid())
    with pytest.raises(run_lock.RunFolderBusy, match="on some-other-node"):
        run_lock.acquire(tmp_path)


def test_the_lock_of_a_dead_run_is_taken_over_and_released_at_the_end(tmp_path, capsys):
    gone = _live_process()
    gone.kill()
    gone.wait()
    _write_lock(tmp_path, pid=gone.pid)
    with run_lock.hold(tmp_path) as lock:
        assert run_lock.read_holder(lock).pid == os.getpid()
        with run_lock.hold(tmp_path):  # re-entrant: the demo holds it around training
            pass
        assert lock.exists()
    assert not lock.exists()
    err = capsys.readouterr().err
    assert f"from pid {gone.pid}" in err and "no longer running" in err


def test_a_zombie_or_reused_pid_does_not_hold_the_lock(tmp_path):
    zombie = _live_process()
    zombie.kill()
    time.sleep(0.5)  # killed but not reaped: a zombie
    try:
        _write_lock(tmp_path / "a", pid=zombie.pid)
        run_lock.release(run_lock.acquire(tmp_path / "a"))
    finally:
        zombie.wait()
    _write_lock(tmp_path / "b", pid=os.getpid(), process_start=1)  # this pid, but another process's start time
    run_lock.release(run_lock.acquire(tmp_path / "b"))


def test_two_train_commands_on_one_folder(tmp_path):
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "t2i.cli", "train", str(TINY_CONFIG), "--set", f"run_dir={run_dir}",
               "--set", "train.unet.sample_every=0", "--resume"]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (run_dir / run_lock.LOCK_NAME).exists() and time.time() < deadline:
        time.sleep(0.05)
    started = time.perf_counter()
    second = subprocess.run(command, capture_output=True, text=True, timeout=60)
    refused_in = time.perf_counter() - started
    _, first_err = first.communicate(timeout=120)
    assert first.returncode == 0, first_err
    assert second.returncode == 2 and f"in use by pid {first.pid}" in second.stderr
    assert refused_in < 10
    for stage in ("vae", "clip", "unet"):
        steps = [r["step"] for r in strict_json_lines(run_dir / stage / "metrics.jsonl")]
        assert len(steps) == len(set(steps))
    assert not (run_dir / run_lock.LOCK_NAME).exists()


# ---------------------------------------------------------------- signals

def test_a_first_signal_asks_a_second_stops_at_once():
    stop = StopRequest()
    with stop.installed():
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGTERM
        with pytest.raises(StopNow):
            os.kill(os.getpid(), signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is not stop._handle


def test_ctrl_c_to_a_launcher_and_its_workers_together_is_one_request_not_two():
    """A terminal's Ctrl-C signals the whole process group: the launcher sets the shared stop first, and a worker's
    own SIGINT then must still finish the step, not stop at once (it did, with tracebacks from inside torch)."""
    import multiprocessing

    shared = multiprocessing.get_context("spawn").Value("i", 0)
    launcher, worker = StopRequest(shared), StopRequest(shared)
    with launcher.installed():
        os.kill(os.getpid(), signal.SIGINT)
    with worker.installed():
        os.kill(os.getpid(), signal.SIGINT)  # the same Ctrl-C, delivered to the worker
        assert worker.signum == signal.SIGINT
        with pytest.raises(StopNow):
            os.kill(os.getpid(), signal.SIGINT)  # a second Ctrl-C does stop at once


def test_sigint_saves_a_checkpoint_exits_130_and_resume_equals_an_uninterrupted_run(trained_run, tmp_path,
                                                                                     monkeypatch, capsys):
    run_dir = tmp_path / "run"
    real_loss = UNetStage.loss
    calls = {"n": 0}

    def interrupted_loss(self, *args):
        calls["n"] += 1
        if calls["n"] == 4:  # Ctrl-C during step 4; checkpoints fall at 3 and 6
            os.kill(os.getpid(), signal.SIGINT)
        return real_loss(self, *args)

    monkeypatch.setattr(UNetStage, "loss", interrupted_loss)
    command = ["train", str(TINY_CONFIG), "--set", f"run_dir={run_dir}"]
    assert main(command) == 130
    err = capsys.readouterr().err
    checkpoint = run_dir / "unet" / "checkpoints" / "step_0000004"
    assert f"stopped by SIGINT after step 4 of 6; checkpoint saved to '{checkpoint}'" in err and "--resume" in err
    assert not (run_dir / "unet" / "final").exists()
    monkeypatch.setattr(UNetStage, "loss", real_loss)
    assert main([*command, "--resume"]) == 0
    resumed, uninterrupted = load_file(run_dir / "unet" / UNET_WEIGHTS), load_file(trained_run / "unet" / UNET_WEIGHTS)
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)


def _wait_for_step(metrics: Path, step: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if metrics.is_file() and any(json.loads(line)["step"] >= step for line in metrics.read_text().splitlines()):
            return
        time.sleep(0.05)
    raise AssertionError(f"never reached step {step}: {process.poll()}")


SIGNAL_TEST_SETTINGS = ["train.unet.steps=60", "train.unet.log_every=1", "train.unet.checkpoint_every=0",
                        "train.unet.sample_every=0"]


def test_sigterm_to_a_training_process_then_resume_gives_the_uninterrupted_weights(trained_run, tmp_path):
    reference = unet_only_run(trained_run, tmp_path / "reference")
    run_training(tiny_config(reference, *SIGNAL_TEST_SETTINGS), resume=True)

    run_dir = unet_only_run(trained_run, tmp_path / "run")
    command = [sys.executable, "-m", "t2i.cli", "train", str(TINY_CONFIG), "--set", f"run_dir={run_dir}",
               *[arg for setting in SIGNAL_TEST_SETTINGS for arg in ("--set", setting)], "--resume"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_step(run_dir / "unet" / "metrics.jsonl", 3, process)
    signalled = time.perf_counter()
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    stopped_in = time.perf_counter() - signalled
    assert process.returncode == 143, err
    assert "stopped by SIGTERM after step" in err and "checkpoint saved to" in err and "Traceback" not in err
    assert stopped_in < 30
    stopped_at = latest_checkpoint(run_dir / "unet")
    assert stopped_at is not None and 3 <= int(stopped_at.name.split("_")[1]) < 60
    assert not (run_dir / run_lock.LOCK_NAME).exists()

    run_training(tiny_config(run_dir, *SIGNAL_TEST_SETTINGS), resume=True)
    resumed, uninterrupted = load_file(run_dir / "unet" / UNET_WEIGHTS), load_file(reference / "unet" / UNET_WEIGHTS)
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)
    steps = [r["step"] for r in strict_json_lines(run_dir / "unet" / "metrics.jsonl")]
    assert steps == list(range(1, 61))


def test_under_torchrun_the_ranks_share_one_lock_and_agree_on_the_step_to_stop(trained_run, tmp_path):
    run_dir = unet_only_run(trained_run, tmp_path / "run")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), "-m", "t2i.cli", "train", str(TINY_CONFIG), "--set", f"run_dir={run_dir}",
               *[arg for setting in SIGNAL_TEST_SETTINGS for arg in ("--set", setting)], "--resume"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    _wait_for_step(run_dir / "unet" / "metrics.jsonl", 3, process)
    main_rank = run_lock.read_holder(run_dir / run_lock.LOCK_NAME).pid  # the main process holds the lock
    os.kill(main_rank, signal.SIGTERM)  # one rank only: the other learns of it through the step's all-reduce
    _, err = process.communicate(timeout=120)
    stops = [line for line in err.splitlines() if "stopped by SIGTERM after step" in line]
    assert len(stops) == 2, err
    assert stops[0].split("after step")[1] == stops[1].split("after step")[1]  # the same step on both ranks
    assert latest_checkpoint(run_dir / "unet").name in stops[0]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ---------------------------------------------------------------- fail-safe writes

def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_failed_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    first = save_checkpoint(tmp_path, TrainingState(1, 1), model, None, optimizer, scheduler, {}, keep=2)
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    monkeypatch.setattr("t2i.training.checkpoint.save_file", _disk_full)
    for step in (1, 2):  # over the same checkpoint, and a new one
        with pytest.raises(T2IError, match="could not write checkpoint .* No space left on device"):
            save_checkpoint(tmp_path, TrainingState(step, step), model, None, optimizer, scheduler, {}, keep=2)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_0000001"]
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before


def test_a_failed_pipeline_save_keeps_the_previous_pipeline(tiny_pipeline, tmp_path, monkeypatch):
    from diffusers import UNet2DConditionModel

    from t2i import Text2ImagePipeline

    tiny_pipeline.save_pretrained(tmp_path / "pipe")
    before = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "pipe").rglob("*") if p.is_file()}
    monkeypatch.setattr(UNet2DConditionModel, "save_pretrained", _disk_full)
    with pytest.raises(T2IError, match="could not write pipeline .*; the previous one is intact"):
        tiny_pipeline.save_pretrained(tmp_path / "pipe")
    after = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "pipe").rglob("*") if p.is_file()}
    assert after == before and sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]
    Text2ImagePipeline.from_pretrained(tmp_path / "pipe", device="cpu")


def test_a_pipeline_is_not_saved_over_a_file_or_a_folder_of_other_files(tiny_pipeline, tmp_path):
    (tmp_path / "file").write_text("keep")
    with pytest.raises(T2IError, match="is a file"):
        tiny_pipeline.save_pretrained(tmp_path / "file")
    with pytest.raises(T2IError, match="is a file"):
        with atomic.write_folder(tmp_path / "file", "pipeline"):
            pass
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(T2IError, match="already holds other files"):
        tiny_pipeline.save_pretrained(tmp_path / "mine")
    assert (tmp_path / "file").read_text() == (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    (tmp_path / "empty").mkdir()
    tiny_pipeline.save_pretrained(tmp_path / "empty")
    tiny_pipeline.save_pretrained(tmp_path / "empty")  # a previous pipeline is replaced
    assert sorted(path.name for path in tmp_path.iterdir()) == ["empty", "file", "mine"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_saved_weights_get_the_mode_the_umask_gives_other_files(tiny_pipeline, tmp_path, umask):
    previous = os.umask(umask)
    try:
        tiny_pipeline.save_pretrained(tmp_path / "pipe")
        with atomic.write_file(tmp_path / "cache.safetensors") as draft:
            save_file({"x": torch.zeros(2)}, draft)
    finally:
        os.umask(previous)
    files = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert any(path.suffix == ".safetensors" for path in files)
    assert {oct(stat.S_IMODE(path.stat().st_mode)) for path in files} == {oct(0o666 & ~umask)}


@pytest.mark.parametrize("can_exchange", [True, False])
def test_replacing_a_folder_leaves_the_old_or_the_new(tmp_path, monkeypatch, can_exchange):
    target = tmp_path / "pipeline"
    target.mkdir()
    (target / "old").write_text("old")
    if not can_exchange:
        monkeypatch.setattr(atomic, "exchange", lambda a, b: False)
    observed = []
    real_rmtree = shutil.rmtree
    monkeypatch.setattr(atomic.shutil, "rmtree",
                        lambda path, **kw: (observed.append(target.exists()), real_rmtree(path, **kw))[1])
    with atomic.write_folder(target, "pipeline") as staging:
        (staging / "new").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipeline"]
    if can_exchange:  # the old folder is deleted only once the new one stands in its place
        assert observed[-1] is True
