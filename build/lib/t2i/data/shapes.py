"""The procedural `shapes` dataset: coloured circles, squares and triangles on a gray canvas.

Every scene is drawn from a fixed grammar (colour, shape, size, position, or two objects in a
spatial relation) and described by a canonical caption that `parse_caption` can read back, so
generated images can be judged without a model (see `t2i.eval.judge`). Scene `i` of a dataset
depends only on `(seed, i)`, and a few (colour, shape) pairs are held out of training by default
to measure compositional generalisation.
"""

from __future__ import annotations

import functools
import numbers
import re
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

BACKGROUND: tuple[int, int, int] = (128, 128, 128)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 210, 40),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: dict[str, float] = {"small": 0.3, "large": 0.5}
POSITIONS: dict[str, tuple[float, float]] = {
    "center": (0.5, 0.5),
    "left": (0.28, 0.5),
    "right": (0.72, 0.5),
    "top": (0.5, 0.28),
    "bottom": (0.5, 0.72),
}
POSITION_PHRASES: dict[str, str] = {
    "center": "",
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
}
DEFAULT_HELD_OUT: tuple[tuple[str, str], ...] = (
    ("green", "triangle"),
    ("yellow", "circle"),
    ("white", "square"),
)

Relation = Literal["left of", "above"]
RELATIONS: tuple[str, ...] = ("left of", "above")
RELATION_PHRASES: dict[str, str] = {"left of": "to the left of", "above": "above"}
PAIR_CENTRES: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    "left of": ((0.28, 0.5), (0.72, 0.5)),
    "above": ((0.5, 0.28), (0.5, 0.72)),
}
SIDE_JITTER = 0.1
CENTRE_JITTER = 0.04
PROMPT_CATEGORIES: tuple[str, ...] = ("seen", "held_out", "two_object")

_SIZE_SYNONYMS = {"small": ("tiny", "little"), "large": ("big",)}
_POSITION_PARAPHRASES = {
    "center": "in the middle",
    "left": "on the left side",
    "right": "on the right side",
    "top": "near the top",
    "bottom": "near the bottom",
}
_TQDM_THRESHOLD = 5000


@dataclass(frozen=True)
class ShapeSpec:
    """One object as a caption asks for it.

    `size` and `position` are None for the objects of a two-object caption, which names neither
    (both objects are small and the relation fixes where they are).
    """

    colour: str
    shape: str
    size: str | None
    position: str | None

    def __post_init__(self) -> None:
        if self.colour not in COLOURS:
            raise ValueError(f"ShapeSpec colour {self.colour!r} is not one of {list(COLOURS)}")
        if self.shape not in SHAPES:
            raise ValueError(f"ShapeSpec shape {self.shape!r} is not one of {list(SHAPES)}")
        if self.size is not None and self.size not in SIZES:
            raise ValueError(f"ShapeSpec size {self.size!r} is not one of {list(SIZES)} or None")
        if self.position is not None and self.position not in POSITIONS:
            raise ValueError(f"ShapeSpec position {self.position!r} is not one of {list(POSITIONS)} or None")

    def words(self) -> str:
        """'colour shape', the noun phrase without an article."""
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class SceneSpec:
    """What a canonical caption asks for: one object, or two in a relation.

    For two objects, `objects[0]` is left of / above `objects[1]`.
    """

    objects: tuple[ShapeSpec, ...]
    relation: Relation | None

    def __post_init__(self) -> None:
        if len(self.objects) == 1:
            (only,) = self.objects
            if self.relation is not None:
                raise ValueError("SceneSpec with one object must have relation None")
            if only.size is None or only.position is None:
                raise ValueError("SceneSpec with one object needs its size and position")
        elif len(self.objects) == 2:
            first, second = self.objects
            if self.relation not in RELATIONS:
                raise ValueError(f"SceneSpec relation {self.relation!r} is not one of {list(RELATIONS)}")
            if first.colour == second.colour:
                raise ValueError("SceneSpec with two objects needs two different colours")
            if any(obj.size is not None or obj.position is not None for obj in self.objects):
                raise ValueError("SceneSpec objects in a pair have size and position None")
        else:
            raise ValueError(f"SceneSpec needs 1 or 2 objects, got {len(self.objects)}")


@dataclass(frozen=True)
class Scene:
    """A concrete, jittered scene: the spec plus one (cx, cy, side) box per object, in canvas fractions."""

    spec: SceneSpec
    boxes: tuple[tuple[float, float, float], ...]

    def __post_init__(self) -> None:
        if len(self.boxes) != len(self.spec.objects):
            raise ValueError(f"Scene has {len(self.spec.objects)} objects but {len(self.boxes)} boxes")


def canonical_caption(spec: SceneSpec) -> str:
    """The one canonical caption of `spec`, e.g. 'a large red circle on the left'."""
    if spec.relation is None:
        (obj,) = spec.objects
        caption = f"a {obj.size} {obj.colour} {obj.shape}"
        phrase = POSITION_PHRASES[obj.position]
        return f"{caption} {phrase}" if phrase else caption
    first, second = spec.objects
    return f"a {first.words()} {RELATION_PHRASES[spec.relation]} a {second.words()}"


_COLOUR_PATTERN = "|".join(COLOURS)
_SHAPE_PATTERN = "|".join(SHAPES)
_PHRASE_TO_POSITION = {phrase: name for name, phrase in POSITION_PHRASES.items() if phrase}
_PHRASE_TO_RELATION = {phrase: name for name, phrase in RELATION_PHRASES.items()}
_SINGLE_CAPTION = re.compile(
    rf"a ({'|'.join(SIZES)}) ({_COLOUR_PATTERN}) ({_SHAPE_PATTERN})"
    rf"(?: ({'|'.join(_PHRASE_TO_POSITION)}))?"
)
_PAIR_CAPTION = re.compile(
    rf"a ({_COLOUR_PATTERN}) ({_SHAPE_PATTERN}) ({'|'.join(_PHRASE_TO_RELATION)}) "
    rf"a ({_COLOUR_PATTERN}) ({_SHAPE_PATTERN})"
)


def parse_caption(caption: str) -> SceneSpec:
    """Read a canonical caption back into its SceneSpec (case and extra spaces are ignored).

    Raises ValueError naming the caption for anything else, paraphrases included.
    """
    text = " ".join(caption.lower().split())
    single = _SINGLE_CAPTION.fullmatch(text)
    if single:
        size, colour, shape, phrase = single.groups()
        position = _PHRASE_TO_POSITION[phrase] if phrase else "center"
        return SceneSpec((ShapeSpec(colour, shape, size, position),), None)
    pair = _PAIR_CAPTION.fullmatch(text)
    if pair:
        colour_a, shape_a, phrase, colour_b, shape_b = pair.groups()
        if colour_a == colour_b:
            raise ValueError(f"caption {caption!r} names two objects of the same colour; a pair needs two colours")
        objects = (ShapeSpec(colour_a, shape_a, None, None), ShapeSpec(colour_b, shape_b, None, None))
        return SceneSpec(objects, _PHRASE_TO_RELATION[phrase])
    raise ValueError(
        f"caption {caption!r} is not a canonical shapes caption, e.g. 'a small red circle', "
        "'a large blue square on the left', 'a red circle to the left of a blue square', "
        "'a red circle above a blue square'"
    )


def _check_held_out(held_out) -> frozenset[tuple[str, str]]:
    """Validate `held_out` as (colour, shape) pairs and return them as a set."""
    if held_out is None or isinstance(held_out, str):
        raise ValueError(f"held_out must be a sequence of (colour, shape) pairs, () for none; got {held_out!r}")
    pairs = set()
    for item in held_out:
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise ValueError(f"held_out entries must be (colour, shape) pairs, got {item!r}")
        colour, shape = item
        if colour not in COLOURS:
            raise ValueError(f"held_out colour {colour!r} is not one of {list(COLOURS)}")
        if shape not in SHAPES:
            raise ValueError(f"held_out shape {shape!r} is not one of {list(SHAPES)}")
        pairs.add((colour, shape))
    return frozenset(pairs)


def _check_fraction(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")


def _check_resolution(resolution: int) -> None:
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)) or resolution < 32:
        raise ValueError(f"resolution must be an int >= 32, got {resolution!r}")


def _allowed_pairs(held_out) -> list[tuple[str, str]]:
    """Every (colour, shape) pair not in `held_out`, in palette order."""
    excluded = _check_held_out(held_out)
    return [(colour, shape) for colour in COLOURS for shape in SHAPES if (colour, shape) not in excluded]


def sample_scene(
    rng: np.random.Generator,
    held_out=DEFAULT_HELD_OUT,
    two_object_fraction: float = 0.3,
) -> Scene:
    """Draw one jittered scene; no object in it is a held-out (colour, shape) pair."""
    _check_fraction("two_object_fraction", two_object_fraction)
    allowed = _allowed_pairs(held_out)
    if not allowed:
        raise ValueError("held_out excludes every (colour, shape) pair; nothing is left to draw")
    if rng.random() < two_object_fraction:
        spec = _sample_pair_spec(rng, allowed)
    else:
        colour, shape = allowed[rng.integers(len(allowed))]
        size = tuple(SIZES)[rng.integers(len(SIZES))]
        position = tuple(POSITIONS)[rng.integers(len(POSITIONS))]
        spec = SceneSpec((ShapeSpec(colour, shape, size, position),), None)
    return scene_for_spec(spec, rng)


def _sample_pair_spec(rng: np.random.Generator, allowed: list[tuple[str, str]]) -> SceneSpec:
    """Two objects of different colours, left/right or top/bottom."""
    first = allowed[rng.integers(len(allowed))]
    partners = [pair for pair in allowed if pair[0] != first[0]]
    if not partners:
        raise ValueError("held_out leaves a single colour; a two-object scene needs two (set two_object_fraction=0)")
    second = partners[rng.integers(len(partners))]
    relation = RELATIONS[rng.integers(len(RELATIONS))]
    return SceneSpec((ShapeSpec(*first, None, None), ShapeSpec(*second, None, None)), relation)


def scene_for_spec(spec: SceneSpec, rng: np.random.Generator) -> Scene:
    """A jittered Scene showing `spec` (any spec, held-out pairs included), e.g. a reference render of a prompt."""
    if spec.relation is None:
        (obj,) = spec.objects
        return Scene(spec, (_jittered_box(rng, POSITIONS[obj.position], SIZES[obj.size]),))
    boxes = tuple(_jittered_box(rng, centre, SIZES["small"]) for centre in PAIR_CENTRES[spec.relation])
    return Scene(spec, boxes)


def _jittered_box(rng: np.random.Generator, centre: tuple[float, float], side: float) -> tuple[float, float, float]:
    """(cx, cy, side): the centre moved by up to CENTRE_JITTER per axis, the side scaled by 1 +- SIDE_JITTER."""
    jitter_x, jitter_y = rng.uniform(-CENTRE_JITTER, CENTRE_JITTER, size=2)
    scale = rng.uniform(1.0 - SIDE_JITTER, 1.0 + SIDE_JITTER)
    return (float(centre[0] + jitter_x), float(centre[1] + jitter_y), float(side * scale))


@functools.lru_cache(maxsize=8)
def _pixel_centres(resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) coordinate grids of pixel centres in canvas fractions, shape (R, R) each, read-only."""
    coords = (np.arange(resolution, dtype=np.float64) + 0.5) / resolution
    ys, xs = np.meshgrid(coords, coords, indexing="ij")
    xs.flags.writeable = False
    ys.flags.writeable = False
    return xs, ys


def shape_mask(shape: str, box: tuple[float, float, float], resolution: int) -> np.ndarray:
    """Boolean (R, R) mask of the pixels whose centre lies inside `shape` drawn in `box`."""
    xs, ys = _pixel_centres(resolution)
    cx, cy, side = box
    half = side / 2.0
    if shape == "circle":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= half**2
    if shape == "square":
        return (np.abs(xs - cx) <= half) & (np.abs(ys - cy) <= half)
    if shape == "triangle":
        depth_below_apex = ys - (cy - half)
        return (depth_below_apex >= 0) & (depth_below_apex <= side) & (np.abs(xs - cx) <= depth_below_apex / 2.0)
    raise ValueError(f"shape {shape!r} is not one of {list(SHAPES)}")


def _paint(scene: Scene, canvas: np.ndarray) -> None:
    """Draw the objects of `scene` onto an (R, R, 3) uint8 canvas in place."""
    resolution = canvas.shape[0]
    canvas[...] = BACKGROUND
    for obj, box in zip(scene.spec.objects, scene.boxes):
        canvas[shape_mask(obj.shape, box, resolution)] = COLOURS[obj.colour]


def render(scene: Scene, resolution: int = 32) -> np.ndarray:
    """Render `scene` as an (R, R, 3) uint8 image with hard edges (no anti-aliasing)."""
    _check_resolution(resolution)
    canvas = np.empty((resolution, resolution, 3), dtype=np.uint8)
    _paint(scene, canvas)
    return canvas


PARTIAL_ATTRIBUTES = ("size", "colour", "shape")


def caption_for(scene: Scene, rng: np.random.Generator, paraphrase_prob: float,
                partial_caption_prob: float = 0.0, partial_omits: tuple[str, ...] = PARTIAL_ATTRIBUTES) -> str:
    """The canonical caption of `scene`; with probability `paraphrase_prob` a paraphrase of it, and with
    probability `partial_caption_prob` a partial caption that leaves some of `partial_omits` unsaid."""
    _check_fraction("paraphrase_prob", paraphrase_prob)
    _check_fraction("partial_caption_prob", partial_caption_prob)
    if partial_caption_prob > 0 and rng.random() < partial_caption_prob:
        caption = partial_caption(scene.spec, rng, partial_omits)
        if caption is not None:
            return caption
    if rng.random() >= paraphrase_prob:
        return canonical_caption(scene.spec)
    options = _paraphrases(scene.spec)
    return options[rng.integers(len(options))]


def partial_caption(spec: SceneSpec, rng: np.random.Generator,
                    omits: tuple[str, ...] = PARTIAL_ATTRIBUTES) -> str | None:
    """A true but incomplete caption: a random non-empty subset of `omits` is left unsaid (None when the scene
    has none of them to leave out: two-object captions name no size).

    A caption without its colour teaches a shape word its own effect ("a large triangle on the left" shows
    triangles of every trained colour). A caption without its shape does the opposite for held-out pairs: "a
    white shape" only ever shows white circles and triangles, so "white" learns to mean "not a square".
    """
    unknown = set(omits) - set(PARTIAL_ATTRIBUTES)
    if unknown or not omits:
        raise ValueError(f"partial captions can leave out {', '.join(PARTIAL_ATTRIBUTES)}; got {list(omits)}")

    def describe(obj: ShapeSpec, omit: set[str]) -> str:
        words = [obj.size if obj.size and "size" not in omit else None,
                 obj.colour if "colour" not in omit else None,
                 obj.shape if "shape" not in omit else "shape"]
        return " ".join(filter(None, words))

    if spec.relation is None:
        (obj,) = spec.objects
        # The position is always said: without it a caption would read as the canonical one of a centred object.
        attributes = [a for a in PARTIAL_ATTRIBUTES if a in omits]
        omit = {a for a in attributes if rng.random() < 0.5} or {attributes[rng.integers(len(attributes))]}
        if omit == set(PARTIAL_ATTRIBUTES):
            omit.discard(attributes[rng.integers(len(attributes))])
        return " ".join(filter(None, ["a", describe(obj, omit), POSITION_PHRASES[obj.position]]))
    options = [a for a in ("colour", "shape") if a in omits]
    if not options:
        return None
    omit = {options[rng.integers(len(options))]}
    first, second = (describe(obj, omit) for obj in spec.objects)
    return f"a {first} {RELATION_PHRASES[spec.relation]} a {second}"


def _paraphrases(spec: SceneSpec) -> list[str]:
    """A few non-canonical captions that describe exactly the scene `spec` asks for."""
    if spec.relation is None:
        (obj,) = spec.objects
        positions = [POSITION_PHRASES[obj.position], _POSITION_PARAPHRASES[obj.position]]
        captions = []
        for size_word in _SIZE_SYNONYMS[obj.size]:
            for phrase in positions:
                captions.append(" ".join(filter(None, ["a", size_word, obj.colour, obj.shape, phrase])))
        return captions
    first, second = (obj.words() for obj in spec.objects)
    if spec.relation == "left of":
        return [
            f"a {first} left of a {second}",
            f"a {second} to the right of a {first}",
            f"a {first} and a {second}, the {first} on the left",
        ]
    return [
        f"a {second} below a {first}",
        f"a {first} and a {second}, the {first} on top",
    ]


def all_specs(held_out=(), kinds=("single", "pair")) -> list[SceneSpec]:
    """Every canonical SceneSpec whose objects avoid `held_out`, in a fixed order.

    `kinds` selects single-object specs ("single") and/or two-object specs ("pair").
    """
    unknown = set(kinds) - {"single", "pair"}
    if unknown:
        raise ValueError(f"kinds may hold 'single' and 'pair', got {sorted(unknown)}")
    allowed = _allowed_pairs(held_out)
    specs = []
    if "single" in kinds:
        for colour, shape in allowed:
            for size in SIZES:
                for position in POSITIONS:
                    specs.append(SceneSpec((ShapeSpec(colour, shape, size, position),), None))
    if "pair" in kinds:
        for relation in RELATIONS:
            for first in allowed:
                for second in allowed:
                    if first[0] != second[0]:
                        objects = (ShapeSpec(*first, None, None), ShapeSpec(*second, None, None))
                        specs.append(SceneSpec(objects, relation))
    return specs


def _balanced_pick(candidates: list[SceneSpec], count: int, rng: np.random.Generator, features) -> list[SceneSpec]:
    """Pick up to `count` distinct candidates, spreading each feature's values as evenly as possible.

    Greedy: each step takes the candidate whose feature values have been used least so far, ties
    broken by a seeded shuffle, so the result is deterministic for a given rng state.
    """
    remaining = [candidates[i] for i in rng.permutation(len(candidates))]
    usage: dict[tuple[int, object], int] = {}

    def cost(spec: SceneSpec) -> int:
        return sum(usage.get((k, feature(spec)), 0) for k, feature in enumerate(features))

    picked: list[SceneSpec] = []
    while remaining and len(picked) < count:
        spec = remaining.pop(min(range(len(remaining)), key=lambda i: cost(remaining[i])))
        picked.append(spec)
        for k, feature in enumerate(features):
            usage[(k, feature(spec))] = usage.get((k, feature(spec)), 0) + 1
    return picked


def _single_features(spec: SceneSpec) -> tuple:
    (obj,) = spec.objects
    return (obj.colour, obj.shape, obj.size, obj.position, (obj.colour, obj.shape), (obj.colour, obj.shape, obj.size))


def _pair_features(spec: SceneSpec) -> tuple:
    first, second = spec.objects
    return (spec.relation, first.colour, second.colour, first.shape, second.shape, first, second)


def _feature_getters(describe, count: int) -> list:
    return [lambda spec, k=k: describe(spec)[k] for k in range(count)]


def prompt_suite(held_out=DEFAULT_HELD_OUT, seed: int = 0) -> list[tuple[str, str]]:
    """A fixed list of (canonical prompt, category) pairs for evaluation; deterministic in `seed`.

    Categories: 48 "seen" single-object prompts (every colour, shape, size and position), 24
    "held_out" single-object prompts of the held-out pairs across sizes and positions (fewer if
    `held_out` allows fewer than 24, none for `held_out=()`), and 24 "two_object" prompts of seen
    pairs, both relations equally.
    """
    excluded = _check_held_out(held_out)
    rng = np.random.default_rng([seed, 7919])
    singles = all_specs(held_out=(), kinds=("single",))
    seen = [spec for spec in singles if (spec.objects[0].colour, spec.objects[0].shape) not in excluded]
    unseen = [spec for spec in singles if (spec.objects[0].colour, spec.objects[0].shape) in excluded]
    pairs = all_specs(held_out=tuple(excluded), kinds=("pair",))
    single_features = _feature_getters(_single_features, 6)
    pair_features = _feature_getters(_pair_features, 7)
    chosen = [
        ("seen", _balanced_pick(seen, 48, rng, single_features)),
        ("held_out", _balanced_pick(unseen, 24, rng, single_features)),
        ("two_object", _balanced_pick(pairs, 24, rng, pair_features)),
    ]
    return [(canonical_caption(spec), category) for category, specs in chosen for spec in specs]


class ShapesDataset(Dataset):
    """`size` rendered scenes with captions, all held in memory.

    Item i: {"pixel_values": float32 (3, H, W) in [-1, 1], "caption": str, "index": i}. Scene i
    depends only on (seed, i). `self.images` is uint8 (N, H, W, 3); `self.captions` and
    `self.scenes` are lists of length N.
    """

    def __init__(
        self,
        size: int,
        resolution: int = 32,
        seed: int = 0,
        held_out=DEFAULT_HELD_OUT,
        two_object_fraction: float = 0.3,
        paraphrase_prob: float = 0.2,
        partial_caption_prob: float = 0.0,
        partial_omits: tuple[str, ...] = PARTIAL_ATTRIBUTES,
    ) -> None:
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
            raise ValueError(f"size must be an int >= 1, got {size!r}")
        _check_resolution(resolution)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        _check_fraction("two_object_fraction", two_object_fraction)
        _check_fraction("paraphrase_prob", paraphrase_prob)
        _check_fraction("partial_caption_prob", partial_caption_prob)
        self.held_out = tuple(sorted(_check_held_out(held_out)))
        allowed = _allowed_pairs(held_out)
        if not allowed:
            raise ValueError("held_out excludes every (colour, shape) pair; nothing is left to draw")
        if two_object_fraction > 0 and len({colour for colour, _ in allowed}) < 2:
            raise ValueError("held_out leaves a single colour; two_object_fraction must be 0")

        self.resolution = int(resolution)
        self.seed = int(seed)
        self.two_object_fraction = float(two_object_fraction)
        self.paraphrase_prob = float(paraphrase_prob)
        self.partial_caption_prob = float(partial_caption_prob)
        self.partial_omits = tuple(partial_omits)
        self.images = np.empty((size, self.resolution, self.resolution, 3), dtype=np.uint8)
        self.scenes: list[Scene] = []
        self.captions: list[str] = []
        indices = range(size)
        if size > _TQDM_THRESHOLD:
            from tqdm.auto import tqdm

            indices = tqdm(indices, desc="rendering shapes", unit="img")
        for i in indices:
            rng = np.random.default_rng([self.seed, i])
            scene = sample_scene(rng, self.held_out, self.two_object_fraction)
            _paint(scene, self.images[i])
            self.scenes.append(scene)
            self.captions.append(caption_for(scene, rng, self.paraphrase_prob, self.partial_caption_prob,
                                             self.partial_omits))

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for a ShapesDataset of {len(self)} images")
        i = i % len(self)
        pixels = torch.from_numpy(self.images[i]).permute(2, 0, 1).to(torch.float32) / 127.5 - 1.0
        return {"pixel_values": pixels, "caption": self.captions[i], "index": i}
