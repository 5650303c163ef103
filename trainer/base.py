"""Load a base model: the embedded default, a hub id, a diffusers folder or a single .safetensors file.

The embedded model is a diffusers folder we pretrain and commit (trainer/embedded.py); it is
loaded with from_pretrained like any other.

Also the one place that decides device and dtype (ARCHITECTURE.md convention 5).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline

from trainer import embedded

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl")


def choose_device_dtype(precision: str = "auto") -> tuple[torch.device, torch.dtype]:
    """Device and dtype of the frozen weights: bf16 (else fp16) on a GPU, fp32 on the CPU."""
    if torch.cuda.is_available():
        device = torch.device("cuda")
        auto = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        device, auto = torch.device("cpu"), torch.float32
    dtypes = {"auto": auto, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in dtypes:
        raise ValueError(f"Unknown precision {precision!r}; choose one of {', '.join(dtypes)}.")
    return device, dtypes[precision]


@dataclass
class Base:
    """A loaded base pipeline and what we know about it."""

    pipe: StableDiffusionPipeline
    model_id: str
    family: str  # "sd1" | "sd2"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32

    @property
    def resolution(self) -> int:
        """Native image size in pixels."""
        return self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor

    @cached_property
    def unet_hash(self) -> str:
        """sha256 over the UNet's base weights (LoRA layers excluded), to tell models apart."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.pipe.unet.state_dict().items()):
            if "lora_" in name:
                continue
            name = name.replace(".base_layer", "")  # peft wraps targeted layers; hash the same names
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()[:16]


def load_base(model: str | None = None, precision: str = "auto") -> Base:
    """Load a base model by hub id, diffusers folder or single-file checkpoint; None is the embedded model.

    >>> base = load_base()  # the embedded tiny model, offline
    >>> base.family, base.resolution
    ('sd1', 64)
    """
    device, dtype = choose_device_dtype(precision)
    if model in (None, "", embedded.EMBEDDED_ID, "embedded"):
        if not (embedded.MODEL_DIR / "model_index.json").is_file():
            raise ValueError(
                f"The embedded model is missing from {embedded.MODEL_DIR}; rebuild it with `python -m trainer.pretrain`."
            )
        pipe, model_id = _load_pipeline(str(embedded.MODEL_DIR), dtype), embedded.EMBEDDED_ID
    else:
        pipe, model_id = _load_pipeline(str(model), dtype), str(model)
    family = detect_family(pipe)
    pipe.to(device)
    if pipe.unet.dtype != dtype:
        pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    for frozen in (pipe.unet, pipe.vae, pipe.text_encoder):
        frozen.requires_grad_(False)
    return Base(pipe=pipe, model_id=model_id, family=family, device=device, dtype=dtype)


def detect_family(pipe) -> str:
    unet = pipe.unet.config
    if getattr(unet, "addition_embed_type", None) == "text_time":
        raise ValueError(
            "SDXL base models are not supported yet: use a Stable Diffusion 1.x or 2.x model for now."
        )
    return "sd2" if unet.cross_attention_dim == 1024 else "sd1"


def _load_pipeline(model: str, dtype: torch.dtype):
    path = Path(model)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ValueError(
            f"{path.name} is a pickle checkpoint, which can run code when loaded; it is refused. "
            "Use a .safetensors checkpoint or a diffusers folder instead."
        )
    if path.suffix.lower() == ".safetensors":
        if not path.is_file():
            raise ValueError(f"Checkpoint file {model} does not exist.")
        return StableDiffusionPipeline.from_single_file(str(path), dtype=dtype)
    if path.exists() and not (path / "model_index.json").is_file():
        raise ValueError(f"{model} is not a diffusers model folder (it has no model_index.json).")
    try:
        return DiffusionPipeline.from_pretrained(model, dtype=dtype, safety_checker=None)
    except OSError as err:
        raise ValueError(
            f"Cannot load base model {model!r}: {err}. Give a hub id that is in the local cache "
            "(the machine is offline), a diffusers folder, or a .safetensors checkpoint."
        ) from None
