"""A model-free judge: does an image show what a canonical `shapes` prompt asks for?

Each pixel is classified to the nearest palette colour (or background when it is far from all
of them), same-colour pixels are grouped into 8-connected components, specks are dropped, and
every remaining component is described by its colour, bounding box and shape. The shape comes
from how much wider its bottom third is than its top third (an apex-up triangle is, by ~2/3 of
its width; circles and squares are symmetric) and then from how much of the bounding-box corners
it covers (square ~1, circle ~0), measured with soft colour coverage so that blur, which rounds
a square's corners, does not turn it into a circle. Size is the bounding-box side against 0.4 of
the canvas; position is the nearest of the five anchor points to the bounding-box centre; a
relation holds when the two centres are offset mostly along its axis.

It assumes the `shapes` dataset's canvas: a plain grey background, `t2i.data.shapes.BACKGROUND` (RGB 128, 128,
128). The background is that fixed grey (and any pixel far from every palette colour), not measured from the image,
so an image on another background is judged wrong whatever it draws: a white or black canvas reads as one large
white or black square, a light one as the palette colour nearest it. Use it on images of shapes prompts from
models trained on the shapes data, not on fine-tuned models' images or photos.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from t2i.data.shapes import BACKGROUND, COLOURS, POSITIONS, SceneSpec, ShapeSpec, parse_caption

PALETTE_NAMES: tuple[str, ...] = ("background", *COLOURS)
_PALETTE = np.array([BACKGROUND, *COLOURS.values()], dtype=np.float32)
# A pixel farther than this (RGB distance) from every palette entry counts as background.
MAX_COLOUR_DISTANCE = 100.0
# Regions smaller than this many pixels (and than this share of the canvas) are specks, ignored.
MIN_OBJECT_PIXELS = 4
MIN_OBJECT_FRACTION = 0.004
# Bounding-box side (canvas fraction) from which an object is "large"; small is 0.27-0.33, large 0.45-0.55.
SIZE_THRESHOLD = 0.4
# A region of the asked colour stands for the asked object if its area is at least this share of
# the largest region's area: for a one-object prompt, and for each object of a two-object prompt.
EXPECTED_OBJECT_SHARE = 0.5
PAIR_OBJECT_SHARE = 0.15
# Shape thresholds: bottom-third minus top-third width over bbox width (apex-up triangle ~0.67,
# rendered circles up to ~0.3); area over bbox area below which a symmetric region is irregular;
# corner region (sum of distances to the two nearest bbox edges, as fractions of the bbox);
# covered share of that corner region from which a region is a square (squares 1, circles <= 2/3).
TRIANGLE_ASYMMETRY = 0.38
MIN_ROUND_FILL = 0.6
CORNER_REACH = 0.32
SQUARE_CORNER_FILL = 0.7


@dataclass(frozen=True)
class DetectedObject:
    """One connected region of a palette colour: area in pixels; centre (cx, cy) and side in canvas fractions."""

    colour: str
    area: int
    cx: float
    cy: float
    side: float
    shape: str

    @property
    def size(self) -> str:
        return "large" if self.side >= SIZE_THRESHOLD else "small"

    @property
    def position(self) -> str:
        def distance(name: str) -> float:
            x, y = POSITIONS[name]
            return (x - self.cx) ** 2 + (y - self.cy) ** 2

        return min(POSITIONS, key=distance)

    def describe(self, with_size: bool = True) -> str:
        words = [self.size] if with_size else []
        return " ".join([*words, self.colour, self.shape, "at", self.position])


@dataclass(frozen=True)
class Judgement:
    """Per-attribute verdict for one image against one prompt.

    `attributes`: colour, shape, size, position for one object; colour, shape, position (the
    relation) for two. `found` describes what was detected, for reports.
    """

    prompt: str
    attributes: dict[str, bool]
    found: str

    @property
    def correct(self) -> bool:
        return all(self.attributes.values())


def _as_rgb_array(image) -> np.ndarray:
    """An (H, W, 3) uint8 array from a PIL image or an (H, W, 3) uint8 array."""
    array = np.asarray(image.convert("RGB")) if isinstance(image, Image.Image) else np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ValueError(f"image must be a PIL image or a uint8 (H, W, 3) array, got {array.dtype} {array.shape}")
    if min(array.shape[:2]) < 32:
        raise ValueError(f"image must be at least 32x32 pixels, got {array.shape[1]}x{array.shape[0]}")
    return array


def classify_pixels(rgb: np.ndarray) -> np.ndarray:
    """(H, W) int palette index per pixel: 0 background, k the k-th colour of COLOURS.

    Pixels farther than MAX_COLOUR_DISTANCE from every palette entry count as background.
    """
    distances = np.linalg.norm(rgb.astype(np.float32)[:, :, None, :] - _PALETTE, axis=-1)
    labels = distances.argmin(axis=-1)
    labels[distances.min(axis=-1) > MAX_COLOUR_DISTANCE] = 0
    return labels


def connected_components(labels: np.ndarray) -> np.ndarray:
    """(H, W) component id per pixel for 8-connected regions of equal nonzero label; -1 on background.

    Vectorised min-label propagation with pointer jumping: every pixel repeatedly takes the
    smallest id among its same-label neighbours until nothing changes.
    """
    height, width = labels.shape
    foreground = labels > 0
    sentinel = height * width
    ids = np.where(foreground, np.arange(sentinel).reshape(height, width), sentinel)
    padded_labels = np.pad(labels, 1, constant_values=0)
    shifts = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    same_label = [
        padded_labels[1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width] == labels for dy, dx in shifts
    ]
    while True:
        padded_ids = np.pad(ids, 1, constant_values=sentinel)
        smallest = ids
        for (dy, dx), same in zip(shifts, same_label):
            neighbour = padded_ids[1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width]
            smallest = np.minimum(smallest, np.where(same, neighbour, sentinel))
        flat = np.append(smallest.ravel(), sentinel)
        jumped = flat[flat[:-1]].reshape(height, width)
        updated = np.where(foreground, np.minimum(smallest, jumped), sentinel)
        if np.array_equal(updated, ids):
            break
        ids = updated
    return np.where(foreground, ids, -1)


def _corner_fill(rgb: np.ndarray, mask: np.ndarray, colour: str) -> float:
    """How much of the region near the four bounding-box corners is covered (square ~1, circle ~0).

    `rgb` and `mask` are cropped to the bounding box. Pixels of the region count 1; the others
    count by how far their colour lies from the background towards `colour` (0..1), so a blurred
    square whose corner pixels fell just below the colour threshold still reads as filled.
    """
    height, width = mask.shape
    rows = np.arange(height) + 0.5
    cols = np.arange(width) + 0.5
    row_to_edge = np.minimum(rows, height - rows) / height
    col_to_edge = np.minimum(cols, width - cols) / width
    corners = row_to_edge[:, None] + col_to_edge[None, :] <= CORNER_REACH
    if not corners.any():
        return 1.0
    towards_colour = np.asarray(COLOURS[colour], dtype=np.float32) - _PALETTE[0]
    coverage = (rgb[corners].astype(np.float32) - _PALETTE[0]) @ towards_colour / (towards_colour @ towards_colour)
    coverage = np.where(mask[corners], 1.0, np.clip(coverage, 0.0, 1.0))
    return float(coverage.mean())


def classify_shape(fill: float, asymmetry: float, corner_fill: float) -> str:
    """'triangle', 'square', 'circle' or 'irregular' from a region's bounding-box statistics.

    fill: area / bbox area; asymmetry: (mean width of bottom third - of top third) / bbox width;
    corner_fill: how much of the bbox corners is covered (see `_corner_fill`).
    """
    if asymmetry >= TRIANGLE_ASYMMETRY:
        return "triangle"
    if asymmetry <= -TRIANGLE_ASYMMETRY or fill < MIN_ROUND_FILL:
        return "irregular"
    return "square" if corner_fill >= SQUARE_CORNER_FILL else "circle"


def detect_objects(image) -> list[DetectedObject]:
    """Every palette-coloured region of `image` bigger than a speck, largest first."""
    rgb = _as_rgb_array(image)
    height, width = rgb.shape[:2]
    labels = classify_pixels(rgb)
    components = connected_components(labels)
    min_pixels = max(MIN_OBJECT_PIXELS, round(MIN_OBJECT_FRACTION * height * width))
    ids, areas = np.unique(components[components >= 0], return_counts=True)
    objects = []
    for component_id, area in zip(ids, areas):
        if area < min_pixels:
            continue
        rows, cols = np.nonzero(components == component_id)
        top, bottom, left, right = int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1
        box_height, box_width = bottom - top, right - left
        mask = components[top:bottom, left:right] == component_id
        row_widths = mask.sum(axis=1)
        third = max(1, box_height // 3)
        asymmetry = float(row_widths[-third:].mean() - row_widths[:third].mean()) / box_width
        fill = float(area) / (box_height * box_width)
        colour = PALETTE_NAMES[int(labels.flat[component_id])]
        corner_fill = _corner_fill(rgb[top:bottom, left:right], mask, colour)
        objects.append(
            DetectedObject(
                colour=colour,
                area=int(area),
                cx=(left + right) / 2 / width,
                cy=(top + bottom) / 2 / height,
                side=max(box_height / height, box_width / width),
                shape=classify_shape(fill, asymmetry, corner_fill),
            )
        )
    return sorted(objects, key=lambda obj: -obj.area)


def _largest_of_colour(objects: list[DetectedObject], colour: str, min_area: float) -> DetectedObject | None:
    return next((obj for obj in objects if obj.colour == colour and obj.area >= min_area), None)


def _judge_single(expected: ShapeSpec, objects: list[DetectedObject]) -> tuple[dict[str, bool], str]:
    if not objects:
        return dict(colour=False, shape=False, size=False, position=False), "no object"
    dominant = objects[0]
    match = _largest_of_colour(objects, expected.colour, EXPECTED_OBJECT_SHARE * dominant.area)
    target = match or dominant
    attributes = dict(
        colour=match is not None,
        shape=target.shape == expected.shape,
        size=target.size == expected.size,
        position=target.position == expected.position,
    )
    found = target.describe()
    if len(objects) > 1:
        found += f" (+{len(objects) - 1} other)"
    return attributes, found


def _relation_holds(relation: str, first: DetectedObject, second: DetectedObject) -> bool:
    dx, dy = second.cx - first.cx, second.cy - first.cy
    if relation == "left of":
        return bool(dx > abs(dy))
    return bool(dy > abs(dx))


def _judge_pair(spec: SceneSpec, objects: list[DetectedObject]) -> tuple[dict[str, bool], str]:
    if not objects:
        return dict(colour=False, shape=False, position=False), "no object"
    min_area = PAIR_OBJECT_SHARE * objects[0].area
    matches = [_largest_of_colour(objects, expected.colour, min_area) for expected in spec.objects]
    unused = [obj for obj in objects if all(obj is not match for match in matches)]
    assigned = [match if match is not None else (unused.pop(0) if unused else None) for match in matches]
    both = all(obj is not None for obj in assigned)
    attributes = dict(
        colour=all(match is not None for match in matches),
        shape=both and all(obj.shape == expected.shape for obj, expected in zip(assigned, spec.objects)),
        position=both and _relation_holds(spec.relation, *assigned),
    )
    found = " and ".join(obj.describe(with_size=False) for obj in assigned if obj is not None)
    extra = len(objects) - sum(obj is not None for obj in assigned)
    if extra:
        found += f" (+{extra} other)"
    return attributes, found


def judge(image, prompt: str) -> Judgement:
    """Judge an RGB image (PIL or uint8 (H, W, 3), at least 32 px, on the shapes canvas's grey background, see the
    module's docstring) against a canonical prompt.

    Raises ValueError if the prompt is not canonical or the image is not an RGB image.
    """
    spec = parse_caption(prompt)
    objects = detect_objects(image)
    if spec.relation is None:
        attributes, found = _judge_single(spec.objects[0], objects)
    else:
        attributes, found = _judge_pair(spec, objects)
    return Judgement(prompt=prompt, attributes=attributes, found=found)


def summarize(judgements: list[Judgement], categories: list[str]) -> dict[str, dict[str, float]]:
    """Per category, plus "all": the fraction of judgements with each attribute right, and "correct".

    An attribute's fraction counts only the judgements that have it (size only for one object).
    """
    if len(judgements) != len(categories):
        raise ValueError(f"got {len(judgements)} judgements but {len(categories)} categories")
    if "all" in categories:
        raise ValueError("categories may not be named 'all': summarize adds that group itself")
    groups: dict[str, list[Judgement]] = {"all": list(judgements)}
    for judgement, category in zip(judgements, categories):
        groups.setdefault(category, []).append(judgement)
    summary = {}
    for category, members in groups.items():
        names = list(dict.fromkeys(name for j in members for name in j.attributes))
        row = {}
        for name in names:
            verdicts = [j.attributes[name] for j in members if name in j.attributes]
            row[name] = sum(verdicts) / len(verdicts)
        row["correct"] = sum(j.correct for j in members) / len(members) if members else 0.0
        summary[category] = row
    return summary
