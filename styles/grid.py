"""A scale grid, as AUTOMATIC1111's X/Y plot draws it: one picture per (row, scale), composed into one labelled PNG.

Columns are scales. In every cell, each style of its row is at the column's scale and every other
style is off:

- rows = "styles": one row per style, that style alone; one seed for the whole grid. A row shows
  what the style does as it grows; a column compares the styles at the same strength.
- rows = "seeds": one row per seed, the chosen styles together, all at the column's scale. It shows
  whether a look holds across seeds, not only on the one picked.

The scale-0 column is the base model's own picture of the prompt (no style, no trigger word). The PNG
carries its recipe as every generated image does (`styles.blend.save_png`): the first cell's
AUTOMATIC1111 "parameters" plus an X/Y plot line, and "style_studio" JSON with every cell's prompt,
seed, styles and its box in the picture.

>>> grid = draw_grid(blender, "a red circle", rows="styles", styles=["ink", "polka"], seed=3)  # doctest: +SKIP
>>> save_png(grid, "grid.png")                                                             # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

from styles.blend import Blender, a1111_parameters

ROWS = ("styles", "seeds")
DEFAULT_SCALES = (0.0, 0.25, 0.5, 0.75, 1.0)
DEFAULT_SEEDS = (0, 1, 2)
MAX_CELLS = 64  # pictures in one grid: bounds the work of one click (64 x 20 steps is a minute on the embedded model)
MIN_CELL_SIDE = 160  # smaller pictures are scaled up by a whole factor (nearest neighbour), so 64 px stays legible
LABEL_SIZE = 16  # px, the labels' font
PAD = 6  # px around labels and between cells
MAX_LABEL_WIDTH = 220  # px; longer row labels are cut with an ellipsis
BACKGROUND, INK = (255, 255, 255), (20, 20, 20)


def numbers(value, kind: type, what: str) -> list:
    """'0, 0.25, 1' (or a list) as numbers of `kind`; ValueError naming `what` otherwise.

    >>> numbers("0, 0.5 1", float, "Scales"), numbers([3, "4"], int, "Seeds")
    ([0.0, 0.5, 1.0], [3, 4])
    """
    parts = value.replace(",", " ").split() if isinstance(value, str) else list(value or [])
    result = []
    for part in parts:
        try:
            number = float(part)
            if not math.isfinite(number) or (kind is int and not number.is_integer()):
                raise ValueError
        except (TypeError, ValueError):
            raise ValueError(f"{what} must be {'whole numbers' if kind is int else 'numbers'} separated by commas; "
                             f"{part!r} is not one.") from None
        result.append(kind(number))
    if not result:
        raise ValueError(f"{what}: give at least one value, e.g. {', '.join(map(str, DEFAULT_SCALES))}.")
    return result


def plan(blender: Blender, rows: str, styles: Sequence[str], scales: Sequence[float], seeds: Sequence[int],
         seed: int) -> list[tuple[str, int, list[dict[str, float]]]]:
    """(row label, seed, the {style: scale} of each column) for every row; checks everything before any drawing."""
    if rows not in ROWS:
        raise ValueError(f"Rows must be one of {', '.join(ROWS)}, not {rows!r}.")
    styles = list(dict.fromkeys(styles))  # in order, once each
    if not styles:
        raise ValueError("Choose at least one style for the grid (train one in the Train tab first).")
    if rows == "styles":
        table = [(name, int(seed), [{name: scale} for scale in scales]) for name in styles]
    else:
        table = [(f"seed {s}", int(s), [dict.fromkeys(styles, scale) for scale in scales]) for s in seeds]
    cells = len(table) * len(scales)
    if cells > MAX_CELLS:
        raise ValueError(f"That grid is {len(table)} rows x {len(scales)} scales = {cells} pictures; at most "
                         f"{MAX_CELLS} are drawn at once. Use fewer {rows} or scales.")
    for _, _, blends in table:
        for blend in blends:
            blender.normalise(blend)  # unknown styles and scales out of range, named, before anything is drawn
    return table


def draw_grid(blender: Blender, prompt: str, rows: str = "styles", styles: Sequence[str] = (),
              scales: Sequence[float] = DEFAULT_SCALES, seeds: Sequence[int] = DEFAULT_SEEDS, seed: int = 0,
              **options) -> Image.Image:
    """The grid as one PNG-ready image (recipe in .info); `options` go to Blender.generate (steps, guidance,
    width, height, negative_prompt, add_triggers)."""
    table = plan(blender, rows, styles, scales, seeds, seed)
    pictures, recipes = [], []
    for _, row_seed, blends in table:
        drawn = [blender.generate(prompt, seed=row_seed, styles=blend, **options)[0] for blend in blends]
        pictures.append(drawn)
        recipes.append([json.loads(image.info["style_studio"]) for image in drawn])
    row_labels = [label for label, _, _ in table]
    column_labels = [f"scale {scale:g}" for scale in scales]
    title = f"{prompt}  ·  " + (f"styles: {' + '.join(dict.fromkeys(styles))}" if rows == "seeds" else f"seed {seed}")
    grid, boxes = compose(pictures, row_labels, column_labels, title)

    first = recipes[0][0]
    cells = [
        {"row": label, "scale": scale, "box": boxes[r][c],
         **{key: recipes[r][c][key] for key in ("prompt", "seed", "styles")}}
        for r, label in enumerate(row_labels) for c, scale in enumerate(scales)
    ]
    recipe = {key: first[key] for key in ("negative_prompt", "steps", "guidance", "width", "height", "base_model")}
    recipe |= {"prompt": prompt, "grid": {"rows": rows, "row_labels": row_labels, "scales": list(scales),
                                          "styles": list(dict.fromkeys(styles)), "cells": cells}}
    grid.info["style_studio"] = json.dumps(recipe, sort_keys=True)
    y_values = ", ".join(row_labels if rows == "styles" else [str(s) for _, s, _ in table])
    grid.info["parameters"] = (a1111_parameters(first) + f"\nScript: X/Y plot, X Type: Scale, X Values: "
                               f"{', '.join(f'{s:g}' for s in scales)}, Y Type: {rows[:-1].capitalize()}, "
                               f"Y Values: {y_values}")
    return grid


def compose(pictures: list[list[Image.Image]], row_labels: list[str], column_labels: list[str],
            title: str = "") -> tuple[Image.Image, list[list[list[int]]]]:
    """Pictures (rows of equal-sized images) on one white sheet with a title, column and row labels.

    Each picture is shown whole, scaled up by a whole factor with nearest-neighbour sampling when it is
    smaller than MIN_CELL_SIDE. Returns the sheet and each cell's box [left, top, right, bottom].
    """
    width, height = pictures[0][0].size
    factor = max(1, math.ceil(MIN_CELL_SIDE / max(width, height)))
    cell_w, cell_h = width * factor, height * factor
    font = ImageFont.load_default(size=LABEL_SIZE)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = LABEL_SIZE + 2 * PAD
    row_labels = [_fit(measure, label, font, MAX_LABEL_WIDTH) for label in row_labels]
    label_w = int(max(measure.textlength(label, font=font) for label in row_labels)) + 2 * PAD
    columns = len(column_labels)
    sheet_w = label_w + columns * (cell_w + PAD) + PAD
    top = (line_h if title else 0) + line_h
    sheet = Image.new("RGB", (sheet_w, top + len(row_labels) * (cell_h + PAD) + PAD), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((PAD, PAD), _fit(draw, title, font, sheet_w - 2 * PAD), font=font, fill=INK)
    for c, label in enumerate(column_labels):
        left = label_w + PAD + c * (cell_w + PAD)
        text = _fit(draw, label, font, cell_w)
        draw.text((left + (cell_w - draw.textlength(text, font=font)) / 2, top - line_h + PAD), text, font=font,
                  fill=INK)
    boxes = []
    for r, (label, row) in enumerate(zip(row_labels, pictures)):
        y = top + PAD + r * (cell_h + PAD)
        draw.text((PAD, y + (cell_h - LABEL_SIZE) / 2), label, font=font, fill=INK)
        boxes.append([])
        for c, picture in enumerate(row):
            x = label_w + PAD + c * (cell_w + PAD)
            sheet.paste(picture.convert("RGB").resize((cell_w, cell_h), Image.Resampling.NEAREST), (x, y))
            boxes[-1].append([x, y, x + cell_w, y + cell_h])
    return sheet, boxes


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: float) -> str:
    """`text`, cut with an ellipsis to fit `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"
