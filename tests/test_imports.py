"""Issue 19: adapters made elsewhere import whole, blend by their own formula, restore exactly and export again.

The case table crosses layouts (kohya with diffusers' and with the original block names, ComfyUI's own,
diffusers, PEFT, old diffusers attention processors), kinds (LoRA, LoCon with a Tucker core, LoHa with and
without one, LoKr, DoRA, full differences) and families (tiny random SD 1.x, SD 2.x and SDXL pipelines built
in code). Each file's expected weights are computed here in numpy, from the formulas as ComfyUI and LyCORIS
state them, independently of styles/updates.py.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import safetensors.torch
import torch

from models.base import load_base
from styles import formats, kohya
from styles.blend import Blender
from styles.library import StyleLibrary
from tests import tiny_models

RANK, ALPHA, SCALE = 4, 3.0, 0.7


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: a second thread only adds overhead on a shared machine
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setups(tmp_path_factory):
    """family -> (base, library, blender): one tiny pipeline of each family, loaded as a user's would be."""
    root = tmp_path_factory.mktemp("imports")
    result = {}
    for family in tiny_models.FAMILIES:
        base = load_base(str(tiny_models.save_pipeline(family, root / family)))
        library = StyleLibrary(root / f"{family}-styles")
        result[family] = (base, library, Blender(base, library))
    return result


# -- the layers a file changes, and the parts of each kind --------------------------------------------------


def chosen_layers(layout) -> list[str]:
    """One layer of each sort: attention projection, 3x3 conv, 1x1/linear projection, time embedding linear,
    upsampler conv (its original block number depends on the level's attention), text encoder(s)."""
    patterns = [r"^unet\..*attn1\.to_q$", r"^unet\..*resnets\.0\.conv1$", r"^unet\..*proj_in$",
                r"^unet\..*time_emb_proj$", r"^unet\.up_blocks\.0\.upsamplers\.0\.conv$",
                r"^text_encoder\..*layers\.0\.self_attn\.q_proj$", r"^text_encoder_2\..*layers\.1\.mlp\.fc1$"]
    found = [next((name for name in layout.shapes if re.match(p, name)), None) for p in patterns]
    return [name for name in found if name]


def is_spatial(shape) -> bool:
    return len(shape) == 4 and shape[2:] != (1, 1)


def parts_for(kind: str, shape: tuple, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Random parts of `kind` for a weight of `shape`, as LyCORIS and kohya store them (Tucker kinds fall back
    to their plain form on layers without a kernel)."""
    def rand(*size):
        return torch.randn(*size, generator=g) * 0.3

    out, fan_in, kernel = shape[0], shape[1], tuple(shape[2:])
    flat_in = int(np.prod(shape[1:]))
    alpha = {"alpha": torch.tensor(ALPHA)}
    if kind == "locon_tucker" and is_spatial(shape):
        return {"lora_down.weight": rand(RANK, fan_in, 1, 1), "lora_mid.weight": rand(RANK, RANK, *kernel),
                "lora_up.weight": rand(out, RANK, 1, 1), **alpha}
    if kind in ("lora", "locon_tucker", "dora", "dora_peft"):
        down = rand(RANK, fan_in, *kernel) if len(shape) == 4 else rand(RANK, fan_in)
        up = rand(out, RANK, 1, 1) if len(shape) == 4 else rand(out, RANK)
        parts = {"lora_down.weight": down, "lora_up.weight": up, **alpha}
        if kind == "dora":  # LyCORIS/kohya: one norm per input column
            parts["dora_scale"] = rand(1, fan_in, *([1] * len(kernel))).abs() + 0.5
        if kind == "dora_peft":  # PEFT: one per output row
            parts["dora_scale"] = rand(out).abs() + 0.5
        return parts
    if kind == "loha_tucker" and is_spatial(shape):
        return {"hada_w1_a": rand(RANK, out), "hada_w1_b": rand(RANK, fan_in), "hada_t1": rand(RANK, RANK, *kernel),
                "hada_w2_a": rand(RANK, out), "hada_w2_b": rand(RANK, fan_in), "hada_t2": rand(RANK, RANK, *kernel),
                **alpha}
    if kind in ("loha", "loha_tucker"):
        return {"hada_w1_a": rand(out, RANK), "hada_w1_b": rand(RANK, flat_in),
                "hada_w2_a": rand(out, RANK), "hada_w2_b": rand(RANK, flat_in), **alpha}
    if kind == "lokr":  # convolution: w1 factored, w2 whole with its kernel; linear: both factored (w2's rank scales)
        if len(shape) == 4:
            return {"lokr_w1_a": rand(2, 2), "lokr_w1_b": rand(2, 2), "lokr_w2": rand(out // 2, fan_in // 2, *kernel),
                    **alpha}
        return {"lokr_w1_a": rand(2, 1), "lokr_w1_b": rand(1, 2), "lokr_w2_a": rand(out // 2, RANK),
                "lokr_w2_b": rand(RANK, fan_in // 2), **alpha}
    if kind == "diff":
        return {"diff": rand(*shape) * 0.1, "diff_b": rand(out) * 0.1}
    raise AssertionError(kind)


def expected_delta(parts: dict[str, torch.Tensor], weight: np.ndarray) -> np.ndarray:
    """The change each kind's formula makes to `weight` at scale 1, in numpy float64 (ComfyUI's weight_adapter
    and LyCORIS, written out once more here on purpose, per kernel position where there is a Tucker core)."""
    p = {k: v.double().numpy() for k, v in parts.items()}
    shape, out = weight.shape, weight.shape[0]
    if "lora_mid.weight" in p:
        up, down = p["lora_up.weight"].reshape(out, -1), p["lora_down.weight"].reshape(RANK, -1)
        mid = p["lora_mid.weight"]
        delta = np.stack([np.stack([up @ mid[:, :, k, m] @ down for m in range(shape[3])], -1)
                          for k in range(shape[2])], -2)
        return delta * ALPHA / RANK
    if "lora_up.weight" in p:
        delta = (p["lora_up.weight"].reshape(out, -1) @ p["lora_down.weight"].reshape(RANK, -1)).reshape(shape)
        delta = delta * float(p.get("alpha", RANK)) / RANK
        if "dora_scale" not in p:
            return delta
        updated, magnitude = weight + delta, p["dora_scale"]
        if magnitude.ndim == 1:  # per output row
            norm = np.sqrt((updated.reshape(out, -1) ** 2).sum(1)).reshape(-1, *[1] * (weight.ndim - 1))
            magnitude = magnitude.reshape(norm.shape)
        else:  # per input column
            norm = np.sqrt((updated ** 2).sum(axis=tuple(i for i in range(weight.ndim) if i != 1), keepdims=True))
        return updated * magnitude / norm - weight
    if "hada_t1" in p:
        def side(n):
            a, b, t = p[f"hada_w{n}_a"], p[f"hada_w{n}_b"], p[f"hada_t{n}"]
            return np.stack([np.stack([a.T @ t[:, :, k, m] @ b for m in range(shape[3])], -1)
                             for k in range(shape[2])], -2)
        return side(1) * side(2) * ALPHA / RANK
    if "hada_w1_a" in p:
        product = (p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"])
        return product.reshape(shape) * ALPHA / RANK
    if "lokr_w2" in p:  # w1 factored (its rank scales), w2 whole with the kernel
        w1 = (p["lokr_w1_a"] @ p["lokr_w1_b"])[:, :, None, None]
        return np.kron(w1, p["lokr_w2"]).reshape(shape) * ALPHA / p["lokr_w1_b"].shape[0]
    if "lokr_w2_a" in p:  # both factored: ComfyUI divides by the rank of w2's factors
        w1, w2 = p["lokr_w1_a"] @ p["lokr_w1_b"], p["lokr_w2_a"] @ p["lokr_w2_b"]
        return np.kron(w1, w2).reshape(shape) * ALPHA / p["lokr_w2_b"].shape[0]
    return p["diff"]


# -- the layouts a file may be written in --------------------------------------------------------------------


def sgm(module: str, layout) -> str:
    """The original block name (checked against diffusers' own conversion in test_sgm_names_...)."""
    attended = kohya.attended_up_levels(n[5:] for n in layout.shapes if n.startswith("unet."))
    return kohya.to_sgm(module, layout.layers_per_block, attended)


def file_keys(layer: str, layout_name: str, family: str, layout) -> str:
    """The name `layer` goes by in a file of `layout_name`."""
    component, _, module = layer.partition(".")
    if component == "unet":
        return {"kohya-diffusers": "lora_unet_" + module.replace(".", "_"),
                "kohya-sgm": "lora_unet_" + sgm(module, layout).replace(".", "_"),
                "comfy": "diffusion_model." + sgm(module, layout),
                "diffusers": "unet." + module, "peft": "base_model.model." + module}[layout_name]
    if not module.startswith("text_projection"):  # files name CLIP's layers from its text_model root
        module = module if module.startswith("text_model.") else "text_model." + module
    if layout_name == "comfy":
        clip = "clip_g" if component == "text_encoder_2" else "clip_h" if family == "sd2" else "clip_l"
        return f"text_encoders.{clip}.transformer.{module}"
    if layout_name == "diffusers":
        return f"{component}.{module}"
    prefix = "lora_te2_" if component == "text_encoder_2" else "lora_te1_" if family == "sdxl" else "lora_te_"
    return prefix + module.replace(".", "_")


def write_file(path, updates: dict[str, dict], layout_name: str, family: str, layout) -> None:
    tensors, metadata = {}, {}
    for layer, parts in updates.items():
        name = file_keys(layer, layout_name, family, layout)
        for part, tensor in parts.items():
            if layout_name in ("diffusers", "peft", "old-diffusers"):
                part = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight",
                        "dora_scale": "lora_magnitude_vector"}.get(part, part)
                if part == "alpha":  # diffusers gives alpha in its metadata
                    metadata["lora_adapter_metadata"] = json.dumps(
                        {f"{c}.lora_alpha": ALPHA for c in ("unet", "text_encoder", "text_encoder_2")})
                    continue
            tensors[f"{name}.{part}"] = tensor
    safetensors.torch.save_file(tensors, path, metadata=metadata)


def old_diffusers_file(path, updates: dict[str, dict]) -> None:
    """diffusers' first LoRA format: attention processors' to_q_lora.down/up (alpha = rank)."""
    tensors = {}
    for layer, parts in updates.items():
        head, _, projection = layer[len("unet."):].rpartition(".")
        tensors[f"{head}.processor.{projection}_lora.down.weight"] = parts["lora_down.weight"]
        tensors[f"{head}.processor.{projection}_lora.up.weight"] = parts["lora_up.weight"]
    safetensors.torch.save_file(tensors, path)


KINDS = ["lora", "locon_tucker", "loha", "loha_tucker", "lokr", "dora", "diff"]
CASES = (
    [(layout, kind, family) for family in ("sd1", "sdxl") for layout in ("kohya-diffusers", "kohya-sgm", "comfy")
     for kind in KINDS]
    + [("kohya-diffusers", kind, "sd2") for kind in ("lora", "loha", "dora")]
    + [("diffusers", kind, family) for family in ("sd1", "sdxl") for kind in ("lora", "dora_peft")]
    + [("peft", "lora", "sd1"), ("old-diffusers", "lora", "sd1")]
)


def parameters(base) -> dict[str, torch.Tensor]:
    """Every weight and bias of the UNet and text encoder(s), copied."""
    return {f"{c}.{k}": v.clone() for c in ("unet", "text_encoder", "text_encoder_2")
            if getattr(base.pipe, c, None) is not None for k, v in getattr(base.pipe, c).state_dict().items()}


@pytest.mark.parametrize("layout_name, kind, family", CASES, ids=["-".join(case) for case in CASES])
def test_a_file_imports_whole_blends_by_its_formula_restores_exactly_and_exports_again(
        setups, tmp_path, layout_name, kind, family):
    base, library, blender = setups[family]
    g = torch.Generator().manual_seed(hash((layout_name, kind, family)) % 2**31)
    layers = chosen_layers(base.layout)
    if layout_name in ("peft", "old-diffusers"):  # PEFT files and attention processors hold the UNet only
        layers = [name for name in layers if name.endswith("to_q")]
    updates = {layer: parts_for(kind, base.layout.shapes[layer], g) for layer in layers}
    for layer, parts in updates.items():
        if "diff_b" in parts and layer not in base.layout.biased:
            del parts["diff_b"]
        if layout_name in ("peft", "old-diffusers"):
            parts.pop("alpha")
    source = tmp_path / "adapter.safetensors"
    (old_diffusers_file(source, updates) if layout_name == "old-diffusers"
     else write_file(source, updates, layout_name, family, base.layout))

    name = f"{family}-{layout_name}-{kind}".replace("_", "-")
    blender.apply({})  # the base model as loaded, whatever an earlier case left
    imported, notes = formats.import_style(source, base.layout, base.family)
    library.save(name, imported.to_bytes())
    assert notes[0].startswith("holds ")

    before = parameters(base)
    blender.apply({name: SCALE})
    after = parameters(base)
    for layer, parts in updates.items():
        weight = before[f"{layer}.weight"].double().numpy()
        scaled = dict(parts) if "alpha" in parts else {**parts, "alpha": torch.tensor(float(RANK))}
        expected = weight + SCALE * expected_delta(scaled, weight)
        np.testing.assert_allclose(after[f"{layer}.weight"].double().numpy(), expected, rtol=1e-4, atol=2e-5,
                                   err_msg=layer)
        if "diff_b" in parts:
            np.testing.assert_allclose(after[f"{layer}.bias"].numpy(),
                                       (before[f"{layer}.bias"] + SCALE * parts["diff_b"]).numpy(), atol=1e-6)
    untouched = {k for k in before if k.rpartition(".")[0] not in updates}
    assert all(torch.equal(before[k], after[k]) for k in untouched)  # nothing else changed

    blender.apply({})
    restored = parameters(base)
    assert all(torch.equal(before[k], restored[k]) for k in before)  # exactly the base model again

    tensors, metadata = formats.to_kohya(library.get(name).path, base.layout.layers_per_block)
    exported = formats.write_atomic(tmp_path / "exported.safetensors", tensors, metadata)
    again = formats.read_adapter(exported, base.layout)
    assert set(again.updates) == set(updates)  # every module it brought
    for layer, parts in updates.items():
        kept = again.updates[layer].parts
        assert set(kept) >= set(parts) - {"alpha"} and all(
            torch.equal(kept[p].reshape(t.shape), t) for p, t in parts.items() if p != "alpha"), layer
    if family == "sdxl":  # sd-scripts' SDXL names: original blocks, lora_te1_/lora_te2_
        assert not any(k.startswith(("lora_unet_down_blocks", "lora_unet_up_blocks", "lora_te_")) for k in tensors)


def test_sgm_names_are_the_ones_diffusers_converts_back(setups):
    """Every UNet parameter renamed by kohya.to_sgm and read by diffusers' own LDM conversion lands where it was."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    for family in tiny_models.FAMILIES:
        base = setups[family][0]
        unet = base.pipe.unet
        modules = [name for name, _ in unet.named_modules() if name]
        attended = kohya.attended_up_levels(modules)
        original = {}
        for key, tensor in unet.state_dict().items():
            module, _, param = key.rpartition(".")
            name = kohya.to_sgm(module, base.layout.layers_per_block, attended)
            if name is not None:
                original[f"model.diffusion_model.{name}.{param}"] = tensor
        converted = convert_ldm_unet_checkpoint(original, dict(unet.config))
        state = unet.state_dict()
        mapped = {k for k in state if k.rpartition(".")[0] in {m for m in modules
                                                               if kohya.to_sgm(m, base.layout.layers_per_block,
                                                                               attended)}}
        assert set(converted) >= mapped, family
        assert all(torch.equal(converted[k].reshape(state[k].shape), state[k]) for k in mapped), family
        # every layer an adapter may change has an original name
        layers = [n[5:] for n in base.layout.shapes if n.startswith("unet.")]
        assert all(kohya.to_sgm(m, base.layout.layers_per_block, attended) for m in layers), family


# -- a file as sd-scripts' networks/lora.py writes it: LoCon (conv_dim) and text encoder ----------------------
# sd-scripts' LoRANetwork wraps every Linear and Conv2d inside the module classes below (3x3 convolutions only
# with conv_dim set), names them prefix + "." + module path + "." + child with every "." made "_", uses its SGM
# block names for SDXL (lora_te1_/lora_te2_), and stores alpha per module: its key scheme, reproduced here.
SD_SCRIPTS_UNET = ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D")  # with conv_dim
SD_SCRIPTS_TEXT = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")


def sd_scripts_locon(base, g) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """(file tensors, {layer: parts}) of a LoCon + text-encoder LoRA with network_dim 4, conv_dim 2."""
    tensors, updates = {}, {}
    components = [("unet", base.pipe.unet, SD_SCRIPTS_UNET)] + [
        (c, getattr(base.pipe, c), SD_SCRIPTS_TEXT) for c in ("text_encoder", "text_encoder_2")
        if getattr(base.pipe, c, None) is not None]
    for component, model, classes in components:
        for parent_name, parent in model.named_modules():
            if type(parent).__name__ not in classes:
                continue
            for child_name, child in parent.named_modules():
                if not isinstance(child, (torch.nn.Linear, torch.nn.Conv2d)) or not child_name:
                    continue
                module = f"{parent_name}.{child_name}"
                layer = f"{component}.{module}"
                if layer in updates:
                    continue
                spatial = isinstance(child, torch.nn.Conv2d) and child.kernel_size != (1, 1)
                rank = 2 if spatial else RANK
                shape = tuple(child.weight.shape)
                down = torch.randn(rank, *shape[1:], generator=g) * 0.2 if len(shape) == 4 else torch.randn(
                    rank, shape[1], generator=g) * 0.2
                up = torch.randn(shape[0], rank, *([1, 1] if len(shape) == 4 else []), generator=g) * 0.2
                parts = {"lora_down.weight": down, "lora_up.weight": up, "alpha": torch.tensor(1.0 if spatial else 2.0)}
                name = (file_keys(layer, "kohya-sgm" if base.family == "sdxl" else "kohya-diffusers", base.family,
                                  base.layout))
                tensors |= {f"{name}.{part}": t for part, t in parts.items()}
                updates[layer] = parts
    return tensors, updates


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_an_sd_scripts_locon_with_text_encoder_imports_and_blends_whole(setups, tmp_path, family):
    base, library, blender = setups[family]
    tensors, updates = sd_scripts_locon(base, torch.Generator().manual_seed(7))
    assert any(k.startswith("lora_te") for k in tensors) and any("conv1" in k or "in_layers_2" in k for k in tensors)
    source = tmp_path / "sd_scripts_locon.safetensors"
    safetensors.torch.save_file(tensors, source, metadata={
        "ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_network_alpha": "2",
        "ss_network_args": json.dumps({"conv_dim": "2", "conv_alpha": "1"})})
    imported, notes = formats.import_style(source, base.layout, base.family)
    library.save(f"locon-{family}", imported.to_bytes())
    assert "LoCon" in notes[0] and "text encoder" in notes[0]

    before = parameters(base)
    blender.apply({f"locon-{family}": 1.0})
    after = parameters(base)
    for layer, parts in updates.items():
        rank = parts["lora_down.weight"].shape[0]
        weight = before[f"{layer}.weight"].double().numpy()
        delta = (parts["lora_up.weight"].double().reshape(weight.shape[0], rank).numpy()
                 @ parts["lora_down.weight"].double().reshape(rank, -1).numpy()).reshape(weight.shape)
        np.testing.assert_allclose(after[f"{layer}.weight"].double().numpy(),
                                   weight + delta * float(parts["alpha"]) / rank, rtol=1e-4, atol=2e-5, err_msg=layer)
    blender.apply({})
    assert all(torch.equal(before[k], v) for k, v in parameters(base).items())
    exported, metadata = formats.to_kohya(library.get(f"locon-{family}").path, base.layout.layers_per_block)
    assert exported.keys() == tensors.keys() and metadata["ss_network_args"]  # sd-scripts' own names and notes


@pytest.mark.parametrize("bad, words", [
    ({"lora_unet_{conv}.oft_blocks": (4, 8, 8)}, r"'oft_blocks' is not a part of an adapter kind"),
    ({"lora_unet_{conv}.w_norm": (8,)}, r"'w_norm' is not a part of an adapter kind"),
    ({"lora_unet_down_blocks_7_resnets_0_conv1.lora_down.weight": (4, 8),
      "lora_unet_down_blocks_7_resnets_0_conv1.lora_up.weight": (8, 4)},
     r"'lora_unet_down_blocks_7_resnets_0_conv1' \(LoRA\) does not name a layer of this base"),
    ({"lora_unet_{conv}.hada_w1_a": (4, 4), "lora_unet_{conv}.lora_up.weight": (4, 4)}, r"LoRA and LoHa in one"),
    ({"lora_unet_{conv}.diff_b": (32,)}, r"diff_b without its diff"),
])
def test_what_cannot_apply_is_refused_naming_the_layer(setups, tmp_path, bad, words):
    base = setups["sd1"][0]
    conv = next(n for n in base.layout.shapes if n.endswith("resnets.0.conv1"))[5:].replace(".", "_")
    tensors = {key.format(conv=conv): torch.ones(shape) for key, shape in bad.items()}
    path = tmp_path / "bad.safetensors"
    safetensors.torch.save_file(tensors, path)
    with pytest.raises(ValueError, match=words):
        formats.import_style(path, base.layout, base.family)  # refused before anything is made to save


def test_an_import_of_plain_lora_exports_in_diffusers_layout_and_stock_diffusers_draws_the_blend(setups, tmp_path):
    """The diffusers-layout export of an imported LoRA (UNet and text encoder): alpha / rank folded in, loaded by
    stock diffusers' load_lora_weights, draws what our fused blend draws. Other kinds are refused with the reason."""
    from diffusers import StableDiffusionPipeline

    base, library, blender = setups["sd1"]
    g = torch.Generator().manual_seed(3)
    layers = [n for n in chosen_layers(base.layout) if n.endswith(("to_q", "q_proj", "time_emb_proj"))]
    updates = {layer: parts_for("lora", base.layout.shapes[layer], g) for layer in layers}
    source = tmp_path / "plain.safetensors"
    write_file(source, updates, "kohya-diffusers", "sd1", base.layout)
    imported, _ = formats.import_style(source, base.layout, base.family)
    library.save("plain", imported.to_bytes())
    exported = tmp_path / "plain_diffusers.safetensors"
    exported.write_bytes(formats.to_diffusers(library.get("plain").path, base.layout))

    folder = tmp_path / "stock"
    base.pipe.save_pretrained(folder)  # the base as it was loaded: no blend is fused now
    stock = StableDiffusionPipeline.from_pretrained(folder)
    stock.load_lora_weights(str(exported))
    blender.apply({"plain": 1.0})
    prompt = dict(prompt="a red circle", num_inference_steps=3, output_type="np", height=32, width=32)
    ours = base.pipe(**prompt, generator=torch.Generator().manual_seed(1)).images
    theirs = stock(**prompt, generator=torch.Generator().manual_seed(1)).images
    blender.apply({})
    assert np.abs(ours - theirs).max() < 1e-4

    loha = tmp_path / "loha.safetensors"
    write_file(loha, {layers[0]: parts_for("loha", base.layout.shapes[layers[0]], g)}, "kohya-diffusers", "sd1",
               base.layout)
    imported, _ = formats.import_style(loha, base.layout, base.family)
    library.save("loha", imported.to_bytes())
    with pytest.raises(ValueError, match="LoHa, which diffusers' and PEFT's LoRA layout cannot hold"):
        formats.to_diffusers(library.get("loha").path, base.layout)
