"""Decoding user images, their conversion to 8-bit RGB (each mode against known pixels), and the transforms."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from t2i.data.images import decode_image, to_rgb8
from t2i.data.quarantine import Rejected
from t2i.data.transforms import resize_crop_flip, resize_to_cover, sample_generator, to_tensor

from data_fixtures import bomb_png, image_bytes


def encoded(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def rgb_pixels(image: Image.Image) -> np.ndarray:
    converted = to_rgb8(image)
    assert converted.mode == "RGB"
    return np.asarray(converted)


def test_rgb_passes_through():
    pixels = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    assert np.array_equal(rgb_pixels(Image.fromarray(pixels, "RGB")), pixels)


def test_alpha_is_composited_on_white():
    rgba = Image.fromarray(np.array([[[255, 0, 0, 128], [0, 0, 255, 0], [10, 20, 30, 255]]], np.uint8), "RGBA")
    # (c·a + 255·(255 − a)) / 255, rounded: half-transparent red is pink, transparent is white, opaque is kept.
    assert rgb_pixels(rgba).tolist() == [[[255, 127, 127], [255, 255, 255], [10, 20, 30]]]
    la = Image.fromarray(np.array([[[0, 0], [100, 255], [0, 51]]], np.uint8), "LA")
    assert rgb_pixels(la)[..., 0].tolist() == [[255, 100, 204]]


def test_palette_transparency_is_composited_on_white():
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    palette.putpixel((0, 0), 0)
    palette.putpixel((1, 0), 1)
    assert rgb_pixels(palette).tolist() == [[[255, 0, 0], [0, 255, 0]]]
    reloaded = Image.open(io.BytesIO(encoded(palette, transparency=1)))
    assert reloaded.mode == "P" and "transparency" in reloaded.info
    assert rgb_pixels(reloaded).tolist() == [[[255, 0, 0], [255, 255, 255]]]
    pa = palette.convert("PA")
    pa.putpixel((0, 0), (0, 0))
    assert rgb_pixels(pa).tolist() == [[[255, 255, 255], [0, 255, 0]]]


def test_cmyk_grey_and_one_bit():
    cmyk = Image.fromarray(np.array([[[0, 0, 0, 0], [255, 0, 0, 0], [0, 0, 0, 255]]], np.uint8), "CMYK")
    assert rgb_pixels(cmyk).tolist() == [[[255, 255, 255], [0, 255, 255], [0, 0, 0]]]
    grey = Image.fromarray(np.array([[0, 77, 255]], np.uint8), "L")
    assert rgb_pixels(grey).tolist() == [[[0, 0, 0], [77, 77, 77], [255, 255, 255]]]
    one_bit = Image.fromarray(np.array([[0, 255]], np.uint8), "L").convert("1")
    assert rgb_pixels(one_bit)[..., 0].tolist() == [[0, 255]]


def test_sixteen_bit_is_scaled_not_clipped():
    values = np.array([[0, 257, 32896, 65535]], np.uint16)
    png = Image.open(io.BytesIO(encoded(Image.fromarray(values))))
    assert png.mode.startswith("I")  # a 16-bit greyscale PNG
    assert rgb_pixels(png)[..., 0].tolist() == [[0, 1, 128, 255]]
    as_int32 = Image.fromarray(values.astype(np.int32), "I")
    assert rgb_pixels(as_int32)[..., 0].tolist() == [[0, 1, 128, 255]]


def test_wide_integers_and_floats_use_their_range():
    wide = Image.fromarray(np.array([[-1000, 0, 1000]], np.int32), "I")
    assert rgb_pixels(wide)[..., 0].tolist() == [[0, 128, 255]]
    unit = Image.fromarray(np.array([[0.0, 0.25, 1.0]], np.float32), "F")
    assert rgb_pixels(unit)[..., 0].tolist() == [[0, 64, 255]]
    wide_float = Image.fromarray(np.array([[2.0, 4.0, 6.0]], np.float32), "F")
    assert rgb_pixels(wide_float)[..., 0].tolist() == [[0, 128, 255]]


def test_exif_orientation_is_applied():
    # Stored 2 wide, 1 tall: red then blue. Orientation 6 means "rotate 90° clockwise to display".
    stored = Image.fromarray(np.array([[[255, 0, 0], [0, 0, 255]]], np.uint8), "RGB")
    exif = Image.Exif()
    exif[0x0112] = 6
    shown = decode_image(encoded(stored, exif=exif))
    assert rgb_pixels(shown).tolist() == [[[255, 0, 0]], [[0, 0, 255]]]


@pytest.mark.parametrize("data, reason", [
    (b"", "zero-byte file"),
    (b"plain text, not pixels", "not an image"),
    (image_bytes((32, 32), 0)[:60], "truncated image"),
    (image_bytes((64, 64), 0, "JPEG")[:400], "truncated image"),
    (bomb_png(), "decompression bomb"),
])
def test_bad_bytes_are_rejected_with_their_reason(data, reason):
    with pytest.raises(Rejected) as caught:
        decode_image(data)
    assert caught.value.reason == reason


def test_the_bomb_limit_stays_on_and_its_warning_counts(monkeypatch):
    data = image_bytes((40, 40), 0)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1600 pixels: over the limit, under twice it
    with pytest.raises(Rejected, match="decompression bomb"):
        decode_image(data)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # over twice the limit: PIL raises
    with pytest.raises(Rejected, match="decompression bomb"):
        decode_image(data)


def test_resize_covers_the_target_and_crops_to_it():
    wide = Image.new("RGB", (100, 50))
    assert resize_to_cover(wide, 32, 32).size == (64, 32)
    assert resize_to_cover(wide, 32, 64).size == (64, 32)
    for crop in ("center", "random"):
        out = resize_crop_flip(wide, 32, 32, crop, True, sample_generator(0, 0, 0))
        assert out.size == (32, 32)


def test_centre_crop_and_flip():
    pixels = np.zeros((8, 16, 3), np.uint8)
    pixels[:, :4] = 255  # a white band on the left quarter
    image = Image.fromarray(pixels, "RGB")
    centre = np.asarray(resize_crop_flip(image, 8, 8, "center", False, sample_generator(0, 0, 0)))
    assert centre.max() == 0  # the centre crop (columns 4..11) misses the band
    flips = {bool(np.asarray(resize_crop_flip(image, 8, 16, "center", True, sample_generator(0, 0, i)))[0, -1, 0])
             for i in range(16)}
    assert flips == {True, False}  # some samples flipped (band on the right), some not


def test_random_crop_is_a_function_of_seed_epoch_and_index():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 80, 3), dtype=np.uint8), "RGB")

    def crop(seed, epoch, index):
        return np.asarray(resize_crop_flip(image, 24, 24, "random", True, sample_generator(seed, epoch, index)))

    torch.manual_seed(123)  # the global RNG plays no part
    assert np.array_equal(crop(0, 0, 5), crop(0, 0, 5))
    assert len({crop(0, epoch, 5).tobytes() for epoch in range(6)}) > 1


def test_to_tensor_range():
    image = Image.fromarray(np.array([[[0, 128, 255]]], np.uint8), "RGB")
    tensor = to_tensor(image)
    assert tensor.shape == (3, 1, 1) and tensor.dtype == torch.float32
    assert tensor.flatten().tolist() == pytest.approx([-1.0, 128 / 127.5 - 1, 1.0], abs=1e-6)
