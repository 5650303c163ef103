"""Issue 20: blends beyond the weighted sum: block strengths, step bands, sign-elected modes, a blend saved as a
style (exact, or re-ranked with its error), named blends, restyling a start picture."""

from __future__ import annotations

import json

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

from app import handlers
from app.layout import build_ui
from app.studio import Studio
from styles import formats
from styles.blend import Blender
from styles.library import StyleLibrary
from styles.mix import block_factor, block_keys, check_band, check_blocks, merge, segments
from tests.conftest import copy_styles, train_style

TOLERANCE = 1e-5  # as tests/test_formats.py: fp32 on the CPU, only the order of float additions differs


# -- the settings, as pure functions ----------------------------------------------------------------------


def test_block_keys_and_factors_follow_the_unet_levels():
    assert block_keys("unet.up_blocks.1.attentions.0.proj_in") == ("up.1", "up")
    assert block_keys("unet.mid_block.attentions.0.proj_in") == ("mid",)
    assert block_keys("text_encoder.encoder.layers.0.mlp.fc1") == ("text",)
    assert block_keys("unet.conv_in") == ("other",)
    blocks = check_blocks({"up": 0.5, "up.1": 1.5, "text": 0}, "ink")
    assert block_factor("unet.up_blocks.1.x", blocks) == 1.5 and block_factor("unet.up_blocks.0.x", blocks) == 0.5
    assert block_factor("unet.down_blocks.0.x", blocks) == 1.0 and block_factor("text_encoder.x", blocks) == 0
    assert check_blocks("look only", "ink")["down"] == 0


@pytest.mark.parametrize("blocks, words", [
    ("nonsense", "not a preset"), ({"sideways": 1}, "not a block"), ({"up": "x"}, "not a number"),
    ({"up": 9}, "factor from -2 to 2"), ([1, 2], "send a preset"),
])
def test_a_bad_block_setting_is_refused_naming_it(blocks, words):
    with pytest.raises(ValueError, match=words):
        check_blocks(blocks, "ink")


@pytest.mark.parametrize("band, words", [([0.5, 0.2], "start < end"), ([0, 2], "start < end"), ("late", "send"),
                                         ([0, float("nan")], "not a finite")])
def test_a_bad_step_band_is_refused_naming_it(band, words):
    with pytest.raises(ValueError, match=words):
        check_band(band, "ink")


def test_segments_split_the_steps_where_a_band_begins_or_ends():
    assert segments({"ink": (0.5, 1.0)}, 6) == [(0, frozenset()), (3, frozenset({"ink"}))]
    assert segments({"ink": (0.0, 1.0)}, 4) == [(0, frozenset({"ink"}))]
    assert [first for first, _ in segments({"a": (0.3, 1.0), "b": (0.0, 0.6)}, 10)] == [0, 3, 6]


def test_sign_election_keeps_the_stronger_side_and_one_style_unchanged():
    a, b = torch.tensor([1.0, 2.0, -1.0, 0.0]), torch.tensor([-3.0, 2.0, -1.0, 4.0])
    assert torch.equal(merge([a, b], "sum"), a + b)
    assert torch.equal(merge([a, b], "elect"), torch.tensor([-3.0, 4.0, -2.0, 4.0]))  # a's +1 is outvoted
    assert torch.equal(merge([a, b], "ties"), torch.tensor([-3.0, 2.0, -1.0, 4.0]))  # agreeing values averaged
    assert all(torch.equal(merge([a], mode), a) for mode in ("sum", "ties", "elect"))


# -- on the embedded model --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    library = StyleLibrary(tmp_path_factory.mktemp("mix"))
    train_style(library, "ink", seed=1, rank=4, alpha=8.0, steps=4, num_samples=0)
    train_style(library, "pastel", seed=2, rank=4, steps=4, num_samples=0)
    return library


@pytest.fixture
def blender(library, base, trained):
    copy_styles(trained, library)
    return Blender(base, library)


def _unet_weights(blender) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in blender.base.pipe.unet.state_dict().items()}


def test_look_only_changes_the_up_blocks_only_and_restores_exactly(blender):
    before = _unet_weights(blender)
    blender.apply({"ink": 1.0, "pastel": 0.5}, blocks={"ink": "look only", "pastel": "look only"})
    after = _unet_weights(blender)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("up_blocks.") for k in changed)
    blender.apply({"ink": 1.0}, blocks={"ink": {"down": 0.0, "mid": 0.0, "up": 2.0}})
    doubled = _unet_weights(blender)
    blender.apply({"ink": 2.0})
    plain = _unet_weights(blender)
    assert all(torch.equal(doubled[k], plain[k]) for k in changed)  # up blocks at 2x: as the style at scale 2
    blender.apply({})
    assert all(torch.equal(before[k], v) for k, v in _unet_weights(blender).items())


def test_a_step_band_switches_the_weights_at_its_step_and_nothing_else_changes(blender):
    """A style on from half the steps: the first steps run the base weights, the later ones the style's."""
    layer = blender.base.pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    seen = []
    handle = layer.register_forward_pre_hook(lambda module, args: seen.append(module.weight.sum().item()))
    try:
        blender.generate("a red circle", seed=1, steps=6, styles={"ink": 1.0}, bands={"ink": [0.5, 1.0]})
    finally:
        handle.remove()
    base = layer.weight.sum().item()  # after the generation the next apply restores; now: the last band's blend
    assert len(seen) == 6 and len(set(seen[:3])) == 1 and len(set(seen[3:])) == 1
    assert seen[0] != seen[3] and seen[3] == base
    blender.apply({})
    assert layer.weight.sum().item() == seen[0]  # the base weight again


def test_bands_over_all_steps_draw_what_the_plain_blend_draws_and_a_later_start_differs(blender):
    def image(**shape):
        return np.asarray(blender.generate("a red circle", seed=2, steps=6, styles={"ink": 1.0, "pastel": 1.0},
                                           **shape)[0]).astype(int)
    plain = image()
    assert np.array_equal(image(bands={"ink": [0, 1]}), plain)
    late = image(bands={"ink": [0.5, 1]})
    assert not np.array_equal(late, plain)
    assert not np.array_equal(image(mode="elect"), plain)
    recipe = json.loads(blender.generate("a red circle", seed=2, steps=6, styles={"ink": 1.0}, bands={"ink": [0.5, 1]},
                                         blocks={"ink": "look only"}, mode="ties")[0].info["style_studio"])
    assert recipe["bands"] == {"ink": (0.5, 1.0)} or recipe["bands"] == {"ink": [0.5, 1.0]}
    assert recipe["blocks"]["ink"]["down"] == 0 and recipe["mode"] == "ties"


def test_settings_for_a_style_not_in_the_blend_are_refused_before_anything_changes(blender):
    before = _unet_weights(blender)
    with pytest.raises(ValueError, match="not in the blend: pastel"):
        blender.apply({"ink": 1.0}, blocks={"pastel": "look only"})
    with pytest.raises(ValueError, match="Blend mode"):
        blender.apply({"ink": 1.0}, mode="average")
    assert all(torch.equal(before[k], v) for k, v in _unet_weights(blender).items())


def test_an_exact_saved_blend_loads_in_stock_diffusers_and_draws_the_fused_blend(blender, library, tmp_path):
    from diffusers import StableDiffusionPipeline

    from embedded import MODEL_DIR

    scales, blocks = {"ink": 0.8, "pastel": -0.6}, {"pastel": {"down": 0.5, "up": 1.0}}
    patch, report = blender.blend_as_adapter(scales, blocks)
    assert report["error"] == 0 and report["rank"] == 0
    style = formats.patch_style(patch, {"trigger": ""}, "sd1", blender.base.layout)
    library.save("mixed", style.to_bytes())
    kohya_file = tmp_path / "mixed.safetensors"
    formats.write_atomic(kohya_file, *formats.to_kohya(library.get("mixed").path, 1))
    diffusers_file = tmp_path / "mixed_diffusers.safetensors"
    diffusers_file.write_bytes(formats.to_diffusers(library.get("mixed").path, blender.base.layout))

    blender.apply(scales, blocks)
    prompt = dict(prompt="a red circle", num_inference_steps=6, output_type="np")
    ours = blender.base.pipe(**prompt, generator=torch.Generator().manual_seed(4)).images
    blender.apply({"mixed": 1.0})  # the saved blend as a style, on our side too
    again = blender.base.pipe(**prompt, generator=torch.Generator().manual_seed(4)).images
    assert np.abs(again - ours).max() < TOLERANCE
    blender.apply({})
    for path in (kohya_file, diffusers_file):
        stock = StableDiffusionPipeline.from_pretrained(MODEL_DIR, dtype=torch.float32)
        stock.load_lora_weights(str(path))  # the stock call, as a user would make it
        theirs = stock(**prompt, generator=torch.Generator().manual_seed(4)).images
        assert np.abs(theirs - ours).max() < TOLERANCE, path.name


def test_a_re_ranked_blend_reports_its_error(blender):
    _, full = blender.blend_as_adapter({"ink": 1.0, "pastel": 1.0}, rank=8)  # 4 + 4: the sum's own rank
    _, low = blender.blend_as_adapter({"ink": 1.0, "pastel": 1.0}, rank=1)
    assert full["error"] < 1e-5 and 0.05 < low["error"] < 1
    assert max(low["layers"].values()) <= 1 and set(low["layers"]) == set(full["layers"])
    with pytest.raises(ValueError, match="empty"):
        blender.blend_as_adapter({"ink": 0})


def test_restyling_a_start_picture_keeps_its_layout_and_records_its_hash(blender):
    start = Image.new("RGB", (64, 64), (20, 20, 20))
    start.paste((240, 240, 240), (0, 0, 32, 64))  # light left half, dark right half
    light = blender.generate("a red circle", seed=3, steps=8, styles={"ink": 1.0}, image=start, strength=0.3)[0]
    pixels = np.asarray(light).astype(float)
    assert pixels[:, :32].mean() > pixels[:, 32:].mean() + 40  # a low strength keeps the picture's layout
    recipe = json.loads(light.info["style_studio"])
    assert recipe["strength"] == 0.3 and len(recipe["image_sha256"]) == 64
    with pytest.raises(ValueError, match="Strength"):
        blender.generate("a red circle", styles={"ink": 1.0}, image=start, strength=1.5)


def test_sdxl_restyles_too(tmp_path):
    from models.base import load_base
    from tests import tiny_models

    base = load_base(str(tiny_models.save_pipeline("sdxl", tmp_path / "sdxl")))
    blender = Blender(base, StyleLibrary(tmp_path / "styles"))
    out = blender.generate("a red circle", seed=1, steps=4, image=Image.new("RGB", (32, 32), (200, 0, 0)),
                           strength=0.5)[0]
    assert out.size == (32, 32) and "image_sha256" in out.info["style_studio"]


# -- the app: save a blend, named blends, the blend table -------------------------------------------------


@pytest.fixture
def studio(tmp_path, trained):
    studio = Studio(tmp_path / "workspace")
    copy_styles(trained, studio.library)
    yield studio
    studio.close()


def test_save_blend_makes_a_style_that_records_its_sources(studio):
    page = build_ui(studio)
    table = handlers.blend_table(studio.library.names(), {"pastel": "look only"}, {"ink": (0.3, 1.0)})
    message = handlers.save_blend_form(studio, "inky-pastel", {"ink": 0.8, "pastel": 0.5}, table, "sum", 0)
    assert message == "Saved the blend as style **inky-pastel** (exact)."
    info = studio.library.get("inky-pastel")
    source = json.loads(safetensors.safe_open(str(info.path), "pt").metadata()["style_studio.blend_of"])
    assert source["styles"] == {"ink": 0.8, "pastel": 0.5} and source["blocks"] == {"pastel": "look only"}
    assert studio.export("inky-pastel", "kohya").is_file() and studio.export("inky-pastel", "diffusers").is_file()
    ranked = handlers.save_blend(studio, "inky-low", {"ink": 1, "pastel": 1}, rank=2)
    assert "at rank 2: relative error" in ranked
    with pytest.raises(Exception, match="already exists"):
        handlers.save_blend(studio, "inky-low", {"ink": 1})
    assert page.blend_table is not None


def test_a_named_blend_is_saved_and_loaded_back_into_the_form(studio):
    page = build_ui(studio)
    table = handlers.blend_table(studio.library.names(), {"ink": {"down": 0.0, "up": 1.5}}, {"pastel": (0.4, 1.0)})
    picker, message = handlers.save_mix(studio, "evening", {"ink": 1.0, "pastel": 0.7}, table, "sum")
    assert "evening" in message and studio.mixes() == ["evening"]
    loaded = handlers.load_mix(studio, page, "evening")
    assert loaded[page.blend] == {"ink": 1.0, "pastel": 0.7} and "only the API" not in loaded[page.info]
    rows = loaded[page.blend_table].set_index("style")
    assert rows.loc["ink", "blocks"] == "down=0, up=1.5" and rows.loc["pastel", "from %"] == 40
    with pytest.raises(Exception, match="No saved blend"):
        handlers.load_mix(studio, page, "nope")
    with pytest.raises(Exception, match="Blocks of 'ink'"):
        handlers.blend_settings(handlers.blend_table(["ink"], {"ink": "sideways"}))


def test_a_start_picture_passes_the_training_uploads_checks(studio, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("<html>not a picture</html>")
    with pytest.raises(ValueError, match=r"Start image: .*notes\.png: not an image"):
        studio.generate("a red circle", styles={"ink": 1.0}, image=str(bad), steps=2)
    start = tmp_path / "start.png"
    Image.new("RGB", (300, 150), (200, 0, 0)).save(start)
    made = studio.generate("a red circle", styles={"ink": 1.0}, image=str(start), steps=4, strength=0.5)
    recipe = json.loads(Image.open(made.paths[0]).text["style_studio"])
    assert recipe["strength"] == 0.5 and len(recipe["image_sha256"]) == 64
    page = build_ui(studio)
    shown = handlers.generate(studio, page, "a red circle", steps=4, styles={"ink": 1.0}, image=str(start),
                              strength=0.5)
    assert "restyled from the start picture at strength 0.5" in shown[page.info]  # the page says what it drew
