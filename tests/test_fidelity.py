"""The style distance (trainer/fidelity.py) tells styles apart, and the held-out benchmark's parts do what
they say (no model involved)."""

from __future__ import annotations

import random

import pytest

from bench.style_fidelity import held_out_scenes, ideal
from embedded import scenes
from embedded.examples import EXAMPLES
from trainer.fidelity import monotonic, paired_distance, shift, style_distance


def plain_images(count: int, seed: int) -> list:
    rng = random.Random(seed)
    return [scenes.render(scenes.random_scene(rng), rng)[0] for _ in range(count)]


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_a_style_is_nearer_to_itself_than_plain_scenes_or_other_styles_are(name):
    reference = [image for image, _ in EXAMPLES[name].images()]
    same_style = [image for image, _ in EXAMPLES[name].images(seed=99)]
    own = style_distance(same_style, reference)
    assert own < 0.9 * style_distance(plain_images(24, seed=5), reference)
    for other in EXAMPLES:
        if other != name:
            assert own < 0.9 * style_distance([i for i, _ in EXAMPLES[other].images(seed=99)], reference)


def test_monotonic():
    assert monotonic([3, 2, 2, 1]) and not monotonic([3, 4, 1])
    assert monotonic([1, 2, 3], decreasing=False)


def test_the_held_out_prompts_never_appear_in_any_examples_training_data():
    trained = {(s.shape, s.colour, s.background) for e in EXAMPLES.values() for s, _, _ in e.scenes()}
    held_out = held_out_scenes()
    assert len(held_out) == len(set(held_out)) == 24
    assert not {(s.shape, s.colour, s.background) for s in held_out} & trained
    assert all(s.count == 1 and (s.shape, s.colour) not in scenes.HELD_OUT for s in held_out)


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_a_perfect_transfer_scores_near_1_on_the_paired_distance_and_plain_pictures_do_not(name):
    rng = random.Random(3)
    plain = [scenes.render(scene, rng)[0] for scene in held_out_scenes(8)]
    ideals = [ideal(EXAMPLES[name], image) for image in plain]
    assert paired_distance(ideals, ideals) == 0
    assert shift(paired_distance(ideals, ideals), paired_distance(plain, ideals)) == 1
    other = next(o for o in EXAMPLES if o != name)
    wrong = [ideal(EXAMPLES[other], image) for image in plain]
    assert paired_distance(wrong, ideals) > 0.5 * paired_distance(plain, ideals)


def test_the_object_mask_covers_the_drawn_object():
    rng = random.Random(4)
    image, mask = scenes.render(scenes.Scene("square", "red", "blue", size="big"), rng)
    found = scenes.object_mask(image)
    overlap = sum(1 for a, b in zip(found.getdata(), mask.getdata()) if (a > 127) == (b > 127))
    assert overlap / (64 * 64) > 0.95
