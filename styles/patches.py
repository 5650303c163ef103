"""Adapter files of any layout ComfyUI reads, as one weight update per layer of the base model.

Layouts (the names a layer goes by; styles/kohya.name_table lists them):
  kohya            lora_unet_<module with _>, lora_te_/lora_te1_/lora_te2_<module>  (sd-scripts, A1111, LyCORIS)
                   UNet modules in diffusers' spelling or the original (SGM) one
  ComfyUI          diffusion_model.<original UNet path>, text_encoders.clip_l|clip_g|clip_h.transformer.<module>
  diffusers, PEFT  unet.<module>, text_encoder.<module>, text_encoder_2.<module>, base_model.model.<module>,
                   and old diffusers attention processors (<attention>.processor.to_q_lora.down.weight)
and parts of each kind styles/updates.py applies (LoRA, LoCon, LoHa, LoKr, DoRA, full differences).

A file is read whole or refused: every key must name a part of a supported kind on a layer this base
model has, with shapes that fit and finite values. Nothing is half-applied or silently dropped.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch

from models.base import Layout
from styles import kohya
from styles.metadata import LORA_METADATA_KEY
from styles.updates import KIND_PARTS, PARTS, SUPPORTED, Update

MAX_RANK = 512
# How the diffusers, PEFT and transformers layouts spell a part -> the kohya/LyCORIS spelling we keep.
PART_ALIASES = {
    ".lora_A.weight": "lora_down.weight",
    ".lora_B.weight": "lora_up.weight",
    ".lora.down.weight": "lora_down.weight",  # diffusers' LoRACompatible layers
    ".lora.up.weight": "lora_up.weight",
    "_lora.down.weight": "lora_down.weight",  # old diffusers attention processors: ...processor.to_q_lora.down
    "_lora.up.weight": "lora_up.weight",
    ".lora_linear_layer.down.weight": "lora_down.weight",
    ".lora_linear_layer.up.weight": "lora_up.weight",
    ".lora_magnitude_vector": "dora_scale",  # PEFT's DoRA: one norm per output row
    ".lora_magnitude_vector.weight": "dora_scale",
}
DIFFUSERS_PREFIXES = ("unet.", "text_encoder.", "text_encoder_2.")
COMPONENT_NAMES = {"unet": "UNet", "text_encoder": "text encoder", "text_encoder_2": "second text encoder"}


@dataclass
class Patch:
    """An adapter file read against a base model: its update of each layer it changes, and its metadata."""

    updates: dict[str, Update]  # "unet.<module>" / "text_encoder.<module>" / ... -> its parts, as the file has them
    metadata: dict[str, str]
    source_format: str

    def summary(self) -> str:
        """'128 LoRA, 66 LoCon on the UNet; 72 LoRA on the text encoder': what the file changes."""
        groups: dict[str, Counter] = {name: Counter() for name in COMPONENT_NAMES.values()}  # UNet first
        for layer, update in self.updates.items():
            groups[COMPONENT_NAMES[layer.partition(".")[0]]][_kind_name(update)] += 1
        return "; ".join(f"{', '.join(f'{n} {kind}' for kind, n in counts.most_common())} on the {component}"
                         for component, counts in groups.items() if counts)

    def plain_lora(self) -> bool:
        """Whether every update is a plain LoRA (no Tucker core, no DoRA): what diffusers' own layout can hold."""
        return all(update.low_rank() is not None for update in self.updates.values())


def read_patch(path: str | Path, layout: Layout, metadata: dict[str, str]) -> Patch:
    """Every layer update of a checked safetensors adapter file (formats.check_adapter_file), in any layout.

    Raises ValueError naming the key or layer when a part is of no supported kind, a layer is not in the
    base model, a shape does not fit, a value is not finite or a rank is out of range.
    """
    path = Path(path)
    raw = safetensors.torch.load_file(str(path))
    names = kohya.name_table(list(layout.shapes), layout.layers_per_block)
    entries: dict[str, dict[str, torch.Tensor]] = {}
    spelled: dict[str, str] = {}  # layer -> the name the file gives it, for messages
    for key, tensor in raw.items():
        name, part = _split(key)
        layer = _layer(name, names)
        if layer is None or layer not in layout.shapes:
            raise ValueError(f"{path.name}: {name!r} ({_kind_of_part(part)}) does not name a layer of this base "
                             "model's UNet or text encoders; the adapter was probably made for another model family.")
        if part in entries.setdefault(layer, {}):
            raise ValueError(f"{path.name}: {layer} is given twice ({spelled[layer]!r} and {name!r}).")
        entries[layer][part] = tensor
        spelled[layer] = name
    if not entries:
        raise ValueError(f"{path.name} holds no adapter weights; nothing to import.")
    _add_metadata_alphas(entries, metadata)
    updates = {layer: Update(layer, parts) for layer, parts in entries.items()}
    for update in updates.values():
        _check(update, layout, path.name)
    source = ("ComfyUI" if any(n.startswith(kohya.COMFY_UNET) for n in spelled.values())
              else "kohya" if kohya.is_kohya(spelled.values()) else "diffusers/PEFT")
    return Patch(updates, metadata, source)


def kohya_tensors(patch: Patch, family: str, layout: Layout) -> dict[str, torch.Tensor]:
    """The patch in the kohya layout, every part as the file gave it (names as sd-scripts writes them)."""
    attended = kohya.attended_up_levels(layer[5:] for layer in layout.shapes if layer.startswith("unet."))
    tensors = {}
    for layer, update in patch.updates.items():
        name = kohya.export_name(layer, family, layout.layers_per_block, attended)
        tensors |= {f"{name}.{part}": tensor.contiguous() for part, tensor in update.parts.items()}
    return tensors


def diffusers_tensors(patch: Patch, layout: Layout) -> dict[str, torch.Tensor]:
    """A plain-LoRA patch in diffusers' own layout (<component>.<module>.lora_A/lora_B.weight), each layer's
    alpha / rank folded into its lora_B so that diffusers' default alpha = rank gives the same strength."""
    if not patch.plain_lora():
        kinds = sorted({_kind_name(u) for u in patch.updates.values() if u.low_rank() is None})
        raise ValueError(f"This style holds {', '.join(kinds)}, which diffusers' and PEFT's LoRA layout cannot "
                         "hold; export it in the kohya layout, which ComfyUI, AUTOMATIC1111 and sd-scripts read.")
    tensors = {}
    for layer, update in patch.updates.items():
        up, down = update.parts["lora_up.weight"].float() * update.scale(), update.parts["lora_down.weight"].float()
        if len(layout.shapes[layer]) == 2:  # a Linear stored as a 1x1 convolution by some tools
            up, down = up.flatten(1), down.flatten(1)
        name = f"{layer.partition('.')[0]}.{kohya.file_path(layer)}"  # text encoders with CLIP's text_model root
        tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"] = down.contiguous(), up.contiguous()
    return tensors


# -- helpers -----------------------------------------------------------------------------------------


def _split(key: str) -> tuple[str, str]:
    """'lora_unet_x.lora_down.weight' -> ('lora_unet_x', 'lora_down.weight'), for every layout's spelling."""
    for suffix, part in PART_ALIASES.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], part
    for part in PARTS:
        if key.endswith("." + part):
            return key[: -len(part) - 1], part
    name, _, part = key.rpartition(".")
    raise ValueError(f"Unexpected key {key!r}: {part!r} is not a part of an adapter kind Style Studio applies "
                     f"({SUPPORTED}); the file was not imported.")


def _layer(name: str, names: dict[str, str]) -> str | None:
    """The layer ("unet.<module>", ...) a file's name for it means; None if it means none."""
    if name in names:  # kohya, ComfyUI and text encoder names
        return names[name]
    name = name.removeprefix("base_model.model.")
    if not name.startswith(DIFFUSERS_PREFIXES):
        name = "unet." + name  # PEFT's and old diffusers' files hold the UNet only
    head, _, projection = name.rpartition(".processor.")  # old diffusers attention processors
    if head:
        return f"{head}.{'to_out.0' if projection == 'to_out' else projection}"
    return name


def _add_metadata_alphas(entries: dict[str, dict[str, torch.Tensor]], metadata: dict[str, str]) -> None:
    """diffusers' files give alpha in their metadata (lora_adapter_metadata: <component>.lora_alpha and
    alpha_pattern), not per layer: put it where the kohya layout keeps it. Without either, alpha = rank."""
    try:
        packed = json.loads(metadata.get(LORA_METADATA_KEY) or "{}")
    except json.JSONDecodeError:
        raise ValueError(f"The file's {LORA_METADATA_KEY} metadata is not JSON; the file is damaged.") from None
    for layer, parts in entries.items():
        component, _, module = layer.partition(".")
        alpha = packed.get(f"{component}.lora_alpha") if isinstance(packed, dict) else None
        if "alpha" in parts or alpha is None or "lora_down.weight" not in parts:
            continue
        pattern = packed.get(f"{component}.alpha_pattern") or {}
        alpha = next((v for k, v in pattern.items() if module.endswith(k)), alpha)
        parts["alpha"] = torch.tensor(float(alpha))


def _check(update: Update, layout: Layout, file: str) -> None:
    """Refuse an update that cannot apply whole: kind, rank, finite values, shapes (checked on the meta device)."""
    kind = update.kind  # raises for a mix of kinds or none
    rank = update.rank
    if rank is not None and not 1 <= rank <= MAX_RANK:
        raise ValueError(f"{file}: rank {rank} of the {kind} of {update.layer} is outside 1-{MAX_RANK}.")
    for part, tensor in update.parts.items():
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{file}: the {part} of {update.layer} contains NaN or infinite values; "
                             "the file is damaged.")
    if "alpha" in update.parts and (update.parts["alpha"].numel() != 1 or not math.isfinite(update.scale())):
        raise ValueError(f"{file}: the alpha of {update.layer} is not one finite number.")
    shape = layout.shapes[update.layer]
    meta = Update(update.layer, {p: t if p == "alpha" else torch.empty(t.shape, device="meta")
                                 for p, t in update.parts.items()})
    meta.delta(torch.empty(shape, device="meta"))  # raises ValueError naming the layer and the shapes
    bias = update.parts.get("diff_b")
    if bias is not None and (update.layer not in layout.biased or bias.shape != (shape[0],)):
        has = "has no bias" if update.layer not in layout.biased else f"has {shape[0]} outputs"
        raise ValueError(f"{file}: the diff_b of {update.layer} ({list(bias.shape)}) does not fit: the layer {has}.")


def _kind_name(update: Update) -> str:
    """LoRA on a convolution is what users call LoCon."""
    kind = update.kind
    if kind.startswith("LoRA") and update.parts["lora_down.weight"].ndim == 4 and (
        update.parts["lora_down.weight"].shape[2:] != (1, 1) or "lora_mid.weight" in update.parts
    ):
        return kind.replace("LoRA", "LoCon")
    return kind


def _kind_of_part(part: str) -> str:
    return next((kind for kind, parts in KIND_PARTS.items() if part in parts), part)
