"""How fast and how light is a training step?  `python -m bench.train_speed`

Issue 5: training must be lighter and faster than diffusers' LoRA example. One run measures two
training steps side by side, at batch 1 and 4, on the same base model and LoRA rank:
- ours: trainer.train.train() itself, the loop users run, timed between its Step events (the loop
  reads each step's loss, so an event marks a finished step, GPU work included);
- baseline: what diffusers' examples/text_to_image/train_text_to_image_lora.py does every step
  (train_text_to_image_lora_sdxl.py for SDXL): the VAE encodes the batch and the text encoder(s)
  run, the UNet's forward runs under torch.autocast with its frozen weights in bf16/fp16 and the
  LoRA weights in fp32, then backward, gradient clipping and torch's default (unfused) AdamW.
  Its data loader's work (decoding, transforms, tokenizing) runs in worker processes there, so it
  is done once here and not timed. SDXL's script keeps the VAE in fp32; so does this baseline.
  (The SD script upcasts the LoRA weights to fp32 only for fp16; they are fp32 here for both.)

Printed per batch size: the fastest step time of each, the speed-up (baseline step / ours), peak
memory (torch.cuda.max_memory_allocated on a GPU: everything allocated, weights included; on the
CPU the rise of the process's peak RSS during the timed steps), and on a GPU the model FLOP
utilisation: the UNet's forward and backward FLOPs (counted once with FlopCounterMode, without
gradient checkpointing's recomputation, as MFU is defined in the PaLM paper, appendix B) per
second of step, over the GPU's peak dense bf16 FLOP/s.

    python -m bench.train_speed                            # the embedded tiny model (CPU: about a minute)
    python -m bench.train_speed --arch sd15 --low-memory   # SD 1.5 UNet, VAE, text encoder, random weights, 512 px
    python -m bench.train_speed --arch sdxl --low-memory   # SDXL, 1024 px
    python -m bench.train_speed --set channels_last=true --set compile=true   # any TrainConfig field, ours only

--arch sd15 / sdxl build the full-size models from the configs below with random weights (no
download: speed and memory do not depend on what the weights are); they need a CUDA GPU.
Floors on a GPU: SD 1.5 512 px batch 1 with --low-memory <= 4 GB; SDXL 1024 px batch 1 <= 10 GB;
ours >= 2x the baseline's throughput at batch 1.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.training_utils import cast_training_params
from peft import LoraConfig
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

import embedded
from models.base import Base, choose_device_dtype, load_base
from trainer.config import DEFAULT_PRESET, PRESETS, make_config, parse_overrides
from trainer.data import ImageSet
from trainer.events import Failed, Step
from trainer.train import MAX_GRAD_NORM, train

BASELINE_ADAPTER = "baseline"
NUM_IMAGES = 4
GB = 10**9  # the floors are in GB; decimal, so a figure under the floor is under it in GiB too

# Peak dense (no sparsity) bf16 tensor-core TFLOP/s from NVIDIA's data sheets, by a piece of
# torch.cuda.get_device_name(); the first match wins. Other GPUs print MFU n/a.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756),
    ("H100 NVL", 835),
    ("H100", 989),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", 989),
    ("A100", 312),
    ("RTX 4090", 165),  # with fp32 accumulation, as PyTorch's matmuls run
    ("L40S", 362),
    ("L4", 121),
)

# -- full-size architectures, written out from the reference repos' config.json files -------------
# runwayml/stable-diffusion-v1-5 unet, vae, text_encoder (CLIP ViT-L/14)
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, act_fn="silu", norm_num_groups=32, norm_eps=1e-5,
    flip_sin_to_cos=True, freq_shift=0, downsample_padding=1, mid_block_scale_factor=1,
)
SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, act_fn="silu",
    norm_num_groups=32, sample_size=512, scaling_factor=0.18215,
)
CLIP_L = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
)
# stabilityai/stable-diffusion-xl-base-1.0 unet, vae, text_encoder (CLIP ViT-L), text_encoder_2 (OpenCLIP bigG)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, act_fn="silu", norm_num_groups=32, norm_eps=1e-5,
    flip_sin_to_cos=True, freq_shift=0,
)
SDXL_VAE = dict(SD_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
OPENCLIP_BIGG = dict(
    vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
    max_position_embeddings=77, hidden_act="gelu", projection_dim=1280,
)


def build_base(arch: str, precision: str = "auto") -> Base:
    """The embedded model ("tiny"), or a full-size SD 1.5 / SDXL pipeline with random weights.

    The full-size parts are built on the GPU directly (random init there takes seconds); the
    embedded model lends its tokenizer (a CLIP BPE tokenizer, 77 tokens) and scheduler.
    """
    if arch == "tiny":
        return load_base(precision=precision)
    device, dtype = choose_device_dtype(precision)
    tokenizer = CLIPTokenizer.from_pretrained(embedded.MODEL_DIR / "tokenizer")
    scheduler = DDIMScheduler.from_pretrained(embedded.MODEL_DIR / "scheduler")
    torch.manual_seed(0)
    with torch.device(device):
        if arch == "sd15":
            pipe = StableDiffusionPipeline(
                vae=AutoencoderKL(**SD_VAE), text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_L)), tokenizer=tokenizer,
                unet=UNet2DConditionModel(**SD15_UNET), scheduler=scheduler, safety_checker=None,
                feature_extractor=None, requires_safety_checker=False,
            )
        else:
            pipe = StableDiffusionXLPipeline(
                vae=AutoencoderKL(**SDXL_VAE), text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_L)),
                text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**OPENCLIP_BIGG)), tokenizer=tokenizer,
                tokenizer_2=tokenizer, unet=UNet2DConditionModel(**SDXL_UNET), scheduler=scheduler,
                add_watermarker=False,
            )
    for part in pipe.components.values():  # as load_base leaves them: frozen, in the compute dtype
        if isinstance(part, torch.nn.Module):
            torch.nn.Module.to(part, dtype).requires_grad_(False).eval()
    pipe.set_progress_bar_config(disable=True)
    return Base.of(pipe, f"{arch}-random-weights", device, dtype)


def bench_images(count: int, size: int, seed: int = 0) -> ImageSet:
    """Smooth random colour fields at the training size (what they show does not change the speed)."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        corners = rng.integers(0, 256, size=(2, 2, 3)).astype(np.uint8)
        images.append(Image.fromarray(corners).resize((size, size), Image.BILINEAR))
    return ImageSet(images=images, captions=[None] * count, names=[f"{i}.png" for i in range(count)])


# -- measuring ------------------------------------------------------------------------------------------
class PeakMemory:
    """Peak memory of what runs between start() and peak(): GPU memory allocated, or the CPU process's RSS rise.

    On Linux, writing 5 to /proc/self/clear_refs resets the process's peak RSS (VmHWM), so the
    CPU figure covers the timed steps only. Elsewhere it is None ("n/a").
    """

    def __init__(self, device: torch.device):
        self.device, self.rss_at_start = device, None

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.rss_at_start = _proc_status("VmRSS")
        except OSError:
            self.rss_at_start = None

    def peak(self) -> int | None:
        """Bytes: the GPU's peak allocation since start(), or the rise of the peak RSS over the RSS at start()."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        if self.rss_at_start is None:
            return None
        return max(0, _proc_status("VmHWM") - self.rss_at_start)


def _proc_status(key: str) -> int:
    """A kB line of /proc/self/status, in bytes."""
    return int(re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1)) * 1024


@dataclass
class Measure:
    step_s: list[float] = field(default_factory=list)
    peak_bytes: int | None = None
    failed: str = ""  # e.g. "out of memory": the row says so instead of a time

    def add(self, other: Measure) -> None:
        self.step_s += other.step_s
        self.failed = self.failed or other.failed
        if other.peak_bytes is not None:
            self.peak_bytes = max(self.peak_bytes or 0, other.peak_bytes)

    @property
    def fastest_s(self) -> float:
        """The fastest step: other processes only ever add time (timeit's advice), so it is the fairest."""
        return min(self.step_s)


def time_ours(base: Base, images: ImageSet, cfg, warmup: int) -> Measure:
    """Run train() for warmup + timed steps; time the gaps between Step events after the warm-up."""
    measure, memory, last = Measure(), PeakMemory(base.device), None
    for event in train(cfg, images, base):
        if isinstance(event, Failed):
            if "out of memory" not in event.message:
                raise SystemExit(f"error: our training run failed: {event.message}")
            return Measure(failed="out of memory")
        if not isinstance(event, Step):
            continue
        if event.step > warmup:
            measure.step_s.append(time.perf_counter() - last)
        if event.step == warmup:
            memory.start()
        if event.step == cfg.steps:  # before train() goes on to hand the style back and give the encoders back
            measure.peak_bytes = memory.peak()
        last = time.perf_counter()  # after the bookkeeping: the next gap is the next step alone
    return measure


class DiffusersExampleStep:
    """One step of diffusers' train_text_to_image_lora.py (train_text_to_image_lora_sdxl.py for SDXL).

    It borrows the base's parts and adds its own LoRA adapter to the UNet; close() gives them back.
    """

    def __init__(self, base: Base, images: ImageSet, captions: list[str], rank: int, batch_size: int, seed: int = 0):
        pipe = base.pipe
        self.base, self.unet, self.vae, self.device = base, pipe.unet, pipe.vae, base.device
        self.batch_size, self.sdxl = batch_size, base.family == "sdxl"
        self.weight_dtype = base.dtype
        # SDXL's script keeps the VAE in fp32 (it overflows in fp16) and casts the latents down afterwards.
        self.vae_dtype = torch.float32 if self.sdxl else base.dtype
        torch.nn.Module.to(self.vae, self.vae_dtype)
        self.encoders = [e for e in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if e is not None]
        tokenizers = [t for t in (pipe.tokenizer, getattr(pipe, "tokenizer_2", None)) if t is not None]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.unet.add_adapter(
                LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                           target_modules=["to_k", "to_q", "to_v", "to_out.0"]),
                adapter_name=BASELINE_ADAPTER,
            )
        self.unet.set_adapter(BASELINE_ADAPTER)
        cast_training_params(self.unet, dtype=torch.float32)
        self.params = [p for p in self.unet.parameters() if p.requires_grad]
        # The script's defaults; torch picks the implementation (foreach on CUDA, a loop on the CPU), not fused.
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
        self.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        # What the script's data loader hands over: pixels in [-1, 1] and token ids, on the CPU.
        self.pixels = torch.stack([pipe.image_processor.preprocess(image)[0] for image in images.images])
        self.ids = [
            t(captions, padding="max_length", max_length=t.model_max_length, truncation=True,
              return_tensors="pt").input_ids
            for t in tokenizers
        ]
        self.generator = torch.Generator().manual_seed(seed)
        self.unet.train()

    def __call__(self) -> float:
        """One optimisation step; returns the loss (read, as the script logs it every step)."""
        latents, cond = self.encode(self.draw())
        loss = self.unet_loss(latents, cond)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, MAX_GRAD_NORM)
        self.optimizer.step()
        self.optimizer.zero_grad()
        return loss.item()

    def draw(self) -> torch.Tensor:
        return torch.randint(len(self.pixels), (self.batch_size,), generator=self.generator)

    def encode(self, batch: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The VAE's latents and the text encoders' conditioning: run on every step by the script."""
        pixels = self.pixels[batch].to(self.device, self.vae_dtype)
        latents = self.vae.encode(pixels).latent_dist.sample() * self.vae.config.scaling_factor
        latents = latents.to(self.weight_dtype)
        ids = [i[batch].to(self.device) for i in self.ids]
        if not self.sdxl:
            return latents, {"encoder_hidden_states": self.encoders[0](ids[0], return_dict=False)[0]}
        states, pooled = [], None
        for encoder, tokens in zip(self.encoders, ids):  # as the script's encode_prompt
            output = encoder(tokens, output_hidden_states=True)
            pooled = output[0]  # the last encoder's (projected, pooled) output is kept
            states.append(output.hidden_states[-2])
        height, width = pixels.shape[-2:]
        time_ids = torch.tensor([[height, width, 0, 0, height, width]] * len(batch), device=self.device,
                                dtype=self.weight_dtype)
        return latents, {
            "encoder_hidden_states": torch.cat(states, dim=-1),
            "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids},
        }

    def unet_loss(self, latents: torch.Tensor, cond: dict) -> torch.Tensor:
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (len(latents),), device=latents.device)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        if self.scheduler.config.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        # accelerate's mixed precision: the prepared UNet's forward runs under autocast (none in fp32).
        autocast = (torch.autocast(self.device.type, dtype=self.weight_dtype) if self.weight_dtype != torch.float32
                    else nullcontext())
        with autocast:
            prediction = self.unet(noisy, timesteps, **cond, return_dict=False)[0]
        return F.mse_loss(prediction.float(), target.float(), reduction="mean")

    def unet_flops(self) -> int:
        """FLOPs of the UNet's forward and backward on one batch (LoRA included; no recomputation)."""
        latents, cond = self.encode(self.draw())
        with FlopCounterMode(display=False) as counter:
            self.unet_loss(latents, cond).backward()
        self.optimizer.zero_grad()
        return counter.get_total_flops()

    def close(self) -> None:
        self.unet.eval()
        self.unet.delete_adapters(BASELINE_ADAPTER)
        torch.nn.Module.to(self.vae, self.base.dtype)


def time_baseline(base: Base, images: ImageSet, captions: list[str], rank: int, batch_size: int, steps: int,
                  warmup: int) -> Measure:
    measure, memory = Measure(), PeakMemory(base.device)
    sync = torch.cuda.synchronize if base.device.type == "cuda" else (lambda: None)
    step = DiffusersExampleStep(base, images, captions, rank, batch_size)
    try:
        for _ in range(warmup):
            step()
        memory.start()
        for _ in range(steps):
            sync()
            started = time.perf_counter()
            step()
            sync()
            measure.step_s.append(time.perf_counter() - started)
        measure.peak_bytes = memory.peak()
    except torch.OutOfMemoryError:
        measure = Measure(failed="out of memory")
    finally:
        step.close()
        del step
        if base.device.type == "cuda":
            torch.cuda.empty_cache()
    return measure


def count_unet_flops(base: Base, images: ImageSet, captions: list[str], rank: int, batch_size: int) -> int | None:
    step = DiffusersExampleStep(base, images, captions, rank, batch_size)
    try:
        return step.unet_flops()
    except torch.OutOfMemoryError:
        return None
    finally:
        step.close()


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((float(tflops) for piece, tflops in PEAK_BF16_TFLOPS if piece in name), None)


# -- the run ----------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.train_speed", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=("tiny", "sd15", "sdxl"), default="tiny",
                        help="tiny: the embedded model (CPU or GPU); "
                             "sd15 (512 px) / sdxl (1024 px): full size, random weights, GPU only")
    parser.add_argument("--precision", default="auto",
                        help="frozen weights' dtype: auto is bf16/fp16 on a GPU, fp32 on the CPU")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--steps", type=int, default=0,
                        help="timed steps per side, batch size and round (0: 8 on the CPU, 20 on a GPU)")
    parser.add_argument("--warmup", type=int, default=0,
                        help="untimed steps first (0: 2 on the CPU, 3 on a GPU; compile: 5)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="ours then baseline, this many times: load from other processes falls on both")
    parser.add_argument("--rank", type=int, default=0,
                        help="LoRA rank of both (0: the TrainConfig default, or the Low memory preset's)")
    parser.add_argument("--low-memory", action="store_true",
                        help="ours with the Low memory preset's options (batch size aside)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="a TrainConfig field for ours, e.g. --set channels_last=true (JSON value)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.arch != "tiny" and not torch.cuda.is_available():
        print(f"error: --arch {args.arch} builds the full-size model ({'512' if args.arch == 'sd15' else '1024'} px) "
              "and needs a CUDA GPU; this machine has none. On the CPU, run --arch tiny (the default).",
              file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)

    # Ours: the Balanced defaults, with the Low memory preset's options and --set on top;
    # nothing rendered or saved on the way.
    options = {k: v for k, v in PRESETS["Low memory"].items() if k != "batch_size"} if args.low_memory else {}
    if args.rank:
        options["rank"] = args.rank
    options |= parse_overrides(args.overrides)
    probe = make_config(DEFAULT_PRESET, style_name="bench", **options).validate()

    base = build_base(args.arch, args.precision)
    device, gpu = base.device, base.device.type == "cuda"
    steps = args.steps or (20 if gpu else 8)
    warmup = args.warmup or (5 if probe.compile else 3 if gpu else 2)
    images = bench_images(NUM_IMAGES, base.resolution)
    captions = [probe.caption_for(None)] * NUM_IMAGES
    peak = peak_tflops(device)

    results: dict[int, tuple[Measure, Measure, int | None]] = {}
    for batch_size in args.batch_sizes:
        cfg = make_config(DEFAULT_PRESET, style_name="bench", steps=warmup + steps, batch_size=batch_size,
                          num_samples=0, sample_every=0, checkpoint_every=0, **options)
        ours, baseline = Measure(), Measure()
        for _ in range(args.rounds):
            ours.add(time_ours(base, images, cfg, warmup))
            baseline.add(time_baseline(base, images, captions, cfg.rank, batch_size, steps, warmup))
        results[batch_size] = (ours, baseline, count_unet_flops(base, images, captions, cfg.rank, batch_size))

    # -- report ------------------------------------------------------------------------------------------
    where = torch.cuda.get_device_name() if gpu else f"CPU, {torch.get_num_threads()} thread(s)"
    changed = {k: v for k, v in probe.to_dict().items()
               if k != "style_name" and v != getattr(make_config(DEFAULT_PRESET), k)}
    print(f"Train speed: {args.arch} ({base.model_id}), {str(base.dtype).removeprefix('torch.')}, "
          f"{base.resolution} px, rank {probe.rank}, {where}; fastest of {steps * args.rounds} steps after {warmup} "
          f"warm-up, in {args.rounds} round(s)")
    print(f"ours: train() with {', '.join(f'{k}={v}' for k, v in changed.items()) or 'the default options'}; "
          f"baseline: diffusers' LoRA example's step")
    memory_label = "peak GPU memory" if gpu else "peak RSS rise"
    print()
    print(f"| batch | ours step | baseline step | speed-up (baseline / ours) | ours {memory_label} "
          f"| baseline {memory_label} | UNet fwd+bwd | ours MFU | baseline MFU |")
    print("|---|---|---|---|---|---|---|---|---|")
    for batch_size, (ours, baseline, flops) in results.items():
        def step(measure: Measure) -> str:
            return measure.failed or f"{measure.fastest_s * 1000:.1f} ms"

        def mfu(measure: Measure) -> str:
            return (f"{flops / measure.fastest_s / (peak * 1e12):.1%}" if peak and flops and not measure.failed
                    else "n/a")

        speedup = "n/a" if ours.failed or baseline.failed else f"{baseline.fastest_s / ours.fastest_s:.2f}x"
        print(f"| {batch_size} | {step(ours)} | {step(baseline)} | {speedup} | {_size(ours.peak_bytes)} | "
              f"{_size(baseline.peak_bytes)} | {f'{flops / 1e9:.1f} GFLOP' if flops else 'n/a'} | "
              f"{mfu(ours)} | {mfu(baseline)} |")
    if gpu and 1 in results and not results[1][0].failed:
        ours, baseline, _ = results[1]
        print()
        if not baseline.failed:
            speedup = baseline.fastest_s / ours.fastest_s
            print("floor, batch 1 >= 2x the baseline's throughput: "
                  f"{'met' if speedup >= 2 else 'NOT met'} ({speedup:.2f}x)")
        limit = {"sd15": 4, "sdxl": 10}.get(args.arch)
        if limit and (args.low_memory or args.arch == "sdxl"):
            used = ours.peak_bytes / GB
            print(f"floor, {args.arch} batch 1 <= {limit} GB: {'met' if used <= limit else 'NOT met'} ({used:.2f} GB)")
    return 0


def _size(size: int | None) -> str:
    if size is None:
        return "n/a"
    return f"{size / GB:.2f} GB" if size >= GB / 10 else f"{size / 10**6:.0f} MB"


if __name__ == "__main__":
    sys.exit(main())
