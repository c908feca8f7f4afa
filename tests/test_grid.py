"""Preview grids: captions and row names for people, the images themselves untouched."""
import numpy as np
import pytest
from PIL import Image, ImageFont

from t2i.eval.grid import make_grid, wrap
from t2i.eval.report import IMAGE_SCALE, write_report
from tests.test_report import small_evaluation

GREY = (128, 128, 128)


def dark_pixels(image: Image.Image, box: tuple[int, int, int, int]) -> int:
    return int((np.asarray(image.crop(box).convert("L")) < 100).sum())


def test_labels_go_under_each_image_and_leave_the_images_as_they_were():
    colours = [(200, 0, 0), (0, 200, 0), (0, 0, 200), GREY]
    images = [Image.new("RGB", (32, 32), colour) for colour in colours]
    labels = ["a large red circle", "a small green square on the left", "a blue triangle", "grey"]
    grid = make_grid(images, rows=2, scale=2, labels=labels)
    plain = make_grid(images, rows=2, scale=2)
    assert grid.width == plain.width and grid.height > plain.height
    cell_height = (grid.height - 2) // 2 - 2
    for i, colour in enumerate(colours):
        r, c = divmod(i, 2)
        x, y = 2 + c * 66, 2 + r * (cell_height + 2)
        assert np.all(np.asarray(grid.crop((x, y, x + 64, y + 64))) == colour)  # pasted unchanged
        assert dark_pixels(grid, (x, y + 64, x + 64, y + cell_height)) > 10  # a caption under it


def test_row_labels_name_each_row_on_the_left():
    images = [Image.new("RGB", (16, 16), GREY)] * 4
    grid = make_grid(images, rows=2, row_labels=["original", "reconstructed"])
    left = grid.width - make_grid(images, rows=2).width
    assert left > 20
    assert dark_pixels(grid, (0, 0, left, 18)) > 10 and dark_pixels(grid, (0, 18, left, 36)) > 10
    with pytest.raises(ValueError, match="1 row labels for 2 rows"):
        make_grid(images, rows=2, row_labels=["original"])


def test_wrap_breaks_between_words_and_cuts_long_captions():
    font = ImageFont.load_default()
    lines = wrap("a small yellow triangle on the left", font, 60)
    assert " ".join(lines) == "a small yellow triangle on the left"
    assert all(font.getlength(line) <= 60 for line in lines if " " in line)
    cut = wrap(" ".join(["word"] * 40), font, 30, max_lines=3)
    assert len(cut) == 3 and cut[-1].endswith("...")


def test_the_demo_grid_captions_every_image_with_its_prompt(tmp_path):
    grid_path, _ = write_report(tmp_path, small_evaluation(), tmp_path, [], {"total": 1.0}, {"steps": 30})
    grid = Image.open(grid_path)
    side = 32 * IMAGE_SCALE
    assert grid.height > side + 4 + 8
    assert dark_pixels(grid, (0, side + 2, grid.width, grid.height)) > 20
