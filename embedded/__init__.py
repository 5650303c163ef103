"""The embedded default base model and its factory: a tiny Stable-Diffusion-architecture pipeline we pretrain ourselves.

    architecture.py  its architecture and CLIP tokenizer (build_untrained_pipeline)
    pretrain.py      `python -m embedded.pretrain`: the one command that trains it and writes model/
    scenes.py        procedural captioned scenes, its pretraining data
    examples.py      the example styles a new user can train with one click, made from scenes
    captioner.py     `python -m embedded.captioner`: a small CNN that captions pictures of its world (captioner/)
    model/           the result: a diffusers folder with recipe.json, loaded like any other model

It is not part of the training engine: `trainer/` trains on it as on any base model. This module
imports no torch, so the app can name the model (and draw example images) without loading it.
"""

from pathlib import Path

EMBEDDED_ID = "embedded:tiny-sd-v2"  # the model id a style trained on it records
MODEL_DIR = Path(__file__).parent / "model"
