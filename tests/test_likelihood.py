"""Bits/dim of images (`t2i eval --likelihood`): the decoder's discretised Gaussian, the dequantisation and the
latent terms against hand computations on Gaussians whose densities are known, then the command on a tiny pipeline.
(The ODE likelihood itself is checked against a mixture's density in test_score_samplers.py.)"""
import math
import re

import numpy as np
import pytest
import torch
from PIL import Image

from t2i.cli import main
from t2i.data.shapes import ShapesDataset
from t2i.diffusion.likelihood import (
    PIXEL_BIN_WIDTH,
    dequantization_bits_per_dim,
    dequantize,
    dequantized_bits_per_dim,
    discretized_gaussian_log_likelihood,
    pixel_values,
)
from t2i.diffusion.score_samplers import noise_like
from t2i.eval.likelihood import fit_decoder_scale, held_out_shapes, latent_terms

SIGMA_MIN, SIGMA_MAX = 0.01, 1000.0
HALF_BIN = PIXEL_BIN_WIDTH / 2


def unit_gaussian_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """E[x_0 | x] for x_0 ~ N(0, I): x / (1 + σ²). Its noised density is N(0, (1 + σ²) I), the ODE's prior exactly."""
    return x / (1 + sigma.reshape(-1, *([1] * (x.ndim - 1))) ** 2)


def log_normal(x: torch.Tensor, variance: float) -> torch.Tensor:
    return (-0.5 * x**2 / variance - 0.5 * math.log(2 * math.pi * variance)).flatten(1).sum(1)


def normal_cdf(z: float) -> float:
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def generators(seed: int, count: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(count)]


def test_discretized_gaussian_matches_the_bin_masses_by_hand():
    levels = torch.tensor([[0, 128, 255]])
    mean = torch.tensor([[-0.98, 0.01, 0.95]], dtype=torch.float64)
    scale = 0.02
    expected = 0.0
    for level, centre in zip(levels[0].tolist(), mean[0].tolist()):
        value = level / 127.5 - 1
        upper = 1.0 if level == 255 else normal_cdf((value + HALF_BIN - centre) / scale)
        lower = 0.0 if level == 0 else normal_cdf((value - HALF_BIN - centre) / scale)
        expected += math.log(upper - lower)
    assert discretized_gaussian_log_likelihood(levels, mean, scale).item() == pytest.approx(expected, rel=1e-9)


def test_discretized_gaussian_masses_sum_to_one_and_stay_finite_in_the_far_tail():
    every_level = torch.arange(256)[:, None]  # 256 one-pixel images
    for centre, scale in ((0.3, 0.05), (-1.2, 0.4), (0.0, 1e-4)):
        masses = discretized_gaussian_log_likelihood(every_level, torch.full((256, 1), centre), scale).exp()
        assert masses.sum().item() == pytest.approx(1.0, abs=1e-9)
    # Level 255 seen from a mean at −1, 100 levels of spread away: Mills' ratio gives log Φ(−z) ≈ −z²/2 − log(z√2π).
    z = (1 - HALF_BIN + 1) / 0.01
    far = discretized_gaussian_log_likelihood(torch.tensor([[255]]), torch.tensor([[-1.0]]), 0.01).item()
    assert far == pytest.approx(-z**2 / 2 - math.log(z * math.sqrt(2 * math.pi)), rel=1e-4)


def test_dequantized_bits_per_dim_is_the_density_of_the_dequantised_image_plus_log2_127_5():
    levels = torch.randint(0, 256, (40, 3, 1, 1), generator=torch.Generator().manual_seed(0))
    bits, _ = dequantized_bits_per_dim(unit_gaussian_denoiser, levels, SIGMA_MIN, SIGMA_MAX, trace="exact",
                                       generator=generators(10, 40), rtol=1e-6, atol=1e-6)
    values = dequantize(levels, generators(10, 40))
    offset = values - pixel_values(levels)
    assert offset.abs().max() <= HALF_BIN and offset.std() > HALF_BIN / 3  # inside each level's bin, spread over it
    expected = -log_normal(values, 1 + SIGMA_MIN**2) / (3 * math.log(2)) + math.log2(127.5)
    assert dequantization_bits_per_dim() == pytest.approx(math.log2(127.5))
    assert torch.allclose(bits, expected, atol=1e-4)


def test_latent_terms_match_a_hand_computation_with_an_identity_vae():
    """Encoder N(2x, 0.05²), decoder z/2, latent model N(0, I): each term has a closed form for the drawn z."""
    levels = torch.randint(0, 256, (8, 3, 1, 1), generator=torch.Generator().manual_seed(1))
    std = 0.05

    def encode(pixels):
        return 2 * pixels, torch.full_like(pixels, std)

    terms = latent_terms(unit_gaussian_denoiser, encode, lambda z: z / 2, levels, SIGMA_MIN, SIGMA_MAX,
                         generators(20, 8), trace="exact", tolerance=1e-6)
    mean = 2 * pixel_values(levels)
    noise = noise_like(mean, generators(20, 8))
    z = mean + std * noise
    assert torch.allclose(terms.posterior_log_prob, log_normal(noise, 1.0) - 3 * math.log(std))
    assert torch.allclose(terms.prior_log_prob, log_normal(z, 1 + SIGMA_MIN**2), atol=1e-4)
    assert torch.allclose(terms.decoded, z / 2)
    assert (terms.evaluations > 1).all()


def test_decoder_scale_is_fitted_by_maximum_likelihood():
    generator = torch.Generator().manual_seed(2)
    levels = torch.randint(50, 200, (32, 3, 8, 8), generator=generator)  # away from the open end bins
    decoded = pixel_values(levels) + 0.2 * torch.randn(levels.shape, generator=generator, dtype=torch.float64)
    scale, per_image = fit_decoder_scale(levels, decoded)
    assert scale == pytest.approx(0.2, rel=0.03)
    assert torch.allclose(per_image, discretized_gaussian_log_likelihood(levels, decoded, scale))
    for other in (scale * 0.9, scale * 1.1):
        assert per_image.sum() > discretized_gaussian_log_likelihood(levels, decoded, other).sum()


def test_held_out_shapes_are_the_demo_data_drawn_with_another_seed():
    images = held_out_shapes(3, 32)
    assert images.dtype == torch.uint8 and images.shape == (3, 3, 32, 32)
    drawn_with_seed_1 = ShapesDataset(size=3, resolution=32, seed=1, two_object_fraction=0.5, paraphrase_prob=0.1,
                                      partial_caption_prob=0.35, partial_omits=("size", "colour"))
    assert torch.equal(images, torch.from_numpy(drawn_with_seed_1.images).permute(0, 3, 1, 2))


def test_eval_likelihood_prints_bits_per_dim_and_counts_bad_files(trained_run, tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    for i, colour in enumerate(((200, 40, 40), (40, 40, 200))):
        Image.fromarray(np.full((40, 48, 3), colour, dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "broken.png").write_bytes(b"not a png")
    code = main(["eval", "--likelihood", "--model", str(trained_run / "pipeline"), "--data", str(folder),
                 "--num-images", "5", "--batch-size", "2", "--tolerance", "0.1", "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0
    assert "data: 2 images" in out and "1 skipped: 1 not an image" in out
    bits = float(re.search(r"^bits/dim: ([0-9.]+) ± [0-9.]+", out, re.M).group(1))
    assert 0 < bits < 16
    terms = [float(x) for x in re.search(r"= latent −log p\(z\) (\S+) \+ encoder log q\(z\|x\) (\S+) \+ decoder "
                                         r"−log P\(x\|z\) (\S+)", out).groups()]
    assert sum(terms) == pytest.approx(bits, abs=2e-3)
    assert "upper bound" in out and "unconditional" in out


@pytest.mark.parametrize("arguments, message", [
    (["--model", "MISSING"], "does not exist"),
    (["--model", "PIPELINE", "--num-images", "0"], "--num-images must be at least 1"),
    (["--model", "PIPELINE", "--batch-size", "0"], "--batch-size must be at least 1"),
    (["--model", "PIPELINE", "--data", "nowhere"], "neither 'shapes' nor a folder"),
    (["--model", "PIPELINE", "--data", "EMPTY"], "no readable image"),
])
def test_eval_likelihood_refuses_bad_arguments_in_one_line(trained_run, tmp_path, capsys, arguments, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.png").write_bytes(b"")
    places = {"MISSING": str(tmp_path / "missing"), "PIPELINE": str(trained_run / "pipeline"),
              "EMPTY": str(tmp_path / "empty")}
    code = main(["eval", "--likelihood", *(places.get(argument, argument) for argument in arguments)])
    error = capsys.readouterr().err
    assert code == 2
    assert message in error and "Traceback" not in error


def test_eval_needs_a_measure(capsys):
    assert main(["eval", "--model", "anything"]) == 2
    assert "--likelihood" in capsys.readouterr().err


@pytest.mark.parametrize("tolerance", ["nan", "inf", "1", "0", "-0.5"])
def test_an_ode_tolerance_outside_0_1_is_refused(trained_run, tmp_path, capsys, tolerance):
    assert main(["eval", "--likelihood", "--model", str(trained_run / "pipeline"), "--tolerance", tolerance,
                 "--device", "cpu"]) == 2
    assert "the ODE tolerance must lie in (0, 1)" in capsys.readouterr().err


def test_eval_likelihood_on_one_held_out_shapes_image_says_one_image(trained_run, capsys):
    assert main(["eval", "--likelihood", "--model", str(trained_run / "pipeline"), "--num-images", "1",
                 "--tolerance", "0.1", "--device", "cpu"]) == 0
    assert "data: 1 image of held-out shapes, 32x32 px" in capsys.readouterr().out  # was "1 held-out shapes images"
