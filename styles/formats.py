"""Style files: safetensors in the diffusers/PEFT LoRA layout, with our metadata beside diffusers'.

Layout (what stock `StableDiffusionPipeline.load_lora_weights(path)` reads unchanged):
  tensors   unet.<module path>.lora_A.weight  [rank, in]
            unet.<module path>.lora_B.weight  [out, rank]
  metadata  "format": "pt"
            "lora_adapter_metadata": JSON {"unet.r": .., "unet.lora_alpha": .., "unet.target_modules": [..]}
            "style_studio.*": how the style was made (TrainConfig, base model, UNet hash, trigger, time)

diffusers reads `lora_adapter_metadata` to rebuild the LoraConfig, so an alpha that differs from
the rank survives the round trip (without it diffusers would assume alpha = rank).
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path

import safetensors.torch
import torch

UNET_PREFIX = "unet."
LORA_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
OUR_PREFIX = "style_studio."
MAX_HEADER_BYTES = 16 * 1024 * 1024  # a LoRA header is kilobytes; anything near this is not a style


def encode_style(
    unet_lora_state: dict[str, torch.Tensor],
    rank: int,
    alpha: float,
    target_modules: list[str],
    info: dict[str, str],
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a style file from a peft UNet state dict (keys without 'unet.')."""
    tensors = {UNET_PREFIX + key: value.detach().to("cpu", torch.float32).contiguous() for key, value in unet_lora_state.items()}
    lora_config = {"r": rank, "lora_alpha": alpha, "target_modules": sorted(target_modules)}
    metadata = {
        "format": "pt",
        LORA_METADATA_KEY: json.dumps({UNET_PREFIX + k: v for k, v in lora_config.items()}, sort_keys=True),
        **{OUR_PREFIX + key: value for key, value in info.items()},
    }
    return tensors, metadata


def write_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write a safetensors file whole or not at all: a temporary file in the same folder, then rename."""
    path = Path(path)
    data = safetensors.torch.save(tensors, metadata=metadata)
    write_bytes_atomic(path, data)
    return path


def write_bytes_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_header(path: str | Path) -> tuple[dict[str, str], dict[str, dict]]:
    """(metadata, tensor table) of a safetensors file, read without loading any tensor.

    Raises ValueError with the reason when the file is not a sane safetensors file.
    """
    path = Path(path)
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) != 8:
            raise ValueError(f"{path.name} is not a safetensors file (too short).")
        (size,) = struct.unpack("<Q", head)
        if size > MAX_HEADER_BYTES or size > path.stat().st_size - 8:
            raise ValueError(f"{path.name} is not a safetensors file (header size {size} is implausible).")
        try:
            header = json.loads(handle.read(size))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError(f"{path.name} is not a safetensors file (its header is not JSON).") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path.name} is not a safetensors file (its header is not a table).")
    metadata = header.pop("__metadata__", None) or {}
    return metadata, header


def style_info(metadata: dict[str, str]) -> dict[str, str]:
    """Our own metadata entries, without the prefix."""
    return {key[len(OUR_PREFIX):]: value for key, value in metadata.items() if key.startswith(OUR_PREFIX)}


def lora_config(metadata: dict[str, str]) -> dict:
    """The UNet LoraConfig fields stored by diffusers' convention ({} when absent)."""
    packed = json.loads(metadata.get(LORA_METADATA_KEY, "{}"))
    return {key[len(UNET_PREFIX):]: value for key, value in packed.items() if key.startswith(UNET_PREFIX)}


def read_style(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and metadata of a style file."""
    metadata, _ = read_header(path)
    return safetensors.torch.load_file(str(path)), metadata
