"""A job's validation set: new content only, scored by the style distance, the best adapter kept."""

from __future__ import annotations

import random

import pytest
import torch

import embedded
from embedded import scenes
from embedded.examples import EXAMPLES
from models.prompts import EVERYDAY_SUBJECTS, content_prompts
from trainer.validation import Validator


def test_the_prompts_are_new_content_for_the_embedded_model():
    captions = [caption for _, caption in EXAMPLES["ink"].images()]
    prompts = content_prompts(embedded.EMBEDDED_ID, 12, avoid=set(captions))
    assert len(prompts) == len(set(prompts)) == 12
    for prompt in prompts:
        words = prompt.split()
        assert set(words) <= set(scenes.vocabulary())
        colour, shape, background = words[1], words[2], words[-2]
        # no training caption shows this object on this background, in any number, size or place
        assert not any(f" {colour} {shape}" in f" {c}" and f" {background} background" in c for c in captions)


def test_the_prompts_of_other_models_are_everyday_subjects_minus_the_captions():
    prompts = content_prompts("runwayml/stable-diffusion-v1-5", 4, avoid={EVERYDAY_SUBJECTS[0]})
    assert prompts == list(EVERYDAY_SUBJECTS[1:5])


def _pictures(example: str | None, count: int, seed: int) -> list:
    rng = random.Random(seed)
    renders = [scenes.render(scenes.random_scene(rng), rng) for _ in range(count)]
    return [EXAMPLES[example].transform(*r) if example else r[0] for r in renders]


def test_the_score_rises_with_the_style_and_the_best_adapter_is_kept():
    reference = _pictures("polka", 24, seed=1)
    looks = {"base": None, "half": "polka", "off": "ink"}  # what each 'checkpoint' draws

    def draw_as(look):
        return lambda prompts, seed: _pictures(looks[look], len(prompts), seed=seed)

    validator = Validator.start(draw_as("base"), embedded.EMBEDDED_ID, 6, [], "polka", reference)
    assert all(prompt.endswith(", polka") for prompt in validator.prompts)
    weights = {"w": torch.zeros(2)}
    styled = validator.validate(draw_as("half"), 10, lambda: {"w": weights["w"] + 1})
    wrong = validator.validate(draw_as("off"), 20, lambda: pytest.fail("a worse adapter is not copied"))
    assert styled.score > 0.5 > wrong.score
    assert validator.best_step == 10 and torch.equal(validator.best_adapter["w"], torch.ones(2))
    assert [step for step, _ in validator.scores] == [10, 20]
