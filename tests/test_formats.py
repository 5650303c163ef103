"""Export: stock diffusers loads our style file unchanged and draws what our blender draws."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from styles import formats
from styles.blend import Blender
from tests.conftest import train_style

# Both sides run the same fp32 CPU kernels; the only difference allowed is float rounding from a
# different order of adapter bookkeeping, far below one 8-bit colour level.
TOLERANCE = 1e-5


@pytest.mark.parametrize("rank,alpha", [(4, 4.0), (4, 12.0)])
def test_stock_diffusers_loads_the_export_and_matches_our_blender(library, base, rank, alpha):
    from diffusers import StableDiffusionPipeline

    from trainer.embedded import MODEL_DIR

    path = train_style(library, "ink", seed=3, rank=rank, alpha=alpha).path
    ours = Blender(base, library).base.pipe
    Blender(base, library).apply({"ink": 1.0})

    stock = StableDiffusionPipeline.from_pretrained(MODEL_DIR, dtype=torch.float32)  # the stock loader, as a user would
    stock.load_lora_weights(path)  # stock call, no adapter name, no extra arguments

    kwargs = dict(prompt="a red circle", num_inference_steps=6, output_type="np")
    ours_out = ours(**kwargs, generator=torch.Generator().manual_seed(4)).images
    stock_out = stock(**kwargs, generator=torch.Generator().manual_seed(4)).images
    assert np.abs(ours_out - stock_out).max() < TOLERANCE
    base_out = StableDiffusionPipeline.from_pretrained(MODEL_DIR, dtype=torch.float32)(**kwargs, generator=torch.Generator().manual_seed(4)).images
    assert np.abs(stock_out - base_out).max() > 1e-3  # the style really is applied


def test_header_is_read_without_loading_tensors_and_garbage_is_refused(library, tmp_path):
    path = train_style(library, "ink", seed=3).path
    metadata, table = formats.read_header(path)
    assert metadata["format"] == "pt" and all(key.startswith("unet.") for key in table)
    for name, data in [("short.safetensors", b"abc"), ("huge.safetensors", (2**40).to_bytes(8, "little") + b"{}"),
                       ("text.safetensors", (5).to_bytes(8, "little") + b"hello")]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match="not a safetensors file"):
            formats.read_header(tmp_path / name)
