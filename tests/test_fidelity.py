"""The style distance used by bench/style_fidelity.py tells styles apart (no model involved)."""

from __future__ import annotations

import random

import pytest

from bench.style_fidelity import monotonic, style_distance
from embedded import scenes
from embedded.examples import EXAMPLES


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
