"""The kohya LoRA key layout (AUTOMATIC1111, ComfyUI, kohya sd-scripts), both ways.

A kohya file names each adapted module by its UNet path with '.' turned into '_':
  lora_unet_<module>.lora_down.weight   [rank, in]   (peft's lora_A)
  lora_unet_<module>.lora_up.weight     [out, rank]  (peft's lora_B)
  lora_unet_<module>.alpha              []           the update is scaled by alpha / rank
plus `ss_*` metadata saying how it was trained. SD 1.x and 2.x files use diffusers' module names
(down_blocks_1_attentions_0_...); SDXL files from sd-scripts use the original (SGM) names
(input_blocks_4_1_...). A1111 and ComfyUI read both; we write what sd-scripts writes.

diffusers' `convert_state_dict_to_kohya` writes alpha = rank whatever the adapter was trained
with, which changes the strength of every style whose alpha differs from its rank; it also has
no SGM names. So this module does the renaming itself (it is a few string rules) and writes the
trained alpha.
"""

from __future__ import annotations

import json
import re
from datetime import datetime

import torch

UNET = "lora_unet_"
TEXT_ENCODER = ("lora_te_", "lora_te1_", "lora_te2_")  # SD 1.x/2.x; SDXL's first and second encoder
TEXT_ENCODER_PREFIXES = {"text_encoder": ("lora_te_", "lora_te1_"), "text_encoder_2": ("lora_te2_",)}
COMFY_UNET = "diffusion_model."  # ComfyUI's own LoRA files: the original UNet path, dots kept
# ComfyUI's text encoder prefixes (clip_h is SD 2's encoder, clip_g SDXL's second).
COMFY_TEXT_ENCODERS = {"text_encoder": ("text_encoders.clip_l.transformer.", "text_encoders.clip_h.transformer."),
                       "text_encoder_2": ("text_encoders.clip_g.transformer.",)}
DOWN, UP, ALPHA = ".lora_down.weight", ".lora_up.weight", ".alpha"

# sd-scripts' names of the base model each family is, and the model-spec architecture ids and implementations
# as sd-scripts writes them (library/sai_model_spec.py: determine_architecture, determine_implementation).
BASE_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
MODELSPEC_ARCHITECTURE = {
    "sd1": "stable-diffusion-v1/lora",
    "sd2": "stable-diffusion-v2-512/lora",
    "sd2-v": "stable-diffusion-v2-768-v/lora",
    "sdxl": "stable-diffusion-xl-v1-base/lora",
}
MODELSPEC_IMPLEMENTATION = {"sdxl": "https://github.com/Stability-AI/generative-models"}  # the others: "diffusers"


# diffusers' UNet module names -> the original (SGM/LDM) ones, as sd-scripts' and ComfyUI's conversion tables
# spell them (sd-scripts library/sdxl_model_util.py, ComfyUI comfy/utils.py unet_to_diffusers).
_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions)\.(\d+)(\..+)?$")
_SAMPLER = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(?:downsamplers|upsamplers)\.0\.conv$")
_MID = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)(\..+)?$")
_RESNET_PARTS = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                 "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_FIXED = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
          "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
          "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}


def to_sgm(module: str, layers_per_block: int, attended_up_levels: frozenset[int] = frozenset()) -> str | None:
    """diffusers UNet module path -> its original (SGM/LDM) path; None for a module it has no name for.

    The original UNet numbers its blocks flat: input block 0 is conv_in, then each down level has
    `layers_per_block` layers and a downsampler; each up level has one layer more, then its upsampler,
    which is the block's third part where the level has attention and its second where it has not.
    """
    step = layers_per_block + 1
    if module in _FIXED:
        return _FIXED[module]
    if match := _BLOCK.match(module):
        side, level, kind, layer, rest = match[1], int(match[2]), match[3], int(match[4]), match[5] or ""
        index = step * level + layer + (1 if side == "down_blocks" else 0)
        block = f"{'input' if side == 'down_blocks' else 'output'}_blocks.{index}"
        return f"{block}.1{rest}" if kind == "attentions" else f"{block}.0{_resnet_part(rest)}"
    if match := _SAMPLER.match(module):
        level = int(match[2])
        if match[1] == "down_blocks":
            return f"input_blocks.{step * (level + 1)}.0.op"
        return f"output_blocks.{step * level + layers_per_block}.{2 if level in attended_up_levels else 1}.conv"
    if match := _MID.match(module):
        kind, index, rest = match[1], int(match[2]), match[3] or ""
        if kind == "attentions":
            return f"middle_block.1{rest}"
        return f"middle_block.{2 * index}{_resnet_part(rest)}"
    return None


def _resnet_part(rest: str) -> str:
    """'.conv1' -> '.in_layers.2': a ResNet block's part in the original UNet's names."""
    head, dot, tail = rest[1:].partition(".")
    return "." + _RESNET_PARTS.get(head, head) + dot + tail if rest else ""


def attended_up_levels(unet_modules) -> frozenset[int]:
    """The up levels of a UNet that have attention (their upsampler is numbered after it)."""
    return frozenset(int(m.split(".")[1]) for m in unet_modules if m.startswith("up_blocks.") and ".attentions." in m)


def kohya_name(module: str, prefix: str = UNET) -> str:
    """'down_blocks.0.attentions.0...to_out.0' -> 'lora_unet_down_blocks_0_attentions_0_..._to_out_0'."""
    return prefix + module.replace(".", "_")


def file_path(layer: str) -> str:
    """A layer's module path as adapter files spell it: a text encoder's with CLIP's "text_model." root, which
    files and checkpoints carry and transformers 5 no longer puts in module names."""
    component, _, module = layer.partition(".")
    if component != "unet" and module.startswith(("encoder.", "embeddings.", "final_layer_norm")):
        return "text_model." + module
    return module


def name_table(layers: list[str], layers_per_block: int) -> dict[str, str]:
    """Every name a layer goes by in adapter files -> the layer ("unet.<path>", "text_encoder.<path>", ...).

    kohya names (lora_unet_ with diffusers' and with the original block names, lora_te_/lora_te1_ and
    lora_te2_ for the text encoders), ComfyUI's own (diffusion_model.<original path>,
    text_encoders.clip_*.transformer.<module>) and diffusers' text encoder names, each with and without
    CLIP's "text_model." root.
    """
    unet = [layer[len("unet."):] for layer in layers if layer.startswith("unet.")]
    attended = attended_up_levels(unet)
    table = {}
    for module in unet:
        table[kohya_name(module)] = "unet." + module
        if (sgm := to_sgm(module, layers_per_block, attended)) is not None:
            table[kohya_name(sgm)] = "unet." + module
            table[COMFY_UNET + sgm] = "unet." + module
    for layer in layers:
        component, _, module = layer.partition(".")
        for spelling in {module, file_path(layer)}:
            for prefix in TEXT_ENCODER_PREFIXES.get(component, ()):
                table[kohya_name(spelling, prefix)] = layer
            for prefix in COMFY_TEXT_ENCODERS.get(component, ()):
                table[prefix + spelling] = layer
            if component != "unet":
                table[f"{component}.{spelling}"] = layer
    return table


def export_name(layer: str, family: str, layers_per_block: int, attended: frozenset[int] = frozenset()) -> str:
    """The kohya name sd-scripts writes for a layer: SGM block names and lora_te1_/lora_te2_ for SDXL."""
    component, _, module = layer.partition(".")
    if component == "unet":
        return kohya_name(to_sgm(module, layers_per_block, attended) or module if family == "sdxl" else module)
    if component == "text_encoder":
        return kohya_name(file_path(layer), "lora_te1_" if family == "sdxl" else "lora_te_")
    return kohya_name(file_path(layer), "lora_te2_")


def export(
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]], alpha: float, family: str, layers_per_block: int
) -> dict[str, torch.Tensor]:
    """Kohya tensors from {diffusers UNet module path: (lora_A, lora_B)}, with the trained alpha."""
    tensors = {}
    for module, (down, up) in modules.items():
        key = export_name("unet." + module, family, layers_per_block)
        tensors[key + DOWN] = down.contiguous()
        tensors[key + UP] = up.contiguous()
        tensors[key + ALPHA] = torch.tensor(float(alpha), dtype=torch.float32)
    return tensors


def training_metadata(
    family: str, name: str, rank: int, alpha: float, info: dict[str, str], config: dict
) -> dict[str, str]:
    """The `ss_*` and `modelspec.*` entries as sd-scripts' train_network.py writes them: what A1111's and
    ComfyUI's LoRA browsers show. Times are epoch seconds; `ss_tag_frequency` counts the comma-separated tags
    of the training captions (sd-scripts' set_tag_frequency), so A1111 lists the trigger word first."""
    v_prediction = _v_prediction(family, info)
    side = info.get("resolution") or str(config.get("resolution") or "")
    width, _, height = side.partition("x")
    width, height = (width, height or width) if width else ("", "")
    architecture = MODELSPEC_ARCHITECTURE.get(family + ("-v" if family == "sd2" and v_prediction else ""), "")
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": f"{alpha:g}",
        "ss_base_model_version": BASE_VERSION.get(family, ""),
        "ss_v2": str(family == "sd2"),
        "ss_sd_model_name": info.get("base_model", ""),
        "ss_output_name": name,
        "ss_training_comment": f"Style Studio style '{name}'",
        "ss_learning_rate": str(config.get("learning_rate", "")),
        "ss_unet_lr": str(config.get("learning_rate", "")),
        "ss_text_encoder_lr": "0",
        "ss_network_train_unet_only": "True",
        "ss_max_train_steps": str(config.get("steps", "")),
        "ss_train_batch_size": str(config.get("batch_size", "")),
        "ss_seed": str(config.get("seed", "")),
        "ss_resolution": f"({width}, {height})" if width else "",
        "ss_num_train_images": info.get("num_images", ""),
        "ss_training_started_at": _epoch(info.get("started_at", "")),
        "ss_training_finished_at": _epoch(info.get("created", "")),
        "ss_tag_frequency": json.dumps({"style_studio": tag_frequency(json.loads(info.get("captions") or "[]"))}),
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": architecture,
        "modelspec.implementation": MODELSPEC_IMPLEMENTATION.get(family, "diffusers"),
        "modelspec.title": name,
        "modelspec.date": info.get("created", ""),
        "modelspec.resolution": f"{width}x{height}" if width else "",
        "modelspec.trigger_phrase": info.get("trigger", ""),
    }
    if v_prediction is not None:
        metadata["ss_v_parameterization"] = str(v_prediction)
        metadata["modelspec.prediction_type"] = "v" if v_prediction else "epsilon"
    return {key: value for key, value in metadata.items() if value != ""}


def tag_frequency(captions: list[str]) -> dict[str, int]:
    """How many captions hold each tag: a caption's comma-separated parts, stripped and lower-cased, as
    sd-scripts counts them for `ss_tag_frequency`."""
    counts: dict[str, int] = {}
    for caption in captions:
        for tag in (part.strip().lower() for part in str(caption or "").split(",")):
            if tag:
                counts[tag] = counts.get(tag, 0) + 1
    return counts


def _v_prediction(family: str, info: dict[str, str]) -> bool | None:
    """Whether the style's base predicts v. Styles record it; for older ones SD 1.x and SDXL are epsilon,
    and an SD 2.x base is v at 768 px (2.x-768-v) and epsilon at 512 (2.x-base), as SD 2 was released."""
    if info.get("prediction_type"):
        return info["prediction_type"] == "v_prediction"
    if family == "sd2":
        side = (info.get("resolution") or "").partition("x")[0]
        return int(side) >= 768 if side.isdigit() else None
    return False if family in ("sd1", "sdxl") else None


def _epoch(iso_time: str) -> str:
    """An ISO time as epoch seconds, as sd-scripts writes times (time.time()); "" when there is none."""
    try:
        return f"{datetime.fromisoformat(iso_time).timestamp():.6f}" if iso_time else ""
    except ValueError:
        return ""


def is_kohya(keys) -> bool:
    return any(key.startswith((UNET, *TEXT_ENCODER)) for key in keys)
