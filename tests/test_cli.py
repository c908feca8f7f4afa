"""The t2i command on tiny configs: help texts, train, generate, demo, and errors without tracebacks."""
import logging
import os
import re
import signal
import subprocess
import sys

import pytest
from PIL import Image

from t2i import Text2ImagePipeline
from t2i.cli import main

from conftest import REPO, TINY_CONFIG

OPTIONS = {
    "demo": ["--out", "--device", "--config", "--set", "--resume-weights-only", "--cascade"],
    "train": ["config", "--set", "--resume", "--resume-weights-only"],
    "finetune": ["--model", "--data", "--out", "--max-steps", "--resolution", "--batch-size", "--lr", "--lora-rank",
                 "--validation-prompts", "--checkpoint-every", "--image-column", "--caption-column",
                 "--allow-pickle", "--device", "--config", "--set", "--resume"],
    "generate": ["prompt", "--model", "--negative", "--steps", "--guidance", "--seed", "--sampler", "--eta",
                 "--guidance-rescale", "--dynamic-threshold", "--num-images",
                 "--height", "--width", "--out", "--device", "--from-image", "--allow-pickle", "--upscale"],
    "upscale": ["IMAGE", "--model", "--prompt", "--steps", "--guidance", "--noise-level", "--sampler", "--seed",
                "--out", "--device", "--allow-pickle"],
    "batch": ["--model", "--prompts", "--out", "--batch-size", "--steps", "--guidance", "--sampler", "--negative",
              "--seed", "--height", "--width", "--num-images", "--skip-invalid", "--force", "--device", "--merge"],
    "export": ["--model", "--out", "--sampler", "--allow-pickle"],
    "eval": ["--likelihood", "--model", "--data", "--num-images", "--batch-size", "--seed", "--tolerance", "--device",
             "--allow-pickle"],
}


@pytest.mark.parametrize("command", list(OPTIONS))
def test_every_command_explains_every_option(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in OPTIONS[command]:
        assert option in text


@pytest.mark.parametrize("command", ["demo", "train", "finetune"])
def test_the_set_example_in_the_help_is_a_valid_override(command, capsys):
    import re

    from t2i.config import PACKAGED_CONFIGS, load_config

    with pytest.raises(SystemExit):
        main([command, "--help"])
    example = re.search(r"--set\s+(\S+=\S+)", capsys.readouterr().out.split("--set KEY=VALUE", 2)[-1]).group(1)
    if command == "finetune":
        load_config(PACKAGED_CONFIGS / "finetune.yaml", ["finetune.model=m", "data.path=d", example])
    else:
        load_config(TINY_CONFIG, [example])


def test_console_script_runs():
    result = subprocess.run([sys.executable, "-m", "t2i.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "demo" in result.stdout and "generate" in result.stdout


def test_sampler_names_for_the_command_line_equal_the_registry():
    from t2i.diffusion.sampler_names import SAMPLER_NAMES
    from t2i.diffusion.samplers import ALL_SAMPLERS

    assert SAMPLER_NAMES == ALL_SAMPLERS


@pytest.mark.parametrize("command", [["upscale", "x.png", "--prompt", "a"], ["export", "--out", "o"]])
def test_upscale_and_export_offer_only_the_samplers_they_can_use(capsys, command):
    """pc, annealed_langevin and pf_ode have no diffusers scheduler: --help listed them, and they failed later."""
    from t2i.diffusion.sampler_names import SCHEDULER_SAMPLER_NAMES
    from t2i.diffusion.samplers import SAMPLERS

    assert SCHEDULER_SAMPLER_NAMES == tuple(SAMPLERS)
    with pytest.raises(SystemExit):
        main([*command, "--model", "m", "--sampler", "pc"])
    assert "invalid choice: 'pc'" in capsys.readouterr().err


@pytest.mark.parametrize("command", [[], *([name] for name in OPTIONS)])
def test_help_imports_neither_torch_nor_diffusers(command):
    code = ("import sys\nfrom t2i.cli import main\ntry:\n    main(sys.argv[1:] + ['--help'])\n"
            "except SystemExit:\n    pass\nprint(sorted({'torch', 'diffusers', 'numpy'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code, *command], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_the_libraries_stay_quiet_after_they_are_imported(monkeypatch):
    """diffusers and transformers set their loggers' level when first imported, after the CLI's quieting, from
    their *_VERBOSITY variables: without them a diffusers warning (a U-Net cast with `to(dtype)`) reached
    `t2i demo --cascade`'s output."""
    import diffusers.utils.logging
    import transformers.utils.logging

    from t2i.cli import _quiet_libraries

    monkeypatch.setattr(os, "environ", {key: value for key, value in os.environ.items()
                                        if key not in ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY")})
    logger = logging.getLogger("t2i")
    monkeypatch.setattr(logger, "handlers", list(logger.handlers))
    monkeypatch.setattr(logger, "propagate", logger.propagate)
    _quiet_libraries()
    assert diffusers.utils.logging._get_default_logging_level() == logging.ERROR
    assert transformers.utils.logging._get_default_logging_level() == logging.ERROR


def test_generate_writes_images(trained_run, tmp_path, capsys):
    out = tmp_path / "red.png"
    assert main(["generate", "--model", str(trained_run / "pipeline"), "a large red circle", "--num-images", "2",
                 "--steps", "3", "--seed", "4", "--sampler", "euler", "--out", str(out)]) == 0
    for i in range(2):
        assert Image.open(tmp_path / f"red-{i}.png").size == (32, 32)


def test_generate_with_dpmpp_sde_prints_no_brownian_tree_warnings(trained_run, tmp_path):
    result = subprocess.run([sys.executable, "-m", "t2i.cli", "generate", "--model", str(trained_run / "pipeline"),
                             "a red circle", "--steps", "4", "--sampler", "dpmpp_sde", "--device", "cpu",
                             "--out", str(tmp_path / "sde.png")], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    assert "Should have" not in result.stderr and (tmp_path / "sde.png").is_file()


@pytest.mark.parametrize("sampler", ["pc", "annealed_langevin", "pf_ode"])
def test_generate_with_a_sampler_written_in_t2i(trained_run, tmp_path, sampler):
    out = tmp_path / f"{sampler}.png"
    assert main(["generate", "--model", str(trained_run / "pipeline"), "a large red circle", "--steps", "2",
                 "--sampler", sampler, "--out", str(out)]) == 0
    assert Image.open(out).size == (32, 32)


@pytest.mark.parametrize("args, message", [
    (["generate", "--model", "/nonexistent/model", "a red circle"], "model folder '/nonexistent/model' does not exist"),
    (["generate", "--model", "{pipeline}", ""], "the prompt is empty"),
    (["generate", "--model", "{pipeline}", "a red circle", "--height", "31"], "height 31 is not a positive multiple"),
    (["train", "/nonexistent.yaml"], "config file '/nonexistent.yaml' does not exist"),
    (["train", str(TINY_CONFIG), "--set", "unet.depth=3"], "unknown config key 'unet.depth'"),
    (["generate", "--model", "{pipeline}", "x", "--out", "{tmp}"], "is a folder; give an image file name"),
    (["generate", "--model", "{pipeline}", "x", "--out", "{tmp}/v1.5"], "'.5' is not an image format PIL writes"),
    (["generate", "--model", "{pipeline}", "x", "--out", "{tmp}/file/x.png"], "'{tmp}/file' is a file, not a folder"),
    (["generate", "--model", "{pipeline}", "--from-image", "{tmp}/file"], "cannot read image '{tmp}/file'"),
    (["generate", "--model", "{pipeline}", "--from-image", "{tmp}"], "image '{tmp}' is a folder, not an image file"),
    (["generate", "--model", "{pipeline}", "--from-image", "{tmp}/file", "--seed", "3"],  # was silently overwritten
     "--from-image takes --seed from the image; leave it out"),
    (["generate", "--model", "{pipeline}", "--from-image", "{tmp}/file", "--steps", "9", "--sampler", "ddim"],
     "--from-image takes --steps, --sampler from the image; leave them out"),
    (["batch", "--merge", "{pipeline}"], "is not a batch job's output folder"),
    (["batch", "--model", "{pipeline}", "--prompts", "{tmp}/p.txt", "--out", "{tmp}/file"],
     "--out '{tmp}/file' is a file; give a folder"),
    (["batch", "--model", "{pipeline}", "--prompts", "{tmp}", "--out", "{tmp}/o"], "is a folder; give a .txt"),
    (["batch", "--model", "{pipeline}", "--prompts", "{tmp}/p.txt", "--out", "{tmp}/o", "--steps", "0"],
     "--steps: steps must be at least 1, got 0"),
])
def test_errors_are_one_clear_line(trained_run, tmp_path, capsys, args, message):
    (tmp_path / "file").write_text("not an image")
    (tmp_path / "p.txt").write_text("a red circle\na blue square\n")
    message = message.replace("{tmp}", str(tmp_path))
    args = [a.replace("{pipeline}", str(trained_run / "pipeline")).replace("{tmp}", str(tmp_path)) for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


@pytest.mark.parametrize("command", ["generate", "upscale"])
def test_an_image_that_cannot_be_written_is_one_clear_line(trained_run, tmp_path, capsys, monkeypatch, command):
    """A full disk or a folder without write permission ended in a traceback from PIL, after the work was done."""
    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    if command == "upscale":  # no SR stage is needed to reach the save: pipe.upscale is replaced
        Image.new("RGB", (32, 32)).save(tmp_path / "low.png")
        monkeypatch.setattr(Text2ImagePipeline, "upscale", lambda self, images, *a, **k: images)
    monkeypatch.setattr(Image.Image, "save", no_space)
    args = (["generate", "a red circle", "--steps", "1"] if command == "generate"
            else ["upscale", str(tmp_path / "low.png"), "--prompt", "a red circle"])
    assert main([*args, "--model", str(trained_run / "pipeline"), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert f"cannot write '{tmp_path / 'x.png'}': No space left on device; give --out in a writable folder" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("command", ["upscale", "generate"])
def test_an_image_over_pils_pixel_limit_is_one_clear_line(trained_run, tmp_path, capsys, monkeypatch, command):
    """PIL's DecompressionBombError is no OSError: an image over twice MAX_IMAGE_PIXELS ended in its traceback."""
    Image.new("RGB", (32, 32)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 1,024 pixels is then over twice the limit
    args = (["upscale", str(tmp_path / "big.png"), "--prompt", "a red circle"] if command == "upscale"
            else ["generate", "--from-image", str(tmp_path / "big.png")])
    assert main([*args, "--model", str(trained_run / "pipeline"), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert f"cannot read image '{tmp_path / 'big.png'}': Image size (1024 pixels) exceeds limit" in err
    assert "Traceback" not in err


def test_unknown_sampler_is_rejected_with_the_valid_names(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--model", "x", "a red circle", "--sampler", "plms"])
    assert "dpmpp_2m" in capsys.readouterr().err


def test_train_then_resume(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["train", str(TINY_CONFIG), "--set", f"run_dir={run_dir}", "--set", "train.unet.steps=2",
                 "--set", "train.unet.sample_every=0"]) == 0
    assert (run_dir / "pipeline" / "t2i_pipeline.json").is_file()
    assert main(["train", str(TINY_CONFIG), "--set", f"run_dir={run_dir}", "--set", "train.unet.steps=2",
                 "--set", "train.unet.sample_every=0", "--resume"]) == 0
    assert "already trained" in capsys.readouterr().out


def test_demo_cascade_trains_sr_and_reports_it(tmp_path, capsys):
    out = tmp_path / "cascade"
    assert main(["demo", "--out", str(out), "--device", "cpu", "--config", str(TINY_CONFIG), "--cascade",
                 "--set", "train.unet.sample_every=0", "--set", "train.sr.steps=2", "--set", "train.sr.sample_every=0",
                 "--set", "sampling.samples_per_prompt=1"]) == 0
    printed = capsys.readouterr().out
    assert "cascade (SR stage, 32 -> 64 px)" in printed and "PSNR over bicubic" in printed
    assert (out / "pipeline" / "sr" / "sr.json").is_file()
    assert Image.open(out / "grid_upscaled.png").height > Image.open(out / "grid.png").height
    assert "<td>PSNR over bicubic, dB</td>" in (out / "report.html").read_text()


def test_demo_writes_grid_report_and_pipeline(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--device", "cpu", "--config", str(TINY_CONFIG),
                 "--set", "train.unet.sample_every=0", "--set", "sampling.samples_per_prompt=2"]) == 0
    printed = capsys.readouterr().out
    assert "judged accuracy" in printed and "targets:" in printed
    assert (out / "pipeline" / "t2i_pipeline.json").is_file()
    grid = Image.open(out / "grid.png")
    assert grid.width > 32 * 8
    report = (out / "report.html").read_text()
    assert "a large red" in report or "a small red" in report
    assert "held_out" in report and "two_object" in report and "Loss curves" in report
    assert "no metrics recorded" not in report
    assert report.count("data:image/png;base64") == 2 * 96 + 1  # every sample (2 per prompt) and the loss curves
    assert "samples_per_prompt" in report
    printed_total = re.search(r"wall time, s +([0-9.]+)", printed).group(1)
    reported_total = float(re.search(r"<td>total</td><td>([0-9.]+) s</td>", report).group(1))
    assert abs(float(printed_total) - reported_total) <= 0.05 + 1e-9  # one total, printed to 0.01 s, shown to 0.1 s
    assert f"<td>wall time, s</td><td>{printed_total}</td><td>≤ 240</td>" in report  # the printed targets, as a table
    assert "<td>held-out fully correct</td>" in report and "<td>unet</td><td>" in report


def _run_python(script: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def test_python_dash_m_t2i_exits_with_the_commands_status(tmp_path):
    result = subprocess.run([sys.executable, "-m", "t2i", "batch", "--merge", str(tmp_path / "missing")],
                            capture_output=True, text=True, timeout=60, cwd=REPO, env={**os.environ,
                                                                                      "PYTHONPATH": str(REPO)})
    assert result.returncode == 2 and "does not exist" in result.stderr


def test_a_second_ctrl_c_while_exiting_ends_the_process_without_a_traceback():
    result = _run_python(
        "import atexit, os, signal, sys\n"
        "import t2i.cli as cli\n"
        "atexit.register(os.kill, os.getpid(), signal.SIGINT)  # the second Ctrl-C, in the exit handlers\n"
        "def interrupted(args):\n"
        "    raise KeyboardInterrupt\n"
        "cli._batch = interrupted\n"
        "sys.exit(cli.main(['batch', '--merge', 'x']))\n")
    assert "t2i batch: interrupted" in result.stderr
    assert "Traceback" not in result.stderr and result.returncode == -signal.SIGINT
