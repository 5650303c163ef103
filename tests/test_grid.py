"""The scale grid (styles/grid.py): its layout on plain pictures, then on the embedded model with two styles."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from styles.blend import Blender, save_png
from styles.grid import MAX_CELLS, MIN_CELL_SIDE, PAD, compose, draw_grid, numbers
from styles.library import StyleLibrary
from tests.conftest import copy_styles, train_style

COLOURS = [(200, 30, 30), (30, 160, 60), (40, 60, 200), (220, 200, 40), (140, 40, 160), (30, 180, 190)]


def _pictures(rows: int, columns: int, size: int = 64) -> list[list[Image.Image]]:
    """Plain squares, each with a one-pixel dot in its corner, so a crop shows whether the picture is whole."""
    pictures = []
    for r in range(rows):
        pictures.append([])
        for c in range(columns):
            picture = Image.new("RGB", (size, size), COLOURS[(r * columns + c) % len(COLOURS)])
            picture.putpixel((size - 1, size - 1), (0, 0, 0))
            pictures[-1].append(picture)
    return pictures


def _has_ink(sheet: Image.Image, box) -> bool:
    """Whether a region of the white sheet has dark (label) pixels."""
    return bool((np.asarray(sheet.crop(box).convert("L")) < 128).any())


def test_every_picture_is_shown_whole_scaled_up_by_a_whole_factor_under_its_labels():
    pictures = _pictures(2, 3)
    sheet, boxes = compose(pictures, ["ink", "polka"], ["scale 0", "scale 0.5", "scale 1"], "a red circle")
    factor = -(-MIN_CELL_SIDE // 64)  # 64 px pictures: 3x, nearest neighbour
    assert factor == 3 and len(boxes) == 2 and all(len(row) == 3 for row in boxes)
    for r, row in enumerate(boxes):
        for c, (left, top, right, bottom) in enumerate(row):
            assert (right - left, bottom - top) == (64 * factor, 64 * factor)
            expected = pictures[r][c].resize((192, 192), Image.Resampling.NEAREST)
            assert np.array_equal(np.asarray(sheet.crop((left, top, right, bottom))), np.asarray(expected))
    # Cells do not overlap and the sheet ends one gap after the last of them.
    assert boxes[0][1][0] - boxes[0][0][2] == PAD and boxes[1][0][1] - boxes[0][0][3] == PAD
    assert sheet.size == (boxes[0][-1][2] + PAD, boxes[-1][0][3] + PAD)
    # A label above every column, beside every row, and the title on top.
    for left, top, right, _ in boxes[0]:
        assert _has_ink(sheet, (left, top - 2 * PAD - 16, right, top))
    for row in boxes:
        assert _has_ink(sheet, (0, row[0][1], row[0][0], row[0][3]))
    assert _has_ink(sheet, (0, 0, sheet.width, PAD + 16))


def test_big_pictures_are_not_scaled_and_long_labels_are_cut():
    sheet, boxes = compose(_pictures(1, 2, size=256), ["a-very-long-style-name-" * 4], ["scale 0", "scale 1"])
    left, top, right, bottom = boxes[0][0]
    assert (right - left, bottom - top) == (256, 256)
    assert left < 240  # the row label was cut to MAX_LABEL_WIDTH, not the whole 92 characters wide


@pytest.mark.parametrize("text,kind,expected", [
    ("0, 0.25, 0.5, 0.75, 1", float, [0.0, 0.25, 0.5, 0.75, 1.0]),
    ("-1 1", float, [-1.0, 1.0]),
    ([0, "1.5"], float, [0.0, 1.5]),
    ("3, 4,5", int, [3, 4, 5]),
])
def test_numbers_are_read_from_text_or_lists(text, kind, expected):
    assert numbers(text, kind, "Scales") == expected


@pytest.mark.parametrize("text,kind,message", [
    ("0, half", float, "'half' is not one"),
    ("1.5", int, "Seeds must be whole numbers"),
    ("", float, "give at least one value"),
    ("nan", float, "'nan' is not one"),
])
def test_bad_numbers_are_refused_by_name(text, kind, message):
    with pytest.raises(ValueError, match=message):
        numbers(text, kind, "Seeds" if kind is int else "Scales")


# -- on the embedded model ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    library = StyleLibrary(tmp_path_factory.mktemp("trained"))
    train_style(library, "ink", seed=1, steps=4, num_samples=0)
    train_style(library, "pastel", seed=2, steps=4, num_samples=0, trigger="pstl")
    return library


@pytest.fixture
def blender(library, base, trained):
    copy_styles(trained, library)
    return Blender(base, library)


def test_a_style_grid_draws_each_style_alone_at_each_scale(blender, tmp_path):
    grid = draw_grid(blender, "a red circle", rows="styles", styles=["ink", "pastel"], scales=[0, 0.5, 1], seed=3,
                     steps=2)
    recipe = json.loads(grid.info["style_studio"])
    cells = recipe["grid"]["cells"]
    assert recipe["grid"]["row_labels"] == ["ink", "pastel"] and recipe["grid"]["scales"] == [0, 0.5, 1]
    assert [(c["row"], c["scale"], c["styles"], c["seed"]) for c in cells] == [
        ("ink", 0, {}, 3), ("ink", 0.5, {"ink": 0.5}, 3), ("ink", 1, {"ink": 1.0}, 3),
        ("pastel", 0, {}, 3), ("pastel", 0.5, {"pastel": 0.5}, 3), ("pastel", 1, {"pastel": 1.0}, 3),
    ]
    # The trigger word of the style in use joins the prompt; the 0 column is the base model's prompt as written.
    assert [c["prompt"] for c in cells[3:]] == ["a red circle", "a red circle, pstl", "a red circle, pstl"]
    # Every cell is its picture, whole: 64 px drawn 3x; the two scale-0 cells are the same base picture.
    boxes = [c["box"] for c in cells]
    assert all((b[2] - b[0], b[3] - b[1]) == (192, 192) for b in boxes)
    first = np.asarray(grid.crop(boxes[0]))
    assert np.array_equal(first, np.asarray(grid.crop(boxes[3])))
    alone = blender.generate("a red circle, ink", seed=3, steps=2, styles={"ink": 1.0}, add_triggers=False)[0]
    assert np.array_equal(np.asarray(grid.crop(boxes[2])),
                          np.asarray(alone.resize((192, 192), Image.Resampling.NEAREST)))
    assert not np.array_equal(first, np.asarray(grid.crop(boxes[2])))
    # Saved like any generated picture: the recipe in its text chunks, A1111's X/Y plot line included.
    saved = Image.open(save_png(grid, tmp_path / "grid.png"))
    assert json.loads(saved.text["style_studio"]) == recipe
    assert "X/Y plot, X Type: Scale, X Values: 0, 0.5, 1, Y Type: Style, Y Values: ink, pastel" in saved.text[
        "parameters"]


def test_a_seed_grid_draws_the_styles_together_per_seed(blender):
    grid = draw_grid(blender, "a blue square", rows="seeds", styles=["ink", "pastel"], scales=[0, 1], seeds=[1, 2],
                     steps=2, add_triggers=False)
    cells = json.loads(grid.info["style_studio"])["grid"]["cells"]
    assert [(c["row"], c["seed"], c["styles"]) for c in cells] == [
        ("seed 1", 1, {}), ("seed 1", 1, {"ink": 1.0, "pastel": 1.0}),
        ("seed 2", 2, {}), ("seed 2", 2, {"ink": 1.0, "pastel": 1.0}),
    ]
    assert {c["prompt"] for c in cells} == {"a blue square"}  # add_triggers=False: the prompt as written
    assert not np.array_equal(np.asarray(grid.crop(cells[0]["box"])), np.asarray(grid.crop(cells[2]["box"])))


@pytest.mark.parametrize("settings,message", [
    (dict(rows="seeds", seeds=list(range(13))), f"13 rows x 5 scales = 65 pictures; at most {MAX_CELLS}"),
    (dict(styles=["ink", "gone"]), "Unknown style.*gone.*Available styles: ink, pastel"),
    (dict(scales=[0, 3]), "between -2.0 and 2.0"),
    (dict(rows="columns"), "Rows must be one of styles, seeds"),
    (dict(styles=[]), "Choose at least one style"),
])
def test_bad_grids_are_refused_before_anything_is_drawn(blender, monkeypatch, settings, message):
    def no_drawing(*args, **kwargs):
        raise AssertionError("drew a picture")

    monkeypatch.setattr(blender, "generate", no_drawing)
    with pytest.raises(ValueError, match=message):
        draw_grid(blender, "a red circle", **{"styles": ["ink"], **settings})
