"""What a style file's safetensors metadata says, read without torch (the library lists styles with it).

A style file carries two sets of metadata entries beside its tensors (styles/formats.py writes them):
  "lora_adapter_metadata"  diffusers' JSON of the UNet LoraConfig ({"unet.r": .., "unet.lora_alpha": .., ...})
  "style_studio.<key>"     ours: config (the TrainConfig as JSON), trigger, base_model, family, unet_hash, created, ...
"""

from __future__ import annotations

import json

UNET_PREFIX = "unet."
LORA_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
OUR_PREFIX = "style_studio."


def style_info(metadata: dict[str, str]) -> dict[str, str]:
    """Our own metadata entries, without the prefix.

    >>> style_info({"style_studio.trigger": "ink", "format": "pt"})
    {'trigger': 'ink'}
    """
    return {key[len(OUR_PREFIX):]: value for key, value in metadata.items() if key.startswith(OUR_PREFIX)}


def lora_config(metadata: dict[str, str]) -> dict:
    """The UNet LoraConfig fields stored by diffusers' convention ({} when absent)."""
    packed = json.loads(metadata.get(LORA_METADATA_KEY, "{}"))
    return {key[len(UNET_PREFIX):]: value for key, value in packed.items() if key.startswith(UNET_PREFIX)}
