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
import math
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import safetensors.torch
import torch

from core.files import PICKLE_SUFFIXES, read_safetensors_header, write_bytes_atomic
from core.names import ATTENTION_PROJECTIONS
from models.base import UnetLayout
from styles import kohya
from styles.metadata import LORA_METADATA_KEY, OUR_PREFIX, UNET_PREFIX, lora_config, style_info


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
MAX_RANK = 512
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
UNSUPPORTED_PARTS = {  # key fragments of adapter kinds that are not LoRA, with their names for the message
    "hada_": "LoHa (LyCORIS)",
    "lokr_": "LoKr (LyCORIS)",
    "lora_mid": "LoCon with a mid weight (LyCORIS)",
    "dora_scale": "DoRA",
    "lora_magnitude_vector": "DoRA",
    ".diff": "full weight difference",
}



@dataclass
class ImportedAdapter:
    """The UNet attention LoRA of a foreign file, normalised to one rank and alpha, and what was left out."""

    tensors: dict[str, torch.Tensor]  # peft's layout: <module>.lora_A/B.weight (no 'unet.' prefix)
    rank: int
    alpha: float
    target_modules: list[str]
    source_format: str
    metadata: dict[str, str]  # the file's own metadata
    notes: list[str] = field(default_factory=list)  # what was not imported, and assumptions made


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
        raise ValueError(f"{path.name} is not a .safetensors file; only safetensors LoRA adapters can be imported.")
    if path.stat().st_size > MAX_ADAPTER_BYTES:
        raise ValueError(f"{path.name} is {path.stat().st_size / 1024**3:.1f} GB; a LoRA adapter is at most "
                         f"{MAX_ADAPTER_BYTES / 1024**3:.0f} GB. Is it a whole model checkpoint?")
    metadata, table = read_safetensors_header(path)
    if not table:
        raise ValueError(f"{path.name} holds no tensors.")
    for key, entry in table.items():
        if not isinstance(entry, dict) or entry.get("dtype") not in FLOAT_DTYPES:
            raise ValueError(
                f"{path.name}: tensor {key!r} is not a float tensor "
                f"({entry.get('dtype') if isinstance(entry, dict) else entry})."
            )
    for fragment, kind in UNSUPPORTED_PARTS.items():
        if any(fragment in key for key in table):
            raise ValueError(
                f"{path.name} is a {kind} adapter; "
                "only LoRA adapters (lora_A/lora_B or lora_down/lora_up) can be imported."
            )
    return metadata, table


def import_adapter(path: str | Path, layout: UnetLayout) -> ImportedAdapter:
    """Read a diffusers, PEFT or kohya LoRA file and keep its UNet attention part, checked against `layout`.

    Text-encoder weights and LoRA on other UNet modules (convolutions, feed-forward, projections)
    are reported in `notes`, not silently dropped. Raises ValueError naming the problem when a key
    does not map onto the base model, a shape differs, a value is not finite or the rank is too large.

    >>> adapter = import_adapter("pixel_art.safetensors", base.layout)  # doctest: +SKIP
    """
    path = Path(path)
    metadata, table = check_adapter_file(path)
    raw = safetensors.torch.load_file(str(path))
    if kohya.is_kohya(table):
        source, modules, skipped, alphas = "kohya", *_parse_kohya(raw, layout)
    else:
        source, modules, skipped, alphas = "diffusers/PEFT", *_parse_peft(raw, metadata)
    notes = [
        f"{count} {what} left out (a style adapts the UNet's attention projections only)"
        for what, count in skipped.items()
    ]

    unknown = sorted(m for m in modules if m not in layout.modules)
    if unknown:
        raise ValueError(
            f"{path.name} does not fit this base model: {len(unknown)} module(s) it adapts do not exist here, "
            f"e.g. {unknown[0]!r}. It was probably made for another model family."
        )
    used = {m: pair for m, pair in modules.items() if m in layout.projections}
    other = len(modules) - len(used)
    if other:
        notes.append(f"LoRA on {other} other UNet module(s) (convolutions, feed-forward, projections) left out")
    if not used:
        raise ValueError(
            f"{path.name} has no LoRA weights on the UNet's attention projections "
            f"({', '.join(ATTENTION_PROJECTIONS)}); nothing to import."
        )

    for module, (down, up) in used.items():
        out_features, in_features = layout.projections[module]
        rank = down.shape[0]
        if down.ndim != 2 or up.ndim != 2 or down.shape[1] != in_features or up.shape != (out_features, rank):
            raise ValueError(
                f"{path.name}: the LoRA of {module} has shapes {list(down.shape)} and {list(up.shape)}; "
                f"this base model needs [rank, {in_features}] and [{out_features}, rank]. "
                "It was made for another model."
            )
        if not 1 <= rank <= MAX_RANK:
            raise ValueError(f"{path.name}: rank {rank} of {module} is outside 1-{MAX_RANK}.")
        if not (torch.isfinite(down).all() and torch.isfinite(up).all()):
            raise ValueError(f"{path.name}: the LoRA of {module} contains NaN or infinite values; the file is damaged.")
    if not all(math.isfinite(alphas.get(m, 1.0)) for m in used):
        raise ValueError(f"{path.name}: an alpha value is not finite; the file is damaged.")

    ranks = {down.shape[0] for down, _ in used.values()}
    module_alphas = {alphas.get(m, float(used[m][0].shape[0])) for m in used}
    if len(ranks) == 1 and len(module_alphas) == 1:
        rank, alpha = ranks.pop(), module_alphas.pop()
        tensors = {f"{m}.lora_A.weight": d.float() for m, (d, _) in used.items()}
        tensors |= {f"{m}.lora_B.weight": u.float() for m, (_, u) in used.items()}
    else:
        # One style has one rank and one alpha. Pad every module to the largest rank with zero rows
        # and columns (B @ A is unchanged) and fold each module's alpha / rank into its B, with
        # alpha = rank overall: the same update, exactly, up to float rounding.
        rank, alpha, tensors = max(ranks), float(max(ranks)), {}
        for m, (down, up) in used.items():
            r = down.shape[0]
            scale = alphas.get(m, float(r)) / r
            tensors[f"{m}.lora_A.weight"] = torch.nn.functional.pad(down.float(), (0, 0, 0, rank - r))
            tensors[f"{m}.lora_B.weight"] = torch.nn.functional.pad(up.float() * scale, (0, rank - r))
        notes.append(
            f"ranks {sorted(ranks)} and alphas differ per module: "
            f"padded to rank {rank} with each module's strength kept"
        )
    if not alphas:
        notes.append("the file does not say its alpha: alpha = rank assumed, as diffusers does")
    return ImportedAdapter(
        tensors={k: v.contiguous() for k, v in tensors.items()},
        rank=rank,
        alpha=alpha,
        target_modules=sorted(used),
        source_format=source,
        metadata=metadata,
        notes=notes,
    )


def import_style(path: str | Path, layout: UnetLayout, family: str) -> tuple[StyleAdapter, list[str]]:
    """A diffusers, PEFT or kohya LoRA file as a style of a `family` base, checked against its `layout`,
    and notes on what was left out. A file we exported keeps the record of how it was made.

    >>> adapter, notes = import_style("pixel_art.safetensors", base.layout, base.family)  # doctest: +SKIP
    >>> library.save("pixel-art", adapter.to_bytes())                                        # doctest: +SKIP
    """
    adapter = import_adapter(path, layout)
    ours = style_info(adapter.metadata)
    info = {
        "trigger": ours.get("trigger", ""),
        "base_model": ours.get("base_model") or adapter.metadata.get("ss_sd_model_name", ""),
        "family": family,
        "unet_hash": ours.get("unet_hash", ""),
        "created": ours.get("created") or datetime.now(UTC).isoformat(timespec="seconds"),
        "config": ours.get("config") or json.dumps({"rank": adapter.rank, "alpha": adapter.alpha}),
        "imported_from": f"{Path(path).name} ({adapter.source_format})",
    }
    return StyleAdapter(adapter.tensors, adapter.rank, adapter.alpha, adapter.target_modules, info), adapter.notes


def _parse_kohya(raw: dict[str, torch.Tensor], layout: UnetLayout):
    """kohya keys -> ({module: (down, up)}, {skipped kind: count}, {module: alpha})."""
    names = kohya.name_table(sorted(layout.modules), layout.layers_per_block)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    text_encoder: set[str] = set()
    for key, tensor in raw.items():
        split = kohya.split_key(key)
        if split is None:
            raise ValueError(f"Unexpected key {key!r}: a kohya LoRA has only lora_down, lora_up and alpha entries.")
        name, part = split
        if name.startswith(kohya.TEXT_ENCODER):
            text_encoder.add(name)
            continue
        parts.setdefault(name, {})[part] = tensor
    modules, alphas = {}, {}
    for name, entry in parts.items():
        if kohya.DOWN not in entry or kohya.UP not in entry:
            raise ValueError(
                f"{name} has no {'lora_up' if kohya.DOWN in entry else 'lora_down'} weight; the file is incomplete."
            )
        module = names.get(name)
        if module is None:
            raise ValueError(
                f"{name} does not name a module of this base model's UNet; "
                "it was probably made for another model family."
            )
        down, up = entry[kohya.DOWN], entry[kohya.UP]
        if (
            down.ndim == 4 and down.shape[2:] == (1, 1) and up.ndim == 4 and up.shape[2:] == (1, 1)
            and module in layout.projections
        ):
            down, up = down[:, :, 0, 0], up[:, :, 0, 0]  # some tools store linear layers as 1x1 convolutions
        modules[module] = (down, up)
        if kohya.ALPHA in entry:
            alphas[module] = float(entry[kohya.ALPHA].float().item())
    skipped = {"text-encoder LoRA module(s)": len(text_encoder)} if text_encoder else {}
    return modules, skipped, alphas


_OLD_DIFFUSERS = re.compile(r"^(.*)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")


def _parse_peft(raw: dict[str, torch.Tensor], metadata: dict[str, str]):
    """diffusers (unet.<m>.lora_A.weight), PEFT (base_model.model.<m>...) and old diffusers attention-processor keys."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    text_encoder = 0
    for key, tensor in raw.items():
        if key.startswith(("text_encoder.", "text_encoder_2.", "te.", "te1.", "te2.")):
            text_encoder += 1
            continue
        name = key.removeprefix("base_model.model.").removeprefix(UNET_PREFIX)
        if match := _OLD_DIFFUSERS.match(name):
            module = match[1] + "." + ("to_out.0" if match[2] == "to_out" else match[2])
            part = "A" if match[3] == "down" else "B"
        elif name.endswith((".lora_A.weight", ".lora_B.weight")):
            module, part = name[: -len(".lora_A.weight")], name[-len("A.weight")]
        elif name.endswith((".lora.down.weight", ".lora.up.weight")):  # diffusers' LoRACompatible layers
            module = (
                name[: -len(".lora.down.weight")] if name.endswith("down.weight") else name[: -len(".lora.up.weight")]
            )
            part = "A" if name.endswith("down.weight") else "B"
        else:
            raise ValueError(f"Unexpected key {key!r}: not a LoRA weight in the diffusers, PEFT or kohya layout.")
        parts.setdefault(module, {})[part] = tensor
    modules = {}
    for module, entry in parts.items():
        if "A" not in entry or "B" not in entry:
            raise ValueError(f"{module} has only one of its two LoRA weights; the file is incomplete.")
        modules[module] = (entry["A"], entry["B"])
    config = lora_config(metadata) if LORA_METADATA_KEY in metadata else {}
    alphas = {}
    if "lora_alpha" in config:
        pattern = config.get("alpha_pattern") or {}
        for module in modules:
            alphas[module] = float(next((v for k, v in pattern.items() if module.endswith(k)), config["lora_alpha"]))
    skipped = {"text-encoder LoRA weight(s)": text_encoder} if text_encoder else {}
    return modules, skipped, alphas


def to_kohya(path: str | Path, layers_per_block: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A style file's tensors and metadata in the kohya layout (A1111, ComfyUI), with its trained alpha.

    Our own metadata stays beside the `ss_*` keys, so importing the file again restores how the
    style was made.
    """
    tensors, metadata = read_style(path)
    config = lora_config(metadata)
    info = style_info(metadata)
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
