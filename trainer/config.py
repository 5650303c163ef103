"""TrainConfig: the single source of truth for one training run.

Every field carries a one-line help (as peft's LoraConfig does); the UI's Advanced
accordion, the CLI and the style file's metadata are all derived from these fields.
This module imports no torch (tests/test_layers.py checks), so the UI and the CLI's --help read it at once.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.files import write_text_atomic
from core.names import ATTENTION_PROJECTIONS, check_style_name, with_trigger

DEFAULT_CAPTION_TEMPLATE = "an image in the style of {trigger}"
DEFAULT_TARGET_MODULES = ATTENTION_PROJECTIONS
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
OPTIMIZERS = ("adamw", "adamw8bit")
LR_SCHEDULES = ("constant", "cosine")
KEEP_CHOICES = ("best", "last")
# the choices of an on/off field: the UI shows a drop-down whose empty value means the preset's
BOOLEANS = (True, False)


def _field(default: Any, help: str, **ui: Any) -> Any:
    """A dataclass field with help text and optional UI hints (min, max, step, choices)."""
    meta = {"help": help, **ui}
    if isinstance(default, (list, tuple, dict)):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    style_name: str = _field("", "Name of the style; letters, digits, '-' and '_' (it becomes the file name).")
    trigger: str = _field("", "Word that calls the style up in prompts; defaults to the style name.")
    caption_template: str = _field(
        DEFAULT_CAPTION_TEMPLATE, "Caption for images without a .txt file; {trigger} is replaced by the trigger word."
    )
    auto_caption: bool = _field(
        True, "Caption the images that have no .txt caption with the base model's captioner, so the style learns "
        "the look rather than the objects; off, or with no captioner available, they get the caption template.",
        choices=BOOLEANS,
    )
    rank: int = _field(
        8, "LoRA rank: capacity of the adapter (file size grows with it).", minimum=1, maximum=256, step=1
    )
    alpha: float = _field(
        0.0, "LoRA alpha: the update is scaled by alpha / rank; 0 means alpha = rank.", minimum=0, maximum=512, step=0.5
    )
    learning_rate: float = _field(3e-4, "AdamW learning rate of the LoRA weights.", minimum=1e-6, maximum=1e-2)
    lr_schedule: str = _field(
        "constant", "constant, or cosine: the learning rate falls to 0 by the last step, so the adapter settles "
        "instead of ending wherever its last noisy steps left it.", choices=LR_SCHEDULES,
    )
    steps: int = _field(1000, "Number of optimisation steps.", minimum=1, maximum=100_000, step=1)
    batch_size: int = _field(4, "Images per step.", minimum=1, maximum=64, step=1)
    resolution: int = _field(
        0, "Training resolution in pixels; 0 uses the base model's native size.", minimum=0, maximum=2048, step=8
    )
    bucketing: bool = _field(
        True, "Aspect-ratio buckets: each picture trains whole at the size nearest its shape (1:2 to 2:1, about "
        "resolution x resolution pixels), so portraits and landscapes keep their edges; off: the centre square.",
        choices=BOOLEANS,
    )
    caption_dropout: float = _field(
        0.1, "Share of steps trained with an empty caption, so the style also holds without its prompt words.",
        minimum=0.0, maximum=1.0,
    )
    min_snr_gamma: float = _field(
        0.0, "Min-SNR loss weighting (Hang et al. 2023): each step's loss weighted by min(SNR, gamma) / SNR, "
        "so the low-noise steps (fine detail) count less; 0 turns it off, 5 is the paper's value.",
        minimum=0.0, maximum=100.0,
    )
    seed: int = _field(
        0, "Random seed; the same seed and data give the same adapter.", minimum=0, maximum=2**31 - 1, step=1
    )
    precision: str = _field(
        "auto", "Frozen weights' dtype: auto picks bf16/fp16 on GPU and fp32 on CPU.", choices=PRECISIONS
    )
    target_modules: list[str] = _field(
        list(DEFAULT_TARGET_MODULES), "UNet attention projections that receive LoRA layers."
    )
    num_samples: int = _field(
        2, "Sample images rendered from fixed prompts and seeds while training.", minimum=0, maximum=8, step=1
    )
    sample_every: int = _field(
        100, "Render the samples every this many steps (0: only at the end).", minimum=0, maximum=100_000, step=1
    )
    validation_prompts: int = _field(
        4, "Held-out content prompts (none of them a training caption) drawn with fixed seeds and scored at every "
        "checkpoint and at the end: how much of the style shows on new content (0: no validation).",
        minimum=0, maximum=16, step=1,
    )
    keep: str = _field(
        "best", "Which adapter the finished style is: best, the checkpoint with the best validation score; "
        "or last, the last step.", choices=KEEP_CHOICES,
    )
    checkpoint_every: int = _field(
        100, "Save a checkpoint (to resume from) and validate every this many steps (0: only at the end).",
        minimum=0, maximum=100_000, step=1,
    )
    keep_checkpoints: int = _field(3, "How many of the newest checkpoints to keep.", minimum=1, maximum=100, step=1)
    # Memory and speed (issue 5). Frozen weights in bf16/fp16, cached latents and text embeddings and
    # SDPA attention need no switch: train() always uses them on a GPU.
    gradient_checkpointing: bool = _field(
        False, "Recompute UNet activations in the backward pass instead of keeping them: "
        "far less GPU memory, slower steps.",
        choices=BOOLEANS,
    )
    optimizer: str = _field(
        "adamw", "adamw, or adamw8bit: 8-bit optimizer states from the optional bitsandbytes package (CUDA GPU only).",
        choices=OPTIMIZERS,
    )
    channels_last: bool = _field(
        False, "Lay the UNet's convolution weights out channels-last (NHWC), "
        "which tensor-core GPUs may convolve faster.",
        choices=BOOLEANS,
    )
    compile: bool = _field(
        False, "torch.compile the UNet: faster steps after a minute or more of compiling at the start (CUDA GPU only).",
        choices=BOOLEANS,
    )
    cuda_graphs: bool = _field(
        True, "Replay the UNet's forward and backward as CUDA graphs, captured at the first step: several times faster "
        "steps on a GPU, where launching thousands of small kernels costs more than running them (CUDA GPU only; "
        "ignored elsewhere and with compile).",
        choices=BOOLEANS,
    )

    # -- derived values -------------------------------------------------------------
    @property
    def lora_alpha(self) -> float:
        return self.alpha or float(self.rank)

    @property
    def trigger_word(self) -> str:
        return self.trigger.strip() or self.style_name

    def caption_for(self, caption: str | None) -> str:
        """The caption trained on: the image's content caption with the trigger word added (as the
        Generate tab adds it to prompts, issue 17), else the template with the trigger filled in.

        >>> TrainConfig(style_name="ink").caption_for("a red star on a blue background")
        'a red star on a blue background, ink'
        """
        if caption and caption.strip():
            return with_trigger(caption.strip(), self.trigger_word)
        return self.caption_template.replace("{trigger}", self.trigger_word)

    def validate(self) -> TrainConfig:
        """Raise ValueError naming every problem at once; return self when all is well."""
        problems = []
        try:
            check_style_name(self.style_name)
        except ValueError as err:
            problems.append(str(err).rstrip("."))
        for f in dataclasses.fields(self):
            lo, hi = f.metadata.get("minimum"), f.metadata.get("maximum")
            value = getattr(self, f.name)
            if lo is not None and value < lo or hi is not None and value > hi:
                problems.append(f"{f.name} = {value} is outside {lo}..{hi}")
            if f.type in (bool, "bool"):
                if not isinstance(value, bool):
                    problems.append(f"{f.name} must be true or false, not {value!r}")
            elif "choices" in f.metadata and value not in f.metadata["choices"]:
                problems.append(f"{f.name} must be one of {', '.join(f.metadata['choices'])}, not {value!r}")
        if self.optimizer == "adamw8bit" and not bitsandbytes_installed():
            problems.append(
                "optimizer adamw8bit needs the optional bitsandbytes package, which is not installed: "
                "`pip install bitsandbytes` (it needs a CUDA GPU), or choose optimizer adamw"
            )
        if not self.target_modules:
            problems.append("target_modules is empty: name at least one of " + ", ".join(DEFAULT_TARGET_MODULES))
        if problems:
            raise ValueError("Invalid training settings: " + "; ".join(problems) + ".")
        return self

    # -- serialisation ----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown training settings: {', '.join(unknown)}. Known: {', '.join(sorted(known))}.")
        return cls(**values)


def read_settings(path: str | Path) -> dict[str, Any]:
    """Field values from a .toml or .json file (a "preset" key is allowed beside the fields)."""
    path = Path(path)
    if path.suffix == ".toml":
        import tomllib

        return tomllib.loads(path.read_text())
    return json.loads(path.read_text())


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`FIELD=VALUE` strings (the CLI's --set) as settings; a value is JSON when it parses, else text.

    >>> parse_overrides(["steps=100", "style_name=ink"])
    {'steps': 100, 'style_name': 'ink'}
    """
    values = {}
    for item in items:
        key, _, raw = item.partition("=")
        try:
            values[key] = json.loads(raw)
        except json.JSONDecodeError:
            values[key] = raw
    return values


def write_settings(path: str | Path, values: dict[str, Any]) -> Path:
    """Write field values as flat TOML (what read_settings and `python -m trainer --config` read back),
    whole or not at all.

    Values are str, int, float, bool or lists of str; JSON's string and array syntax is valid TOML.
    """
    lines = []
    for key, value in values.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (int, float)):
            text = repr(value)
        else:
            text = json.dumps(value, ensure_ascii=False)
        lines.append(f"{key} = {text}")
    return write_text_atomic(path, "\n".join(lines) + "\n")


def bitsandbytes_installed() -> bool:
    """Whether the optional bitsandbytes package (8-bit AdamW) is installed; looked up without importing it."""
    return importlib.util.find_spec("bitsandbytes") is not None


# Presets trade time for quality. Values are overrides on top of the dataclass defaults.
PRESETS: dict[str, dict[str, Any]] = {
    "Quick": {"steps": 200, "rank": 8, "batch_size": 1},
    # The dataclass defaults: rank 8, alpha = rank, lr 3e-4, 1000 steps of 4 images. Chosen with
    # `python -m bench.style_fidelity`: at lr 1e-4 for 500 steps of 1 image the palette and line
    # examples shifted 0.42 and 0.27 (floor 0.5), and with 1 image per step the result hung on the
    # seed (lr 3e-4 for 1500 steps of 1 image shifted ink 0.68 with seed 0 and 0.04 with seed 1):
    # 4 images per step average out that noise. At rank 16 the texture example barely moved below
    # half scale (its distance rose 0.002 at 0.25); rank 8 moves it from the first quarter, with
    # seeds 0 and 1 alike, and the palette and line examples still shift 0.72-0.84.
    "Balanced": {},
    "Best": {"steps": 2000, "rank": 32},
    # What an 8 GB card needs for SD 1.5 at 512 px (`python -m bench.train_speed --arch sd15 --low-memory`
    # measures it). The optimizer is decided here, when the module loads, not at train time: the
    # config is written into the style file and must name the optimizer that actually ran. Without
    # bitsandbytes, AdamW's fp32 moments of SD 1.5's rank-8 adapter (1.6 M weights) take about 10 MB
    # more than 8-bit ones: little next to what checkpointing saves, so plain AdamW is a fine fallback.
    "Low memory": {
        "gradient_checkpointing": True,
        "optimizer": "adamw8bit" if bitsandbytes_installed() else "adamw",
        "batch_size": 1,
        "rank": 8,
    },
}
DEFAULT_PRESET = "Balanced"

# Starting points per base-model family, under the presets (issue 17). The dataclass defaults are
# the embedded model's, chosen by `python -m bench.style_fidelity`; on the real families that bench
# cannot run here, so they follow the community's defaults: learning rate 1e-4 and one image per
# step at the native resolution (diffusers' LoRA training guide, docs/source/en/training/lora.md,
# and examples/text_to_image/README_sdxl.md), rank 16 with alpha half the rank (kohya sd-scripts,
# docs/train_network_README: "network_alpha ... half of network_dim" is the usual advice), and
# about 1500 steps for a 10-50 image set (kohya's repeats x epochs for such sets). A validation
# draws 4 images at full size, so it runs every 250 steps rather than every 100.
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    family: {"learning_rate": 1e-4, "batch_size": 1, "rank": 16, "alpha": 8.0, "steps": 1500,
             "checkpoint_every": 250, "sample_every": 250}
    for family in ("sd1", "sd2", "sdxl")
}


def make_config(preset: str = DEFAULT_PRESET, family: str | None = None, **overrides: Any) -> TrainConfig:
    """A TrainConfig from a family's defaults, a preset on top, and explicit overrides on top of both.

    `family` is the base model's ("sd1", "sd2", "sdxl"); None or "embedded" for the embedded model.
    >>> make_config("Quick", style_name="ink", steps=10).steps
    10
    >>> make_config("Balanced", family="sdxl").learning_rate
    0.0001
    """
    if preset not in PRESETS:
        raise ValueError(f"Unknown preset {preset!r}; choose one of {', '.join(PRESETS)}.")
    return TrainConfig.from_dict({**FAMILY_DEFAULTS.get(family or "", {}), **PRESETS[preset], **overrides})


def config_fields() -> list[dataclasses.Field]:
    """The TrainConfig fields, for UIs and CLIs that derive their controls from them."""
    return list(dataclasses.fields(TrainConfig))
