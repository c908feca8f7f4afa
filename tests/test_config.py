"""Typed configs: YAML in, dotted overrides, and errors that name the bad key."""
import pytest
import yaml

from t2i.config import RunConfig, load_config
from t2i.config_io import from_dict, to_dict
from t2i.errors import ConfigError

from conftest import REPO


@pytest.mark.parametrize("name", ["demo.yaml", "demo_gpu.yaml", "tiny.yaml"])
def test_shipped_configs_load(name):
    config = load_config(REPO / "configs" / name)
    assert isinstance(config, RunConfig)
    assert config.stages == ("vae", "clip", "unet")


def test_overrides_are_typed():
    config = load_config(REPO / "configs" / "tiny.yaml",
                         ["train.unet.steps=7", "unet.block_out_channels=[16, 32]", "diffusion.min_snr_gamma=5",
                          "train.unet.ema_decay=null"])
    assert config.train.unet.steps == 7
    assert config.unet.block_out_channels == (16, 32)
    assert config.diffusion.min_snr_gamma == 5.0 and isinstance(config.diffusion.min_snr_gamma, float)
    assert config.train.unet.ema_decay is None


def test_bare_no_is_the_word_no_where_a_choice_is_spelled_so():
    """YAML 1.1 reads a bare `no` as false; `mixed_precision=no` means the choice 'no', and a bool is still refused
    where no choice is spelled like it."""
    config = load_config(REPO / "configs" / "tiny.yaml", ["train.unet.mixed_precision=no"])
    assert config.train.unet.mixed_precision == "no"
    with pytest.raises(ConfigError, match="'diffusion.schedule' must be one of .*; got True"):
        load_config(REPO / "configs" / "tiny.yaml", ["diffusion.schedule=yes"])


def test_exponent_numbers_without_a_dot_are_numbers():
    """YAML 1.1 reads 1e-4 as a string; a float field takes it as the number it means, a bad string still fails."""
    config = load_config(REPO / "configs" / "tiny.yaml",
                         ["train.unet.learning_rate=1e-4", "train.vae.learning_rate=2E3"])
    assert config.train.unet.learning_rate == 1e-4 and config.train.vae.learning_rate == 2000.0
    with pytest.raises(ConfigError, match="'train.unet.learning_rate' must be a number; got '1e-4x'"):
        load_config(REPO / "configs" / "tiny.yaml", ["train.unet.learning_rate=1e-4x"])


@pytest.mark.parametrize("override, message", [
    ("unet.widths=[1]", "unknown config key 'unet.widths'"),
    ("train.unet.stpes=3", "unknown config key 'train.unet.stpes'"),
    ("train.unet.steps=many", "'train.unet.steps' must be an integer; got 'many'"),
    ("train.unet.steps=2.5", "'train.unet.steps' must be an integer"),
    ("diffusion.schedule=quadratic", "'diffusion.schedule' must be one of 'linear', 'scaled_linear', 'cosine'"),
    ("train.vae.mixed_precision=fp8", "'train.vae.mixed_precision' must be one of 'no', 'fp16', 'bf16'"),
    ("unet.block_out_channels=64", "'unet.block_out_channels' must be a list"),
    ("data.resolution=48", "data.resolution must be 32 or 64"),
    ("unet.cross_attention=[true]", "one entry per unet.block_out_channels"),
    ("train.unet.batch_size=0", "batch_size must be at least 1"),
    ("sr.min_snr_gamma=0", "sr.min_snr_gamma must be > 0, or null"),
    ("stages=[vae, srr]", "'stages\\[1\\]' must be one of 'vae', 'clip', 'unet', 'sr'"),
    ("stages=[]", "stages is empty: list the stages to train"),
    ("train.unet", "must look like key.subkey=value"),
    ("unet.block_out_channels.x=1", "'unet.block_out_channels' is not a section"),
    ("train.unet.grad_clip=-1", "train.unet: grad_clip must be positive, or null for no clipping"),
    ("train.unet.log_every=0", "train.unet: log_every must be at least 1"),
    ("train.vae.warmup_steps=-1", "train.vae: warmup_steps must be >= 0"),
    ("train.vae.final_learning_rate_fraction=2", "final_learning_rate_fraction must lie in \\[0, 1\\]"),
    ("vae.block_out_channels=[]", "vae.block_out_channels needs at least one entry"),
    ("unet.layers_per_block=0", "unet.layers_per_block must be at least 1"),
    ("unet.attention_heads=0", "unet.attention_heads must be at least 1"),
    ("sampling.steps=0", "sampling.steps must be at least 1"),
    ("sampling.sampler=fast", "sampling.sampler 'fast' is not a sampler; valid: ddpm"),
    ("sr.sampler=fast", "sr.sampler 'fast' is not a sampler"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(REPO / "configs" / "tiny.yaml", [override])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("unet: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    (tmp_path / "empty.yaml").write_text("# nothing yet\n")
    with pytest.raises(ConfigError, match="is empty; start from one of configs/"):
        load_config(tmp_path / "empty.yaml")
    with pytest.raises(ConfigError, match="is a folder; give a YAML file"):
        load_config(tmp_path)


def test_a_key_given_twice_is_refused_with_both_lines(tmp_path):
    config = tmp_path / "twice.yaml"
    config.write_text("train:\n  unet:\n    learning_rate: 1.0e-4\n    steps: 10\n    learning_rate: 3.0e-4\n")
    with pytest.raises(ConfigError, match=r"key 'learning_rate' is given twice \(lines 3 and 5\)"):
        load_config(config)
    config.write_text("train:\n  unet:\n    learning_rate: 1.0e-4\n  vae:\n    learning_rate: 3.0e-4\n")
    assert load_config(config).train.unet.learning_rate == 1.0e-4


def test_pretrained_text_encoder_needs_its_paths_and_no_clip_stage():
    with pytest.raises(ConfigError, match="needs text_encoder.hf_path"):
        load_config(None, ["text_encoder.source=hf_clip"])
    with pytest.raises(ConfigError, match="stage 'clip' trains a text encoder from scratch"):
        load_config(None, ["text_encoder.source=hf_clip", "text_encoder.hf_path=/x"])
    with pytest.raises(ConfigError, match="freeze_token_embedding applies to a text encoder trained here"):
        load_config(None, ["text_encoder.source=hf_clip", "text_encoder.hf_path=/x", "stages=[vae, unet]",
                           "text_encoder.freeze_token_embedding=true"])


def test_resolved_config_round_trips_through_yaml():
    config = load_config(REPO / "configs" / "demo.yaml")
    again = from_dict(RunConfig, yaml.safe_load(yaml.safe_dump(to_dict(config))))
    assert again == config


def test_every_config_key_is_named_in_the_docs():
    """A user reads keys in the README and docs/, and their meanings in t2i/config.py's comments."""
    import dataclasses
    import typing

    docs = "\n".join(path.read_text() for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))])

    def leaves(cls, prefix=""):
        hints = typing.get_type_hints(cls)
        for item in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[item.name]):
                yield from leaves(hints[item.name], f"{prefix}{item.name}.")
            else:
                yield prefix + item.name

    unnamed = [key for key in leaves(RunConfig) if key.rsplit(".", 1)[-1] not in docs]
    assert unnamed == []
