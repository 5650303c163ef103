"""Export: stock diffusers loads our style file unchanged and draws what our blender draws."""

from __future__ import annotations

import json

import numpy as np
import pytest
import safetensors.torch
import torch

from core.files import read_safetensors_header
from styles import formats
from styles.blend import Blender
from tests.conftest import train_style

# Both sides run the same fp32 CPU kernels; the only difference allowed is float rounding from a
# different order of adapter bookkeeping, far below one 8-bit colour level.
TOLERANCE = 1e-5


@pytest.mark.parametrize("rank,alpha", [(4, 4.0), (4, 12.0)])
def test_stock_diffusers_loads_the_export_and_matches_our_blender(library, base, rank, alpha):
    from diffusers import StableDiffusionPipeline

    from embedded import MODEL_DIR

    path = train_style(library, "ink", seed=3, rank=rank, alpha=alpha).path
    ours = Blender(base, library).base.pipe
    Blender(base, library).apply({"ink": 1.0})

    stock = StableDiffusionPipeline.from_pretrained(MODEL_DIR, dtype=torch.float32)  # the stock loader, as a user would
    stock.load_lora_weights(path)  # stock call, no adapter name, no extra arguments

    kwargs = dict(prompt="a red circle", num_inference_steps=6, output_type="np")
    ours_out = ours(**kwargs, generator=torch.Generator().manual_seed(4)).images
    stock_out = stock(**kwargs, generator=torch.Generator().manual_seed(4)).images
    assert np.abs(ours_out - stock_out).max() < TOLERANCE
    base_out = StableDiffusionPipeline.from_pretrained(MODEL_DIR, dtype=torch.float32)(
        **kwargs, generator=torch.Generator().manual_seed(4)
    ).images
    assert np.abs(stock_out - base_out).max() > 1e-3  # the style really is applied


def test_header_is_read_without_loading_tensors_and_garbage_is_refused(library, tmp_path):
    path = train_style(library, "ink", seed=3).path
    metadata, table = read_safetensors_header(path)
    assert metadata["format"] == "pt" and all(key.startswith("unet.") for key in table)
    for name, data in [("short.safetensors", b"abc"), ("huge.safetensors", (2**40).to_bytes(8, "little") + b"{}"),
                       ("text.safetensors", (5).to_bytes(8, "little") + b"hello")]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match="not a safetensors file"):
            read_safetensors_header(tmp_path / name)


# -- kohya layout and imports -----------------------------------------------------------------------


def import_file(library, path, name, base):
    """Import as the Styles tab does: the file checked against the base, then saved as a style; (StyleInfo, notes)."""
    adapter, notes = formats.import_style(path, base.layout, base.family)
    library.save(name, adapter.to_bytes())
    return library.get(name), notes


PROMPT = dict(prompt="a red circle", num_inference_steps=6, output_type="np")


def draw(pipe, seed: int = 4):
    return pipe(**PROMPT, generator=torch.Generator().manual_seed(seed)).images


def stock_pipeline():
    from diffusers import StableDiffusionPipeline

    from embedded import MODEL_DIR

    return StableDiffusionPipeline.from_pretrained(MODEL_DIR, dtype=torch.float32)


def kohya_file(style_path, tmp_path, family_naming: str = "sd1"):
    """Our style written in the kohya layout (as Studio.export does), optionally with SDXL's block names."""
    from styles import kohya

    tensors, metadata = formats.to_kohya(style_path, layers_per_block=1)
    if family_naming == "sdxl":
        style, _ = formats.read_style(style_path)
        modules = {k[5:-14]: (v, style[k.replace("lora_A", "lora_B")])
                   for k, v in style.items() if k.endswith("lora_A.weight")}
        tensors = kohya.export(modules, float(metadata["ss_network_alpha"]), "sdxl", layers_per_block=1)
    return formats.write_atomic(tmp_path / f"kohya_{family_naming}.safetensors", tensors, metadata)


def test_kohya_export_keeps_the_trained_alpha_and_stock_diffusers_draws_what_we_draw(library, base, tmp_path):
    style = train_style(library, "ink", seed=3, rank=4, alpha=12.0).path
    exported = kohya_file(style, tmp_path)
    metadata, table = read_safetensors_header(exported)
    assert all(key.startswith("lora_unet_") for key in table)
    alphas = [value for key, value in safetensors.torch.load_file(exported).items() if key.endswith(".alpha")]
    assert alphas and all(float(a) == 12.0 for a in alphas)  # diffusers' own converter would write 4 (the rank)
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "12"

    blender = Blender(base, library)
    blender.apply({"ink": 1.0})
    ours = draw(base.pipe)
    stock = stock_pipeline()
    stock.load_lora_weights(str(exported))  # diffusers' own kohya loader, as a user would call it
    assert np.abs(draw(stock) - ours).max() < TOLERANCE
    assert np.abs(draw(stock_pipeline()) - ours).max() > 1e-3  # the style really is applied


def test_sdxl_block_names_are_the_ones_diffusers_maps_back(library, base, tmp_path):
    """SDXL files use the original UNet's flat block numbers; diffusers' own SGM mapping must undo ours."""
    from diffusers.loaders.lora_conversion_utils import _maybe_map_sgm_blocks_to_diffusers

    style = train_style(library, "ink", seed=3, rank=4).path
    diffusers_names = safetensors.torch.load_file(kohya_file(style, tmp_path, "sd1"))
    sgm_names = safetensors.torch.load_file(kohya_file(style, tmp_path, "sdxl"))
    assert sgm_names.keys() != diffusers_names.keys() and any("input_blocks" in k for k in sgm_names)
    mapped = _maybe_map_sgm_blocks_to_diffusers(dict(sgm_names), base.pipe.unet.config)
    # diffusers renumbers the blocks here and renames input/middle/output later, in _convert_unet_lora_key
    renames = {"input_blocks": "down_blocks", "middle_block": "mid_block", "output_blocks": "up_blocks"}
    renamed = set()
    for key in mapped:
        for old, new in renames.items():
            key = key.replace(old, new)
        renamed.add(key)
    assert renamed == set(diffusers_names)
    # ...and our import reads the SGM spelling onto the same modules.
    info, _ = import_file(library, tmp_path / "kohya_sdxl.safetensors", "ink-sgm", base)
    assert layers(info.path, base) == layers(style, base)


def layers(path, base) -> set[str]:
    """The layers a style file changes, as the blender reads them."""
    return set(formats.read_adapter(path, base.layout).updates)


def test_an_imported_kohya_file_blends_like_the_native_style(library, base, tmp_path):
    style = train_style(library, "ink", seed=3, rank=4, alpha=12.0).path
    exported = kohya_file(style, tmp_path)
    info, notes = import_file(library, exported, "ink-again", base)
    assert notes == [f"holds {len(layers(style, base))} LoRA on the UNet"]
    assert info.config["rank"] == 4 and info.config["alpha"] == 12.0
    blender = Blender(base, library)
    for scale in (1.0, 0.5, -0.7):
        blender.apply({"ink": scale})
        native = draw(base.pipe)
        blender.apply({"ink-again": scale})
        assert np.abs(draw(base.pipe) - native).max() < TOLERANCE


def test_import_keeps_every_part_text_encoder_convolutions_and_per_module_ranks(library, base, tmp_path):
    """A kohya file that also trains the text encoder, a convolution and per-module ranks and alphas: all kept."""
    style = train_style(library, "ink", seed=3, rank=4, alpha=4.0).path
    tensors = safetensors.torch.load_file(kohya_file(style, tmp_path))
    key = next(k[: -len(".lora_down.weight")] for k in tensors if k.endswith("attn2_to_k.lora_down.weight"))
    tensors[key + ".lora_down.weight"] = tensors[key + ".lora_down.weight"][:2].clone()  # rank 2 here
    tensors[key + ".lora_up.weight"] = tensors[key + ".lora_up.weight"][:, :2].clone()
    tensors[key + ".alpha"] = torch.tensor(1.0)
    extra = {
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (torch.randn(4, 128), torch.randn(128, 4)),
        "lora_unet_down_blocks_0_resnets_0_conv1": (torch.randn(4, 64, 3, 3), torch.randn(64, 4, 1, 1)),
    }
    for name, (d, u) in extra.items():
        tensors |= {name + ".lora_down.weight": d, name + ".lora_up.weight": u, name + ".alpha": torch.tensor(4.0)}
    mixed = tmp_path / "mixed.safetensors"
    safetensors.torch.save_file(tensors, mixed)

    info, notes = import_file(library, mixed, "mixed", base)
    assert notes[0] == f"holds {len(layers(style, base))} LoRA, 1 LoCon on the UNet; 1 LoRA on the text encoder"
    kept = safetensors.torch.load_file(info.path)
    assert kept.keys() == tensors.keys()  # every part, as the file gave it: nothing padded or dropped
    assert all(torch.equal(kept[k], tensors[k]) for k in kept)


def test_peft_and_old_diffusers_layouts_import(library, base, tmp_path):
    style = train_style(library, "ink", seed=3, rank=4).path
    tensors = safetensors.torch.load_file(style)
    peft_raw = {"base_model.model." + k[len("unet."):]: v for k, v in tensors.items()}
    old = {}
    for k, v in tensors.items():
        module, part = k[: -len(".lora_A.weight")], "down" if ".lora_A." in k else "up"
        head, proj = (module.rsplit(".", 1) if not module.endswith("to_out.0")
                      else (module[: -len(".to_out.0")], "to_out"))
        old[f"{head}.processor.{proj}_lora.{part}.weight"] = v
    for name, content in [("peft-raw", peft_raw), ("old-diffusers", old)]:
        safetensors.torch.save_file(content, tmp_path / f"{name}.safetensors")
        info, notes = import_file(library, tmp_path / f"{name}.safetensors", name, base)
        assert any("alpha = rank assumed" in n for n in notes)
        assert layers(info.path, base) == layers(style, base)


def hostile_adapters(tmp_path, good: dict):
    """(file, expected words in the message) for adapter files that must be refused before loading."""
    key_a = next(k for k in good if k.endswith("to_q.lora_A.weight"))
    cases = {
        "model.ckpt": (b"\x80\x04not really", "pickle"),
        "adapter.bin": (b"\x80\x04", "pickle"),
        "notes.txt": (b"hello", "not a .safetensors file"),
        "truncated.safetensors": (None, "not a safetensors file"),
        "nan.safetensors": ({**good, key_a: torch.full_like(good[key_a], float("nan"))}, "NaN"),
        "shape.safetensors": ({**good, key_a: torch.zeros(4, 77)}, "do not fit this layer's weight"),
        "sdxl.safetensors": ({"unet.down_blocks.5.attentions.0.proj_in.lora_A.weight": torch.zeros(4, 8),
                              "unet.down_blocks.5.attentions.0.proj_in.lora_B.weight": torch.zeros(8, 4)},
                             "another model family"),
        "rank.safetensors": ({k: torch.zeros(600, v.shape[1]) if "lora_A" in k else torch.zeros(v.shape[0], 600)
                              for k, v in good.items()}, "rank 600"),
        "loha.safetensors": ({"lora_unet_x.hada_w1_a": torch.zeros(2, 2)}, "LoHa"),
        "ints.safetensors": ({key_a: torch.zeros(4, 4, dtype=torch.int64)}, "not a float tensor"),
        "oft.safetensors": ({"lora_unet_down_blocks_0_resnets_0_conv1.oft_blocks": torch.zeros(4, 4, 4)},
                            "'oft_blocks' is not a part of an adapter kind"),
        "half.safetensors": ({key_a: good[key_a]}, "has no lora_up.weight"),
    }
    for name, (content, words) in cases.items():
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content is None:
            path.write_bytes(safetensors.torch.save(good)[:200])
        else:
            safetensors.torch.save_file(content, path)
        yield path, words


def test_hostile_adapter_files_are_refused_with_the_reason_and_nothing_is_written(library, base, tmp_path):
    style = train_style(library, "ink", seed=3, rank=4).path
    good = safetensors.torch.load_file(style)
    before = sorted(library.root.iterdir())
    for path, words in hostile_adapters(tmp_path, good):
        with pytest.raises(ValueError, match=words):
            import_file(library, path, "hostile", base)
    assert sorted(library.root.iterdir()) == before  # no style, no temporary file


def test_a_damaged_file_in_the_library_is_refused_by_the_blender_with_the_reason(library, base):
    style = train_style(library, "ink", seed=3, rank=4).path
    tensors, metadata = formats.read_style(style)
    key = next(k for k in tensors if k.endswith("lora_B.weight"))
    formats.write_atomic(style, {**tensors, key: torch.full_like(tensors[key], float("inf"))}, metadata)
    with pytest.raises(ValueError, match="NaN or infinite"):
        Blender(base, library).apply({"ink": 1.0})


# What sd-scripts' train_network.py writes for a UNet-only LoRA (its metadata keys, value formats as it makes them:
# times from time.time(), modelspec from library/sai_model_spec.py, tags from set_tag_frequency). Built here from
# that published key list, not downloaded: the shape our export must match for A1111 and ComfyUI to read it alike.
SD_SCRIPTS_SD15_LORA = {
    "ss_network_module": "networks.lora", "ss_network_dim": "16", "ss_network_alpha": "8", "ss_v2": "False",
    "ss_v_parameterization": "False", "ss_base_model_version": "sd_v1", "ss_resolution": "(512, 512)",
    "ss_training_started_at": "1700000000.123456", "ss_training_finished_at": "1700000900.654321",
    "ss_tag_frequency": json.dumps({"10_ink": {"a red circle": 3, "ink": 10}}),
    "modelspec.sai_model_spec": "1.0.1", "modelspec.architecture": "stable-diffusion-v1/lora",
    "modelspec.implementation": "diffusers", "modelspec.resolution": "512x512", "modelspec.prediction_type": "epsilon",
}
SD_SCRIPTS_ARCHITECTURES = {"stable-diffusion-v1/lora", "stable-diffusion-v2-512/lora",
                            "stable-diffusion-v2-768-v/lora", "stable-diffusion-xl-v1-base/lora"}


def test_the_kohya_export_writes_metadata_as_sd_scripts_does(library, tmp_path):
    """Issue 19: epoch times, a valid model-spec architecture, v-prediction flags, and ss_tag_frequency from the
    captions, so AUTOMATIC1111 lists the trigger word among the training tags."""
    import time

    started = time.time()
    style = train_style(library, "ink", seed=3, steps=2, trigger="inkk").path
    metadata, _ = read_safetensors_header(kohya_file(style, tmp_path))
    for key, reference in SD_SCRIPTS_SD15_LORA.items():
        assert key in metadata, key
        if key.endswith("_at"):
            assert started - 5 <= float(metadata[key]) <= time.time() and float(reference)  # epoch seconds, both
    assert metadata["modelspec.architecture"] in SD_SCRIPTS_ARCHITECTURES
    assert metadata["modelspec.implementation"] == "diffusers" and metadata["modelspec.prediction_type"] == "epsilon"
    assert metadata["ss_v2"] == metadata["ss_v_parameterization"] == "False"
    assert metadata["ss_resolution"] == "(64, 64)" and metadata["modelspec.resolution"] == "64x64"
    (tags,) = json.loads(metadata["ss_tag_frequency"]).values()  # {dataset: {tag: images holding it}}
    assert sum(count for tag, count in tags.items() if "inkk" in tag) == 3  # each image's caption holds the trigger
    assert metadata["modelspec.trigger_phrase"] == "inkk"


def test_tag_frequency_counts_comma_separated_tags_as_sd_scripts_does():
    from styles import kohya

    captions = ["a red circle, Inkk", "a blue star,inkk, ", "inkk", None]
    assert kohya.tag_frequency(captions) == {"a red circle": 1, "inkk": 3, "a blue star": 1}


@pytest.mark.parametrize("family, info, architecture, v", [
    ("sd2", {"prediction_type": "v_prediction"}, "stable-diffusion-v2-768-v/lora", "True"),
    ("sd2", {"prediction_type": "epsilon"}, "stable-diffusion-v2-512/lora", "False"),
    ("sd2", {"resolution": "768x768"}, "stable-diffusion-v2-768-v/lora", "True"),  # an older style: by its size
    ("sdxl", {}, "stable-diffusion-xl-v1-base/lora", "False"),
])
def test_model_spec_architecture_and_v_flags_follow_sd_scripts(family, info, architecture, v):
    from styles import kohya

    metadata = kohya.training_metadata(family, "x", 4, 4.0, info, {})
    assert metadata["modelspec.architecture"] == architecture and metadata["ss_v_parameterization"] == v
    assert metadata["modelspec.prediction_type"] == ("v" if v == "True" else "epsilon")
    assert metadata["modelspec.implementation"] == (
        "https://github.com/Stability-AI/generative-models" if family == "sdxl" else "diffusers")
