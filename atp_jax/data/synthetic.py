"""The "shapes" set: a small synthetic visual-question-answering set for training a tiny LLaVA on a CPU.

Each image is a plain light background with 1 to 4 flat-coloured, non-overlapping shapes that together cover
about 6% of the image, so most image patches (visual tokens) are background and a pruning method that keeps the
object tokens loses nothing. Every question needs the image: for each exact question string the answer is
(close to) uniformly distributed, so a text-only guesser scores at chance (`text_only_baseline` measures it).

Vocabulary (defaults, see `ShapesConfig`):

- shapes: circle, square, triangle, cross (a plus sign); object size (bounding-box side) 12% to 22% of the
  image side, drawn uniformly; boxes at least 3% of the side apart and inside the image.
- colours: red, green, blue, yellow, purple, orange (saturated RGB, far from every background).
- background: one of white, light grey and cream per image (drawn uniformly; pass one to fix it).
- each (shape, colour) pair occurs at most once per scene, so "the red circle" always names one object.

Question kinds, drawn per sample with `ShapesConfig.kind_weights` (default: the first four, 1/4 each), one question
per sample, answers a single word (exact-match evaluation). The answer is drawn first and the scene built around it:

- ``color``: "What color is the {shape}?" -> a colour name; the shape occurs exactly once in the scene.
  Uniform over the colours for every question.
- ``count`` (`count_weights`, default 1/3 each): "How many {shape}s are there?" (0..4, uniform),
  "How many {colour} objects are there?" (0..4, uniform), "How many objects are there?" (1..4, uniform).
  Answers are number words ("zero", "one", ...): with a LLaMA-style tokenizer a numeral answer starts with a
  lone "▁" piece that LLaVA's label masking leaves unsupervised (it belongs to "ASSISTANT: "), so a model
  trained from scratch never learns to emit it; a word is one supervised piece.
- ``exist``: "Is there a(n) {colour} {shape}?" -> "yes"/"no", 50/50. Negatives follow POPE's idea of hard
  negatives (`exist_negative_weights`, default 1/3 each): "binding" (the colour and the shape both occur,
  but never together), "shape" (the shape occurs in another colour), "random" (any absent pair); when a
  strategy has no candidate the next one in that order is used. By symmetry every question string is yes
  half of the time.
- ``position``: "Where is the {colour1} {shape1} relative to the {colour2} {shape2}?" -> "left", "right",
  "above" or "below" (where object 1 is; image coordinates, so "above" means a smaller row), uniform.
  On the asked axis the two boxes do not overlap and the centres are at least `position_margin` of the side
  apart, and the offset on the asked axis is at least `position_ratio` (2x) the offset on the other axis.
  The scene holds 2 to `max_objects` objects; `position_max_objects` (for training curricula) caps that, also for
  the position turns of multi-turn samples.
- ``place`` (asked only when `kind_weights` names it): "Where is the {colour} {shape}?" -> "left", "right",
  "above" or "below": which part of the image the object is in, by the same rule as ``position`` with the image's
  centre point in place of the second object (its box clear of the centre line, a margin, a dominant axis), uniform.
  One look-up instead of two and a comparison: a tiny model learns it far sooner than ``position``.

Captions (stage-1 projector pretraining, LLaVA-Pretrain style) list the objects left to right:
"A red circle, an orange square and a green cross."; they come from their own scenes (random, not built around
a question), drawn from a separate random stream of the same (split seed, index).

Samples are plain dicts in the LLaVA-Instruct schema::

    {"id": "shapes-train-000123", "image": uint8[H, W, 3],
     "conversations": [{"from": "human", "value": "<image>\\n" + question}, {"from": "gpt", "value": answer}],
     "kind": "color" | "count" | "exist" | "position" | "place", "subkind": str, "answer": answer, "scene": Scene}

and caption samples in the LLaVA-Pretrain schema::

    {"id": "shapes-cap-train-000123", "image": uint8[H, W, 3], "caption": caption,
     "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": caption}], "scene": Scene}

``subkind`` is the count template ("shape", "color", "total"), the exist case ("positive", "binding", "shape",
"random") or equals ``kind``. ``scene`` is the ground truth (object boxes, for instance to see which patches a
pruning method kept; `object_mask` renders it). Sample ``i`` of a split depends only on (split seed, ``i``)
(``np.random.default_rng([seed, i])``), so any sample can be regenerated alone with `sample`.
Everything here is pure numpy + PIL and deterministic.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

RGB = tuple[int, int, int]

KINDS = ("color", "count", "exist", "position", "place")
COUNT_MODES = ("shape", "color", "total")
EXIST_NEGATIVES = ("binding", "shape", "random")
DIRECTIONS = ("left", "right", "above", "below")
SPLITS = ("train", "val", "test")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
IMAGE_TOKEN = "<image>"

_CAPTION_STREAM = 1  # third seed word of the caption scenes' random stream
_MULTI_STREAM = 2  # ... and of the extra questions of multi-turn samples
SAMPLE_KINDS = ("vqa", "multi", "caption")
_WORD = re.compile(r"^[a-z]+$")


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return split


@dataclass(frozen=True)
class ShapesConfig:
    """Everything that defines the set; sizes are fractions of the image side."""

    image_size: int = 224
    min_objects: int = 1
    max_objects: int = 4
    min_size: float = 0.12  # object bounding-box side, as a fraction of the image side
    max_size: float = 0.22
    min_gap: float = 0.03  # smallest gap between two objects' boxes
    shapes: tuple[str, ...] = ("circle", "square", "triangle", "cross")
    colors: tuple[tuple[str, RGB], ...] = (
        ("red", (220, 40, 40)),
        ("green", (40, 170, 60)),
        ("blue", (40, 80, 220)),
        ("yellow", (240, 200, 20)),
        ("purple", (140, 60, 190)),
        ("orange", (245, 130, 20)),
    )
    backgrounds: tuple[RGB, ...] = ((255, 255, 255), (225, 225, 225), (245, 240, 225))  # white, grey, cream
    kind_weights: tuple[tuple[str, float], ...] = (("color", 0.25), ("count", 0.25), ("exist", 0.25),
                                                   ("position", 0.25))
    count_weights: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3)  # over COUNT_MODES
    exist_negative_weights: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3)  # over EXIST_NEGATIVES
    position_margin: float = 0.2  # smallest centre offset on the asked axis
    position_ratio: float = 2.0  # asked-axis offset >= ratio * other-axis offset
    position_max_objects: int = 0  # position questions only about scenes of at most this many objects (0: any)
    train_size: int = 20000
    val_size: int = 500
    test_size: int = 1000
    train_seed: int = 0
    val_seed: int = 1
    test_seed: int = 2
    turns: int = 4  # questions per conversation in "multi" samples
    max_tries: int = 500  # placement tries per object before the layout restarts
    max_restarts: int = 50

    def __post_init__(self):
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {self.image_size}")
        if self.turns < 1:
            raise ValueError(f"turns must be >= 1, got {self.turns}")
        if not 1 <= self.min_objects <= self.max_objects < len(NUMBER_WORDS):
            raise ValueError(f"need 1 <= min_objects <= max_objects <= {len(NUMBER_WORDS) - 1}, got "
                             f"{self.min_objects}, {self.max_objects}")
        if not 0 < self.min_size <= self.max_size < 0.5:
            raise ValueError(f"need 0 < min_size <= max_size < 0.5, got {self.min_size}, {self.max_size}")
        names = self.shapes + self.color_names
        if len(self.shapes) < 2 or len(self.colors) < 2 or len(set(names)) != len(names):
            raise ValueError("need at least 2 shapes and 2 colours, all names distinct")
        if not all(_WORD.match(n) for n in names):
            raise ValueError(f"shape and colour names must be lower-case single words: {names}")
        if self.max_objects >= len(self.shapes) * len(self.colors):
            raise ValueError("max_objects must be below the number of distinct (shape, colour) pairs "
                             "(a scene must leave some pair absent for 'no' answers)")
        if not self.backgrounds:
            raise ValueError("need at least one background colour")
        kinds = [k for k, _ in self.kind_weights]
        if len(set(kinds)) != len(kinds) or not set(kinds) <= set(KINDS):
            raise ValueError(f"kind_weights must name distinct kinds among {KINDS}, got {kinds}")
        for name, w in (("kind_weights", [w for _, w in self.kind_weights]), ("count_weights", self.count_weights),
                        ("exist_negative_weights", self.exist_negative_weights)):
            if any(x < 0 for x in w) or sum(w) <= 0:
                raise ValueError(f"{name} must be non-negative with a positive sum, got {w}")
        if dict(self.kind_weights).get("position", 0) > 0 and self.max_objects < 2:
            raise ValueError("position questions need max_objects >= 2")
        if self.position_max_objects and not 2 <= self.position_max_objects <= self.max_objects:
            raise ValueError(f"position_max_objects must be 0 or in [2, max_objects], got {self.position_max_objects}")
        for split in SPLITS:
            if self.split_size(split) < 0:
                raise ValueError(f"{split}_size must be >= 0")

    @property
    def color_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.colors)

    def rgb(self, color: str) -> RGB:
        return dict(self.colors)[color]

    def split_size(self, split: str) -> int:
        return getattr(self, f"{_check_split(split)}_size")

    def split_seed(self, split: str) -> int:
        return getattr(self, f"{_check_split(split)}_seed")

    @property
    def max_shape_count(self) -> int:
        """Largest answer of "How many {shape}s are there?" (one object per colour at most)."""
        return min(self.max_objects, len(self.colors))

    @property
    def max_color_count(self) -> int:
        """Largest answer of "How many {colour} objects are there?" (one object per shape at most)."""
        return min(self.max_objects, len(self.shapes))


DEFAULT_CONFIG = ShapesConfig()


@dataclass(frozen=True)
class Obj:
    """One object: its box is ``[x - size // 2, x + size // 2]`` by ``[y - size // 2, y + size // 2]`` (pixels)."""

    shape: str
    color: str
    center: tuple[int, int]  # (x, y) = (column, row)
    size: int  # bounding-box side in pixels

    @property
    def half(self) -> int:
        return self.size // 2

    @property
    def box(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1), inclusive."""
        x, y = self.center
        h = self.half
        return x - h, y - h, x + h, y + h


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: RGB


# ---------------------------------------------------------------------------------------------------------------
# words


def plural(shape: str) -> str:
    return shape + ("es" if shape.endswith(("s", "x", "z", "ch", "sh")) else "s")


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _np(color: str, shape: str) -> str:
    return f"{article(color)} {color} {shape}"


def color_question(shape: str) -> str:
    return f"What color is the {shape}?"


def count_question(mode: str, target: str | None = None) -> str:
    if mode == "shape":
        return f"How many {plural(target)} are there?"
    if mode == "color":
        return f"How many {target} objects are there?"
    if mode == "total":
        return "How many objects are there?"
    raise ValueError(f"unknown count mode {mode!r}")


def exist_question(color: str, shape: str) -> str:
    return f"Is there {_np(color, shape)}?"


def position_question(a: tuple[str, str], b: tuple[str, str]) -> str:
    """``a`` and ``b`` are (colour, shape) pairs."""
    return f"Where is the {a[0]} {a[1]} relative to the {b[0]} {b[1]}?"


def place_question(a: tuple[str, str]) -> str:
    """``a`` is a (colour, shape) pair."""
    return f"Where is the {a[0]} {a[1]}?"


def _caption_text(pairs: Sequence[tuple[str, str]]) -> str:
    """Caption of (colour, shape) pairs in the given order."""
    parts = [_np(c, s) for c, s in pairs]
    parts[0] = parts[0][0].upper() + parts[0][1:]
    if len(parts) == 1:
        return parts[0] + "."
    return ", ".join(parts[:-1]) + " and " + parts[-1] + "."


def caption(scene: Scene) -> str:
    """Deterministic description: the objects left to right (ties top to bottom)."""
    objs = sorted(scene.objects, key=lambda o: (o.center[0], o.center[1]))
    return _caption_text([(o.color, o.shape) for o in objs])


def answers(cfg: ShapesConfig = DEFAULT_CONFIG) -> dict[str, tuple[str, ...]]:
    """Every answer each kind can produce."""
    counts = set()
    w_shape, w_color, w_total = cfg.count_weights
    if w_shape > 0:
        counts |= set(range(cfg.max_shape_count + 1))
    if w_color > 0:
        counts |= set(range(cfg.max_color_count + 1))
    if w_total > 0:
        counts |= set(range(cfg.min_objects, cfg.max_objects + 1))
    return {"color": cfg.color_names, "count": tuple(NUMBER_WORDS[n] for n in sorted(counts)), "exist": ("yes", "no"),
            "position": DIRECTIONS, "place": DIRECTIONS}


def all_text(cfg: ShapesConfig = DEFAULT_CONFIG) -> Iterator[str]:
    """Every question, answer and caption template filled over the whole vocabulary (without ``<image>``).

    Covers every word (and punctuation mark) the set can produce, independently of sampling, for training the
    set's own tokenizer. Each string once.
    """
    seen: set[str] = set()

    def once(strings: Iterable[str]) -> Iterator[str]:
        for s in strings:
            if s not in seen:
                seen.add(s)
                yield s

    colors = cfg.color_names
    pairs = [(c, s) for s in cfg.shapes for c in colors]
    yield from once(color_question(s) for s in cfg.shapes)
    yield from once(count_question("shape", s) for s in cfg.shapes)
    yield from once(count_question("color", c) for c in colors)
    yield from once([count_question("total")])
    yield from once(exist_question(c, s) for c, s in pairs)
    yield from once(position_question(a, b) for a in pairs for b in pairs if a != b)
    yield from once(place_question(a) for a in pairs)
    for kind_answers in answers(cfg).values():
        yield from once(kind_answers)
    yield from once(_caption_text([p]) for p in pairs)
    n = len(pairs)
    yield from once(_caption_text([pairs[i], pairs[(i + 1) % n], pairs[(i + 2) % n]]) for i in range(n))
    yield from once(_caption_text([pairs[i], pairs[(i + 1) % n]]) for i in range(n))


# ---------------------------------------------------------------------------------------------------------------
# scenes


def _choice(rng: np.random.Generator, items: Sequence, p: Sequence[float] | None = None):
    if p is not None:
        p = np.asarray(p, dtype=np.float64)
        p = p / p.sum()
    return items[int(rng.choice(len(items), p=p))]


def _pairs(rng: np.random.Generator, n: int, shapes: Sequence[str], colors: Sequence[str]) -> list[tuple[str, str]]:
    """``n`` distinct random (shape, colour) pairs."""
    cands = [(s, c) for s in shapes for c in colors]
    if n > len(cands):
        raise ValueError(f"cannot draw {n} distinct pairs out of {len(cands)}")
    return [cands[int(i)] for i in rng.choice(len(cands), size=n, replace=False)]


def _n_objects(rng: np.random.Generator, cfg: ShapesConfig, lo: int = 1, hi: int | None = None) -> int:
    lo = max(lo, cfg.min_objects)
    hi = cfg.max_objects if hi is None else min(hi, cfg.max_objects)
    if lo > hi:
        raise ValueError(f"no valid object count in [{lo}, {hi}] for this config")
    return int(rng.integers(lo, hi + 1))


def _size(rng: np.random.Generator, cfg: ShapesConfig) -> int:
    return max(3, int(round(rng.uniform(cfg.min_size, cfg.max_size) * cfg.image_size)))


def _center(rng: np.random.Generator, size: int, cfg: ShapesConfig) -> tuple[int, int]:
    h = size // 2
    lo, hi = h + 1, cfg.image_size - 2 - h  # one pixel of background around every object
    return int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))


def _apart(a: Obj, b: Obj, gap: float) -> bool:
    """True when the two boxes are at least ``gap`` pixels apart on some axis."""
    need = a.half + b.half + gap
    return abs(a.center[0] - b.center[0]) >= need or abs(a.center[1] - b.center[1]) >= need


def relation(a: Obj, b: Obj) -> str:
    """Where ``a`` is relative to ``b`` along the axis of their larger centre offset."""
    dx, dy = a.center[0] - b.center[0], a.center[1] - b.center[1]
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "above" if dy < 0 else "below"


def _clear_offset(main: float, other: float, need: float, cfg: ShapesConfig) -> bool:
    """A centre offset of ``main`` on the asked axis (positive: the asked direction) and ``other`` on the other axis
    is clear: past ``need`` plus the gap, at least the margin, and dominant."""
    return (main >= need + cfg.min_gap * cfg.image_size and main >= cfg.position_margin * cfg.image_size
            and main >= cfg.position_ratio * abs(other))


def _toward(dx: float, dy: float, direction: str) -> tuple[float, float]:
    """(offset in ``direction``, offset on the other axis) of a displacement (dx, dy) in image coordinates."""
    return {"left": (-dx, dy), "right": (dx, dy), "above": (-dy, dx), "below": (dy, dx)}[direction]


def _clear_relation(a: Obj, b: Obj, direction: str, cfg: ShapesConfig) -> bool:
    """``a`` is clearly ``direction`` of ``b``: separated boxes, a margin, and a dominant axis."""
    main, other = _toward(a.center[0] - b.center[0], a.center[1] - b.center[1], direction)
    return _clear_offset(main, other, a.half + b.half, cfg)


def _clear_place(a: Obj, direction: str, cfg: ShapesConfig) -> bool:
    """``a`` is clearly in the ``direction`` part of the image: its box off the centre line, its centre a margin
    from the image centre, and a dominant axis."""
    c = (cfg.image_size - 1) / 2
    main, other = _toward(a.center[0] - c, a.center[1] - c, direction)
    return _clear_offset(main, other, a.half, cfg)


def _layout(rng: np.random.Generator, cfg: ShapesConfig, specs: Sequence[tuple[str, str]],
            direction: str | None = None, in_image: bool = False) -> tuple[Obj, ...]:
    """Place (shape, colour) specs without overlap; with ``direction``, specs[0] is clearly that of specs[1], or
    with ``in_image`` clearly in that part of the image."""
    gap = cfg.min_gap * cfg.image_size
    for _ in range(cfg.max_restarts):
        placed: list[Obj] = []
        start = 0
        if direction is not None and in_image:
            (sa, ca), za = specs[0], _size(rng, cfg)
            for _ in range(cfg.max_tries * 4):
                a = Obj(sa, ca, _center(rng, za, cfg), za)
                if _clear_place(a, direction, cfg):
                    placed = [a]
                    break
            else:
                continue
            start = 1
        elif direction is not None:
            (sa, ca), (sb, cb) = specs[0], specs[1]
            za, zb = _size(rng, cfg), _size(rng, cfg)
            for _ in range(cfg.max_tries * 4):
                a = Obj(sa, ca, _center(rng, za, cfg), za)
                b = Obj(sb, cb, _center(rng, zb, cfg), zb)
                if _clear_relation(a, b, direction, cfg):
                    placed = [a, b]
                    break
            else:
                continue
            start = 2
        for shape, color in specs[start:]:
            size = _size(rng, cfg)
            for _ in range(cfg.max_tries):
                o = Obj(shape, color, _center(rng, size, cfg), size)
                if all(_apart(o, p, gap) for p in placed):
                    placed.append(o)
                    break
            else:
                break
        if len(placed) == len(specs):
            return tuple(placed)
    raise RuntimeError(f"could not place {len(specs)} objects after {cfg.max_restarts} restarts; "
                       "objects too large or too many for the image")


def _background(rng: np.random.Generator, cfg: ShapesConfig) -> RGB:
    return tuple(cfg.backgrounds[int(rng.integers(len(cfg.backgrounds)))])


def sample_scene(rng: np.random.Generator, cfg: ShapesConfig = DEFAULT_CONFIG,
                 n_objects: int | None = None) -> Scene:
    """A random scene: ``n_objects`` (default uniform in [min, max]) distinct (shape, colour) pairs, no overlap."""
    n = _n_objects(rng, cfg) if n_objects is None else n_objects
    bg = _background(rng, cfg)
    return Scene(_layout(rng, cfg, _pairs(rng, n, cfg.shapes, cfg.color_names)), bg)


def _absent_pair(rng: np.random.Generator, specs: Sequence[tuple[str, str]], cfg: ShapesConfig
                 ) -> tuple[str, tuple[str, str]]:
    """(negative kind, (shape, colour)) absent from a scene of (shape, colour) `specs`, POPE-style hard
    negatives drawn with `exist_negative_weights` (see the module doc)."""
    shapes, colors = cfg.shapes, cfg.color_names
    present = set(specs)
    in_shapes = [s for s in shapes if any(s == p[0] for p in present)]
    in_colors = [c for c in colors if any(c == p[1] for p in present)]
    cands = {
        "binding": [(s, c) for s in in_shapes for c in in_colors if (s, c) not in present],
        "shape": [(s, c) for s in in_shapes for c in colors if (s, c) not in present],
        "random": [(s, c) for s in shapes for c in colors if (s, c) not in present],
    }
    subkind = _choice(rng, EXIST_NEGATIVES, cfg.exist_negative_weights)
    order = EXIST_NEGATIVES[EXIST_NEGATIVES.index(subkind):]
    subkind = next(k for k in order if cands[k])  # "random" is never empty: max_objects < #pairs
    return subkind, _choice(rng, cands[subkind])


# ---------------------------------------------------------------------------------------------------------------
# questions: per kind, a scene built around a drawn answer (`build`) and a question about a given scene (`ask`)


@dataclass(frozen=True)
class Built:
    """What a kind's `build` draws: the scene's (shape, colour) objects (the first ones are the question's),
    the question's subkind, text and answer, and the direction the layout must make true (position, place)."""

    specs: list[tuple[str, str]]
    subkind: str
    question: str
    answer: str
    direction: str | None = None


def _build_color(rng: np.random.Generator, cfg: ShapesConfig) -> Built:
    shapes, colors = cfg.shapes, cfg.color_names
    shape, color = _choice(rng, shapes), _choice(rng, colors)
    others = [s for s in shapes if s != shape]
    n = _n_objects(rng, cfg, 1, 1 + len(others) * len(colors))
    return Built([(shape, color)] + _pairs(rng, n - 1, others, colors), "color", color_question(shape), color)


def _ask_color(rng: np.random.Generator, objs: list[Obj], cfg: ShapesConfig) -> tuple[str, str] | None:
    single = [o for o in objs if sum(p.shape == o.shape for p in objs) == 1]  # a shape that occurs once
    if not single:
        return None
    o = single[int(rng.integers(len(single)))]
    return color_question(o.shape), o.color


def _build_count(rng: np.random.Generator, cfg: ShapesConfig) -> Built:
    shapes, colors = cfg.shapes, cfg.color_names
    mode = _choice(rng, COUNT_MODES, cfg.count_weights)
    if mode == "total":
        k = _n_objects(rng, cfg)
        return Built(_pairs(rng, k, shapes, colors), mode, count_question("total"), NUMBER_WORDS[k])
    if mode == "shape":
        target = _choice(rng, shapes)
        k = int(rng.integers(cfg.max_shape_count + 1))
        own = [(target, colors[int(i)]) for i in rng.choice(len(colors), size=k, replace=False)]
        rest_shapes, rest_colors = [s for s in shapes if s != target], colors
    else:
        target = _choice(rng, colors)
        k = int(rng.integers(cfg.max_color_count + 1))
        own = [(shapes[int(i)], target) for i in rng.choice(len(shapes), size=k, replace=False)]
        rest_shapes, rest_colors = shapes, [c for c in colors if c != target]
    n = _n_objects(rng, cfg, max(k, 1), k + len(rest_shapes) * len(rest_colors))
    specs = own + _pairs(rng, n - k, rest_shapes, rest_colors)
    return Built(specs, mode, count_question(mode, target), NUMBER_WORDS[k])


def _ask_count(rng: np.random.Generator, objs: list[Obj], cfg: ShapesConfig) -> tuple[str, str]:
    mode = _choice(rng, COUNT_MODES, cfg.count_weights)
    if mode == "total":
        return count_question("total"), NUMBER_WORDS[len(objs)]
    if mode == "shape":
        target = _choice(rng, cfg.shapes)
        return count_question("shape", target), NUMBER_WORDS[sum(o.shape == target for o in objs)]
    target = _choice(rng, cfg.color_names)
    return count_question("color", target), NUMBER_WORDS[sum(o.color == target for o in objs)]


def _build_exist(rng: np.random.Generator, cfg: ShapesConfig) -> Built:
    yes = bool(rng.random() < 0.5)
    n = _n_objects(rng, cfg)
    specs = _pairs(rng, n, cfg.shapes, cfg.color_names)
    if yes:
        subkind = "positive"
        shape, color = specs[int(rng.integers(n))]
    else:
        subkind, (shape, color) = _absent_pair(rng, specs, cfg)
    return Built(specs, subkind, exist_question(color, shape), "yes" if yes else "no")


def _ask_exist(rng: np.random.Generator, objs: list[Obj], cfg: ShapesConfig) -> tuple[str, str]:
    if rng.random() < 0.5:  # yes half of the time
        o = objs[int(rng.integers(len(objs)))]
        return exist_question(o.color, o.shape), "yes"
    _, (shape, color) = _absent_pair(rng, sorted({(o.shape, o.color) for o in objs}), cfg)
    return exist_question(color, shape), "no"


def _build_position(rng: np.random.Generator, cfg: ShapesConfig) -> Built:
    direction = _choice(rng, DIRECTIONS)
    n = _n_objects(rng, cfg, 2, cfg.position_max_objects or None)
    specs = _pairs(rng, n, cfg.shapes, cfg.color_names)
    (sa, ca), (sb, cb) = specs[0], specs[1]
    return Built(specs, "position", position_question((ca, sa), (cb, sb)), direction, direction)


def _ask_position(rng: np.random.Generator, objs: list[Obj], cfg: ShapesConfig) -> tuple[str, str] | None:
    if cfg.position_max_objects and len(objs) > cfg.position_max_objects:
        return None
    clear = [(a, b, d) for a in objs for b in objs if a is not b for d in DIRECTIONS
             if _clear_relation(a, b, d, cfg)]  # a clearly separated pair
    if not clear:
        return None
    a, b, d = clear[int(rng.integers(len(clear)))]
    return position_question((a.color, a.shape), (b.color, b.shape)), d


def _build_place(rng: np.random.Generator, cfg: ShapesConfig) -> Built:
    direction = _choice(rng, DIRECTIONS)
    specs = _pairs(rng, _n_objects(rng, cfg), cfg.shapes, cfg.color_names)
    (sa, ca) = specs[0]
    return Built(specs, "place", place_question((ca, sa)), direction, direction)


def _ask_place(rng: np.random.Generator, objs: list[Obj], cfg: ShapesConfig) -> tuple[str, str] | None:
    clear = [(o, d) for o in objs for d in DIRECTIONS if _clear_place(o, d, cfg)]
    if not clear:
        return None
    o, d = clear[int(rng.integers(len(clear)))]
    return place_question((o.color, o.shape)), d


# kind -> (build, ask); the one place the question kinds branch.
QUESTION_KINDS = {
    "color": (_build_color, _ask_color),
    "count": (_build_count, _ask_count),
    "exist": (_build_exist, _ask_exist),
    "position": (_build_position, _ask_position),
    "place": (_build_place, _ask_place),
}


def _draw_kind(rng: np.random.Generator, cfg: ShapesConfig) -> str:
    return _choice(rng, [k for k, _ in cfg.kind_weights], [w for _, w in cfg.kind_weights])


def _vqa(rng: np.random.Generator, cfg: ShapesConfig) -> tuple[Scene, str, str, str, str]:
    """(scene, kind, subkind, question, answer), the answer drawn first and the scene built around it."""
    kind = _draw_kind(rng, cfg)
    bg = _background(rng, cfg)
    built = QUESTION_KINDS[kind][0](rng, cfg)
    scene = Scene(_layout(rng, cfg, built.specs, built.direction, in_image=kind == "place"), bg)
    return scene, kind, built.subkind, built.question, built.answer


def _scene_question(rng: np.random.Generator, scene: Scene, cfg: ShapesConfig) -> tuple[str, str, str] | None:
    """(kind, question, answer) about an existing scene, answered from it (None when the drawn kind has no
    question here, e.g. no clear relation, or more objects than `position_max_objects`). Answers are as balanced
    as the scene allows: exist is yes half of the time; colour asks about a shape that occurs once; position
    about a clearly separated pair."""
    kind = _draw_kind(rng, cfg)
    asked = QUESTION_KINDS[kind][1](rng, scene.objects, cfg)
    return None if asked is None else (kind, *asked)


# ---------------------------------------------------------------------------------------------------------------
# rendering


def _draw(draw: ImageDraw.ImageDraw, o: Obj, fill) -> None:
    x, y = o.center
    h = o.half
    if o.shape == "circle":
        draw.ellipse([x - h, y - h, x + h, y + h], fill=fill)
    elif o.shape == "square":
        draw.rectangle([x - h, y - h, x + h, y + h], fill=fill)
    elif o.shape == "triangle":
        draw.polygon([(x, y - h), (x + h, y + h), (x - h, y + h)], fill=fill)
    elif o.shape == "cross":
        a = max(1, round(h / 3))
        draw.rectangle([x - h, y - a, x + h, y + a], fill=fill)
        draw.rectangle([x - a, y - h, x + a, y + h], fill=fill)
    else:
        raise ValueError(f"don't know how to draw shape {o.shape!r} (known: circle, square, triangle, cross)")


def render(scene: Scene, cfg: ShapesConfig = DEFAULT_CONFIG) -> np.ndarray:
    """uint8[H, W, 3] image of the scene (no anti-aliasing: every pixel is the background or an object colour)."""
    s = cfg.image_size
    img = Image.new("RGB", (s, s), tuple(scene.background))
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        _draw(draw, o, cfg.rgb(o.color))
    return np.asarray(img, dtype=np.uint8).copy()


def object_mask(scene: Scene, cfg: ShapesConfig = DEFAULT_CONFIG) -> np.ndarray:
    """int8[H, W]: index of the object covering each pixel in ``scene.objects``, -1 for background."""
    s = cfg.image_size
    img = Image.new("L", (s, s), 255)
    draw = ImageDraw.Draw(img)
    for i, o in enumerate(scene.objects):
        _draw(draw, o, i)
    m = np.asarray(img).astype(np.int16)
    m[m == 255] = -1
    return m.astype(np.int8)


# ---------------------------------------------------------------------------------------------------------------
# samples


def _id(prefix: str, split: str, index: int) -> str:
    return f"{prefix}-{split}-{index:06d}"


def _check_index(index: int) -> int:
    index = int(index)
    if index < 0:
        raise IndexError(f"negative index {index}")
    return index


def sample(split: str, index: int, cfg: ShapesConfig = DEFAULT_CONFIG, kind: str = "vqa") -> dict:
    """Sample ``index`` of ``split`` (``kind`` "vqa", "multi" or "caption"); depends only on (split seed,
    index).

    Indices past the split's size are allowed (the stream is unbounded); `generate` stops at the size.
    """
    if kind == "caption":
        return caption_sample(split, index, cfg)
    if kind == "multi":
        return multi_sample(split, index, cfg)
    if kind != "vqa":
        raise ValueError(f"kind must be one of {SAMPLE_KINDS}, got {kind!r}")
    index = _check_index(index)
    rng = np.random.default_rng([cfg.split_seed(split), index])
    scene, qkind, subkind, question, answer = _vqa(rng, cfg)
    return {
        "id": _id("shapes", split, index),
        "image": render(scene, cfg),
        "conversations": [{"from": "human", "value": f"{IMAGE_TOKEN}\n{question}"},
                          {"from": "gpt", "value": answer}],
        "kind": qkind,
        "subkind": subkind,
        "answer": answer,
        "scene": scene,
    }


def multi_sample(split: str, index: int, cfg: ShapesConfig = DEFAULT_CONFIG) -> dict:
    """A multi-turn conversation about the image of VQA sample ``index`` (LLaVA-Instruct style): its question
    first, then ``cfg.turns - 1`` more questions answered from the scene (distinct, drawn from a separate random
    stream). More supervision per image for training; evaluation uses the single-question ``vqa`` samples."""
    s = sample(split, index, cfg)
    rng = np.random.default_rng([cfg.split_seed(split), index, _MULTI_STREAM])
    asked = {question_of(s)}
    turns = list(s["conversations"])
    for _ in range(cfg.max_tries):
        if len(asked) == cfg.turns:
            break
        drawn = _scene_question(rng, s["scene"], cfg)
        if drawn is not None and drawn[1] not in asked:
            asked.add(drawn[1])
            turns += [{"from": "human", "value": drawn[1]}, {"from": "gpt", "value": drawn[2]}]
    return {**s, "id": _id("shapes-multi", split, index), "conversations": turns}


def caption_sample(split: str, index: int, cfg: ShapesConfig = DEFAULT_CONFIG) -> dict:
    """LLaVA-Pretrain style caption sample ``index`` of ``split`` (its own random scene)."""
    index = _check_index(index)
    rng = np.random.default_rng([cfg.split_seed(split), index, _CAPTION_STREAM])
    scene = sample_scene(rng, cfg)
    text = caption(scene)
    return {
        "id": _id("shapes-cap", split, index),
        "image": render(scene, cfg),
        "caption": text,
        "conversations": [{"from": "human", "value": IMAGE_TOKEN}, {"from": "gpt", "value": text}],
        "scene": scene,
    }


def generate(split: str, cfg: ShapesConfig = DEFAULT_CONFIG, kind: str = "vqa") -> Iterator[dict]:
    """The ``cfg.split_size(split)`` samples of ``split`` in index order (``kind`` one of `SAMPLE_KINDS`)."""
    if kind not in SAMPLE_KINDS:
        raise ValueError(f"kind must be one of {SAMPLE_KINDS}, got {kind!r}")
    for i in range(cfg.split_size(split)):
        yield sample(split, i, cfg, kind)


def question_of(s: dict) -> str:
    """The question text of a VQA sample (the human turn without the ``<image>`` line)."""
    q = s["conversations"][0]["value"]
    return q[len(IMAGE_TOKEN) + 1:] if q.startswith(IMAGE_TOKEN + "\n") else q


# ---------------------------------------------------------------------------------------------------------------
# text-only baseline


def text_only_baseline(train_samples: Iterable[dict], test_samples: Iterable[dict]) -> dict[str, dict[str, float]]:
    """Accuracy of a guesser that never sees the image, per kind, next to chance.

    For each exact question string the guesser predicts the most frequent training answer of that string
    (ties: the answer seen first), falling back to the kind's most frequent training answer. Returns
    ``{kind: {"accuracy", "chance", "majority", "n"}}`` for every kind in the test samples plus ``"all"``:
    ``chance`` is 1 / (number of distinct answers of the kind in train and test), ``majority`` the test rate
    of the kind's most frequent test answer.
    """
    by_question: dict[str, Counter] = defaultdict(Counter)
    by_kind: dict[str, Counter] = defaultdict(Counter)
    seen_answers: dict[str, set] = defaultdict(set)
    for s in train_samples:
        by_question[question_of(s)][s["answer"]] += 1
        by_kind[s["kind"]][s["answer"]] += 1
        seen_answers[s["kind"]].add(s["answer"])
    tests = list(test_samples)
    correct: Counter = Counter()
    total: Counter = Counter()
    test_answers: dict[str, Counter] = defaultdict(Counter)
    for s in tests:
        kind, answer, q = s["kind"], s["answer"], question_of(s)
        seen_answers[kind].add(answer)
        test_answers[kind][answer] += 1
        if q in by_question:
            pred = by_question[q].most_common(1)[0][0]
        elif by_kind[kind]:
            pred = by_kind[kind].most_common(1)[0][0]
        else:
            pred = None
        correct[kind] += pred == answer
        total[kind] += 1
    out = {}
    for kind in sorted(total):
        n = total[kind]
        out[kind] = {"accuracy": correct[kind] / n, "chance": 1 / len(seen_answers[kind]),
                     "majority": max(test_answers[kind].values()) / n, "n": n}
    if total:
        n = sum(total.values())
        out["all"] = {"accuracy": sum(correct.values()) / n,
                      "chance": sum(out[k]["chance"] * total[k] for k in total) / n,
                      "majority": sum(out[k]["majority"] * total[k] for k in total) / n, "n": n}
    return out


__all__ = [
    "COUNT_MODES", "DEFAULT_CONFIG", "DIRECTIONS", "EXIST_NEGATIVES", "IMAGE_TOKEN", "KINDS", "NUMBER_WORDS",
    "SAMPLE_KINDS", "SPLITS", "Obj", "Scene", "ShapesConfig", "all_text", "answers", "article", "caption",
    "caption_sample", "color_question", "count_question", "exist_question", "generate", "multi_sample", "object_mask",
    "plural", "position_question", "question_of", "relation", "render", "sample", "sample_scene",
    "text_only_baseline",
]
