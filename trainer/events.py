"""Typed events that train() yields: small dataclasses, and a module that imports no torch.

Whoever runs training (the job runner, the CLI, a test) decides what to do with them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Started:
    total_steps: int
    num_images: int
    skipped: list[str] = field(default_factory=list)  # "file: reason" for every image left out
    resumed_from: int = 0  # the step a resumed run continues after (0: a fresh run)
    losses: list[float] = field(default_factory=list)  # the loss history up to resumed_from
    notes: list[str] = field(default_factory=list)  # e.g. a damaged checkpoint that was passed over
    captions: list[str] = field(default_factory=list)  # the caption each image is trained with, trigger word included
    image_names: list[str] = field(default_factory=list)  # the images' names, in the same order
    threads: int = 0  # the CPU threads torch trains with (0: not reported)


@dataclass
class Step:
    step: int  # 1-based count of finished steps
    total_steps: int
    loss: float
    lr: float
    it_per_s: float
    eta_s: float


@dataclass
class Sample:
    step: int
    images: list[Any]  # PIL images
    prompts: list[str]


@dataclass
class Validation:
    """The held-out validation set drawn with the adapter at `step`, and its score (trainer/validation.py)."""

    step: int
    score: float  # the style's shift on new content: 0 nothing, 1 as close to the training images as they are
    images: list[Any]  # PIL images, one per prompt
    prompts: list[str]


@dataclass
class Checkpoint:
    step: int
    path: str


@dataclass
class Cancelled:
    step: int
    checkpoint: str | None  # the run can be resumed from it, or kept as a style


@dataclass
class Finished:
    """The run is done and hands its style back: the caller saves `adapter` (styles.formats.StyleAdapter)
    through the library, e.g. `library.save(style_name, adapter.to_bytes(), thumbnail=thumbnail)`."""

    style_name: str
    steps_done: int
    adapter: Any  # styles.formats.StyleAdapter: the LoRA weights and how they were made
    thumbnail: Any = None  # a PIL image: the last sample, else the first training image
    kept_step: int | None = None  # the step the style's weights come from (its best validation, or the last)


@dataclass
class Failed:
    message: str


Event = Started | Step | Sample | Validation | Checkpoint | Cancelled | Finished | Failed
TERMINAL = (Finished, Failed, Cancelled)
