"""A job's validation set: a few fixed held-out prompts and seeds, drawn and scored at every checkpoint (issue 17).

The score is the held-out benchmark's measure (trainer/fidelity.py) on a small scale: the style
distance between the pictures drawn with the adapter and the training images, against the same
distance for the base model's pictures of the same prompts and seeds. 0: the adapter changes
nothing the measure sees; 1: its pictures of new content sit as close to the training images'
look as those do to each other. The run keeps the adapter of its best-scoring checkpoint, so a
run that overfits late still hands back the style at its best.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from PIL import Image

from core.names import with_trigger
from models.prompts import content_prompts
from trainer.events import Validation
from trainer.fidelity import shift, style_distance

VALIDATION_SEED = 1000  # image i of the set always has seed VALIDATION_SEED + i


@dataclass
class Validator:
    prompts: list[str]  # as drawn with the style: content, then the trigger word
    reference: list[Image.Image]  # the training images
    base_distance: float  # the base model's pictures of the same prompts and seeds, to the reference
    scores: list[tuple[int, float]] = field(default_factory=list)  # (step, score) of every validation so far
    best_step: int = 0
    best_adapter: dict[str, torch.Tensor] | None = None
    best_images: list[Image.Image] = field(default_factory=list)  # its pictures (not kept across a resume)

    @classmethod
    def start(cls, draw, model_id: str, count: int, captions: list[str], trigger: str,
              reference: list[Image.Image]) -> Validator:
        """Pick the prompts (none a training caption) and score the base model's own pictures of them.

        `draw(prompts, seed)` draws one picture per prompt with the pipeline as it is (no adapter yet).
        """
        content = content_prompts(model_id, count, avoid=set(captions))
        base_images = draw(content, VALIDATION_SEED)  # as the app draws at scale 0: no trigger word
        return cls([with_trigger(prompt, trigger) for prompt in content], reference,
                   style_distance(base_images, reference) if len(base_images) > 1 else 0.0)

    def restore(self, scores: list[tuple[int, float]], best_step: int, best_adapter: dict | None) -> None:
        """Continue a resumed run's record: its earlier scores and its best adapter so far."""
        self.scores, self.best_step, self.best_adapter = [tuple(s) for s in scores], best_step, best_adapter

    def validate(self, draw, step: int, adapter_state) -> Validation:
        """Draw the prompts with the adapter as it is now, score them, and keep the adapter if it is the best yet.

        `adapter_state()` returns the adapter's state dict; it is called (and copied) only for a new best.
        """
        images = draw(self.prompts, VALIDATION_SEED)
        score = shift(style_distance(images, self.reference), self.base_distance) if len(images) > 1 else 0.0
        is_best = self.best_adapter is None or score > self.best_score
        self.scores.append((step, score))
        if is_best:
            self.best_step, self.best_images = step, images
            self.best_adapter = {k: v.detach().to("cpu", copy=True) for k, v in adapter_state().items()}
        return Validation(step, score, images, self.prompts)

    @property
    def best_score(self) -> float:
        return dict(self.scores).get(self.best_step, float("-inf"))
