"""Tests for the model-free judge (t2i.eval.judge) on rendered shapes images."""
import json

import numpy as np
import pytest
from PIL import Image, ImageFilter

from t2i.data.shapes import (
    BACKGROUND,
    Scene,
    SceneSpec,
    ShapesDataset,
    ShapeSpec,
    parse_caption,
    prompt_suite,
    render,
    scene_for_spec,
)
from t2i.eval.judge import Judgement, connected_components, detect_objects, judge, summarize


def _single(colour: str, shape: str, size: str, position: str, box: tuple[float, float, float]) -> Scene:
    return Scene(SceneSpec((ShapeSpec(colour, shape, size, position),), None), (box,))


def _pair(first: tuple[str, str], second: tuple[str, str], relation: str) -> Scene:
    spec = SceneSpec((ShapeSpec(*first, None, None), ShapeSpec(*second, None, None)), relation)
    centres = {"left of": ((0.28, 0.5), (0.72, 0.5)), "above": ((0.5, 0.28), (0.5, 0.72))}[relation]
    return Scene(spec, tuple((x, y, 0.3) for x, y in centres))


def _categories(data: ShapesDataset) -> list[str]:
    return ["pair" if scene.spec.relation else "single" for scene in data.scenes]


@pytest.mark.parametrize(("size", "resolution", "held_out"), [(2000, 32, ()), (300, 32, None), (300, 64, ())])
def test_judge_accepts_the_datasets_own_images(size, resolution, held_out):
    options = {} if held_out is None else {"held_out": held_out}
    data = ShapesDataset(size, resolution=resolution, seed=11, paraphrase_prob=0.0, **options)
    judgements = [judge(image, caption) for image, caption in zip(data.images, data.captions)]
    summary = summarize(judgements, _categories(data))
    assert summary["all"]["correct"] >= 0.98, summary
    for attribute in ("colour", "shape", "size", "position"):
        assert summary["all"][attribute] >= 0.98, summary


@pytest.mark.parametrize("resolution", [32, 64])
def test_judge_accepts_reference_renders_of_the_prompt_suite(resolution):
    rng = np.random.default_rng(resolution)
    for prompt, _ in prompt_suite():
        judgement = judge(render(scene_for_spec(parse_caption(prompt), rng), resolution), prompt)
        assert judgement.correct, judgement


def test_judge_tolerates_mild_blur_and_noise():
    data = ShapesDataset(200, seed=2, held_out=(), paraphrase_prob=0.0)
    rng = np.random.default_rng(0)
    judgements = []
    for image, caption in zip(data.images, data.captions):
        blurred = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(0.8)), dtype=np.float64)
        noisy = np.clip(blurred + rng.normal(0, 10, blurred.shape), 0, 255).astype(np.uint8)
        judgements.append(judge(noisy, caption))
    assert summarize(judgements, _categories(data))["all"]["correct"] >= 0.95


@pytest.mark.parametrize("resolution", [32, 64])
def test_single_object_mismatches_fail_the_right_attribute(resolution):
    image = render(_single("red", "circle", "large", "left", (0.3, 0.52, 0.5)), resolution)
    assert judge(image, "a large red circle on the left").correct
    cases = {
        "a large blue circle on the left": "colour",
        "a large red square on the left": "shape",
        "a large red triangle on the left": "shape",
        "a small red circle on the left": "size",
        "a large red circle on the right": "position",
        "a large red circle": "position",
    }
    for prompt, wrong in cases.items():
        judgement = judge(image, prompt)
        assert {name for name, ok in judgement.attributes.items() if not ok} == {wrong}, judgement


@pytest.mark.parametrize("drawn", ["circle", "square", "triangle"])
@pytest.mark.parametrize("asked", ["circle", "square", "triangle"])
@pytest.mark.parametrize("size", ["small", "large"])
def test_shape_is_told_apart(drawn, asked, size):
    side = {"small": 0.3, "large": 0.5}[size]
    image = render(_single("blue", drawn, size, "center", (0.5, 0.5, side)), 32)
    judgement = judge(image, f"a {size} blue {asked}")
    assert judgement.attributes["shape"] == (drawn == asked), judgement
    assert judgement.attributes["colour"] and judgement.attributes["size"] and judgement.attributes["position"]


def test_two_object_mismatches_fail_the_right_attribute():
    left_of = render(_pair(("red", "circle"), ("blue", "square"), "left of"), 32)
    above = render(_pair(("red", "circle"), ("blue", "square"), "above"), 32)
    assert judge(left_of, "a red circle to the left of a blue square").correct
    assert judge(above, "a red circle above a blue square").correct
    cases = [
        (left_of, "a blue square to the left of a red circle", "position"),
        (left_of, "a red circle above a blue square", "position"),
        (above, "a blue square above a red circle", "position"),
        (above, "a red circle to the left of a blue square", "position"),
        (left_of, "a red triangle to the left of a blue square", "shape"),
        (left_of, "a red circle to the left of a green square", "colour"),
    ]
    for image, prompt, wrong in cases:
        judgement = judge(image, prompt)
        assert {name for name, ok in judgement.attributes.items() if not ok} == {wrong}, judgement


def test_single_object_image_fails_a_two_object_prompt():
    image = render(_single("red", "circle", "small", "left", (0.28, 0.5, 0.3)), 32)
    judgement = judge(image, "a red circle to the left of a blue square")
    assert not judgement.correct
    assert not judgement.attributes["colour"] and not judgement.attributes["position"]


def test_blank_and_noise_images_are_judged_wrong_without_raising():
    blank = np.full((32, 32, 3), BACKGROUND, dtype=np.uint8)
    for prompt in ["a small red circle", "a red circle above a blue square"]:
        judgement = judge(blank, prompt)
        assert not judgement.correct and not any(judgement.attributes.values())
        assert judgement.found == "no object"
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert isinstance(judge(noise, "a large white square at the top"), Judgement)
    assert isinstance(judge(np.zeros((40, 40, 3), np.uint8), "a large black square"), Judgement)


def test_the_judge_assumes_the_grey_canvas_as_its_docstring_says():
    """A red circle is judged right on the shapes grey only: on white or black the canvas reads as a square."""
    def red_circle_on(background):
        image = np.full((32, 32, 3), background, dtype=np.uint8)
        yy, xx = np.mgrid[:32, :32]
        image[(yy - 16) ** 2 + (xx - 16) ** 2 <= 64] = (220, 30, 30)
        return judge(image, "a large red circle")

    assert red_circle_on(BACKGROUND).correct
    assert red_circle_on((255, 255, 255)).found.startswith("large white square")
    assert red_circle_on((0, 0, 0)).found.startswith("large black square")


def test_pil_and_array_inputs_agree_and_bad_inputs_raise():
    image = render(_single("yellow", "triangle", "small", "bottom", (0.5, 0.72, 0.3)), 48)
    from_array = judge(image, "a small yellow triangle at the bottom")
    from_pil = judge(Image.fromarray(image).convert("RGBA"), "a small yellow triangle at the bottom")
    assert from_array == from_pil and from_array.correct
    assert from_array.found == "small yellow triangle at bottom"
    with pytest.raises(ValueError, match="caption"):
        judge(image, "a tiny yellow triangle near the bottom")
    with pytest.raises(ValueError, match="image"):
        judge(image[:16, :16], "a small yellow triangle at the bottom")
    with pytest.raises(ValueError, match="image"):
        judge(image.astype(np.float32), "a small yellow triangle at the bottom")


def test_detect_objects_reports_geometry():
    scene = _pair(("green", "square"), ("black", "triangle"), "above")
    objects = detect_objects(render(scene, 64))
    assert [(obj.colour, obj.shape, obj.position) for obj in objects] == [
        ("green", "square", "top"),
        ("black", "triangle", "bottom"),
    ]
    assert objects[0].side == pytest.approx(0.3, abs=1.5 / 64)


def test_connected_components_split_by_colour_and_gap():
    labels = np.array(
        [
            [1, 1, 0, 2],
            [0, 1, 0, 2],
            [0, 0, 0, 0],
            [3, 0, 1, 1],
        ]
    )
    components = connected_components(labels)
    assert (components[labels == 0] == -1).all()
    assert components[0, 0] == components[0, 1] == components[1, 1]
    assert components[0, 3] == components[1, 3]
    groups = {components[0, 0], components[0, 3], components[3, 0], components[3, 2]}
    assert len(groups) == 4 and components[3, 2] == components[3, 3]
    diagonal = np.eye(5, dtype=int) * 4
    assert len(np.unique(connected_components(diagonal)[diagonal > 0])) == 1


def test_summarize_per_category_and_overall():
    right = Judgement("a small red circle", dict(colour=True, shape=True, size=True, position=True), "")
    wrong_size = Judgement("a large red circle", dict(colour=True, shape=True, size=False, position=True), "")
    pair = Judgement("a red circle above a blue square", dict(colour=True, shape=False, position=True), "")
    summary = summarize([right, wrong_size, pair], ["seen", "seen", "two_object"])
    assert set(summary) == {"all", "seen", "two_object"}
    assert summary["seen"] == {"colour": 1.0, "shape": 1.0, "size": 0.5, "position": 1.0, "correct": 0.5}
    assert summary["two_object"] == {"colour": 1.0, "shape": 0.0, "position": 1.0, "correct": 0.0}
    assert summary["all"]["size"] == 0.5 and summary["all"]["shape"] == pytest.approx(2 / 3)
    assert summary["all"]["correct"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        summarize([right], [])
    with pytest.raises(ValueError, match="all"):
        summarize([right], ["all"])


def test_loss_curves_skip_records_without_a_training_loss(tmp_path):
    from t2i.eval.report import loss_curves

    (tmp_path / "sr").mkdir()
    lines = [{"step": 1, "loss": 0.5}, {"step": 2, "psnr": 30.7}, {"step": 2, "loss": 0.4}, {"step": 3, "loss": None}]
    (tmp_path / "sr" / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert loss_curves(tmp_path, ["sr"]).width > 0
    assert loss_curves(tmp_path, ["vae"]) is None
