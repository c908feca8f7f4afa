"""Loading is safe: pickle weights are refused unless trusted, and a damaged file is one line naming it."""
import json
import shutil

import pytest

from t2i import Text2ImagePipeline
from t2i.cli import main
from t2i.errors import T2IError

from conftest import build_tiny_pipeline, save_tiny_sd_pipeline


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> dict:
    """A tiny t2i folder (open_clip) and a tiny diffusers folder (Hugging Face CLIP), saved once."""
    root = tmp_path_factory.mktemp("pristine")
    build_tiny_pipeline().save_pretrained(root / "t2i")
    return {"t2i": root / "t2i", "sd": save_tiny_sd_pipeline(root / "sd")}


def test_pickle_weights_are_refused_unless_allowed(tmp_path, capsys):
    folder = save_tiny_sd_pipeline(tmp_path / "pickled", safe_serialization=False)
    assert (folder / "unet" / "diffusion_pytorch_model.bin").is_file()
    with pytest.raises(T2IError, match=r"holds pickle weights \((vae|unet|text_encoder)/.*\.bin\), which can run code"):
        Text2ImagePipeline.from_pretrained(folder, device="cpu")

    assert main(["generate", "--model", str(folder), "a red circle", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "--allow-pickle" in err and "Traceback" not in err

    pipe = Text2ImagePipeline.from_pretrained(folder, device="cpu", allow_pickle=True)
    assert pipe("a red circle", num_inference_steps=2, seed=0)[0].size == (32, 32)


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def scramble(path):
    path.write_bytes(b"\x00not json {" + path.read_bytes()[:40])


def edit_json(**changes):
    def edit(path):
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return edit


DAMAGES = [
    ("t2i", "t2i_pipeline.json", scramble),
    ("t2i", "scheduler/scheduler_config.json", truncate),
    ("t2i", "vae/diffusion_pytorch_model.safetensors", truncate),
    ("t2i", "vae/config.json", edit_json(latent_channels=3)),
    ("t2i", "unet/diffusion_pytorch_model.safetensors", truncate),
    ("t2i", "unet/diffusion_pytorch_model.safetensors", scramble),
    ("t2i", "unet/config.json", edit_json(cross_attention_dim=48)),
    ("t2i", "unet/config.json", scramble),
    ("t2i", "text_encoder/model.safetensors", truncate),
    ("t2i", "text_encoder/open_clip_config.json", edit_json(embed_dim=16)),
    ("t2i", "text_encoder/open_clip_config.json", edit_json(unknown_option=1)),
    ("sd", "text_encoder/model.safetensors", truncate),
    ("sd", "text_encoder/config.json", edit_json(hidden_size=48)),
    ("sd", "text_encoder/config.json", edit_json(num_hidden_layers=3)),
    ("sd", "tokenizer/tokenizer.json", truncate),
    ("sd", "tokenizer/tokenizer_config.json", scramble),
    ("sd", "model_index.json", scramble),
]


@pytest.mark.parametrize("source, file, damage", DAMAGES,
                         ids=[f"{source}-{file}-{damage.__name__}" for source, file, damage in DAMAGES])
def test_damaged_file_is_one_line_naming_it(pristine, tmp_path, capsys, source, file, damage):
    folder = tmp_path / "model"
    shutil.copytree(pristine[source], folder)
    damage(folder / file)
    assert main(["generate", "--model", str(folder), "a red circle", "--steps", "1",
                 "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("t2i generate: error:")]
    assert len(errors) == 1 and file in errors[0], err
    assert "Traceback" not in err


@pytest.mark.parametrize("source, component", [("t2i", "vae"), ("t2i", "unet"), ("sd", "text_encoder")])
def test_a_missing_weights_file_is_one_line_naming_its_folder(pristine, tmp_path, capsys, source, component):
    folder = tmp_path / "model"
    shutil.copytree(pristine[source], folder)
    for weights in (folder / component).glob("*.safetensors"):
        weights.unlink()
    assert main(["generate", "--model", str(folder), "a red circle", "--steps", "1",
                 "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert f"'{component}' in '{folder}' has a config but no weights file" in err
    assert "Traceback" not in err and "An error occurred" not in err
