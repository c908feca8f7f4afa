"""Tests for the procedural shapes dataset (t2i.data.shapes)."""

from collections import Counter

import numpy as np
import pytest
import torch

from t2i.data.shapes import (
    BACKGROUND,
    COLOURS,
    DEFAULT_HELD_OUT,
    POSITION_PHRASES,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    SceneSpec,
    ShapesDataset,
    ShapeSpec,
    all_specs,
    canonical_caption,
    caption_for,
    parse_caption,
    partial_caption,
    prompt_suite,
    render,
    sample_scene,
    scene_for_spec,
)


@pytest.fixture(scope="module")
def dataset() -> ShapesDataset:
    return ShapesDataset(2000, seed=0)


def test_same_seed_gives_identical_data_and_other_seed_differs():
    first = ShapesDataset(300, seed=3)
    second = ShapesDataset(300, seed=3)
    other = ShapesDataset(300, seed=4)
    assert np.array_equal(first.images, second.images)
    assert first.captions == second.captions
    assert first.scenes == second.scenes
    assert not np.array_equal(first.images, other.images)
    assert first.captions != other.captions


def test_scene_depends_only_on_seed_and_index():
    short = ShapesDataset(40, seed=5)
    long = ShapesDataset(120, seed=5)
    assert np.array_equal(short.images, long.images[:40])
    assert short.captions == long.captions[:40]


def test_pixels_are_exactly_palette_and_background(dataset):
    pixel_values = {tuple(map(int, value)) for value in np.unique(dataset.images.reshape(-1, 3), axis=0)}
    assert pixel_values == {BACKGROUND, *COLOURS.values()}
    assert COLOURS["red"] == (220, 40, 40) and COLOURS["black"] == (20, 20, 20)
    assert list(COLOURS) == ["red", "green", "blue", "yellow", "white", "black"]


def test_held_out_pairs_never_appear_in_training(dataset):
    held_out = set(DEFAULT_HELD_OUT)
    seen_pairs = Counter((obj.colour, obj.shape) for scene in dataset.scenes for obj in scene.spec.objects)
    assert not held_out & set(seen_pairs)
    assert len(seen_pairs) == len(COLOURS) * len(SHAPES) - len(held_out)
    for caption in dataset.captions:
        assert not any(f"{colour} {shape}" in caption for colour, shape in held_out), caption


def test_nothing_held_out_with_empty_tuple():
    data = ShapesDataset(600, seed=1, held_out=())
    seen_pairs = {(obj.colour, obj.shape) for scene in data.scenes for obj in scene.spec.objects}
    assert set(DEFAULT_HELD_OUT) <= seen_pairs


def test_most_captions_are_canonical_and_paraphrases_describe_the_scene(dataset):
    canonical = [caption == canonical_caption(scene.spec) for caption, scene in zip(dataset.captions, dataset.scenes)]
    share = sum(canonical) / len(canonical)
    assert 0.7 <= share < 0.95
    for caption, scene, is_canonical in zip(dataset.captions, dataset.scenes, canonical):
        if is_canonical:
            continue
        with pytest.raises(ValueError):
            parse_caption(caption)
        for obj in scene.spec.objects:
            assert obj.words() in caption, (caption, scene.spec)


def test_paraphrases_keep_relation_meaning():
    rng = np.random.default_rng(0)
    red_circle, blue_square = ShapeSpec("red", "circle", None, None), ShapeSpec("blue", "square", None, None)
    above = scene_for_spec(SceneSpec((red_circle, blue_square), "above"), rng)
    left_of = scene_for_spec(SceneSpec((red_circle, blue_square), "left of"), rng)
    above_captions = {caption_for(above, rng, paraphrase_prob=1.0) for _ in range(50)}
    left_captions = {caption_for(left_of, rng, paraphrase_prob=1.0) for _ in range(50)}
    assert "a blue square below a red circle" in above_captions
    assert "a red circle left of a blue square" in left_captions
    assert all("left" not in caption and "right" not in caption for caption in above_captions)
    assert all("above" not in caption and "below" not in caption for caption in left_captions)
    assert {caption_for(above, rng, paraphrase_prob=0.0) for _ in range(5)} == {"a red circle above a blue square"}


def test_two_object_fraction_extremes():
    assert all(len(scene.spec.objects) == 1 for scene in ShapesDataset(100, two_object_fraction=0.0).scenes)
    pairs = ShapesDataset(100, two_object_fraction=1.0).scenes
    assert all(len(scene.spec.objects) == 2 for scene in pairs)
    assert all(scene.spec.objects[0].colour != scene.spec.objects[1].colour for scene in pairs)


def test_canonical_captions_round_trip():
    specs = all_specs()
    assert len(specs) == 6 * 3 * 2 * 5 + 2 * 18 * 15
    assert len(all_specs(DEFAULT_HELD_OUT)) == 150 + 2 * (15 * 15 - (9 + 4 + 9 + 4 + 4 + 9))
    captions = [canonical_caption(spec) for spec in specs]
    assert len(set(captions)) == len(captions)
    for spec, caption in zip(specs, captions):
        assert parse_caption(caption) == spec
    assert canonical_caption(parse_caption("a large red circle")) == "a large red circle"
    assert parse_caption("a small blue square on the left").objects[0].position == "left"
    assert parse_caption("a red circle to the left of a blue square").relation == "left of"


@pytest.mark.parametrize(
    "caption",
    ["a tiny red circle in the middle", "a red circle", "a large purple circle", "a red circle above a red square", ""],
)
def test_parse_caption_rejects_non_canonical(caption):
    with pytest.raises(ValueError, match="caption"):
        parse_caption(caption)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        (dict(size=0), "size"),
        (dict(size=2.5), "size"),
        (dict(resolution=16), "resolution"),
        (dict(resolution=32.0), "resolution"),
        (dict(held_out=(("purple", "circle"),)), "held_out"),
        (dict(held_out=(("red", "hexagon"),)), "held_out"),
        (dict(held_out=None), "held_out"),
        (dict(two_object_fraction=1.5), "two_object_fraction"),
        (dict(paraphrase_prob=-0.1), "paraphrase_prob"),
        (dict(seed=-1), "seed"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs, argument):
    arguments = dict(size=10) | kwargs
    with pytest.raises(ValueError, match=argument):
        ShapesDataset(**arguments)


def test_render_rejects_small_resolution():
    scene = sample_scene(np.random.default_rng(0))
    with pytest.raises(ValueError, match="resolution"):
        render(scene, 16)


@pytest.mark.parametrize("resolution", [32, 45, 64])
def test_rendered_objects_match_their_boxes(resolution):
    rng = np.random.default_rng(resolution)
    for _ in range(150):
        scene = sample_scene(rng, held_out=(), two_object_fraction=0.3)
        image = render(scene, resolution)
        assert image.shape == (resolution, resolution, 3) and image.dtype == np.uint8
        for obj, (cx, cy, side) in zip(scene.spec.objects, scene.boxes):
            rows, cols = np.nonzero((image == COLOURS[obj.colour]).all(axis=-1))
            expected = np.clip(np.array([cy - side / 2, cy + side / 2, cx - side / 2, cx + side / 2]), 0, 1)
            measured = np.array([rows.min(), rows.max() + 1, cols.min(), cols.max() + 1]) / resolution
            assert np.all(np.abs(measured - expected) * resolution <= 1.5), (obj, measured, expected)


def test_boxes_follow_the_size_and_position_spec(dataset):
    for scene in dataset.scenes:
        for obj, (cx, cy, side) in zip(scene.spec.objects, scene.boxes):
            nominal_side = SIZES[obj.size or "small"]
            assert 0.9 * nominal_side - 1e-9 <= side <= 1.1 * nominal_side + 1e-9
        if scene.spec.relation is None:
            anchors = [POSITIONS[scene.spec.objects[0].position]]
        elif scene.spec.relation == "left of":
            anchors = [(0.28, 0.5), (0.72, 0.5)]
        else:
            anchors = [(0.5, 0.28), (0.5, 0.72)]
        for (cx, cy, _), (ax, ay) in zip(scene.boxes, anchors):
            assert abs(cx - ax) <= 0.04 + 1e-9 and abs(cy - ay) <= 0.04 + 1e-9


def test_shapes_have_the_expected_geometry():
    for shape, expected_fill in [("square", 1.0), ("circle", np.pi / 4), ("triangle", 0.5)]:
        spec = SceneSpec((ShapeSpec("red", shape, "large", "center"),), None)
        mask = (render(Scene(spec, ((0.5, 0.5, 0.5),)), 128) != BACKGROUND).any(axis=-1)
        rows, cols = np.nonzero(mask)
        assert rows.max() - rows.min() + 1 == pytest.approx(64, abs=1)
        assert cols.max() - cols.min() + 1 == pytest.approx(64, abs=1)
        assert mask.sum() / 64**2 == pytest.approx(expected_fill, abs=0.03)
    triangle = SceneSpec((ShapeSpec("red", "triangle", "large", "center"),), None)
    mask = (render(Scene(triangle, ((0.5, 0.5, 0.5),)), 128) != BACKGROUND).any(axis=-1)
    widths = mask.sum(axis=1)[mask.any(axis=1)]
    assert widths[0] <= 2 and widths[-1] >= 62


def test_getitem_returns_normalised_tensor_and_caption(dataset):
    item = dataset[7]
    assert set(item) == {"pixel_values", "caption", "index"}
    assert item["pixel_values"].dtype == torch.float32 and item["pixel_values"].shape == (3, 32, 32)
    assert -1.0 <= item["pixel_values"].min() and item["pixel_values"].max() <= 1.0
    assert item["caption"] == dataset.captions[7] and item["index"] == 7
    expected = torch.from_numpy(dataset.images[7]).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.equal(item["pixel_values"], expected)
    assert len(dataset) == 2000 and dataset[-1]["index"] == 1999
    with pytest.raises(IndexError):
        dataset[2000]


def test_resolution_64_dataset():
    data = ShapesDataset(20, resolution=64)
    assert data.images.shape == (20, 64, 64, 3)
    assert data[0]["pixel_values"].shape == (3, 64, 64)


def test_prompt_suite_counts_and_coverage():
    suite = prompt_suite()
    assert suite == prompt_suite()
    assert suite != prompt_suite(seed=1)
    assert Counter(category for _, category in suite) == {"seen": 48, "held_out": 24, "two_object": 24}
    assert len({prompt for prompt, _ in suite}) == len(suite)
    specs = {category: [] for category in ("seen", "held_out", "two_object")}
    for prompt, category in suite:
        specs[category].append(parse_caption(prompt))
        assert canonical_caption(parse_caption(prompt)) == prompt
    seen = [spec.objects[0] for spec in specs["seen"]]
    assert all((obj.colour, obj.shape) not in DEFAULT_HELD_OUT for obj in seen)
    assert {obj.colour for obj in seen} == set(COLOURS)
    assert {obj.shape for obj in seen} == set(SHAPES)
    assert {obj.size for obj in seen} == set(SIZES)
    assert {obj.position for obj in seen} == set(POSITIONS)
    held = [spec.objects[0] for spec in specs["held_out"]]
    assert {(obj.colour, obj.shape) for obj in held} == set(DEFAULT_HELD_OUT)
    assert {obj.size for obj in held} == set(SIZES) and {obj.position for obj in held} == set(POSITIONS)
    pairs = specs["two_object"]
    assert Counter(spec.relation for spec in pairs) == {"left of": 12, "above": 12}
    assert all((obj.colour, obj.shape) not in DEFAULT_HELD_OUT for spec in pairs for obj in spec.objects)


def test_prompt_suite_without_held_out_pairs():
    suite = prompt_suite(held_out=())
    assert Counter(category for _, category in suite) == {"seen": 48, "two_object": 24}


def test_partial_captions_are_true_incomplete_and_never_canonical():
    data = ShapesDataset(600, seed=3, partial_caption_prob=1.0, two_object_fraction=0.3)
    for scene, caption in zip(data.scenes, data.captions):
        with pytest.raises(ValueError):
            parse_caption(caption)  # never mistaken for the full description of another scene
        words = set(caption.replace(",", "").split())
        said = {"a", "shape", "to", "the", "of", "above", "left", "right", "on", "at", "top", "bottom"}
        for obj in scene.spec.objects:
            said |= {obj.colour, obj.shape, obj.size} - {None}
        assert words <= said, caption
        if scene.spec.relation is None:
            (obj,) = scene.spec.objects
            assert caption.endswith(POSITION_PHRASES[obj.position])  # the position is always said
    partial_share = np.mean([c != canonical_caption(s.spec) for s, c in zip(data.scenes, data.captions)])
    assert partial_share == 1.0
    mixed = ShapesDataset(2000, seed=3, partial_caption_prob=0.25, paraphrase_prob=0.1)
    canonical = np.mean([c == canonical_caption(s.spec) for s, c in zip(mixed.scenes, mixed.captions)])
    assert 0.6 < canonical < 0.75


def test_partial_captions_can_be_kept_from_leaving_the_shape_unsaid():
    data = ShapesDataset(400, seed=5, partial_caption_prob=1.0, two_object_fraction=0.3,
                         partial_omits=("size", "colour"))
    for scene, caption in zip(data.scenes, data.captions):
        for obj in scene.spec.objects:
            assert obj.shape in caption.split(), caption  # every object's shape is always said
        assert "shape" not in caption.split(), caption
    said_colours = [any(obj.colour in caption for obj in scene.spec.objects)
                    for scene, caption in zip(data.scenes, data.captions)]
    assert 0 < np.mean(said_colours) < 1  # colours are sometimes left out

    default = ShapesDataset(400, seed=5, partial_caption_prob=1.0, two_object_fraction=0.3)
    assert any("shape" in caption.split() for caption in default.captions)
    with pytest.raises(ValueError, match="partial captions can leave out size, colour, shape"):
        partial_caption(default.scenes[0].spec, np.random.default_rng(0), ("position",))
