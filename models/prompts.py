"""Content prompts a base model draws well, for checking a style on new content (a job's validation set).

A style is judged on content it never saw in training (issue 17): these prompts are checked against
the training captions and none of them is one. For the embedded model they are one-object scenes of
its own world (embedded/scenes.py); for Stable Diffusion bases, everyday subjects of the kind
AUTOMATIC1111 and kohya users put in their sample prompts.
"""

from __future__ import annotations

import itertools
import random

import embedded
from embedded import scenes

EVERYDAY_SUBJECTS = (
    "a lighthouse on a rocky coast",
    "a bowl of fruit on a wooden table",
    "a portrait of an old fisherman",
    "a red bicycle leaning against a wall",
    "a cat sleeping on a windowsill",
    "a mountain lake at dawn",
    "a busy city street in the rain",
    "a cup of coffee and a book",
    "a sailing boat on a calm sea",
    "a cottage in a snowy forest",
)


def content_prompts(model_id: str, count: int, avoid: set[str] = frozenset(), seed: int = 0) -> list[str]:
    """`count` prompts of new content for this base model, none of them one of the captions in `avoid`.

    >>> content_prompts("embedded:tiny-sd-v2", 2)  # doctest: +SKIP
    ['a green star on a white background', 'a big pink ring at the top on a blue background']
    """
    avoid = {caption.strip().lower() for caption in avoid}
    if model_id != embedded.EMBEDDED_ID:
        return [prompt for prompt in EVERYDAY_SUBJECTS if prompt not in avoid][:count]
    result: list[str] = []
    draws = scenes.one_object_draws(random.Random(seed))
    for shape, colour, background in itertools.islice(draws, 1000 * max(count, 1)):  # bounded: `avoid` may hold all
        if len(result) == count:
            break
        prompt = scenes.Scene(shape, colour, background).caption()
        if prompt not in result and not any(_shows(caption, shape, colour, background) for caption in avoid):
            result.append(prompt)
    return result


def _shows(caption: str, shape: str, colour: str, background: str) -> bool:
    """Whether a scene caption names this (shape, colour, background), whatever its count, size or place."""
    padded = f" {caption} "
    return f" {background} background" in padded and any(
        f" {colour} {noun} " in padded for noun in (shape, scenes.PLURALS[shape]))
