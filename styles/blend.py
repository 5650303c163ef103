"""Blend several styles on one pipeline, one scale per style, and generate images.

Semantics (pinned by tests/test_blend.py): a style at scale s adds s * (alpha / rank) * B @ A to
each weight it targets; several styles add up; with every scale at 0 the image is the base
model's, bit for bit.

Speed (issue 5): by default the blend is fused. When the {style: scale} set changes, the weighted
sum of the active styles' updates is written into the base weights once, so each denoising step runs
the base model's own modules and costs what the base model's step costs. The original weight of every
layer ever fused is kept (one copy, on the weight's own device), and the next change starts again from
it: the base weights come back bit for bit however often the sliders move.

What is fused (issue 19): every layer update a style file holds, of any kind styles/updates.py applies
(LoRA on any Linear or Conv2d, LoCon, LoHa, LoKr, DoRA, full differences), in the UNet and the text
encoders, read by styles/patches.py as ComfyUI reads it. A style at scale s adds s * delta to each layer
(for DoRA, delta is taken against the base weight), and several styles add up.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers.utils import logging as diffusers_logging
from peft.tuners.lora import LoraLayer
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from core.names import brief, with_trigger
from models.base import Base
from styles import formats, generation
from styles.generation import GenerationCancelled, GenerationLine, Ticket
from styles.library import StyleInfo, StyleLibrary
from styles.merge import concatenated, low_rank
from styles.mix import block_factor, check_band, check_blocks, check_mode, merge, segments
from styles.patches import Patch
from styles.updates import Update

SCALE_RANGE = (-2.0, 2.0)
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 7.5
MAX_SAVED_RANK = 512  # a saved blend re-ranked by SVD: what imports accept
DEFAULT_STRENGTH = 0.6  # image to image: how much of the start picture is redrawn


class Blender:
    """Generate with any mix of library styles on one base pipeline.

    fuse=True (default): the blend is fused into the base weights at each change of scales; steps
    run at base-model speed, and every adapter kind applies. fuse=False: diffusers' load_lora_weights and
    set_adapters, every LoRA branch runs every step (slower steps, instant slider changes; plain LoRA
    only, as diffusers loads it). The attribute may be flipped between calls.

    The blender claims its base's pipeline when it first loads a style (models.base.Base.claim):
    a training run in this process gets a Base of its own, or the pipeline through lend_base(),
    which hands it over as it was loaded and takes it back.

    Generations take turns in arrival order (`line`); one holding a Ticket can be cancelled by its owner, while
    it waits or between two denoising steps. Sides are capped at twice the base's native side (a 64 px model
    drew 1024 px for minutes while the others waited) unless `allow_large`, up to MAX_SIDE.

    >>> blender = Blender(load_base(), StyleLibrary("workspace"))        # doctest: +SKIP
    >>> images = blender.generate("a red circle", seed=1, styles={"ink": 0.8, "pastel": 0.4})  # doctest: +SKIP
    """

    def __init__(self, base: Base, library: StyleLibrary, fuse: bool = True, allow_large: bool = False):
        self.base, self.library, self.fuse, self.allow_large = base, library, fuse, allow_large
        self.line = GenerationLine()
        self._loaded: dict[str, float] = {}  # unfused: peft adapter name -> mtime of the file it was loaded from
        # fused: style -> (mtime of its file, its layer updates on the base's device)
        self._patches: dict[str, tuple[float, dict[str, Update]]] = {}
        self._lock = threading.RLock()  # one pipeline: one generation (and adapter change) at a time
        self.warnings: list[str] = []
        self._warned: set[str] = set()  # styles warned about, once each
        # layer name -> (its base weight parameter, a copy of that weight's original value): taken
        # before the layer is first fused, never written to, so restoring is one exact copy.
        self._originals: dict[str, tuple[torch.nn.Parameter, torch.Tensor]] = {}
        self._dirty: set[str] = set()  # layers whose weight holds a blend right now
        self._fused: tuple | None = None  # the blend in the weights (_blend_key); None: not known
        self._restyler = None  # the image-to-image pipeline over the base's components, made when first asked

    def normalise(self, scales: dict[str, float] | None) -> dict[str, float]:
        """Check names and values; raise ValueError listing the available styles. Touches nothing."""
        if scales is not None and not isinstance(scales, dict):
            raise ValueError(f"Styles is {brief(scales)}: not a table of style names and scales. "
                             'Send {"style name": scale, ...}, e.g. {"ink": 0.8}.')
        scales = dict(scales or {})
        available = self.library.names()
        unknown = sorted(brief(name, quote=False) for name in scales if name not in available)
        if unknown:
            raise ValueError(
                f"Unknown style(s): {', '.join(unknown)}. Available styles: {', '.join(available) or 'none yet'}."
            )
        result = {}
        lo, hi = SCALE_RANGE
        for name, value in scales.items():
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"Scale of style {name!r} must be a number, not {brief(value)}.") from None
            if not math.isfinite(value) or not lo <= value <= hi:
                raise ValueError(f"Scale of style {name!r} is {value}; it must be between {lo} and {hi}.")
            result[name] = value
        return result

    def check_mix(self, scales, blocks=None, bands=None, mode=None
                  ) -> tuple[dict[str, float], dict[str, dict[str, float]], dict[str, tuple[float, float]], str]:
        """(active scales, block factors, step bands, mode) of a blend, checked (styles/mix.py) and kept for the
        active styles only; ValueError naming what is wrong. Touches nothing."""
        active = {name: s for name, s in self.normalise(scales).items() if s != 0}
        blocks = {name: b for name, b in self._per_style(blocks, "Blocks", check_blocks, active).items() if b}
        bands = {name: b for name, b in self._per_style(bands, "Steps", check_band, active).items() if b != (0, 1)}
        mode = check_mode(mode)
        if not self.fuse and (blocks or bands or mode != "sum"):
            raise ValueError("Block strengths, step bands and blend modes need the fused blend (fuse=True).")
        return active, blocks, bands, mode

    def apply(self, scales: dict[str, float] | None, blocks: dict | None = None, mode: str | None = None
              ) -> dict[str, float]:
        """Make exactly these styles active at these scales (and block factors, combined by `mode`: styles/mix.py);
        return the active (non-zero) ones.

        Fused mode costs one weight rewrite per change of scales; the same scales again write nothing.
        """
        active, blocks, _, mode = self.check_mix(scales, blocks, None, mode)
        with self._lock:
            if self.fuse:
                self._apply_fused(active, blocks, mode)
            else:
                self._apply_unfused(active)
        return active

    def _apply_fused(self, active: dict[str, float], blocks: dict, mode: str) -> None:
        changed = self._read_patches(active)  # validates too, before anything changes
        key = _blend_key(active, blocks, mode)
        if key == self._fused and not changed:
            return  # the blend is in the weights already
        self._take_over()
        if active:
            self._fuse(active, blocks, mode)
        self._fused = key

    def _take_over(self) -> None:
        """Base weights back first, so nothing reloads or hashes a blended UNet; peft's layers from an unfused
        blend out, so fused steps run the plain layers."""
        self._restore()
        if self._loaded:
            self.base.pipe.unload_lora_weights()
            self._loaded.clear()

    def _per_style(self, value, what: str, check, active: dict[str, float]) -> dict:
        """{style: checked setting} from a {style: setting} table; a style not in the blend is refused by name."""
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ValueError(f"{what} is {brief(value)}: send a table of style names and settings, "
                             '{"style name": setting}.')
        unknown = sorted(brief(name, quote=False) for name in value if name not in active)
        if unknown:
            raise ValueError(f"{what} names style(s) not in the blend: {', '.join(unknown)}. "
                             f"Styles in it: {', '.join(active) or 'none'}.")
        return {name: check(setting, name) for name, setting in value.items()}

    def _apply_unfused(self, active: dict[str, float]) -> None:
        pipe = self.base.pipe
        gone, to_load = self._changes(active)  # validates too, before anything changes
        self._restore()
        self._sync(gone, to_load)
        if not active:
            if self._loaded:
                pipe.disable_lora()  # LoRA layers bypassed: exactly the base model
        else:
            pipe.enable_lora()
            pipe.set_adapters(list(active), list(active.values()))

    @torch.no_grad()
    def generate(
        self,
        prompt: str,
        negative_prompt: str = "",
        seed: int = 0,
        steps: int = DEFAULT_STEPS,
        guidance: float = DEFAULT_GUIDANCE,
        width: int = 0,
        height: int = 0,
        styles: dict[str, float] | None = None,
        num_images: int = 1,
        add_triggers: bool = True,
        ticket: Ticket | None = None,
        blocks: dict | None = None,
        bands: dict | None = None,
        mode: str | None = None,
        image: Image.Image | None = None,
        strength: float = DEFAULT_STRENGTH,
    ) -> list[Image.Image]:
        """Images for a prompt with the given styles blended in; each carries its recipe in .info.

        With `add_triggers`, the trigger word of every style with a non-zero scale is added to the
        prompt (styles are trained with it in their captions); the recipe records the prompt used.
        `blocks`, `bands` and `mode` shape the blend (styles/mix.py): {style: preset or {block: factor}},
        {style: [start, end]} as fractions of the steps, "sum" | "ties" | "elect". With a start `image`, the
        picture is restyled (image to image, `strength` 0..1: how much of it is redrawn), as diffusers'
        img2img pipelines do, with the same components and the same fused blend.
        Every value is checked first (check_options; seed -1 draws a random one). The generation waits
        its turn in `line`; cancelling its `ticket` stops it there or at the next denoising step.
        """
        options = self.check_options(prompt, negative_prompt, seed, steps, guidance, width, height, num_images)
        prompt, seed, steps, width, height = (options[key] for key in ("prompt", "seed", "steps", "width", "height"))
        negative_prompt, guidance = options["negative_prompt"], options["guidance"]
        active, blocks, bands, mode = self.check_mix(styles, blocks, bands, mode)
        if image is not None:
            strength = generation.number(strength, "Strength", 0.01, 1.0)
            image = image.convert("RGB").resize((width, height), Image.Resampling.LANCZOS)
        ticket = ticket or Ticket()
        with self.line.turn(ticket), self._lock:
            try:
                run_steps = max(1, int(steps * strength)) if image is not None else steps  # what img2img runs
                on_step_end = self._prepare(active, blocks, bands, mode, run_steps, ticket)  # needs memory too
                if add_triggers:
                    prompt = self.prompt_with_triggers(prompt, active)
                ticket.step, ticket.steps = 0, run_steps
                pipe, extra = self.base.pipe, {"width": width, "height": height}
                if image is not None:
                    pipe, extra = self._img2img(), {"image": image, "strength": strength}
                images = pipe(
                    prompt,
                    negative_prompt=negative_prompt or None,
                    num_inference_steps=steps,
                    guidance_scale=guidance,
                    num_images_per_prompt=options["num_images"],
                    generator=torch.Generator().manual_seed(seed),
                    callback_on_step_end=on_step_end,
                    **extra,
                ).images
            except torch.OutOfMemoryError:
                # The GPU is shared with a training job (a separate process): say so, free what we hold, keep serving.
                torch.cuda.empty_cache()
                raise ValueError(
                    "The GPU ran out of memory for this image, most likely because a style is training on it. "
                    "Wait for the job to finish, or generate fewer or smaller images."
                ) from None
        if ticket.cancelled.is_set():
            raise GenerationCancelled(f"Generation cancelled at step {ticket.step} of {steps}.")
        recipe = {
            "prompt": prompt,
            "negative_prompt": negative_prompt,
            "seed": seed,
            "steps": steps,
            "guidance": guidance,
            "width": width,
            "height": height,
            "styles": active,
            "base_model": self.base.model_id,
        }
        # The blend's shape beyond the scales, only where it has one: older recipes stay as they were.
        recipe |= {key: value for key, value in (("blocks", blocks), ("bands", bands)) if value}
        if mode != "sum":
            recipe["mode"] = mode
        if image is not None:
            recipe["image_sha256"] = hashlib.sha256(image.tobytes()).hexdigest()
            recipe["strength"] = strength
        for image in images:
            image.info["style_studio"] = json.dumps(recipe, sort_keys=True)
            image.info["parameters"] = a1111_parameters(recipe)
        return images

    def check_options(self, prompt: str = "", negative_prompt: str | None = "", seed=0, steps=DEFAULT_STEPS,
                      guidance=DEFAULT_GUIDANCE, width=0, height=0, num_images=1) -> dict:
        """The generation options checked and as generate uses them; ValueError names the field, the value's
        problem and what is allowed. Seed -1 becomes a random seed (the recipe records it); a side of 0 the
        base's native one. Touches nothing, so a grid checks every option before its first picture.
        """
        seed = generation.whole(seed, "Seed", generation.RANDOM_SEED, generation.MAX_SEED,
                                f"a whole number from 0 to {generation.MAX_SEED} (2^64 - 1), or -1 for a random seed")
        return {
            "prompt": generation.text(prompt, "Prompt"),
            "negative_prompt": generation.text(negative_prompt, "Negative prompt"),
            "seed": random.randrange(generation.RANDOM_SEEDS) if seed == generation.RANDOM_SEED else seed,
            "steps": generation.whole(steps, "Steps", *generation.STEPS_RANGE),
            "guidance": generation.number(guidance, "Guidance", *generation.GUIDANCE_RANGE),
            "width": self._check_size(width, "Width"),
            "height": self._check_size(height, "Height"),
            "num_images": generation.whole(num_images, "Number of images", 1, generation.MAX_IMAGES),
        }

    def max_side(self) -> int:
        """The largest width or height generate takes: twice the base's native side; MAX_SIDE when allow_large."""
        top = generation.MAX_SIDE
        return top if self.allow_large else min(generation.LARGE_FACTOR * self.base.resolution, top)

    def prompt_with_triggers(self, prompt: str, scales: dict[str, float]) -> str:
        """`prompt` with the trigger word of each style at a non-zero scale appended, unless it is there already."""
        for name, scale in scales.items():
            if scale:
                prompt = with_trigger(prompt, self.library.get(name).trigger)
        return prompt

    @contextmanager
    def lend_base(self) -> Iterator[Base]:
        """Hand the base pipeline over as it was loaded (no style in its layers or weights), and take it back.

        For a training run in this process on the blender's own base; generation waits meanwhile.
        The styles load again at the next generation.

        >>> with blender.lend_base() as base:                  # doctest: +SKIP
        ...     events = list(train(cfg, images, base))
        """
        with self._lock:
            self._restore()
            if self._loaded:
                self.base.pipe.unload_lora_weights()  # peft's LoRA layers out: the plain base layers back
            self._loaded.clear()
            self._originals.clear()  # taken again at the next fuse
            self.base.release(self)
            yield self.base

    def kept_bytes(self) -> int:
        """Memory held by the kept original weights (what exact restores cost)."""
        with self._lock:
            return sum(original.numel() * original.element_size() for _, original in self._originals.values())

    # -- helpers ------------------------------------------------------------------------
    @torch.no_grad()
    def blend_as_adapter(self, scales, blocks=None, mode=None, rank: int = 0) -> tuple[Patch, dict]:
        """The blend (scales, block factors, mode) as one adapter: a Patch of LoRA parts per layer, exact for rank 0
        (styles/merge.py: factors concatenated, or the update as a full difference where it is not a plain LoRA sum),
        else each layer's update re-ranked by SVD to `rank`; and a report {"rank", "error", "layers": {layer:
        relative error}, "styles": the checked active scales} (errors 0 when exact). Step bands are a generation
        setting and are not saved."""
        active, blocks, _, mode = self.check_mix(scales, blocks, None, mode)
        if not active:
            raise ValueError("The blend is empty: move a style's slider off 0 before saving it.")
        rank = generation.whole(rank, "Rank", 0, MAX_SAVED_RANK, f"0 (exact) or a rank from 1 to {MAX_SAVED_RANK}")
        with self._lock:
            self._read_patches(active)
            updates, errors, squared = {}, {}, [0.0, 0.0]
            for layer, contributions in self._contributions(active, blocks).items():
                module = self._module(layer)
                original = self._originals.get(f"{layer}.weight", (None, module.weight))[1]
                exact = concatenated(contributions) if mode == "sum" or len(contributions) == 1 else None
                if rank == 0 and exact is not None:
                    updates[layer] = Update(layer, {name: t.cpu() for name, t in exact.items()})
                    continue
                # The update itself, not (base + update) - base: no fp32 cancellation against the weight.
                delta = merge([scale * u.delta(original) for scale, u in contributions], mode)
                if rank == 0:
                    updates[layer] = Update(layer, {"diff": delta.cpu()})
                    continue
                parts, error, norm = low_rank(delta, rank)
                updates[layer] = Update(layer, {name: t.cpu() for name, t in parts.items()})
                errors[layer] = (error / norm) ** 0.5 if norm else 0.0
                squared[0], squared[1] = squared[0] + error, squared[1] + norm
        total = (squared[0] / squared[1]) ** 0.5 if squared[1] else 0.0
        return Patch(updates, {}, "blend"), {"rank": rank, "error": total, "layers": errors, "styles": active}

    def _contributions(self, active: dict[str, float], blocks: dict) -> dict[str, list[tuple[float, Update]]]:
        """{layer: [(scale x block factor, update) of each active style that changes it]}."""
        layers: dict[str, list[tuple[float, Update]]] = {}
        for name, scale in active.items():
            for layer, update in self._patches[name][1].items():
                factor = scale * block_factor(layer, blocks.get(name, {}))
                if factor:
                    layers.setdefault(layer, []).append((factor, update))
        return layers

    def _prepare(self, active: dict[str, float], blocks: dict, bands: dict, mode: str, steps: int, ticket: Ticket):
        """Put the blend of the first step in the weights; the diffusers step callback that switches to the next
        band's blend where one begins (weights prepared here, once: a switch is a copy) and stops the
        generation when its ticket is cancelled."""
        plan = segments(bands, steps) if bands else [(0, frozenset(active))]
        if len(plan) == 1:  # one blend for every step: fused once, kept for the next generation
            on = plan[0][1] | (frozenset(active) - frozenset(bands))
            self.apply({n: active[n] for n in active if n in on}, {n: b for n, b in blocks.items() if n in on}, mode)
            return ticket.stop_at_next_step
        always = frozenset(active) - frozenset(bands)
        self._read_patches(active)
        self._take_over()
        self.base.claim(self, "a Blender")
        try:
            blends = {first: self._values({n: active[n] for n in active if n in on | always}, blocks, mode)
                      for first, on in plan}
            self._write(blends[0])
        except BaseException:
            self._restore()
            raise
        self._fused = None  # several blends: the next apply fuses again

        def on_step_end(pipe, index, timestep, kwargs):
            if index + 1 in blends:
                self._write(blends[index + 1])
            return ticket.stop_at_next_step(pipe, index, timestep, kwargs)

        return on_step_end

    def _img2img(self):
        """The image-to-image pipeline of the base's own components (the fused blend in them), made once."""
        if self._restyler is None:
            from diffusers import AutoPipelineForImage2Image

            self._restyler = AutoPipelineForImage2Image.from_pipe(self.base.pipe)
            self._restyler.set_progress_bar_config(disable=True)
        return self._restyler

    def _check_style(self, name: str, info: StyleInfo) -> Patch:
        """A style's file (`info`: its library entry) read and checked against the base (a file put into the
        library by hand is data like any import); ValueError for a style of another family or a file that does
        not fit."""
        if info.family and info.family != self.base.family:
            raise ValueError(
                f"Style {name!r} was trained on a {info.family} model and cannot be used with this "
                f"{self.base.family} base model ({self.base.model_id})."
            )
        if info.unet_hash and info.unet_hash != self.base.unet_hash and name not in self._warned:
            self._warned.add(name)
            self.warnings.append(
                f"Style {name!r} was trained on {info.base_model or 'another model'}; it may look different here."
            )
        return formats.read_adapter(info.path, self.base.layout)

    def _read_patches(self, active: dict[str, float]) -> bool:
        """Read the active styles whose file is new or changed (all checked before any is kept); forget styles
        that are gone. Whether anything changed."""
        names = set(self.library.names())
        gone = [name for name in self._patches if name not in names]
        fresh = {}
        for name in active:
            info = self.library.get(name)
            if self._patches.get(name, (None,))[0] != info.mtime:
                patch = self._check_style(name, info)
                fresh[name] = (info.mtime, {layer: u.to(self.base.device) for layer, u in patch.updates.items()})
        for name in gone:
            del self._patches[name]
        self._patches |= fresh
        return bool(fresh or gone)

    def _changes(self, active: dict[str, float]) -> tuple[list[str], dict[str, StyleInfo]]:
        """Unfused: (loaded adapters whose style is gone, active styles to load or reload); raises before any change."""
        names = set(self.library.names())
        gone = [name for name in self._loaded if name not in names]
        to_load = {}
        for name in active:
            info = self.library.get(name)
            if self._loaded.get(name) == info.mtime:
                continue
            patch = self._check_style(name, info)
            if not patch.plain_lora():
                raise ValueError(f"Style {name!r} holds {patch.summary()}: only a fused blend (the default) applies "
                                 "those; diffusers' set_adapters runs plain LoRA only.")
            to_load[name] = info
        return gone, to_load

    def _sync(self, gone: list[str], to_load: dict[str, StyleInfo]) -> None:
        """Unfused: drop adapters whose style is gone; load new styles and those whose file changed."""
        pipe = self.base.pipe
        if to_load:
            self.base.claim(self, "a Blender")
        for name in gone:
            pipe.delete_adapters(name)
            del self._loaded[name]
        for name, info in to_load.items():
            if name in self._loaded:
                pipe.delete_adapters(name)
            with _diffusers_quiet():  # its "no LoRA keys for the text encoder" note for UNet-only styles
                pipe.load_lora_weights(str(info.path), adapter_name=name)
            self._loaded[name] = info.mtime

    @torch.no_grad()
    def _fuse(self, active: dict[str, float], blocks: dict[str, dict[str, float]], mode: str) -> None:
        """Write base + the active styles' combined updates into every layer they change.

        Not pipe.fuse_lora: peft's merge adds one style at a time in the weights' dtype, so in
        bf16/fp16 the weight is rounded once per style (a delta under half a unit in the last place
        of the weight is lost, even where the styles' sum would not be), and unfuse_lora subtracts
        again with the *current* scales: it drifts, and is wrong once set_adapters has moved them.
        Nor can peft apply LoHa, LoKr or full differences. Here the sum is taken in fp32 from the kept
        original and rounded once; going back is a copy.
        """
        self.base.claim(self, "a Blender")  # from the first fuse until lend_base()
        try:
            self._write(self._values(active, blocks, mode))
        except BaseException:
            self._restore()  # half a blend is worse than none: leave the base model
            raise

    @torch.no_grad()
    def _values(self, active: dict[str, float], blocks: dict[str, dict[str, float]], mode: str
                ) -> dict[str, torch.Tensor]:
        """{parameter name: its blended value} for every weight (and bias) the active styles change: each
        style's update times its scale and its block factor there (styles/mix.py), combined by `mode`."""
        values = {}
        for layer, contributions in self._contributions(active, blocks).items():
            module = self._module(layer)
            original = self._original(f"{layer}.weight", module.weight)
            values[f"{layer}.weight"] = _blended_weight(original, contributions, mode)
            biases = [(scale, u.bias_delta()) for scale, u in contributions if u.bias_delta() is not None]
            if biases:
                original = self._original(f"{layer}.bias", module.bias)
                values[f"{layer}.bias"] = original.float() + sum(scale * delta for scale, delta in biases)
        return values

    @torch.no_grad()
    def _write(self, values: dict[str, torch.Tensor]) -> None:
        """Put these values into their parameters (each rounded once to the weight's dtype) and the originals back
        into every other parameter that holds a blend: one step's weights, from one blend to another."""
        for name in self._dirty - values.keys():
            parameter, original = self._originals[name]
            parameter.copy_(original)
        for name, value in values.items():
            self._originals[name][0].copy_(value)
        self._dirty = set(values)

    def _module(self, layer: str) -> torch.nn.Module:
        """The pipeline's module of a layer ("unet.<path>"), peft's wrapper seen through."""
        component, _, path = layer.partition(".")
        module = self.base.pipe.components[component].get_submodule(path)
        return module.get_base_layer() if isinstance(module, LoraLayer) else module

    def _original(self, name: str, parameter: torch.nn.Parameter) -> torch.Tensor:
        """The kept original value of a parameter, taken before its first fuse.

        Kept on the weight's own device: every change reads it (here) and copies it back (restore).
        From CPU memory both would cross PCIe each time; on the GPU it costs the fused weights once
        more (SD 1.5 attention, bf16: 178 MiB, 11% of the UNet)."""
        if name not in self._originals:
            self._originals[name] = (parameter, parameter.detach().clone())
        return self._originals[name][1]

    @torch.no_grad()
    def _restore(self) -> None:
        """Copy the original value back into every parameter that holds a blend: exact, not a subtraction."""
        for name in self._dirty:
            parameter, original = self._originals[name]
            parameter.copy_(original)
        self._dirty.clear()
        self._fused = _blend_key({}, {}, "sum") if self.fuse else None

    def _check_size(self, value, name: str) -> int:
        """A width or height: 0 (or empty) for the native side, else a multiple of what the UNet divides by."""
        unet = self.base.pipe.unet.config
        multiple = self.base.pipe.vae_scale_factor * 2 ** (len(unet.block_out_channels) - 1)
        native, top, ceiling = self.base.resolution, self.max_side(), generation.MAX_SIDE
        allowed = (f"0 for this model's native {native} px, or a multiple of {multiple} from {multiple} to {top} "
                   f"(width and height must be multiples of {multiple}; ")
        allowed += (f"up to {ceiling} px)" if self.allow_large else
                    f"{generation.LARGE_FACTOR}x the native side: larger pictures take minutes while other "
                    f"generations wait; a server started with --allow-large takes up to {ceiling} px)")
        size = generation.whole(value if value not in (None, "") else 0, name, 0, top, allowed)
        if size % multiple or 0 < size < multiple:
            raise ValueError(f"{name} is {size}: not a multiple of {multiple}. Use {allowed}.")
        return size or native


@contextmanager
def _diffusers_quiet() -> Iterator[None]:
    """diffusers' log at errors only, for the duration (its verbosity is one global setting)."""
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)


def _blend_key(active: dict[str, float], blocks: dict, mode: str) -> tuple:
    """What a fused blend is, comparable: the same key again writes nothing."""
    return json.dumps([active, blocks, mode], sort_keys=True), mode


def _blended_weight(original: torch.Tensor, contributions: list[tuple[float, Update]], mode: str = "sum"
                    ) -> torch.Tensor:
    """original + the styles' scaled updates of this layer combined by `mode` (styles/mix.merge), in fp32.

    For a sum, plain LoRA updates (all our own styles hold) are stacked along the rank, with each scale folded
    into its B, so one fp32 addmm forms their whole sum with no weight-sized temporary per style (4 styles
    on SD 1.5: 155 ms instead of 272 on 2 CPU cores). Other kinds add their full delta; other modes need
    every style's full delta, to compare them weight by weight.
    """
    if mode != "sum" and len(contributions) > 1:
        return original.float() + merge([scale * u.delta(original) for scale, u in contributions], mode)
    result = original.float()
    low_rank = [(scale, factors) for scale, u in contributions if (factors := u.low_rank()) is not None]
    if low_rank:
        b = torch.cat([scale * up for scale, (up, _) in low_rank], dim=1)
        a = torch.cat([down for _, (_, down) in low_rank])
        result = torch.addmm(result.flatten(1), b, a).reshape(original.shape)
    for scale, update in contributions:
        if update.low_rank() is None:
            result = result + scale * update.delta(original)
    return result


def a1111_parameters(recipe: dict) -> str:
    """The recipe as the 'parameters' text that AUTOMATIC1111 and many viewers read."""
    loras = " ".join(f"<lora:{name}:{scale:g}>" for name, scale in recipe["styles"].items())
    lines = [f"{recipe['prompt']} {loras}".strip()]
    if recipe["negative_prompt"]:
        lines.append(f"Negative prompt: {recipe['negative_prompt']}")
    lines.append(
        f"Steps: {recipe['steps']}, CFG scale: {recipe['guidance']:g}, Seed: {recipe['seed']}, "
        f"Size: {recipe['width']}x{recipe['height']}, Model: {recipe['base_model']}"
    )
    return "\n".join(lines)


def save_png(image: Image.Image, path: str | Path) -> Path:
    """Save as PNG with the recipe from image.info as text chunks."""
    info = PngInfo()
    for key in ("parameters", "style_studio"):
        if key in image.info:
            info.add_text(key, image.info[key])
    path = Path(path)
    image.save(path, format="PNG", pnginfo=info)
    return path
