"""The embedded base model: committed in the diffusers layout, loaded by stock diffusers, and it draws."""

from __future__ import annotations

import json

import torch
from diffusers import StableDiffusionPipeline

from embedded import MODEL_DIR, scenes
from embedded.architecture import WORDS

MAX_BYTES = 25 * 10**6


def test_model_folder_is_a_small_diffusers_pipeline_with_its_recipe():
    files = [f for f in MODEL_DIR.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) <= MAX_BYTES
    assert {"model_index.json", "recipe.json"} <= {f.name for f in files}
    recipe = json.loads((MODEL_DIR / "recipe.json").read_text())
    assert recipe["command"] == "python -m embedded.pretrain" and recipe["timings"]["total_s"] > 0
    assert sorted(map(tuple, recipe["held_out_pairs"])) == sorted(scenes.HELD_OUT)


def test_stock_diffusers_loads_it_and_the_tokenizer_keeps_every_word_whole():
    pipe = StableDiffusionPipeline.from_pretrained(MODEL_DIR, dtype=torch.float32)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert all(len(pipe.tokenizer.tokenize(word)) == 1 for word in WORDS)


def test_it_draws_the_background_colour_it_is_asked_for():
    """A smoke version of bench/embedded_quality.py: 8 prompts, held-out shape/colour pairs."""
    pipe = StableDiffusionPipeline.from_pretrained(MODEL_DIR, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    asked = [scenes.Scene(shape, colour, bg) for (shape, colour), bg in
             zip(sorted(scenes.HELD_OUT), ["blue", "white", "yellow", "black", "green", "red", "purple"])]
    images = pipe([s.caption() for s in asked], num_inference_steps=20,
                  generator=[torch.Generator().manual_seed(i) for i in range(len(asked))]).images
    read = [scenes.read_colours(image) for image in images]
    assert sum(bg == s.background for (bg, _), s in zip(read, asked)) >= len(asked) - 1, read


def test_stock_diffusers_draws_with_its_defaults():
    """Issue 18: no dtype given, as stock diffusers users load a folder; every part must come out in one dtype."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(MODEL_DIR)
    pipe.set_progress_bar_config(disable=True)
    assert {pipe.text_encoder.dtype, pipe.unet.dtype, pipe.vae.dtype} == {torch.float32}
    image = pipe("a red circle on a blue background", num_inference_steps=2,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (pipe.unet.config.sample_size * pipe.vae_scale_factor,) * 2
