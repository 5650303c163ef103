"""What a blend asks of each style beyond its scale (issue 20): strength per UNet block, the part of the
denoising it is on for, and how the styles' updates combine. Pure functions and checks; styles/blend.py
applies them.

- Blocks: a style's scale times a factor per block of the UNet: "down", "mid", "up", or one resolution
  level ("down.0", "up.2"; a level's factor wins over its group's), "text" for the text encoders. Presets
  name what they do: style and content live in different blocks (B-LoRA, arXiv 2403.14572: the look in
  the up blocks, the layout in the down blocks).
- Bands: a style on from `start` to `end` (fractions of the denoising steps): content forms in the early
  steps and style in the later ones (Multi-LoRA Composition, arXiv 2402.16843), so a style from 0.3 on
  leaves the composition to the prompt.
- Modes: "sum" adds the updates (what AUTOMATIC1111, ComfyUI and diffusers' set_adapters compute);
  "ties" and "elect" elect a sign per weight and drop the updates that disagree with it, so two styles do
  not cancel each other where they pull apart (TIES-Merging, Yadav et al. 2023, arXiv 2306.01708); "ties"
  then averages the updates that agree, "elect" adds them.
"""

from __future__ import annotations

import math
import re

import torch

from core.names import brief

BLOCK_PRESETS = {
    "all": {},
    "look only": {"down": 0.0, "mid": 0.0, "up": 1.0, "text": 0.0},
    "layout only": {"down": 1.0, "mid": 1.0, "up": 0.0, "text": 1.0},
}
BLOCK_KEY = re.compile(r"^(down|up)(\.\d+)?$|^mid$|^text$|^other$")
MODES = ("sum", "ties", "elect")
FACTOR_RANGE = (-2.0, 2.0)
_LEVEL = re.compile(r"^unet\.(down|up)_blocks\.(\d+)\.")


def block_keys(layer: str) -> tuple[str, ...]:
    """The block keys a layer answers to, the most specific first: 'unet.up_blocks.1.…' -> ('up.1', 'up')."""
    if match := _LEVEL.match(layer):
        return f"{match[1]}.{match[2]}", match[1]
    if layer.startswith("unet.mid_block."):
        return ("mid",)
    if layer.startswith("text_encoder"):
        return ("text",)
    return ("other",)  # conv_in, the time embedding, conv_out


def block_factor(layer: str, blocks: dict[str, float]) -> float:
    """The factor a style's scale is multiplied by on `layer` (1 where `blocks` says nothing). `blocks` is
    check_blocks' table: a preset's name would be searched as text, and silently say nothing."""
    if not isinstance(blocks, dict):
        raise TypeError(f"blocks must be a {{block: factor}} table from check_blocks, not {blocks!r}")
    return next((blocks[key] for key in block_keys(layer) if key in blocks), 1.0)


def check_blocks(value, style: str) -> dict[str, float]:
    """A style's block setting: a preset's name, or {block key: factor}; ValueError naming what is wrong."""
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        if value not in BLOCK_PRESETS:
            raise ValueError(f"Blocks of style {style!r} is {brief(value)}: not a preset. "
                             f"Use one of {', '.join(BLOCK_PRESETS)}, or {{block: factor}}.")
        return dict(BLOCK_PRESETS[value])
    if not isinstance(value, dict):
        raise ValueError(f"Blocks of style {style!r} is {brief(value)}: send a preset's name or "
                         '{"down": 0, "mid": 0.5, "up": 1, "up.1": 1.2, "text": 1}.')
    result = {}
    for key, factor in value.items():
        if not isinstance(key, str) or not BLOCK_KEY.match(key):
            raise ValueError(f"Block {brief(key)} of style {style!r} is not a block: use down, mid, up, text, other "
                             "or a level such as down.0 or up.2.")
        result[key] = _factor(factor, f"Block {key} of style {style!r}")
    return result


def check_band(value, style: str) -> tuple[float, float]:
    """A style's step band: (start, end), fractions of the steps with 0 <= start < end <= 1; None: all steps."""
    if value is None or value == "":
        return 0.0, 1.0
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise ValueError(f"Steps of style {style!r} is {brief(value)}: send [start, end], fractions of the "
                         "denoising steps, e.g. [0.3, 1] for on from 30 % of the steps.")
    start, end = (_number(v, f"Steps of style {style!r}") for v in value)
    if not 0 <= start < end <= 1:
        raise ValueError(f"Steps of style {style!r} is [{start:g}, {end:g}]: use 0 <= start < end <= 1.")
    return start, end


def check_mode(value) -> str:
    mode = value or "sum"
    if mode not in MODES:
        raise ValueError(f"Blend mode is {brief(mode)}: use one of {', '.join(MODES)}.")
    return mode


def segments(bands: dict[str, tuple[float, float]], steps: int) -> list[tuple[int, frozenset[str]]]:
    """(first step, styles on) for each run of steps with the same styles on, in order. Step k of `steps` is
    in a band when start <= k / steps < end, as diffusers counts steps from 0."""
    runs: list[tuple[int, frozenset[str]]] = []
    for step in range(steps):
        on = frozenset(name for name, (start, end) in bands.items() if start <= step / steps < end)
        if not runs or runs[-1][1] != on:
            runs.append((step, on))
    return runs


def merge(deltas: list[torch.Tensor], mode: str) -> torch.Tensor:
    """The styles' scaled updates of one layer combined: "sum", or TIES' sign election (Yadav et al. 2023,
    section 3) followed by its disjoint mean ("ties") or a disjoint sum ("elect").

    Per weight, the sign with the larger total wins and the updates of the other sign are dropped; those that
    agree are averaged (ties) or added (elect: each style keeps its strength where it is not opposed).
    Trimming to the largest values is left out: a LoRA update is dense and low-rank, and trimming weakens
    each style alone. With one style its update is unchanged in every mode.
    """
    if mode == "sum" or len(deltas) == 1:
        return sum(deltas[1:], deltas[0])
    stacked = torch.stack(deltas)
    sign = torch.sign(stacked.sum(0))
    agree = (torch.sign(stacked) == sign) & (stacked != 0)
    kept = (stacked * agree).sum(0)
    return kept / agree.sum(0).clamp(min=1) if mode == "ties" else kept


def _factor(value, name: str) -> float:
    number = _number(value, name)
    lo, hi = FACTOR_RANGE
    if not lo <= number <= hi:
        raise ValueError(f"{name} is {number:g}: use a factor from {lo:g} to {hi:g}.")
    return number


def _number(value, name: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} is {brief(value)}: not a number.") from None
    if isinstance(value, bool) or not math.isfinite(number):
        raise ValueError(f"{name} is {brief(value)}: not a finite number.")
    return number
