"""Style files: safetensors in the diffusers/PEFT LoRA layout, with our metadata beside diffusers'.

Layout (what stock `StableDiffusionPipeline.load_lora_weights(path)` reads unchanged):
  tensors   unet.<module path>.lora_A.weight  [rank, in]
            unet.<module path>.lora_B.weight  [out, rank]
  metadata  "format": "pt"
            "lora_adapter_metadata": JSON {"unet.r": .., "unet.lora_alpha": .., "unet.target_modules": [..]}
            "style_studio.*": how the style was made (TrainConfig, base model, UNet hash, trigger, time)

diffusers reads `lora_adapter_metadata` to rebuild the LoraConfig, so an alpha that differs from
the rank survives the round trip (without it diffusers would assume alpha = rank).

That is a trained style. An imported one (issue 19) is kept in the kohya layout with every part it brought,
of any kind (styles/patches.py reads both, for the blender and for exports).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import safetensors.torch
import torch

from core.files import PICKLE_SUFFIXES, read_safetensors_header, write_bytes_atomic
from models.base import Layout
from styles import kohya
from styles.metadata import LORA_METADATA_KEY, OUR_PREFIX, UNET_PREFIX, lora_config, style_info
from styles.patches import Patch, diffusers_tensors, kohya_tensors, read_patch


@dataclass
class StyleAdapter:
    """A style's LoRA weights and what its file records about them: what train() hands back, and what an import reads.

    The caller saves it through the library:
    >>> library.save("ink", adapter.to_bytes(), thumbnail=finished.thumbnail)  # doctest: +SKIP
    """

    tensors: dict[str, torch.Tensor]  # peft's UNet LoRA state dict: <module>.lora_A/B.weight (no 'unet.' prefix)
    rank: int
    alpha: float
    target_modules: list[str]
    # our metadata: config, trigger, base model, family, UNet hash, ...
    info: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        # In fp32 on the CPU, as the file holds them: an event that carries them keeps no GPU memory alive.
        self.tensors = {
            key: value.detach().to("cpu", torch.float32).contiguous() for key, value in self.tensors.items()
        }

    def to_bytes(self) -> bytes:
        """The style file: safetensors in the diffusers layout, with diffusers' and our metadata."""
        lora_config = {"r": self.rank, "lora_alpha": self.alpha, "target_modules": sorted(self.target_modules)}
        metadata = {
            "format": "pt",
            LORA_METADATA_KEY: json.dumps({UNET_PREFIX + k: v for k, v in lora_config.items()}, sort_keys=True),
            **{OUR_PREFIX + key: value for key, value in self.info.items()},
        }
        tensors = {UNET_PREFIX + key: value for key, value in self.tensors.items()}  # fp32 on the CPU already
        return safetensors.torch.save(tensors, metadata=metadata)


def write_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write a safetensors file whole or not at all (core.files.write_bytes_atomic)."""
    return write_bytes_atomic(path, safetensors.torch.save(tensors, metadata=metadata))





def read_style(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and metadata of a style file."""
    metadata, _ = read_safetensors_header(path)
    return safetensors.torch.load_file(str(path)), metadata


# -- validation and import of adapters made elsewhere --------------------------------------------
# An adapter file is data, never code: only safetensors are read (the format cannot run code when
# loaded), and every tensor is checked against the base model before anything else touches it.

MAX_ADAPTER_BYTES = 2 * 1024**3  # the largest SDXL LoRAs with text encoders are about 1 GB
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
# The foreign metadata an import keeps, so that its kohya export reads in A1111 and ComfyUI as the original did.
KEPT_PREFIXES = ("ss_", "modelspec.")


@dataclass
class ImportedStyle:
    """An adapter made elsewhere, as the library keeps it: every part it brought, in the kohya layout
    (layer names as sd-scripts writes them for the base's family), with our metadata beside the file's own."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]

    def to_bytes(self) -> bytes:
        return safetensors.torch.save(self.tensors, metadata=self.metadata)


def check_adapter_file(path: str | Path) -> tuple[dict[str, str], dict[str, dict]]:
    """Refuse anything but a sane safetensors file before reading a tensor; return (metadata, table)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise ValueError(
            f"{path.name} is a pickle file ({suffix}), which can run code when it is opened; it was not read. "
            "Ask for the .safetensors version of this adapter, or convert it on a machine you trust."
        )
    if suffix != ".safetensors":
        raise ValueError(f"{path.name} is not a .safetensors file; only safetensors adapters can be imported.")
    if path.stat().st_size > MAX_ADAPTER_BYTES:
        raise ValueError(f"{path.name} is {path.stat().st_size / 1024**3:.1f} GB; a LoRA adapter is at most "
                         f"{MAX_ADAPTER_BYTES / 1024**3:.0f} GB. Is it a whole model checkpoint?")
    metadata, table = read_safetensors_header(path)
    if not table:
        raise ValueError(f"{path.name} holds no tensors; nothing to import.")
    for key, entry in table.items():
        if not isinstance(entry, dict) or entry.get("dtype") not in FLOAT_DTYPES:
            raise ValueError(
                f"{path.name}: tensor {key!r} is not a float tensor "
                f"({entry.get('dtype') if isinstance(entry, dict) else entry})."
            )
    return metadata, table


def read_adapter(path: str | Path, layout: Layout) -> Patch:
    """Any adapter file ComfyUI reads (kohya, ComfyUI, diffusers, PEFT; LoRA, LoCon, LoHa, LoKr, DoRA, full
    differences; UNet and text encoders), checked whole against the base model's `layout`: a Patch, or a
    ValueError naming the problem. Style files of the library are read the same way.

    >>> patch = read_adapter("pixel_art.safetensors", base.layout)  # doctest: +SKIP
    >>> patch.summary()                                             # doctest: +SKIP
    '128 LoRA, 66 LoCon on the UNet; 72 LoRA on the text encoder'
    """
    metadata, _ = check_adapter_file(path)
    return read_patch(path, layout, metadata)


def patch_style(patch: Patch, info: dict[str, str], family: str, layout: Layout,
                kept: dict[str, str] | None = None) -> ImportedStyle:
    """A style kept as layer updates (an import, or a saved blend of issue 20): every part in the kohya layout,
    our metadata (`info`, with the family, what it holds and, unless `info` says, its rank and alpha) beside the
    foreign entries `kept`."""
    ranks = sorted({u.rank for u in patch.updates.values() if u.rank is not None})
    alphas = {u.parts["alpha"].item() for u in patch.updates.values() if "alpha" in u.parts}
    config = {"rank": ranks[-1] if ranks else None, "alpha": alphas.pop() if len(alphas) == 1 else None}
    info = {"config": json.dumps(config), **info, "family": family, "holds": patch.summary()}
    metadata = (kept or {}) | {OUR_PREFIX + key: value for key, value in info.items()}
    return ImportedStyle(kohya_tensors(patch, family, layout), metadata)


def import_style(path: str | Path, layout: Layout, family: str) -> tuple[ImportedStyle, list[str]]:
    """An adapter made elsewhere as a style of a `family` base, checked against its `layout`, with notes on what
    it holds and what was assumed. Every part is kept; a file we exported keeps the record of how it was made.

    >>> imported, notes = import_style("pixel_art.safetensors", base.layout, base.family)  # doctest: +SKIP
    >>> library.save("pixel-art", imported.to_bytes())                                        # doctest: +SKIP
    """
    patch = read_adapter(path, layout)
    notes = [f"holds {patch.summary()}"]
    if any("alpha" not in u.parts and u.rank is not None for u in patch.updates.values()):
        notes.append("some layers do not say their alpha: alpha = rank assumed, as diffusers and ComfyUI do")
    ours = style_info(patch.metadata)
    info = {
        **ours,  # a file we exported: how the style was made, its config included
        "trigger": ours.get("trigger", "") or patch.metadata.get("modelspec.trigger_phrase", ""),
        "base_model": ours.get("base_model") or patch.metadata.get("ss_sd_model_name", ""),
        "unet_hash": ours.get("unet_hash", ""),
        "created": ours.get("created") or datetime.now(UTC).isoformat(timespec="seconds"),
        "imported_from": f"{Path(path).name} ({patch.source_format})",
    }
    kept = {key: value for key, value in patch.metadata.items() if key.startswith(KEPT_PREFIXES)}
    return patch_style(patch, info, family, layout, kept), notes


def to_kohya(path: str | Path, layers_per_block: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A style file's tensors and metadata in the kohya layout (A1111, ComfyUI), with its trained alpha.

    Our own metadata stays beside the `ss_*` keys, so importing the file again restores how the
    style was made.
    """
    tensors, metadata = read_style(path)
    info = style_info(metadata)
    if kohya.is_kohya(tensors):  # an import: kept in the kohya layout with every part it brought
        if not any(key.startswith(KEPT_PREFIXES) for key in metadata):
            config = json.loads(info.get("config") or "{}")
            rank = config.get("rank") or 0
            metadata |= kohya.training_metadata(info.get("family", "sd1"), Path(path).stem, rank,
                                                float(config.get("alpha") or rank), info, {})
        return tensors, metadata
    config = lora_config(metadata)
    rank = int(config.get("r") or next(t.shape[0] for k, t in tensors.items() if k.endswith("lora_A.weight")))
    alpha = float(config.get("lora_alpha") or rank)
    modules = {
        key[len(UNET_PREFIX) : -len(".lora_A.weight")]: (value, tensors[key.replace("lora_A", "lora_B")])
        for key, value in tensors.items()
        if key.startswith(UNET_PREFIX) and key.endswith(".lora_A.weight")
    }
    family = info.get("family", "sd1")
    kohya_tensors = kohya.export(modules, alpha, family, layers_per_block)
    kohya_metadata = kohya.training_metadata(
        family, Path(path).stem, rank, alpha, info, json.loads(info.get("config", "{}"))
    )
    return kohya_tensors, kohya_metadata | {key: value for key, value in metadata.items() if key.startswith(OUR_PREFIX)}


def to_diffusers(path: str | Path, layout: Layout) -> bytes:
    """A style file in diffusers' own layout (what diffusers' and PEFT's code load): a trained style's file as it
    is; an import of plain LoRA layers converted (each layer's alpha / rank folded in); other kinds refused."""
    metadata, table = read_safetensors_header(path)
    if not kohya.is_kohya(table):
        return Path(path).read_bytes()
    tensors = diffusers_tensors(read_patch(path, layout, metadata), layout)
    return safetensors.torch.save(tensors, metadata={"format": "pt", **{
        key: value for key, value in metadata.items() if key.startswith(OUR_PREFIX)}})
