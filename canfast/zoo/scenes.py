"""Synthetic scenes: small RGB images of one or two coloured shapes, with captions and questions.

Everything is a pure function of an integer seed (through :class:`random.Random`), so the data
are the same on every machine; a digest recorded in the tests catches any change. A scene
belongs to exactly one split (train, validation or evaluation), decided by a hash of what it
shows rather than by its seed: two seeds that happen to draw the same picture land in the same
split, so no evaluation image is ever seen in training.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from dataclasses import dataclass

from PIL import Image, ImageDraw

IMAGE_SIZE = 32
QUADRANT = IMAGE_SIZE // 2

SHAPE_KINDS = ("circle", "square", "triangle", "diamond", "cross")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "purple": (165, 60, 205),
}
# Side of the bounding box in pixels; odd so that apexes and bars sit on a pixel centre.
SIZES = {"small": 7, "large": 13}
# The built-in models cut images into 8-pixel patches, four to a quadrant. A small shape lies
# inside one of its quadrant's patches (at one of 4 offsets), so that one patch shows all of it;
# a large one covers the quadrant's centre, give or take a pixel. Tiny vision towers then learn
# shapes in minutes, and positions still vary: 25 placements per quadrant.
PATCH = 8
# Reading order: captions list the shapes in this order, which makes a caption a function of
# the picture alone.
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
BACKGROUND = (16, 16, 16)

CAPTION_PROMPT = "describe the image ."
# Questions name a shape by where it is ("what colour is the shape at the top left ?"), never
# by what it is ("what colour is the circle ?", "is there a circle ?"). Answering the latter
# means matching a word of the question against every patch of the picture, and the answer says
# nothing about either alone: tiny models trained for minutes on a CPU stay at chance on it (we
# measured it: the colour of the wrong shape half of the time), while they read a quadrant
# reliably.
QUESTION_TYPES = ("shape", "colour", "size", "object", "count")

SPLITS = ("train", "validation", "evaluation")
# Out of 20 hash buckets: 16 train, 2 validation, 2 evaluation.
_SPLIT_BUCKETS = {"train": range(0, 16), "validation": range(16, 18), "evaluation": range(18, 20)}


@dataclass(frozen=True)
class Shape:
    """One shape: its kind, colour and size names, its quadrant and its top-left pixel."""

    kind: str
    colour: str
    size: str
    position: str
    x: int
    y: int

    def phrase(self) -> str:
        """How a caption names it: "a small red circle at the top left"."""
        return f"a {self.size} {self.colour} {self.kind} at the {self.position}"


@dataclass(frozen=True)
class QA:
    """A prompt and its answer, with the shape kind it is about (the sample's category)."""

    prompt: str
    answer: str
    category: str
    kind: str  # "caption" or one of QUESTION_TYPES


@dataclass(frozen=True)
class Scene:
    """One picture: one or two shapes of different kinds in different quadrants."""

    seed: int
    shapes: tuple[Shape, ...]

    @property
    def key(self) -> str:
        """What the picture shows, exactly: equal keys mean equal images."""
        return ";".join(f"{s.kind},{s.colour},{s.size},{s.x},{s.y}" for s in self.shapes)

    @property
    def split(self) -> str:
        bucket = int.from_bytes(hashlib.sha256(self.key.encode()).digest()[:8], "big") % 20
        return next(name for name, buckets in _SPLIT_BUCKETS.items() if bucket in buckets)

    def render(self) -> Image.Image:
        image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
        draw = ImageDraw.Draw(image)
        for shape in self.shapes:
            _draw_shape(draw, shape)
        return image

    def caption(self) -> str:
        return " and ".join(shape.phrase() for shape in self.shapes)

    def caption_qa(self) -> QA:
        return QA(CAPTION_PROMPT, self.caption(), self.shapes[0].kind, "caption")

    def question_rng(self, salt: int = 0) -> random.Random:
        """A generator for this scene's questions, independent of the one that drew the scene.

        Reusing the scene's own seed would tie the questions to the picture (the first draw of
        both decides how many shapes there are and which one a question is about), which lets a
        model learn "ask about two shapes, answer about the second" instead of looking.
        """
        digest = hashlib.sha256(f"questions:{self.seed}:{salt}".encode()).digest()
        return random.Random(int.from_bytes(digest[:8], "big"))

    def question(self, kind: str, rng: random.Random) -> QA:
        """A question of the given type about this scene, the details drawn from ``rng``."""
        shape = rng.choice(self.shapes)
        where = f"at the {shape.position}"
        if kind == "shape":
            return QA(f"what shape is {where} ?", shape.kind, shape.kind, kind)
        if kind == "colour":
            return QA(f"what colour is the shape {where} ?", shape.colour, shape.kind, kind)
        if kind == "size":
            return QA(f"how big is the shape {where} ?", shape.size, shape.kind, kind)
        if kind == "object":
            answer = f"a {shape.size} {shape.colour} {shape.kind}"
            return QA(f"what is {where} ?", answer, shape.kind, kind)
        if kind == "count":
            answer = ("one", "two")[len(self.shapes) - 1]
            return QA("how many shapes are there ?", answer, self.shapes[0].kind, kind)
        raise ValueError(f"unknown question type {kind!r}; valid: {', '.join(QUESTION_TYPES)}")

    def questions(self, rng: random.Random) -> list[QA]:
        """One question of every type."""
        return [self.question(kind, rng) for kind in QUESTION_TYPES]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: Shape) -> None:
    side = SIZES[shape.size]
    x0, y0 = shape.x, shape.y
    x1, y1 = x0 + side - 1, y0 + side - 1
    cx, cy = x0 + side // 2, y0 + side // 2
    fill = COLOURS[shape.colour]
    if shape.kind == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=fill)
    elif shape.kind == "square":
        draw.rectangle([x0, y0, x1, y1], fill=fill)
    elif shape.kind == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape.kind == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    elif shape.kind == "cross":
        half = max(1, side // 6)
        draw.rectangle([x0, cy - half, x1, cy + half], fill=fill)
        draw.rectangle([cx - half, y0, cx + half, y1], fill=fill)
    else:
        raise ValueError(f"unknown shape kind {shape.kind!r}")


def make_scene(seed: int) -> Scene:
    """The scene of a seed: one or two shapes, each of its own kind and in its own quadrant."""
    rng = random.Random(seed)
    count = rng.choice((1, 2))
    kinds = rng.sample(SHAPE_KINDS, count)
    quadrants = sorted(rng.sample(range(len(POSITIONS)), count))
    shapes = []
    for kind, quadrant in zip(kinds, quadrants, strict=True):
        size = rng.choice(tuple(SIZES))
        colour = rng.choice(tuple(COLOURS))
        if size == "small":
            patch = rng.randrange(4)
            dx = (patch % 2) * PATCH + rng.randint(0, PATCH - SIZES[size])
            dy = (patch // 2) * PATCH + rng.randint(0, PATCH - SIZES[size])
        else:
            centre = (QUADRANT - SIZES[size]) // 2
            dx, dy = centre + rng.randint(-1, 1), centre + rng.randint(-1, 1)
        shapes.append(
            Shape(
                kind=kind,
                colour=colour,
                size=size,
                position=POSITIONS[quadrant],
                x=(quadrant % 2) * QUADRANT + dx,
                y=(quadrant // 2) * QUADRANT + dy,
            )
        )
    return Scene(seed=seed, shapes=tuple(shapes))


def scenes(split: str, count: int, start: int = 0) -> Iterator[Scene]:
    """The first ``count`` scenes of ``split`` among seeds ``start, start + 1, ...``."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    seed, found = start, 0
    while found < count:
        scene = make_scene(seed)
        seed += 1
        if scene.split == split:
            found += 1
            yield scene


def vocabulary() -> list[str]:
    """Every word a prompt, caption or answer can contain, sorted."""
    words = set(CAPTION_PROMPT.split())
    words |= {"a", "at", "the", "and", "one", "two"}
    words |= set(SHAPE_KINDS) | set(COLOURS) | set(SIZES)
    words |= {w for position in POSITIONS for w in position.split()}
    probe = Scene(seed=-1, shapes=(Shape("circle", "red", "small", POSITIONS[0], 0, 0),))
    rng = random.Random(0)
    for kind in QUESTION_TYPES:
        words |= set(probe.question(kind, rng).prompt.split())
    return sorted(words)
