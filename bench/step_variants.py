"""Where does a LoRA training step's time go on a GPU, and what removes it?  (CUDA only)

    python -m bench.step_variants VARIANT ARCH BATCH
    # VARIANT: eager | graphed | compile | compile-ro; ARCH: sd15 | sdxl

One bare training step (rank-16 LoRA on to_q/k/v/out, bf16 frozen UNet, fp32 LoRA, fused AdamW,
clipping, random inputs; no VAE or text encoder) run four ways: eager; the UNet's forward and
backward as CUDA graphs (torch.cuda.make_graphed_callables, what trainer/graphs.py does);
torch.compile; torch.compile in "reduce-overhead" mode. Prints the median and fastest of 30
steps, the set-up time (capture or compile, and 3 warm-up steps) and peak memory; eager at batch 1
also prints a profile: the GPU's busy time per step and the kernels launched. One variant per
process, so that each starts from a clean CUDA state and compile caches do not carry over.
"""
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import cast_training_params
from peft import LoraConfig

from bench.train_speed import build_base
from trainer.graphs import UNetForward

variant, arch, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
base = build_base(arch)
unet, dev, dtype = base.pipe.unet, base.device, base.dtype
torch.manual_seed(0)
unet.add_adapter(LoraConfig(r=16, lora_alpha=16, init_lora_weights="gaussian",
                            target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
cast_training_params(unet, dtype=torch.float32)
params = [p for p in unet.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
sched = DDPMScheduler.from_config(base.pipe.scheduler.config)
side = base.resolution // 8
sdxl = base.family == "sdxl"
width = 2048 if sdxl else 768


def inputs():
    lat = torch.randn(batch, 4, side, side, device=dev)
    noise = torch.randn_like(lat)
    t = torch.randint(0, 1000, (batch,), device=dev)
    noisy = sched.add_noise(lat, noise, t).to(dtype)
    args = [noisy, t, torch.randn(batch, 77, width, device=dev, dtype=dtype)]
    if sdxl:
        args += [torch.randn(batch, 1280, device=dev, dtype=dtype),
                 torch.tensor([[1024, 1024, 0, 0, 1024, 1024]] * batch, device=dev, dtype=dtype)]
    return args, noise


call = UNetForward(unet)  # what train() graphs: the UNet's prediction from positional tensors
unet.train()
t0 = time.perf_counter()
if variant == "graphed":
    sample, _ = inputs()
    call = torch.cuda.make_graphed_callables(call, tuple(sample))
elif variant == "compile":
    call = torch.compile(call)
elif variant == "compile-ro":
    call = torch.compile(call, mode="reduce-overhead")
setup = time.perf_counter() - t0


def step():
    args, noise = inputs()
    pred = call(*args)
    loss = F.mse_loss(pred.float(), noise.float())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


t0 = time.perf_counter()
for _ in range(3):
    step()
warm = time.perf_counter() - t0 + setup
torch.cuda.reset_peak_memory_stats()
times = []
for _ in range(30):
    torch.cuda.synchronize()
    s = time.perf_counter()
    step()
    times.append(time.perf_counter() - s)
print(f"RESULT {variant:10s} {arch} batch {batch}: median {statistics.median(times)*1000:.1f} ms, "
      f"min {min(times)*1000:.1f} ms, "
      f"setup+warmup {warm:.1f} s, peak {torch.cuda.max_memory_allocated()/1e9:.2f} GB", flush=True)
if variant == "eager" and batch == 1:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
    ka = prof.key_averages()
    cuda_total = sum(e.self_device_time_total for e in ka) / 3 / 1000
    print(f"RESULT eager GPU busy per step: {cuda_total:.1f} ms; kernels per step: "
          f"{sum(e.count for e in ka if e.self_device_time_total > 0) / 3:.0f}")
    print(ka.table(sort_by="self_cpu_time_total", row_limit=15))
