"""Load a base model: the embedded default, a hub id, a diffusers folder or a single .safetensors file.

Three families are supported, each detected from the loaded UNet (detect_family): Stable Diffusion
1.x ("sd1"), 2.x ("sd2", epsilon or v-prediction) and SDXL ("sdxl", two text encoders). A style
records the family it was trained on, and the blender refuses a style of another family.

The embedded model is a diffusers folder we pretrain and commit (embedded/); it is
loaded with from_pretrained like any other.

Also the one place that decides device and dtype (ARCHITECTURE.md convention 5), and where a Base
computes its facts (family, resolution, UNet hash, layout), once, at load: training (trainer/) and
blending (styles/) both use it, and neither imports the other.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.loaders.single_file_utils import DIFFUSERS_DEFAULT_PIPELINE_PATHS, infer_diffusers_model_type
from huggingface_hub import constants as hub_constants
from huggingface_hub import snapshot_download
from safetensors import safe_open

import embedded
from core.files import PICKLE_SUFFIXES
from core.names import ATTENTION_PROJECTIONS

# The text-to-image pipelines we train on, by the class name a diffusers folder's model_index.json gives.
PIPELINES = {cls.__name__: cls for cls in (StableDiffusionPipeline, StableDiffusionXLPipeline)}
# What single-file checkpoints we load, by diffusers' name for what they hold (infer_diffusers_model_type).
SINGLE_FILE_KINDS = {"v1": StableDiffusionPipeline, "v2": StableDiffusionPipeline, "xl_base": StableDiffusionXLPipeline}
# The files from_single_file reads from a hub repo to build a pipeline (as its own config download does).
CONFIG_FILES = ["**/*.json", "*.json", "*.txt", "**/*.txt", "**/*.model"]


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


# The pipeline parts an adapter file may change, by the prefix diffusers gives their LoRA keys.
ADAPTED_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


@dataclass
class Layout:
    """What an adapter file must fit: every Linear and Conv2d weight of the UNet and the text encoder(s).

    Keyed as diffusers prefixes LoRA keys: "unet.<module path>", "text_encoder.<...>", "text_encoder_2.<...>".
    """

    shapes: dict[str, tuple[int, ...]]  # layer -> its weight's shape
    biased: set[str]  # the layers that have a bias
    layers_per_block: int  # the UNet's, to spell its modules with the original (SGM) block numbers

    @classmethod
    def of(cls, pipe) -> Layout:
        shapes, biased = {}, set()
        for component in ADAPTED_COMPONENTS:
            model = getattr(pipe, component, None)
            if model is None:
                continue
            for name, module in model.named_modules():
                if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                    shapes[f"{component}.{name}"] = tuple(module.weight.shape)
                    if module.bias is not None:
                        biased.add(f"{component}.{name}")
        layers = pipe.unet.config.layers_per_block
        return cls(shapes, biased, layers if isinstance(layers, int) else layers[0])

    def projections(self) -> list[str]:
        """The UNet's attention projections (what our own training adapts), as "unet.<path>"."""
        ends = tuple("." + p for p in ATTENTION_PROJECTIONS)
        return [name for name in self.shapes if name.startswith("unet.") and name.endswith(ends)]


class BaseInUse(RuntimeError):
    """A training run or a Blender asked for a pipeline that another of them has changed."""


@dataclass(eq=False)
class Base:
    """A loaded base pipeline and the facts about it, computed once, when it is loaded (Base.of).

    Training and blending both change the pipeline (LoRA layers, fused weights), so one pipeline
    serves one of them at a time: whoever changes it claims it first, and a second claimant is
    refused with BaseInUse. Train on a Base of its own, or inside `blender.lend_base()`, which
    hands the pipeline over as it was loaded and takes it back.
    """

    pipe: StableDiffusionPipeline | StableDiffusionXLPipeline
    model_id: str
    family: str  # "sd1" | "sd2" | "sdxl"
    device: torch.device
    dtype: torch.dtype
    prediction_type: str  # what the UNet predicts: "epsilon" (the noise) or "v_prediction"
    resolution: int  # native image size in pixels
    unet_hash: str  # sha256 over the UNet's weights, to tell models apart (styles record it)
    layout: Layout  # what an adapter file must fit
    # (who changes the pipeline now, its description)
    _user: tuple[object, str] | None = field(default=None, repr=False)
    _claims: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def defaults_family(self) -> str:
        """Whose training defaults fit this base (trainer.config.FAMILY_DEFAULTS): its family, or "embedded"."""
        return "embedded" if self.model_id == embedded.EMBEDDED_ID else self.family

    @classmethod
    def of(cls, pipe, model_id: str, device: torch.device, dtype: torch.dtype) -> Base:
        """Freeze a pipeline, cast it to `dtype`, read its facts (on the CPU) and move it to `device`."""
        for part in pipe.components.values():  # unet, vae and the text encoder(s): nothing of the base trains
            if isinstance(part, torch.nn.Module):
                part.requires_grad_(False)
        if pipe.unet.dtype != dtype:
            pipe.to(dtype=dtype)
        pipe.set_progress_bar_config(disable=True)
        base = cls(
            pipe=pipe,
            model_id=model_id,
            family=detect_family(pipe.unet.config),
            device=device,
            dtype=dtype,
            prediction_type=pipe.scheduler.config.get("prediction_type", "epsilon"),
            resolution=pipe.unet.config.sample_size * pipe.vae_scale_factor,
            unet_hash=unet_hash(pipe.unet),  # before the move: hashing reads every weight on the CPU
            layout=Layout.of(pipe),
        )
        pipe.to(device)
        return base

    def claim(self, user: object, what: str) -> None:
        """Record that `user` (`what`: its description for messages) is changing the pipeline;
        BaseInUse if another is."""
        with self._claims:
            if self._user is not None and self._user[0] is not user:
                raise BaseInUse(
                    f"This base model's pipeline is held by {self._user[1]}, so {what} cannot use it: give "
                    "it a Base of its own (load_base()), or hand the pipeline over with `with blender.lend_base():`."
                )
            self._user = (user, what)

    def release(self, user: object) -> None:
        """`user` has given the pipeline back as it was loaded."""
        with self._claims:
            if self._user is not None and self._user[0] is user:
                self._user = None


def unet_hash(unet: torch.nn.Module) -> str:
    """sha256 over a UNet's weights, by name, to tell base models apart (the first 16 hex digits)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(unet.state_dict().items()):
        digest.update(name.encode())
        # Flattened before the byte view: a channels-last 1x1 conv weight counts as contiguous with a last
        # stride > 1, which view(uint8) refuses. The bytes are the same row-major ones either way. The
        # array's own buffer is hashed, not a bytes copy of it.
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


def load_base(model: str | None = None, precision: str = "auto", model_config: str | None = None) -> Base:
    """Load a base model by hub id, diffusers folder or single-file checkpoint; None is the embedded model.

    A hub id is read from the local Hugging Face cache when offline (HF_HUB_OFFLINE=1). A single
    .safetensors checkpoint holds weights only: `model_config` names the diffusers folder, or hub id,
    whose configs describe its parts (default: diffusers' reference model of its family, which
    must then be in the cache when offline).

    >>> base = load_base()  # the embedded tiny model, offline
    >>> base.family, base.resolution
    ('sd1', 64)
    >>> load_base("sdxl.safetensors", model_config="stabilityai/stable-diffusion-xl-base-1.0")  # doctest: +SKIP
    """
    device, dtype = choose_device_dtype(precision)
    if model in (None, "", embedded.EMBEDDED_ID, "embedded"):
        if not (embedded.MODEL_DIR / "model_index.json").is_file():
            raise ValueError(
                f"The embedded model is missing from {embedded.MODEL_DIR}; "
                "rebuild it with `python -m embedded.pretrain`."
            )
        pipe, model_id = _load_pipeline(str(embedded.MODEL_DIR), dtype), embedded.EMBEDDED_ID
    else:
        pipe, model_id = _load_pipeline(str(model), dtype, model_config), str(model)
    return Base.of(pipe, model_id, device, dtype)


def detect_family(unet_config: Mapping) -> str:
    """"sd1", "sd2" or "sdxl" from a UNet config (unet.config, or the dict of its config.json).

    The rule, first match wins:
    - sdxl: addition_embed_type == "text_time", the pooled-text and image-size conditioning SDXL
      added (its UNet cannot run without them); no 1.x or 2.x UNet has it.
    - sd2: use_linear_projection, since 2.x replaced 1.x's 1x1-convolution projections into and out of
      each transformer block with linear layers; or cross_attention_dim 1024 (OpenCLIP ViT-H's width).
    - sd1: anything else.
    Not by widths alone (768, 1024, 2048): small and distilled models of each family have others.

    >>> detect_family({"cross_attention_dim": 1024, "use_linear_projection": True})
    'sd2'
    """
    if unet_config.get("addition_embed_type") == "text_time":
        return "sdxl"
    if unet_config.get("use_linear_projection") or unet_config.get("cross_attention_dim") == 1024:
        return "sd2"
    return "sd1"


def _load_pipeline(model: str, dtype: torch.dtype, model_config: str | None = None):
    path = Path(model)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ValueError(
            f"{path.name} is a pickle checkpoint, which can run code when loaded; it is refused. "
            "Use a .safetensors checkpoint or a diffusers folder instead."
        )
    if path.suffix.lower() == ".safetensors":
        return _load_single_file(path, dtype, model_config)
    if path.exists() and not (path / "model_index.json").is_file():
        raise ValueError(f"{model} is not a diffusers model folder (it has no model_index.json).")
    try:
        # model_index.json first: it names the pipeline, so a wrong kind is refused before gigabytes load.
        cls = _pipeline_class(model)
        extra = {"safety_checker": None} if cls is StableDiffusionPipeline else {}
        return cls.from_pretrained(model, dtype=dtype, **extra)
    except OSError as err:
        raise ValueError(
            f"Cannot load base model {model!r}: {err}. Give a hub id that is in the local cache "
            "(the machine is offline), a diffusers folder, or a .safetensors checkpoint."
        ) from None


def _pipeline_class(model: str) -> type:
    """The pipeline class a diffusers folder or hub id declares, if it is one we train on."""
    name = DiffusionPipeline.load_config(model).get("_class_name")
    if name not in PIPELINES:
        raise ValueError(
            f"{model} is a {name} model; Style Studio trains on text-to-image Stable Diffusion 1.x, 2.x "
            "and SDXL base models (StableDiffusionPipeline or StableDiffusionXLPipeline)."
        )
    return PIPELINES[name]


def checkpoint_kind(path: str | Path) -> str:
    """What a single-file checkpoint holds, in diffusers' words: "v1", "v2", "xl_base", "xl_refiner", "inpainting"...

    Read from the key names and shapes in the file's header, without loading a tensor; diffusers'
    own rule decides (SDXL, for instance, by its second text encoder's conditioner.embedders.1 keys).
    """
    with safe_open(str(path), framework="pt") as checkpoint:
        # infer_diffusers_model_type only asks `key in checkpoint` and `checkpoint[key].shape`.
        shapes = {key: SimpleNamespace(shape=checkpoint.get_slice(key).get_shape()) for key in checkpoint.keys()}
    if not any(key.startswith("model.diffusion_model.") for key in shapes):
        raise ValueError(
            f"{Path(path).name} holds no Stable Diffusion UNet (no model.diffusion_model.* weights); "
            "if it is a LoRA style, import it in the Styles tab instead."
        )
    return infer_diffusers_model_type(shapes)


def _load_single_file(path: Path, dtype: torch.dtype, model_config: str | None):
    """A pipeline from one original-layout .safetensors checkpoint, with its configs found offline."""
    if not path.is_file():
        raise ValueError(f"Checkpoint file {path} does not exist.")
    kind = checkpoint_kind(path)
    if kind not in SINGLE_FILE_KINDS:
        raise ValueError(
            f"{path.name} is a {kind!r} checkpoint; Style Studio trains on Stable Diffusion 1.x, 2.x and "
            "SDXL base checkpoints (not inpainting, refiner, upscaler or ControlNet ones)."
        )
    cls = SINGLE_FILE_KINDS[kind]
    config = _single_file_config(path, kind, model_config)
    if _pipeline_class(config) is not cls:
        raise ValueError(
            f"{path.name} is an {'SDXL' if cls is StableDiffusionXLPipeline else 'SD 1.x/2.x'} checkpoint, "
            f"but the model config {model_config} is not: give the config of a model of the same family."
        )
    extra = {"safety_checker": None} if cls is StableDiffusionPipeline else {}
    # local_files_only: every config is in `config` already, so nothing is fetched.
    return cls.from_single_file(str(path), config=config, dtype=dtype, local_files_only=True, **extra)


def _single_file_config(path: Path, kind: str, model_config: str | None) -> str:
    """A local diffusers folder with the configs (no weights needed) from_single_file builds `path`'s pipeline from.

    diffusers 0.42 takes them from `config=` (a local folder or a hub id), else from its reference
    repo for the checkpoint's kind; offline it looks in the HF cache and, when they are missing,
    retries online and fails with a bare LocalEntryNotFoundError. We resolve the folder first, so
    the failure can say what to do.
    """
    config = model_config or DIFFUSERS_DEFAULT_PIPELINE_PATHS[kind]["pretrained_model_name_or_path"]
    if Path(config).is_dir():
        if not (Path(config) / "model_index.json").is_file():
            raise ValueError(f"The model config {config} is not a diffusers model folder (it has no model_index.json).")
        return str(config)
    offline = hub_constants.HF_HUB_OFFLINE
    try:
        return snapshot_download(config, allow_patterns=CONFIG_FILES, local_files_only=offline)
    except (OSError, ValueError) as err:  # not cached (offline), no network, no such repo, a malformed id
        where = ("is not in the local Hugging Face cache and the machine is offline" if offline
                 else f"cannot be fetched ({err})")
        raise ValueError(
            f"{path.name} is a single-file checkpoint, which holds weights but not the configs that describe "
            f"its parts. They come from {config}, which {where}. Give a model config: a diffusers folder or a "
            f"cached hub id of a model of the same family (load_base(..., model_config=...), the --model-config "
            f"option), or go online once so that {config}'s configs get cached."
        ) from None
