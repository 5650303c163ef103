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


_DOWN_ATTN = re.compile(r"^down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)$")
_UP_ATTN = re.compile(r"^up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)$")
_MID_ATTN = re.compile(r"^mid_block\.attentions\.0\.(.+)$")


def to_sgm(module: str, layers_per_block: int) -> str | None:
    """diffusers UNet path of an attention module -> its original (SGM/LDM) path; None if not in one.

    The original UNet numbers its blocks flat: input block 0 is conv_in, then each down level has
    `layers_per_block` layers and a downsampler; each up level has one layer more.
    """
    if match := _DOWN_ATTN.match(module):
        level, layer, rest = int(match[1]), int(match[2]), match[3]
        return f"input_blocks.{(layers_per_block + 1) * level + layer + 1}.1.{rest}"
    if match := _UP_ATTN.match(module):
        level, layer, rest = int(match[1]), int(match[2]), match[3]
        return f"output_blocks.{(layers_per_block + 1) * level + layer}.1.{rest}"
    if match := _MID_ATTN.match(module):
        return f"middle_block.1.{match[1]}"
    return None


def kohya_name(module: str) -> str:
    """'down_blocks.0.attentions.0...to_out.0' -> 'lora_unet_down_blocks_0_attentions_0_..._to_out_0'."""
    return UNET + module.replace(".", "_")


def name_table(module_names: list[str], layers_per_block: int) -> dict[str, str]:
    """Every kohya name a UNet module may go by (diffusers and SGM spellings) -> its diffusers path."""
    table = {}
    for module in module_names:
        table[kohya_name(module)] = module
        if (sgm := to_sgm(module, layers_per_block)) is not None:
            table[kohya_name(sgm)] = module
    return table


def export(
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]], alpha: float, family: str, layers_per_block: int
) -> dict[str, torch.Tensor]:
    """Kohya tensors from {diffusers module path: (lora_A, lora_B)}, with the trained alpha."""
    tensors = {}
    for module, (down, up) in modules.items():
        name = module
        if family == "sdxl":  # sd-scripts' SDXL files use the original block names
            name = to_sgm(module, layers_per_block) or module
        key = kohya_name(name)
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


def split_key(key: str) -> tuple[str, str] | None:
    """'lora_unet_x.lora_down.weight' -> ('lora_unet_x', '.lora_down.weight'); None for other parts."""
    for part in (DOWN, UP, ALPHA):
        if key.endswith(part):
            return key[: -len(part)], part
    return None
