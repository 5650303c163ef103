"""The procedural scenes behind the embedded model, the example styles, and the colour read-back."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image

from embedded import scenes
from embedded.architecture import WORDS, build_tokenizer
from embedded.examples import EXAMPLES


def test_every_caption_word_is_one_token():
    tokenizer = build_tokenizer()
    rng = random.Random(0)
    for _ in range(200):
        caption = scenes.random_scene(rng).caption()
        assert len(tokenizer.tokenize(caption)) == len(caption.split()), caption
    assert all(len(tokenizer.tokenize(word)) == 1 for word in WORDS)


def test_held_out_pairs_never_appear_in_pretraining_scenes():
    rng = random.Random(1)
    drawn = {(s.shape, s.colour) for s in (scenes.random_scene(rng) for _ in range(3000))}
    assert not drawn & scenes.HELD_OUT
    assert len(drawn) == len(scenes.SHAPES) * len(scenes.COLOURS) - len(scenes.HELD_OUT)


@pytest.mark.parametrize("shape", scenes.SHAPES)
def test_colours_are_read_back_from_rendered_scenes(shape):
    """The quality check's read-back is right on the ground truth, for every shape and colour pair."""
    rng = random.Random(2)
    for colour in scenes.COLOURS:
        for background in [c for c in scenes.COLOURS if c != colour]:
            image, _ = scenes.render(scenes.Scene(shape, colour, background), rng)
            assert scenes.read_colours(image) == (background, colour), (shape, colour, background)


@pytest.mark.parametrize("shape", scenes.SHAPES)
def test_colours_are_read_through_ink_outlines(shape):
    """The style benchmark's content check reads an outlined object as its own colour, not as the
    ink's: small objects, where the 3 px outline covers more pixels than the object itself. Not on
    black, where the outline is background and a small star keeps too few pixels to stand out."""
    rng = random.Random(4)
    for colour in scenes.COLOURS:
        for background in [c for c in scenes.COLOURS if c not in (colour, "black")]:
            image, mask = scenes.render(scenes.Scene(shape, colour, background, size="small"), rng)
            outlined = EXAMPLES["ink"].transform(image, mask)
            assert scenes.read_colours(outlined) == (background, colour), (shape, colour, background)


def test_captions_say_what_is_drawn():
    scene = scenes.Scene("cross", "orange", "blue", count=2, size="small", position="top", texture="striped")
    assert scene.caption() == "two small striped orange crosses at the top on a blue background"
    assert scenes.Scene("star", "red", "orange").caption() == "a red star on an orange background"


@pytest.mark.parametrize("width", [1, 2, 3, 4])
def test_outline_is_a_band_of_the_asked_width_on_the_edge(width):
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))  # a 16 px square
    band = np.asarray(scenes.outline(mask, width)) > 0
    assert band[16, :].sum() == 2 * width  # crossing the square: one band each side
    assert band[16, 16] == 0 and band[0, 0] == 0  # the middle and the far background stay clear


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_example_styles_are_reproducible_and_keep_or_change_colours_as_declared(name, tmp_path):
    example = EXAMPLES[name]
    first, again = example.images(4), example.images(4)
    assert [c for _, c in first] == [c for _, c in again] and all(c.endswith(" background") for _, c in first)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for (a, _), (b, _) in zip(first, again))

    rng = random.Random(3)
    scene = scenes.Scene("square", "green", "white", size="big")
    plain, mask = scenes.render(scene, rng)
    styled = example.transform(plain, mask)
    assert np.abs(np.asarray(styled, float) - np.asarray(plain, float)).mean() > 2  # the style does something
    kept = scenes.read_colours(styled) == ("white", "green")
    assert kept != example.recolours

    files = example.write(tmp_path / name)
    assert len([f for f in files if f.suffix == ".png"]) == len(example.images())
    assert files[1].read_text() == example.images(1)[0][1] + "\n"
