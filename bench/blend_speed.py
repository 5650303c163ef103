"""How fast is generation with styles blended?  `python -m bench.blend_speed`

Issue 5: blended generation runs at base-model speed. Per denoising step (one UNet forward,
batch 2 as classifier-free guidance runs it) with 0, 1, 2 and 4 styles blended, two ways side by
side in one run:
- fused: styles.blend.Blender's default, the weighted sum fused into the weights once per change;
- unfused: diffusers' set_adapters, every LoRA branch runs at every step (Blender(fuse=False)).
Each is printed as a ratio to the base model's step time (a copy of the UNet that never had LoRA
layers). Then the time of a slider change: one apply() that restores the weights and fuses a new
blend (and, for comparison, the unfused set_adapters call).

Issue 20 adds per-block scales and step bands (styles/mix.py). A banded generation prepares one
weight set per run of steps with the same styles on, once, and switches between them in diffusers'
step callback by copying (Blender._prepare / Blender._write). Measured here with 4 styles (two
"look only", one {"down": 0.5, "up": 1.2}, one on all blocks; one style on from 30 % of the steps,
one until 60 %): each band's step against the base step (it runs fused weights, so the base's
speed), the time of one band switch (the weight copy), and the time to prepare the band sets.

    python -m bench.blend_speed                  # the embedded tiny model; about a minute on one CPU thread
    python -m bench.blend_speed --arch sd15      # a full-size SD 1.5 UNet, random weights, no download
    python -m bench.blend_speed --arch sd15 --latent 16 --rounds 6 --threads 2   # the same, in 3 minutes on 2 CPU cores

The styles are random rank-16 LoRA adapters on to_q, to_k, to_v, to_out.0 (made here, not
trained: speed does not depend on what they learned). Floors on a GPU: 4 styles blended
<= 1.05x the base step; a slider change on SD 1.5 < 0.2 s. Issue 20: 4 styles + blocks + 2 bands
<= 1.05x the base step in every band; a band switch < 10 ms on the embedded model on the CPU.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from contextlib import contextmanager

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from models.base import Base, choose_device_dtype, load_base
from styles import formats
from styles.blend import DEFAULT_STEPS, Blender
from styles.generation import Ticket
from styles.library import StyleLibrary
from styles.mix import segments

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
RANK = 16
SCALES = (0.8, -0.5, 0.6, 0.3)  # style i's scale: mixed signs, as sliders are
STYLE_COUNTS = (0, 1, 2, 4)
# Issue 20's banded blend of the 4 styles: per-block factors (B-LoRA, arXiv 2403.14572: the look lives in
# the up blocks) and step bands (Multi-LoRA Composition, arXiv 2402.16843: content forms early, style late).
BLOCKS = {"style0": "look only", "style1": "look only", "style2": {"down": 0.5, "up": 1.2}}
BANDS = {"style0": [0.3, 1.0], "style1": [0.0, 0.6]}
MIX_MODES = ("sum", "ties", "elect")

# runwayml/stable-diffusion-v1-5 unet/config.json, written out so no download is needed.
SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    flip_sin_to_cos=True,
    freq_shift=0,
    downsample_padding=1,
    mid_block_scale_factor=1,
    center_input_sample=False,
)


def sd15_base(precision: str = "auto") -> Base:
    """A Base whose UNet is SD 1.5's architecture with random weights.

    The tiny model's VAE, text encoder and tokenizer only make it a pipeline that load_lora_weights
    accepts; the bench times UNet steps, which never touch them.
    """
    device, dtype = choose_device_dtype(precision)
    tiny = load_base(precision=precision).pipe
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET).to(device, dtype).requires_grad_(False)
    pipe = StableDiffusionPipeline(
        vae=tiny.vae, text_encoder=tiny.text_encoder, tokenizer=tiny.tokenizer, unet=unet, scheduler=tiny.scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    return Base.of(pipe, "sd15-random-weights", device, dtype)


def random_styles(unet: torch.nn.Module, library: StyleLibrary, count: int, seed: int = 0) -> list[str]:
    """Save `count` random LoRA styles that fit `unet` into `library`; return their names.

    The tensors are written straight in peft's key layout (what get_peft_model_state_dict returns)
    rather than by wrapping the UNet with add_adapter and unwrapping it again: the bench's UNet
    stays exactly as loaded. A is scaled as peft initialises it; B is random (not zero, as a
    trained style's is not).
    """
    generator = torch.Generator().manual_seed(seed)
    layers = [(n, m) for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith(TARGETS)]
    names = []
    for i in range(count):
        state = {}
        for name, layer in layers:
            state[f"{name}.lora_A.weight"] = (torch.randn(RANK, layer.in_features, generator=generator)
                                              / layer.in_features**0.5)
            state[f"{name}.lora_B.weight"] = torch.randn(layer.out_features, RANK, generator=generator) * 0.02
        adapter = formats.StyleAdapter(state, RANK, RANK, list(TARGETS), {"family": "sd1"})
        library.save(f"style{i}", adapter.to_bytes(), overwrite=True)
        names.append(f"style{i}")
    return names


@contextmanager
def timed(device: torch.device, into: list[float]):
    """Wall time of the block, with the GPU's queued work finished at both ends."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    yield
    sync()
    into.append(time.perf_counter() - start)


def unet_inputs(unet, device, dtype, latent: int):
    """One classifier-free-guidance step's UNet inputs: batch 2, 77 text tokens."""
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, unet.config.in_channels, latent, latent, generator=generator)
    text = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator)
    return sample.to(device, dtype), torch.tensor(500, device=device), text.to(device, dtype)


@torch.no_grad()
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.blend_speed", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded",
                        help="base model for load_base (default: the embedded tiny model)")
    parser.add_argument("--arch", choices=("sd15",),
                        help="instead of --model: a full-size SD 1.5 UNet with random weights")
    parser.add_argument("--precision", default="auto", help="auto: bf16/fp16 on a GPU, fp32 on the CPU")
    parser.add_argument("--latent", type=int, default=0, help="latent side (0: the model's native size; SD 1.5: 64)")
    parser.add_argument("--rounds", type=int, default=0,
                        help="timing rounds; each times every row once (0: by model and device)")
    parser.add_argument("--steps", type=int, default=0,
                        help="timed UNet steps per row and round (0: by model and device)")
    # One thread by default: on a shared machine a second thread that waits for a busy core can
    # make a step ten times slower (seen here: 11 minutes instead of 30 s), which a ratio reads as overhead.
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for torch (0: torch's default, one per core)")
    parser.add_argument("--changes", type=int, default=0,
                        help="timed slider changes per style count (0: by model and device)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    base = sd15_base(args.precision) if args.arch else load_base(args.model, args.precision)
    unet, device, dtype = base.pipe.unet, base.device, base.dtype
    big = args.arch == "sd15" or unet.config.block_out_channels[-1] >= 1024
    slow = big and device.type == "cpu"  # SD 1.5 on a CPU: seconds per step, so few of them
    # Many short rounds on a CPU: a busy neighbour then slows a few samples of every row, not all of one row.
    rounds = args.rounds or (2 if slow else 20 if device.type == "cpu" else 10)
    steps = args.steps or (1 if slow else 2 if device.type == "cpu" else 20)
    changes = args.changes or (3 if slow else 10)
    latent = args.latent or unet.config.sample_size
    inputs = unet_inputs(unet, device, dtype, latent)
    pristine = copy.deepcopy(unet)  # the base model: a UNet that never had LoRA layers

    with tempfile.TemporaryDirectory() as workspace:
        library = StyleLibrary(workspace)
        names = random_styles(unet, library, max(STYLE_COUNTS))
        blender = Blender(base, library)

        def blend(count: int) -> dict[str, float]:
            return {name: SCALES[i] for i, name in enumerate(names[:count])}

        # The banded blend, prepared once as generate() prepares it: _prepare fuses the first band and returns
        # the step callback, which switches to the next band's prepared weights where one begins.
        # _prepare takes the blend as generate() hands it over: checked (presets expanded, bands as tuples).
        ticket = Ticket()
        mix, blocks, bands, _ = blender.check_mix(blend(max(STYLE_COUNTS)), BLOCKS, BANDS)
        prepare: dict[str, list[float]] = {mode: [] for mode in MIX_MODES}
        for _ in range(3):
            for mode in MIX_MODES:
                with timed(device, prepare[mode]):
                    switch = blender._prepare(mix, blocks, bands, mode, DEFAULT_STEPS, ticket)
        switch = blender._prepare(mix, blocks, bands, "sum", DEFAULT_STEPS, ticket)
        firsts = [first for first, _ in segments(BANDS, DEFAULT_STEPS)]

        def band(first: int) -> None:
            """The weights of the band that begins at step `first`, as the callback puts them there."""
            switch(base.pipe, first - 1, None, {})
            # The callback leaves the blend key unknown after it (as after a generation), so the next
            # row's apply() fuses again: without this the "0 styles" row could run on band weights.
            blender._fused = None

        # Rows are timed in interleaved rounds, so that load from other processes falls on all alike.
        rows = [("base", None, 0)] + [(mode, fuse, n) for n in STYLE_COUNTS
                                      for mode, fuse in (("fused", True), ("unfused", False))]
        rows += [("band", True, first) for first in firsts]
        times: dict[tuple, list[float]] = {row: [] for row in rows}
        for _ in range(rounds):
            for row in rows:
                mode, fuse, n = row
                model = pristine
                if mode == "band":
                    blender.fuse = True
                    blender.apply({})  # a fused blend: peft's wrappers out of the UNet, as a banded generation runs
                    band(n)
                    model = unet
                elif fuse is not None:
                    blender.fuse = fuse
                    blender.apply(blend(n))
                    model = unet
                model(*inputs[:2], encoder_hidden_states=inputs[2])  # warm-up after a change
                for _ in range(steps):
                    with timed(device, times[row]):
                        model(*inputs[:2], encoder_hidden_states=inputs[2])
        # The fastest of the samples: other processes only ever add time (timeit's advice).
        step = {row: min(samples) for row, samples in times.items()}
        base_step = step[("base", None, 0)]

        # Does fusing change the result? Largest difference of one step's output, fused vs unfused.
        differences = {}
        for n in STYLE_COUNTS:
            outputs = []
            for fuse in (True, False):
                blender.fuse = fuse
                blender.apply(blend(n))
                outputs.append(unet(*inputs[:2], encoder_hidden_states=inputs[2]).sample.float())
            differences[n] = (outputs[0] - outputs[1]).abs().max().item()

        # Slider changes: the same styles at new scales (restore + fuse; no file is read again).
        change: dict[tuple, list[float]] = {}
        for fuse in (True, False):
            blender.fuse = fuse
            for n in STYLE_COUNTS[1:]:
                samples = change.setdefault((fuse, n), [])
                blender.apply(blend(n))
                for k in range(changes):
                    moved = {name: scale * (0.5 if k % 2 == 0 else 1.0) for name, scale in blend(n).items()}
                    with timed(device, samples):
                        blender.apply(moved)
        blender.fuse = True
        blender.apply(blend(max(STYLE_COUNTS)))
        restore, same = [], []
        for _ in range(changes):
            with timed(device, same):
                blender.apply(blend(max(STYLE_COUNTS)))  # the same scales again: nothing to do
        for _ in range(changes):
            blender.apply(blend(max(STYLE_COUNTS)))
            with timed(device, restore):
                blender.apply({})

        # A band switch: the callback at a band's first step, one copy of the prepared weights (Blender._write).
        # Timed going round the bands in the order a generation meets them, then back to the first.
        switches: list[float] = []
        blender.apply({})
        band(firsts[0])
        for _ in range(changes):
            for first in firsts[1:] + firsts[:1]:
                with timed(device, switches):
                    switch(base.pipe, first - 1, None, {})
        blender._fused = None
        band_layers = len(blender._dirty)

        # Does a band run the blend it stands for? One step on its prepared weights against apply() of the same
        # styles and blocks (fused afresh): the two should agree to the last bit.
        band_differences = {}
        for first, on in segments(BANDS, DEFAULT_STEPS):
            on = on | (set(names) - set(BANDS))
            blender.apply({})
            band(first)
            banded = unet(*inputs[:2], encoder_hidden_states=inputs[2]).sample
            # In the blend's own order: the fp32 sum is then formed in the same order, so equal means bit-equal.
            blender.apply({n: s for n, s in mix.items() if n in on}, {n: b for n, b in BLOCKS.items() if n in on})
            fresh = unet(*inputs[:2], encoder_hidden_states=inputs[2]).sample
            band_differences[first] = (banded - fresh).abs().max().item()
        kept_mb, kept_layers = blender.kept_bytes() / 2**20, len(blender._originals)

    # -- report ------------------------------------------------------------------------------
    what = "SD 1.5 UNet (random weights)" if args.arch else base.model_id
    threads = f"{torch.get_num_threads()} CPU threads" if device.type == "cpu" else torch.cuda.get_device_name()
    print(f"Blend speed: {what}, {str(dtype).removeprefix('torch.')}, latents {latent}x{latent}, batch 2, {threads}; "
          f"fastest of {rounds * steps} steps per row; random rank-{RANK} styles on {', '.join(TARGETS)}")
    print(f"base model step: {base_step * 1000:.1f} ms")
    print()
    print("| styles | fused step | fused / base | unfused step | unfused / base "
          "| max abs diff of one step, fused vs unfused |")
    print("|---|---|---|---|---|---|")
    for n in STYLE_COUNTS:
        fused, unfused = step[("fused", True, n)], step[("unfused", False, n)]
        print(f"| {n} | {fused * 1000:.1f} ms | {fused / base_step:.3f}x | {unfused * 1000:.1f} ms | "
              f"{unfused / base_step:.3f}x | {differences[n]:.1e} |")
    print()
    print("| slider change (fastest) | fused: restore + fuse | unfused: set_adapters |")
    print("|---|---|---|")
    for n in STYLE_COUNTS[1:]:
        fused, unfused = min(change[(True, n)]), min(change[(False, n)])
        print(f"| {n} style{'s' if n > 1 else ''} | {fused * 1000:.1f} ms | {unfused * 1000:.1f} ms |")
    print(f"| back to the base (all scales 0, from {max(STYLE_COUNTS)} styles) | {min(restore) * 1000:.1f} ms | |")
    print(f"| the same scales again | {min(same) * 1000:.2f} ms | |")
    print()
    print(f"original weights kept for exact restores: {kept_mb:.1f} MiB on {device.type} ({kept_layers} layers)")
    fused4 = step[("fused", True, max(STYLE_COUNTS))] / base_step
    print(f"floor, {max(STYLE_COUNTS)} styles fused <= 1.05x base step: "
          f"{'met' if fused4 <= 1.05 else 'NOT met'} ({fused4:.3f}x)")
    print()
    plan = segments(BANDS, DEFAULT_STEPS)
    print(f"4 styles + blocks + 2 bands ({DEFAULT_STEPS} steps; blocks {BLOCKS}; bands {BANDS}):")
    print("| band (steps) | styles on | step | step / base | max abs diff of one step, band vs apply() |")
    print("|---|---|---|---|---|")
    ends = [first for first, _ in plan[1:]] + [DEFAULT_STEPS]
    for (first, on), end in zip(plan, ends):
        on = sorted(on | (set(names) - set(BANDS)))
        print(f"| {first}-{end - 1} | {', '.join(on)} | {step[('band', True, first)] * 1000:.1f} ms "
              f"| {step[('band', True, first)] / base_step:.3f}x | {band_differences[first]:.1e} |")
    print(f"band switch (the weight copy, {band_layers} parameters): fastest {min(switches) * 1000:.2f} ms, "
          f"median {sorted(switches)[len(switches) // 2] * 1000:.2f} ms of {len(switches)}")
    print("preparing the band sets once (fastest of 3): "
          + ", ".join(f"{mode} {min(samples) * 1000:.0f} ms" for mode, samples in prepare.items()))
    banded = max(step[("band", True, first)] for first in firsts) / base_step
    print(f"floor, 4 styles + blocks + 2 bands <= 1.05x base step: {'met' if banded <= 1.05 else 'NOT met'} "
          f"({banded:.3f}x, the slowest band)")
    if device.type == "cpu" and not big:
        print(f"floor, switch < 10 ms: {'met' if min(switches) < 0.010 else 'NOT met'} ({min(switches) * 1000:.2f} ms)")
    else:
        print(f"band switch: {min(switches) * 1000:.2f} ms (the < 10 ms floor is for the embedded model on the CPU)")
    if args.arch == "sd15":
        slider = max(min(change[(True, n)]) for n in STYLE_COUNTS[1:])
        print(f"floor, slider change on SD 1.5 < 0.2 s: {'met' if slider < 0.2 else 'NOT met'} "
              f"({slider * 1000:.0f} ms, the slowest style count)")


if __name__ == "__main__":
    main()
