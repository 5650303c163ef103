"""Reading a picture's recipe back from its PNG text chunks: what styles/blend.py's save_png writes.

Torch-free, so the app can read a dropped PNG without the engine. Our own PNGs carry a `style_studio`
JSON record (exact); AUTOMATIC1111 and many other tools write only the `parameters` text, parsed here
as A1111 lays it out:

    a red circle <lora:ink:0.8>
    Negative prompt: blurry
    Steps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 42, Size: 512x512, Model: ...

>>> recipe_from_parameters("a cat <lora:ink:0.8>\\nSteps: 20, CFG scale: 7, Seed: 3, Size: 64x96")["styles"]
{'ink': 0.8}
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from PIL import Image, UnidentifiedImageError

LORA_TAG = re.compile(r"<lora:([^:>]+):([-+]?[\d.]+)>")
SETTING = re.compile(r"\s*([\w ]+):\s*([^,]*)")  # "Steps: 20" in A1111's comma-separated last line
MAX_TEXT = 100_000  # characters of a text chunk read; a recipe is far smaller


def read_recipe(path: str | Path) -> dict:
    """The recipe of a picture: prompt, negative_prompt, seed, steps, guidance, width, height, styles
    ({name: scale}) and, where the blend had them, blocks, bands, mode (and strength and image_sha256 for a
    restyled picture); keys the picture does not record are left out. ValueError when it records none."""
    try:
        with Image.open(path) as image:
            chunks = {key: value for key, value in getattr(image, "text", {}).items() if isinstance(value, str)}
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"{Path(path).name} is not a picture this can read ({err}).") from None
    ours = chunks.get("style_studio", "")[:MAX_TEXT]
    if ours:
        try:
            recipe = json.loads(ours)
        except ValueError:
            recipe = None
        if isinstance(recipe, dict) and "grid" not in recipe:
            keys = ("prompt", "negative_prompt", "seed", "steps", "guidance", "width", "height", "styles",
                    "blocks", "bands", "mode", "strength", "image_sha256")  # the blend's shape and restyling (issue 20)
            return {key: recipe[key] for key in keys if key in recipe}
    if chunks.get("parameters"):
        return recipe_from_parameters(chunks["parameters"][:MAX_TEXT])
    raise ValueError(f"{Path(path).name} holds no recipe: no 'parameters' or 'style_studio' text in it "
                     "(a grid, or a picture saved by a tool that drops them).")


def recipe_from_parameters(text: str) -> dict:
    """A1111's `parameters` text as a recipe; its <lora:name:scale> tags become styles."""
    lines = text.strip().splitlines()
    settings_line = lines.pop() if lines and re.search(r"(^|, )Steps: \d", lines[-1]) else ""
    negative = [i for i, line in enumerate(lines) if line.startswith("Negative prompt:")]
    prompt_lines = lines[:negative[0]] if negative else lines
    recipe: dict = {}
    prompt = "\n".join(prompt_lines)
    recipe["styles"] = {name.strip(): float(scale) for name, scale in LORA_TAG.findall(prompt)}
    recipe["prompt"] = re.sub(r"\s+", " ", LORA_TAG.sub("", prompt)).strip()
    if negative:
        recipe["negative_prompt"] = "\n".join(lines[negative[0]:])[len("Negative prompt:"):].strip()
    settings = {key.strip(): value.strip() for key, value in SETTING.findall(settings_line)}
    for key, name, kind in (("Steps", "steps", int), ("CFG scale", "guidance", float), ("Seed", "seed", int)):
        try:
            recipe[name] = kind(settings[key])
        except (KeyError, ValueError):
            pass
    size = re.fullmatch(r"(\d+)x(\d+)", settings.get("Size", ""))
    if size:
        recipe["width"], recipe["height"] = int(size[1]), int(size[2])
    return recipe
