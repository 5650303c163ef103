"""Base families (sd1, sd2, sdxl): detection, loading (folder, single file), training and blending.

Every model here is a tiny random pipeline built in code (tests/tiny_models.py) and saved to a
folder or an original-layout checkpoint, so loading runs the same from_pretrained and
from_single_file paths a real model does, without the network.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from huggingface_hub import constants as hub_constants
from safetensors.torch import save_file

from models.base import checkpoint_kind, detect_family, load_base
from styles.blend import Blender
from styles.library import StyleLibrary
from tests import tiny_models
from tests.conftest import pattern_image, save_style
from trainer.config import make_config
from trainer.data import ImageSet
from trainer.events import Finished
from trainer.train import encode_conditioning, encode_images, train

FAMILIES = tiny_models.FAMILIES
SD1_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # diffusers' reference config for SD 1.x checkpoints


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Run these tiny models on one CPU thread: their ops are so small that a second thread's
    synchronisation costs more than it saves, many times more on a busy machine (66 s against 2.5 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """One saved diffusers folder per family, plus a second sd1 model (other weights, same family)."""
    root = tmp_path_factory.mktemp("models")
    folders = {family: tiny_models.save_pipeline(family, root / family) for family in FAMILIES}
    folders["sd1-other"] = tiny_models.save_pipeline("sd1", root / "sd1-other", seed=1)
    return folders


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache and offline mode, whatever the machine's environment says."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    return cache


def _train(base, library, name, seed, steps=4, **overrides):
    images = [pattern_image(seed * 10 + i, size=tiny_models.RESOLUTION) for i in range(3)]
    image_set = ImageSet(images=images, captions=[None] * 3, names=["a", "b", "c"])
    settings = dict(learning_rate=1e-2, num_samples=1, sample_every=0, checkpoint_every=0, caption_dropout=0.5,
                    validation_prompts=0)
    cfg = make_config("Quick", style_name=name, steps=steps, seed=seed, **{**settings, **overrides})
    events = list(train(cfg, image_set, base))
    assert isinstance(events[-1], Finished), events[-1]
    save_style(library, events[-1])
    return events[-1]


# -- detection ------------------------------------------------------------------------------------
# The UNet configs of the real reference models (their unet/config.json, keys that matter kept).
SD15_UNET = {
    "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "in_channels": 4, "layers_per_block": 2, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD21_UNET = {
    **SD15_UNET, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024, "sample_size": 96,
    "use_linear_projection": True, "upcast_attention": True, "dual_cross_attention": False, "num_class_embeds": None,
}
SD21_BASE_UNET = {**SD21_UNET, "sample_size": 64, "upcast_attention": False}
SDXL_UNET = {
    "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280], "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "in_channels": 4,
    "layers_per_block": 2, "projection_class_embeddings_input_dim": 2816, "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}
DETECTION_CASES = [
    ("sd1.5", SD15_UNET, "sd1"),
    ("sd2.1 (768, v-prediction)", SD21_UNET, "sd2"),
    ("sd2.1-base (512, epsilon)", SD21_BASE_UNET, "sd2"),
    ("sdxl-base-1.0", SDXL_UNET, "sdxl"),
    ("sd2 at another width", {**SD21_UNET, "cross_attention_dim": 768}, "sd2"),
    ("sd1 at width 1024 (a custom text encoder)", {**SD15_UNET, "cross_attention_dim": 1024}, "sd2"),
]  # the tiny models' configs are checked through load_base below


@pytest.mark.parametrize("name, unet_config, family", DETECTION_CASES, ids=[case[0] for case in DETECTION_CASES])
def test_family_is_detected_from_the_unet_config(name, unet_config, family):
    assert detect_family(unet_config) == family


@pytest.mark.parametrize("family", FAMILIES)
def test_load_base_from_a_folder_knows_its_family(models, family):
    base = load_base(str(models[family]))
    assert base.family == family
    assert base.prediction_type == ("v_prediction" if family == "sd2" else "epsilon")
    assert base.resolution == tiny_models.RESOLUTION
    assert not any(p.requires_grad for p in base.pipe.unet.parameters())
    if family == "sdxl":
        assert not any(p.requires_grad for p in base.pipe.text_encoder_2.parameters())


def test_a_folder_of_another_pipeline_kind_is_refused(models, tmp_path):
    folder = tmp_path / "img2img"
    tiny_models.sd1_pipeline().save_pretrained(folder)
    index = (folder / "model_index.json").read_text().replace(
        '"StableDiffusionPipeline"', '"StableDiffusionImg2ImgPipeline"'
    )
    (folder / "model_index.json").write_text(index)
    with pytest.raises(ValueError, match="StableDiffusionImg2ImgPipeline model; Style Studio trains on text-to-image"):
        load_base(str(folder))


# -- training and blending ----------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_train_two_styles_and_blend_them(models, tmp_path, family):
    base = load_base(str(models[family]))
    library = StyleLibrary(tmp_path / "workspace")
    for name, seed in (("first", 1), ("second", 2)):
        _train(base, library, name, seed)
        info = library.get(name)
        assert (info.family, info.unet_hash, info.base_model) == (family, base.unet_hash, str(models[family]))

    blender = Blender(base, library)
    plain = blender.generate("a red circle", steps=4, seed=3)[0]
    blended = blender.generate("a red circle", steps=4, seed=3, styles={"first": 0.7, "second": 0.5})[0]
    assert plain.size == blended.size == (tiny_models.RESOLUTION, tiny_models.RESOLUTION)
    difference = np.abs(np.asarray(plain, dtype=int) - np.asarray(blended, dtype=int))
    assert difference.max() > 0, "the blended styles did not change the image"
    assert blender.warnings == []
    # With every style at 0 the base model is back, bit for bit.
    again = blender.generate("a red circle", steps=4, seed=3, styles={"first": 0, "second": 0})[0]
    assert np.array_equal(np.asarray(again), np.asarray(plain))


def test_an_sdxl_style_exported_for_a1111_loads_in_stock_diffusers(models, tmp_path):
    """The kohya export of an SDXL style uses the original UNet's block names (what A1111 and ComfyUI
    read); diffusers' own SDXL loader maps them back onto the same layers, with the same weights."""
    from diffusers import StableDiffusionXLPipeline

    from styles import formats

    base = load_base(str(models["sdxl"]))
    library = StyleLibrary(tmp_path / "workspace")
    _train(base, library, "xl", seed=1, alpha=6.0)
    tensors, metadata = formats.to_kohya(library.get("xl").path, base.layout.layers_per_block)
    assert any(key.startswith("lora_unet_input_blocks_") for key in tensors), sorted(tensors)[:3]
    exported = formats.write_atomic(tmp_path / "xl.safetensors", tensors, metadata)

    def unet_output(unet):
        torch.manual_seed(5)
        config = unet.config
        sample = torch.randn(1, config.in_channels, config.sample_size, config.sample_size)
        context = torch.randn(1, 7, config.cross_attention_dim)
        pooled_width = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        added = {"text_embeds": torch.randn(1, pooled_width), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
        with torch.no_grad():
            return unet(sample, 500, context, added_cond_kwargs=added).sample

    stock = StableDiffusionXLPipeline.from_pretrained(models["sdxl"], dtype=torch.float32)
    plain = unet_output(stock.unet)
    stock.load_lora_weights(str(exported))  # diffusers' own kohya/SGM loader, as a user would call it
    Blender(base, library).apply({"xl": 1.0})
    ours = unet_output(base.pipe.unet)
    assert (unet_output(stock.unet) - ours).abs().max() < 1e-5
    assert (ours - plain).abs().max() > 1e-3  # the style really is applied


def test_a_style_of_another_family_is_refused(models, tmp_path):
    library = StyleLibrary(tmp_path / "workspace")
    _train(load_base(str(models["sd1"])), library, "flat", seed=1, steps=1, num_samples=0)
    blender = Blender(load_base(str(models["sdxl"])), library)
    with pytest.raises(ValueError, match=r"'flat' was trained on a sd1 model and cannot be used with this sdxl base"):
        blender.generate("a red circle", steps=2, styles={"flat": 1.0})


def test_a_style_from_another_model_of_the_family_warns(models, tmp_path):
    library = StyleLibrary(tmp_path / "workspace")
    _train(load_base(str(models["sd1"])), library, "flat", seed=1, steps=1, num_samples=0)
    other = load_base(str(models["sd1-other"]))
    blender = Blender(other, library)
    images = blender.generate("a red circle", steps=2, styles={"flat": 1.0})
    assert len(images) == 1
    assert len(blender.warnings) == 1 and "'flat' was trained on" in blender.warnings[0], blender.warnings


def test_sdxl_conditioning_holds_both_encoders_the_pooled_embedding_and_the_size_ids():
    pipe = tiny_models.sdxl_pipeline()
    cond = encode_conditioning(pipe, ["a red circle", "a blue square"], [(32, 32), (32, 32)])
    ids = pipe.tokenizer(["a red circle"], padding="max_length", max_length=77, truncation=True,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        first = pipe.text_encoder(ids, output_hidden_states=True)
        second = pipe.text_encoder_2(ids, output_hidden_states=True)
    # Penultimate hidden states of both encoders side by side, and the second one's projection.
    expected = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
    assert torch.allclose(cond.text[:1], expected, atol=1e-6)
    assert torch.allclose(cond.pooled[:1], second.text_embeds, atol=1e-6)
    assert cond.time_ids.tolist() == [[32, 32, 0, 0, 32, 32]] * 2  # original size, crop top-left, target size

    # Caption dropout swaps in the empty prompt's text and pooled embeddings; the size ids stay.
    empty = encode_conditioning(pipe, [""], [(32, 32)])
    dropped = cond.with_dropout(torch.tensor([True, False]), empty)
    assert torch.equal(dropped.text[0], empty.text[0]) and torch.equal(dropped.pooled[0], empty.pooled[0])
    assert torch.equal(dropped.text[1], cond.text[1]) and torch.equal(dropped.pooled[1], cond.pooled[1])
    assert torch.equal(dropped.time_ids, cond.time_ids)


def test_the_vae_encodes_in_fp32_when_its_config_asks(monkeypatch):
    pipe = tiny_models.sd1_pipeline()
    assert pipe.vae.config.force_upcast  # as SDXL's VAE, which overflows in fp16
    reference, _ = encode_images(pipe, [pattern_image(0, size=tiny_models.RESOLUTION)])
    pipe.vae.to(torch.float16)
    seen = []
    pipe.vae.encoder.register_forward_hook(lambda module, args, out: seen.append(args[0].dtype))
    mean, _ = encode_images(pipe, [pattern_image(0, size=tiny_models.RESOLUTION)])
    assert seen == [torch.float32] and pipe.vae.dtype == torch.float16  # upcast for the encode only
    assert torch.allclose(mean, reference, atol=1e-2)  # the fp16 weights round a little


# -- single-file checkpoints --------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd1_checkpoint(models, tmp_path_factory):
    """The sd1 folder's model as one original-layout .safetensors file."""
    pipe = load_base(str(models["sd1"])).pipe
    return tiny_models.save_ldm_checkpoint(pipe, tmp_path_factory.mktemp("checkpoints") / "tiny-sd1.safetensors")


def test_single_file_loads_with_a_local_config_folder(models, sd1_checkpoint, offline_cache):
    base = load_base(str(sd1_checkpoint), model_config=str(models["sd1"]))
    assert base.family == "sd1" and base.model_id == str(sd1_checkpoint)
    assert base.unet_hash == load_base(str(models["sd1"])).unet_hash  # the same weights, converted back


def test_single_file_finds_its_reference_config_in_the_offline_cache(models, sd1_checkpoint, offline_cache):
    _cache_configs(offline_cache, SD1_REPO, models["sd1"])
    base = load_base(str(sd1_checkpoint))  # no config given: diffusers' reference repo for SD 1.x, from the cache
    assert base.family == "sd1" and base.unet_hash == load_base(str(models["sd1"])).unet_hash
    assert load_base(str(sd1_checkpoint), model_config=SD1_REPO).family == "sd1"  # a cached hub id as config


def test_single_file_without_a_config_offline_says_what_to_do(sd1_checkpoint, offline_cache):
    with pytest.raises(ValueError) as err:
        load_base(str(sd1_checkpoint))
    message = str(err.value)
    assert SD1_REPO in message and "offline" in message and "--model-config" in message and "go online once" in message


@pytest.mark.parametrize("suffix", [".ckpt", ".bin", ".pt", ".pth", ".pkl"])
def test_pickle_checkpoints_are_refused_unopened(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"not a pickle: unpickling this would fail differently")
    with pytest.raises(ValueError, match="pickle checkpoint, which can run code"):
        load_base(str(path))


KIND_CASES = [  # (keys and shapes in the file, what diffusers calls it)
    ({"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)}, "v1"),
    ({"model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024)}, "v2"),
    ({"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
      "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": (1280,)}, "xl_base"),
    ({"model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3)}, "inpainting"),
]


@pytest.mark.parametrize("shapes, kind", KIND_CASES, ids=[case[1] for case in KIND_CASES])
def test_checkpoint_kind_reads_only_the_header(tmp_path, shapes, kind):
    path = tmp_path / "model.safetensors"
    save_file({key: torch.zeros(shape) for key, shape in shapes.items()}, path)
    assert checkpoint_kind(path) == kind


def test_single_file_that_is_not_a_base_model_is_refused(models, tmp_path):
    lora = tmp_path / "style.safetensors"
    save_file({"unet.down_blocks.0.attentions.0.to_q.lora_A.weight": torch.zeros(4, 32)}, lora)
    with pytest.raises(ValueError, match="holds no Stable Diffusion UNet.*import it in the Styles tab"):
        load_base(str(lora))
    inpainting = tmp_path / "inpainting.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 9, 3, 3)}, inpainting)
    with pytest.raises(ValueError, match="'inpainting' checkpoint"):
        load_base(str(inpainting))
    sdxl = tmp_path / "sdxl.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
               "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": torch.zeros(1)}, sdxl)
    with pytest.raises(ValueError, match="is an SDXL checkpoint, but the model config .* is not"):
        load_base(str(sdxl), model_config=str(models["sd1"]))


def _cache_configs(cache, repo: str, folder) -> None:
    """Put a diffusers folder's config files into a Hugging Face cache as `repo`, as a download would."""
    commit = "0" * 40
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    for file in folder.rglob("*"):
        if file.suffix in (".json", ".txt"):
            target = repo_dir / "snapshots" / commit / file.relative_to(folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(file.read_bytes())
