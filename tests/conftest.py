"""Shared fixtures: tiny image sets made in code, the embedded base model, a trained style."""

from __future__ import annotations

import io
import shutil
import zipfile

import numpy as np
import pytest
from PIL import Image

from styles.library import THUMB_SUFFIX


def pattern_image(seed: int, size: int = 64) -> Image.Image:
    """A deterministic striped picture: enough structure for a style to learn something."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, size=(2, 3))
    stripes = (np.arange(size)[:, None] + np.arange(size)[None, :]) // 8 % 2
    return Image.fromarray(colours[stripes].astype(np.uint8), "RGB")


def png_bytes(image: Image.Image, **save_args) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=save_args.pop("format", "PNG"), **save_args)
    return buffer.getvalue()


@pytest.fixture
def image_folder(tmp_path):
    """Four PNGs in a folder, one with a caption file."""
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        pattern_image(i).save(folder / f"img{i}.png")
    (folder / "img0.txt").write_text("a red circle in zq style")
    return folder


@pytest.fixture
def image_zip(tmp_path, image_folder):
    path = tmp_path / "set.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for file in sorted(image_folder.iterdir()):
            archive.write(file, f"set/{file.name}")
    return path


@pytest.fixture
def base():
    """A fresh embedded base model (training borrows its UNet, so tests get their own)."""
    from models.base import load_base

    return load_base()


@pytest.fixture
def library(tmp_path):
    from styles.library import StyleLibrary

    return StyleLibrary(tmp_path / "workspace")


def train_style(library, name: str, seed: int, steps: int = 6, **overrides):
    """Train a tiny style on a fresh base and save it into `library`; return its StyleInfo.

    No auto-captions and no validation unless asked for: most tests need a style that differs from
    the base, not a good one, and those two steps cost more than the training itself."""
    from models.base import load_base
    from trainer.config import make_config
    from trainer.data import ImageSet
    from trainer.events import Finished
    from trainer.train import train

    images = [pattern_image(seed * 10 + i) for i in range(3)]
    image_set = ImageSet(images=images, captions=[None] * 3, names=["a", "b", "c"])
    settings = {"num_samples": 1, "validation_prompts": 0, "auto_caption": False, **overrides}
    cfg = make_config("Quick", style_name=name, steps=steps, seed=seed, learning_rate=5e-3, **settings)
    events = list(train(cfg, image_set, load_base()))
    assert isinstance(events[-1], Finished), events[-1]
    save_style(library, events[-1])
    return library.get(name)


def save_style(library, finished, overwrite: bool = False):
    """Save the style a Finished event hands back, as the job runner and the CLI do; return its path."""
    return library.save(finished.style_name, finished.adapter.to_bytes(), thumbnail=finished.thumbnail,
                        overwrite=overwrite)


def copy_styles(source, target, *names: str, thumbnails: bool = False) -> None:
    """Copy styles trained once for a module (`source`, a StyleLibrary) into a test's own library `target`: every
    style, or `names`; with `thumbnails`, their pictures too (the Styles tab shows them)."""
    for name in names or source.names():
        shutil.copy(source.path_for(name), target.path_for(name))
        if thumbnails:
            shutil.copy(source.get(name).thumbnail, target.path_for(name).with_suffix(THUMB_SUFFIX))
