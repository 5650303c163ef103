"""Blend several styles on one pipeline, one scale per style, and generate images.

Semantics (pinned by tests/test_blend.py): a style at scale s adds s * (alpha / rank) * B @ A to
each weight it targets; several styles add up; with every scale at 0 the LoRA layers are
bypassed, so the image is the base model's, bit for bit.
"""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from styles.library import StyleLibrary
from trainer.base import Base

SCALE_RANGE = (-2.0, 2.0)
MAX_SIDE = 2048
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 7.5


class Blender:
    """Generate with any mix of library styles on one base pipeline.

    >>> blender = Blender(load_base(), StyleLibrary("workspace"))        # doctest: +SKIP
    >>> images = blender.generate("a red circle", seed=1, styles={"ink": 0.8, "pastel": 0.4})  # doctest: +SKIP
    """

    def __init__(self, base: Base, library: StyleLibrary):
        self.base, self.library = base, library
        self._loaded: dict[str, float] = {}  # adapter name -> mtime of the file it was loaded from
        self._lock = threading.RLock()  # one pipeline: one generation (and adapter change) at a time
        self.warnings: list[str] = []

    def normalise(self, scales: dict[str, float] | None) -> dict[str, float]:
        """Check names and values; raise ValueError listing the available styles. Touches nothing."""
        scales = dict(scales or {})
        available = self.library.names()
        unknown = sorted(name for name in scales if name not in available)
        if unknown:
            raise ValueError(
                f"Unknown style(s): {', '.join(unknown)}. Available styles: {', '.join(available) or 'none yet'}."
            )
        result = {}
        lo, hi = SCALE_RANGE
        for name, value in scales.items():
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"Scale of style {name!r} must be a number, not {value!r}.") from None
            if not math.isfinite(value) or not lo <= value <= hi:
                raise ValueError(f"Scale of style {name!r} is {value}; it must be between {lo} and {hi}.")
            result[name] = value
        return result

    def apply(self, scales: dict[str, float] | None) -> dict[str, float]:
        """Make exactly these styles active at these scales; return the active (non-zero) ones."""
        active = {name: s for name, s in self.normalise(scales).items() if s != 0}
        pipe = self.base.pipe
        with self._lock:
            self._sync(active)
            if active:
                pipe.enable_lora()
                pipe.set_adapters(list(active), list(active.values()))
            elif self._loaded:
                pipe.disable_lora()  # LoRA layers bypassed: exactly the base model
        return active

    @torch.no_grad()
    def generate(
        self,
        prompt: str,
        negative_prompt: str = "",
        seed: int = 0,
        steps: int = DEFAULT_STEPS,
        guidance: float = DEFAULT_GUIDANCE,
        width: int = 0,
        height: int = 0,
        styles: dict[str, float] | None = None,
        num_images: int = 1,
    ) -> list[Image.Image]:
        """Images for a prompt with the given styles blended in; each carries its recipe in .info."""
        width, height = self._check_size(width), self._check_size(height)
        if not 1 <= int(steps) <= 200:
            raise ValueError(f"Steps must be between 1 and 200, not {steps}.")
        with self._lock:
            active = self.apply(styles)
            try:
                images = self.base.pipe(
                    prompt,
                    negative_prompt=negative_prompt or None,
                    num_inference_steps=int(steps),
                    guidance_scale=float(guidance),
                    width=width,
                    height=height,
                    num_images_per_prompt=int(num_images),
                    generator=torch.Generator().manual_seed(int(seed)),
                ).images
            except torch.OutOfMemoryError:
                # The GPU is shared with a training job (a separate process): say so, free what we hold, keep serving.
                torch.cuda.empty_cache()
                raise ValueError(
                    "The GPU ran out of memory for this image, most likely because a style is training on it. "
                    "Wait for the job to finish, or generate fewer or smaller images."
                ) from None
        recipe = {
            "prompt": prompt,
            "negative_prompt": negative_prompt,
            "seed": int(seed),
            "steps": int(steps),
            "guidance": float(guidance),
            "width": width,
            "height": height,
            "styles": active,
            "base_model": self.base.model_id,
        }
        for image in images:
            image.info["style_studio"] = json.dumps(recipe, sort_keys=True)
            image.info["parameters"] = a1111_parameters(recipe)
        return images

    # -- helpers ------------------------------------------------------------------------
    def _sync(self, active: dict[str, float]) -> None:
        """Load the active styles (again, if their file changed); drop adapters whose style is gone."""
        pipe, names = self.base.pipe, set(self.library.names())
        for name in [n for n in self._loaded if n not in names]:
            pipe.delete_adapters(name)
            del self._loaded[name]
        for name in active:
            info = self.library.get(name)
            if self._loaded.get(name) == info.mtime:
                continue
            if info.family and info.family != self.base.family:
                raise ValueError(
                    f"Style {name!r} was trained on a {info.family} model and cannot be used with this "
                    f"{self.base.family} base model ({self.base.model_id})."
                )
            if info.unet_hash and info.unet_hash != self.base.unet_hash:
                self.warnings.append(
                    f"Style {name!r} was trained on {info.base_model or 'another model'}; it may look different here."
                )
            if name in self._loaded:
                pipe.delete_adapters(name)
            pipe.load_lora_weights(str(info.path), adapter_name=name)
            self._loaded[name] = info.mtime

    def _check_size(self, size: int) -> int:
        size = int(size or self.base.resolution)
        unet = self.base.pipe.unet.config
        multiple = self.base.pipe.vae_scale_factor * 2 ** (len(unet.block_out_channels) - 1)
        if size % multiple or not multiple <= size <= MAX_SIDE:
            raise ValueError(f"Width and height must be multiples of {multiple} between {multiple} and {MAX_SIDE}, not {size}.")
        return size


def a1111_parameters(recipe: dict) -> str:
    """The recipe as the 'parameters' text that AUTOMATIC1111 and many viewers read."""
    loras = " ".join(f"<lora:{name}:{scale:g}>" for name, scale in recipe["styles"].items())
    lines = [f"{recipe['prompt']} {loras}".strip()]
    if recipe["negative_prompt"]:
        lines.append(f"Negative prompt: {recipe['negative_prompt']}")
    lines.append(
        f"Steps: {recipe['steps']}, CFG scale: {recipe['guidance']:g}, Seed: {recipe['seed']}, "
        f"Size: {recipe['width']}x{recipe['height']}, Model: {recipe['base_model']}"
    )
    return "\n".join(lines)


def save_png(image: Image.Image, path: str | Path) -> Path:
    """Save as PNG with the recipe from image.info as text chunks."""
    info = PngInfo()
    for key in ("parameters", "style_studio"):
        if key in image.info:
            info.add_text(key, image.info[key])
    path = Path(path)
    image.save(path, format="PNG", pnginfo=info)
    return path
