"""Procedural captioned scenes: the pretraining data of the embedded model and of the example styles.

A scene is one to three objects of one shape and colour on a plain background, with an optional
size, position and texture, and a caption that says exactly that ("two small striped red stars at
the left on a blue background"). Rendering is pure PIL at 4x and downsampled, so edges are smooth.

Some (shape, colour) pairs are never drawn in pretraining (HELD_OUT): the quality check asks for
them to see whether the model composes colour and shape instead of remembering pairs.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 170, 60),
    "cyan": (40, 210, 220),
    "blue": (40, 70, 210),
    "purple": (140, 50, 190),
    "pink": (250, 140, 200),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross", "ring")
PLURALS = {shape: shape + "s" for shape in SHAPES} | {"cross": "crosses"}
SIZES = {"small": 0.13, "": 0.21, "big": 0.31}  # object radius as a fraction of the image side
POSITIONS = {"": (0.5, 0.5), "left": (0.28, 0.5), "right": (0.72, 0.5), "top": (0.5, 0.28), "bottom": (0.5, 0.72)}
COUNTS = {"a": 1, "two": 2, "three": 3}
TEXTURES = ("striped", "dotted", "checkered")
INK = (24, 22, 30)  # the colour of drawn outlines

# One colour per shape is never drawn with it in pretraining: 7 of the 70 (shape, colour) pairs.
HELD_OUT = frozenset((shape, list(COLOURS)[(3 * i + 1) % len(COLOURS)]) for i, shape in enumerate(SHAPES))

SUPERSAMPLE = 4


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    count: int = 1
    size: str = ""
    position: str = ""
    texture: str = ""

    def caption(self) -> str:
        count = {1: "a", 2: "two", 3: "three"}[self.count]
        noun = self.shape if self.count == 1 else PLURALS[self.shape]
        words = [count, self.size, self.texture, self.colour, noun]
        if self.position:
            words += ["at", "the", self.position]
        words += ["on", "a", self.background, "background"]
        words = [word for word in words if word]
        # English articles: "an orange star", "on an orange background".
        return " ".join("an" if w == "a" and nxt[0] in "aeiou" else w for w, nxt in zip(words, words[1:] + ["x"]))


def vocabulary() -> list[str]:
    """Every word a scene caption can use (each becomes one token of the embedded tokenizer)."""
    words = {"a", "an", "at", "the", "on", "background"} | set(COUNTS) | set(TEXTURES) | set(COLOURS)
    words |= set(SHAPES) | set(PLURALS.values()) | {w for w in SIZES if w} | {w for w in POSITIONS if w}
    return sorted(words)


def one_object_draws(rng: random.Random) -> Iterator[tuple[str, str, str]]:
    """Endless (shape, colour, background) draws from `rng` that the base draws reliably.

    Pairs kept out of pretraining (HELD_OUT) and objects the colour of their background are skipped.
    A caller may draw more from `rng` between items (sizes, places): the sequence stays reproducible.
    """
    while True:
        shape, colour, background = rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(list(COLOURS))
        if colour != background and (shape, colour) not in HELD_OUT:
            yield shape, colour, background


def random_scene(rng: random.Random, allow_held_out: bool = False) -> Scene:
    while True:
        shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        if allow_held_out or (shape, colour) not in HELD_OUT:
            break
    background = rng.choice([c for c in COLOURS if c != colour])
    count = rng.choices([1, 2, 3], weights=[6, 2, 2])[0]
    size = rng.choice(["small", "", "big"] if count == 1 else ["small", ""])
    position = rng.choice(list(POSITIONS)) if count == 1 else rng.choice(["", "top", "bottom"])
    texture = rng.choice(TEXTURES) if rng.random() < 0.2 else ""
    return Scene(shape, colour, background, count, size, position, texture)


def render(scene: Scene, rng: random.Random, side: int = 64) -> tuple[Image.Image, Image.Image]:
    """The scene as an RGB image and its object mask ("L"), both side x side, with small random jitter."""
    big = side * SUPERSAMPLE
    image = Image.new("RGB", (big, big), _jitter(COLOURS[scene.background], rng))
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    radius = SIZES[scene.size] * (0.85 + 0.3 * rng.random())
    if scene.count > 1:
        radius = min(radius, 0.95 / (2 * scene.count + 1))
    cx, cy = POSITIONS[scene.position]
    for i in range(scene.count):
        x = cx + (i - (scene.count - 1) / 2) * 2.4 * radius
        x += rng.uniform(-0.04, 0.04)
        y = cy + rng.uniform(-0.04, 0.04)
        _draw_shape(draw, scene.shape, x * big, y * big, radius * big, rng.uniform(-12, 12))
    fill = Image.new("RGB", (big, big), _jitter(COLOURS[scene.colour], rng))
    if scene.texture:
        shade = tuple(int(c * 0.45) if sum(COLOURS[scene.colour]) > 200 else min(255, c + 110)
                      for c in fill.getpixel((0, 0)))
        fill.paste(shade, mask=_texture(scene.texture, big, rng))
    image.paste(fill, mask=mask)
    return image.resize((side, side), Image.Resampling.LANCZOS), mask.resize((side, side), Image.Resampling.BOX)


def outline(mask: Image.Image, width: int) -> Image.Image:
    """A band `width` pixels wide centred on the edges of a 0/255 mask (dilated minus eroded)."""
    binary = mask.point(lambda v: 255 if v > 127 else 0)
    # Grow the mask by half the width (rounded up) and shrink it by the rest; the filters take odd sizes.
    outside = binary.filter(ImageFilter.MaxFilter(2 * ((width + 1) // 2) + 1))
    inside = (binary.filter(ImageFilter.MinFilter(2 * (width // 2) + 1)) if width > 1
              else binary)  # MinFilter(1) crashes PIL
    return Image.fromarray((np.asarray(outside) > np.asarray(inside)).astype(np.uint8) * 255, "L")


def _jitter(rgb: tuple[int, int, int], rng: random.Random, amount: int = 12) -> tuple[int, int, int]:
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in rgb)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, x: float, y: float, r: float, angle: float) -> None:
    def polygon(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
        a = math.radians(angle)
        return [(x + px * math.cos(a) - py * math.sin(a), y + px * math.sin(a) + py * math.cos(a)) for px, py in points]

    if shape == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=255)
    elif shape == "ring":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=255)
        draw.ellipse([x - 0.55 * r, y - 0.55 * r, x + 0.55 * r, y + 0.55 * r], fill=0)
    elif shape == "square":
        s = 0.85 * r
        draw.polygon(polygon([(-s, -s), (s, -s), (s, s), (-s, s)]), fill=255)
    elif shape == "diamond":
        draw.polygon(polygon([(0, -r), (0.7 * r, 0), (0, r), (-0.7 * r, 0)]), fill=255)
    elif shape == "triangle":
        draw.polygon(polygon([(0, -r), (0.95 * r, 0.75 * r), (-0.95 * r, 0.75 * r)]), fill=255)
    elif shape == "star":
        points = []
        for k in range(10):
            rr = r if k % 2 == 0 else 0.45 * r
            a = -math.pi / 2 + k * math.pi / 5
            points.append((rr * math.cos(a), rr * math.sin(a)))
        draw.polygon(polygon(points), fill=255)
    elif shape == "cross":
        w = 0.33 * r
        draw.polygon(polygon([(-w, -r), (w, -r), (w, r), (-w, r)]), fill=255)
        draw.polygon(polygon([(-r, -w), (r, -w), (r, w), (-r, w)]), fill=255)
    else:
        raise ValueError(f"Unknown shape {shape!r}")


def _texture(name: str, big: int, rng: random.Random) -> Image.Image:
    """A 0/255 pattern mask: where the texture's second shade goes."""
    period = SUPERSAMPLE * rng.choice([6, 8])
    yy, xx = np.mgrid[0:big, 0:big]
    if name == "striped":
        on = ((xx + yy) % period) < period // 2
    elif name == "dotted":
        cx, cy = xx % period - period / 2, yy % period - period / 2
        on = cx * cx + cy * cy < (period * 0.28) ** 2
    else:  # checkered
        on = ((xx // (period // 2)) + (yy // (period // 2))) % 2 == 0
    return Image.fromarray((on * 255).astype(np.uint8), "L")


# -- reading colours back out of generated images (the quality check) -------------------------
_PALETTE = np.array(list(COLOURS.values()), dtype=np.float32)
_NAMES = list(COLOURS)


def _nearest_index(rgb) -> np.ndarray:
    """Index into the palette of the nearest named colour, for one RGB value or an array of them."""
    return ((_PALETTE - np.asarray(rgb, dtype=np.float32)[..., None, :]) ** 2).sum(axis=-1).argmin(axis=-1)


def nearest_colour(rgb) -> str:
    return _NAMES[int(_nearest_index(rgb))]


def _stand_out(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(background colour, mask of the pixels that differ clearly from it); the background is the border's median."""
    edge = max(1, pixels.shape[0] // 16)
    border = np.concatenate([pixels[:edge].reshape(-1, 3), pixels[-edge:].reshape(-1, 3),
                             pixels[:, :edge].reshape(-1, 3), pixels[:, -edge:].reshape(-1, 3)])
    background = np.median(border, axis=0)
    return background, np.linalg.norm(pixels - background, axis=2) > 60


def object_mask(image: Image.Image) -> Image.Image:
    """The drawn objects of a scene picture as an "L" mask: what stands out from the border, specks removed."""
    stands_out = _stand_out(np.asarray(image.convert("RGB"), dtype=np.float32))[1]
    return Image.fromarray(stands_out.astype(np.uint8) * 255, "L").filter(ImageFilter.MedianFilter(3))


def read_colours(image: Image.Image) -> tuple[str, str | None]:
    """(background colour, object colour) of a one-object scene; object None when nothing stands out.

    The background is the median of the border pixels. The object is the median of its core: the
    central pixels that differ clearly from the background, are at least 2 px inside that region and
    are not black. The core leaves out a dark outline drawn round the object (the ink example style:
    half of its own small objects read black otherwise) and the blurred rim of the object, where
    its colour mixes with the background. A black object, or one too small to have a core, is read
    from all of its pixels.
    """
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    n = pixels.shape[0]
    background, stands_out = _stand_out(pixels)
    middle = slice(n // 4, 3 * n // 4)
    centre = pixels[middle, middle]
    differs = centre[stands_out[middle, middle]]
    if len(differs) < 0.03 * (n // 2) ** 2:
        return nearest_colour(background), None
    # The erosion runs on the whole picture, so an object that crosses the centre's edge keeps its core there.
    inside = np.asarray(Image.fromarray(stands_out.astype(np.uint8) * 255)
                        .filter(ImageFilter.MinFilter(5))) > 0  # 2 px in
    core = centre[inside[middle, middle] & (_nearest_index(centre) != _NAMES.index("black"))]
    if len(core) >= 0.05 * len(differs):
        differs = core
    return nearest_colour(background), nearest_colour(np.median(differs, axis=0))
