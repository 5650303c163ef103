"""Blending semantics: zero scales are the base model bit for bit; a scale s adds s*(alpha/r)*B@A; styles add."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from styles import formats
from styles.blend import Blender
from tests.conftest import train_style

LAYER = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v"


@pytest.fixture
def blender(library, base):
    train_style(library, "ink", seed=1, rank=4, alpha=8.0)  # alpha != rank on purpose
    train_style(library, "pastel", seed=2, rank=8)
    return Blender(base, library)


def _image(blender, styles, seed=5):
    return np.asarray(blender.generate("a red circle", seed=seed, steps=8, styles=styles)[0])


def _lora_delta(library, name):
    """alpha/rank * B @ A of LAYER, read straight from the style file."""
    tensors, metadata = formats.read_style(library.path_for(name))
    config = formats.lora_config(metadata)
    a, b = tensors[f"unet.{LAYER}.lora_A.weight"], tensors[f"unet.{LAYER}.lora_B.weight"]
    return config["lora_alpha"] / config["r"] * b @ a


def _layer_delta(blender, x):
    """What the LoRA layers of LAYER add to its output for input x."""
    layer = blender.base.pipe.unet.get_submodule(LAYER)
    with torch.no_grad():
        return layer(x) - layer.base_layer(x)


def test_all_scales_zero_is_the_base_model_bit_for_bit(blender):
    base_image = _image(blender, {})
    assert np.array_equal(_image(blender, {"ink": 0.0, "pastel": 0.0}), base_image)
    assert not np.array_equal(_image(blender, {"ink": 1.0}), base_image)
    assert np.array_equal(_image(blender, {"ink": 0, "pastel": 0}), base_image)  # and back again


@pytest.mark.parametrize("scale", [-2.0, -0.5, 0.5, 1.0, 1.7])
def test_a_style_adds_scale_times_alpha_over_rank_times_BA(blender, library, scale):
    x = torch.randn(3, blender.base.pipe.unet.get_submodule(LAYER).in_features, generator=torch.Generator().manual_seed(0))
    blender.apply({"ink": scale})
    expected = x @ (scale * _lora_delta(library, "ink")).T
    torch.testing.assert_close(_layer_delta(blender, x), expected, rtol=1e-4, atol=1e-6)


def test_two_styles_add(blender, library):
    x = torch.randn(2, blender.base.pipe.unet.get_submodule(LAYER).in_features, generator=torch.Generator().manual_seed(1))
    blender.apply({"ink": 0.7, "pastel": -1.2})
    expected = x @ (0.7 * _lora_delta(library, "ink") - 1.2 * _lora_delta(library, "pastel")).T
    torch.testing.assert_close(_layer_delta(blender, x), expected, rtol=1e-4, atol=1e-6)
    # Image level: two styles differ from either alone.
    both, ink = _image(blender, {"ink": 1, "pastel": 1}), _image(blender, {"ink": 1})
    assert not np.array_equal(both, ink)


def test_unknown_style_and_bad_scale_are_refused_before_anything_changes(blender):
    blender.apply({"ink": 1.0})
    active_before = blender.base.pipe.get_active_adapters()
    with pytest.raises(ValueError, match=r"Unknown style\(s\): nope. Available styles: ink, pastel"):
        blender.apply({"nope": 1.0, "pastel": 1.0})
    with pytest.raises(ValueError, match="between -2.0 and 2.0"):
        blender.apply({"pastel": 3.0})
    with pytest.raises(ValueError, match="must be a number"):
        blender.apply({"pastel": "lots"})
    assert blender.base.pipe.get_active_adapters() == active_before


def test_deleted_and_retrained_styles_are_picked_up_live(blender, library):
    first = _image(blender, {"ink": 1})
    library.delete("ink")
    with pytest.raises(ValueError, match="Unknown style"):
        blender.apply({"ink": 1})
    train_style(library, "ink", seed=9, rank=4)
    assert not np.array_equal(_image(blender, {"ink": 1}), first)


def test_generated_images_carry_their_recipe(blender, tmp_path):
    from PIL import Image

    from styles.blend import save_png

    image = blender.generate("a blue star", negative_prompt="noise", seed=11, steps=4, styles={"pastel": 0.5})[0]
    path = save_png(image, tmp_path / "out.png")
    text = Image.open(path).text
    assert "a blue star <lora:pastel:0.5>" in text["parameters"] and "Seed: 11" in text["parameters"]
    assert '"styles": {"pastel": 0.5}' in text["style_studio"]


def test_training_on_the_blenders_base_works_after_every_scale_was_zero(blender, library):
    """Generating with all scales at 0 switches LoRA layers off; a training run on that base must still learn."""
    from trainer.config import make_config
    from trainer.data import ImageSet
    from trainer.events import Finished
    from trainer.train import train
    from tests.conftest import pattern_image

    _image(blender, {"ink": 1.0})
    _image(blender, {"ink": 0.0})  # disable_lora()
    cfg = make_config("Quick", style_name="after", steps=3, num_samples=0)
    events = list(train(cfg, ImageSet([pattern_image(9)], [None], ["a"]), blender.base, library))
    assert isinstance(events[-1], Finished), events[-1]
    assert "after" in library.names()
