"""Pretrain the embedded base model from scratch on procedural scenes: `python -m embedded.pretrain`.

One command, fixed seed, CPU only. Two stages, as Stable Diffusion itself was made:
1. the VAE learns to autoencode scenes (on 32 px crops, then briefly on whole 64 px images);
2. the UNet and the CLIP text encoder learn, jointly, to denoise the VAE's latents given captions
   (10% of captions dropped so classifier-free guidance works; min-SNR loss weighting; EMA weights).
The pipeline is saved in the diffusers folder layout (fp16 weights, to keep the repo small; the 2 MB text
encoder in fp32) with recipe.json: every setting, the data, the versions and how long each stage took.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import time
from pathlib import Path

import diffusers
import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import EMAModel, compute_snr
from PIL import Image

from embedded import MODEL_DIR, architecture, examples, scenes

RECIPE = {
    "seed": architecture.SEED,
    "scenes": 30_000,  # captioned scenes for the UNet and text encoder
    "vae_extra_styled": 3_000,  # plus renders through VAE_EXTRA_LOOKS, so the VAE can draw textures and lines
    "vae": {"crop": 32, "crop_steps": 1800, "full_steps": 200, "batch": 32, "full_batch": 16, "lr": 5e-4,
            "kl_weight": 1e-6},
    "unet": {"steps": 1500, "batch": 64, "lr": 5e-4, "warmup": 100, "caption_dropout": 0.1, "min_snr_gamma": 5.0,
             "ema_decay": 0.999},
}


def _fine_dots(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A grid of dark dots every 4 pixels over the whole picture."""
    return examples.dark_dots(image, period=4, radius=1.3, darkness=0.7)


def _thin_ink(image: Image.Image, mask: Image.Image) -> Image.Image:
    """Objects outlined with a dark line two pixels wide."""
    return examples.ink_outline(image, mask, width=2)


# The looks the VAE's extra renders go through, so it learns to draw palettes, fine texture and
# lines. Fixed here rather than taken from embedded/examples.py: the recipe must rebuild the same
# model after the example styles change (these are the looks the example styles had then).
VAE_EXTRA_LOOKS = (examples.sunset, _fine_dots, _thin_ink)


def make_scenes(count: int, seed: int, styled: int = 0) -> tuple[np.ndarray, list[str]]:
    """`count` rendered scenes (uint8 N x 64 x 64 x 3) and captions; `styled` more through VAE_EXTRA_LOOKS."""
    rng = random.Random(seed)
    pixels, captions = [], []
    for i in range(count + styled):
        scene = scenes.random_scene(rng)
        image, mask = scenes.render(scene, rng, architecture.RESOLUTION)
        if i >= count:
            image = rng.choice(VAE_EXTRA_LOOKS)(image, mask)
        pixels.append(np.asarray(image))
        captions.append(scene.caption())
    return np.stack(pixels), captions


def to_tensor(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1


def train_vae(vae, pixels: np.ndarray, recipe: dict, log) -> dict:
    cfg = recipe["vae"]
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg["lr"], betas=(0.9, 0.99), weight_decay=0.0)
    generator = torch.Generator().manual_seed(recipe["seed"])
    vae.train()
    total = cfg["crop_steps"] + cfg["full_steps"]
    for step in range(total):
        full = step >= cfg["crop_steps"]
        batch = to_tensor(pixels[torch.randint(len(pixels), (cfg["full_batch"] if full else cfg["batch"],),
                                               generator=generator).numpy()])
        if not full:  # the VAE is convolutional: random crops teach it 4x faster per step
            size = cfg["crop"]
            x, y = torch.randint(0, batch.shape[-1] - size + 1, (2,), generator=generator).tolist()
            batch = batch[..., y : y + size, x : x + size]
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.sample(generator)).sample
        loss = F.l1_loss(recon, batch) + F.mse_loss(recon, batch) + cfg["kl_weight"] * posterior.kl().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == total - 1:
            log(f"vae step {step + 1}/{total} loss {loss.item():.4f}")
    vae.eval()
    return {"final_loss": round(loss.item(), 5)}


@torch.no_grad()
def encode_latents(vae, pixels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for start in range(0, len(pixels), 256):
        dist = vae.encode(to_tensor(pixels[start : start + 256])).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def train_unet(pipe, latent_mean, latent_std, captions: list[str], recipe: dict, log) -> dict:
    cfg = recipe["unet"]
    unet, text_encoder, tokenizer = pipe.unet, pipe.text_encoder, pipe.tokenizer
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    empty_ids = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length,
                          return_tensors="pt").input_ids
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg["lr"], betas=(0.9, 0.99), weight_decay=0.01)

    def schedule(step):  # a linear warm-up, then half a cosine from the full rate down to a tenth of it
        return min(1.0, (step + 1) / cfg["warmup"]) * (0.55 + 0.45 * math.cos(math.pi * step / cfg["steps"]))

    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    ema = EMAModel(params, decay=cfg["ema_decay"], use_ema_warmup=True)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    scale = pipe.vae.config.scaling_factor
    generator = torch.Generator().manual_seed(recipe["seed"])
    unet.train()
    text_encoder.train()
    running = None
    for step in range(cfg["steps"]):
        batch = torch.randint(len(captions), (cfg["batch"],), generator=generator)
        eps = torch.randn(latent_mean[batch].shape, generator=generator)
        latents = (latent_mean[batch] + latent_std[batch] * eps) * scale
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(noise_scheduler.config.num_train_timesteps, (cfg["batch"],), generator=generator)
        drop = torch.rand(cfg["batch"], generator=generator) < cfg["caption_dropout"]
        batch_ids = torch.where(drop[:, None], empty_ids, ids[batch])
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        prediction = unet(noisy, timesteps, text_encoder(batch_ids)[0]).sample
        # min-SNR-gamma weighting (Hang et al. 2023): stops the easy low-noise steps dominating.
        snr = compute_snr(noise_scheduler, timesteps)
        weight = torch.clamp(snr, max=cfg["min_snr_gamma"]) / snr
        loss = (F.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3)) * weight).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(params)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 50 == 0 or step == cfg["steps"] - 1:
            log(f"unet step {step + 1}/{cfg['steps']} loss {running:.4f} lr {lr_scheduler.get_last_lr()[0]:.2e}")
    ema.copy_to(params)
    unet.eval()
    text_encoder.eval()
    return {"final_loss_smoothed": round(running, 5)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m embedded.pretrain", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(MODEL_DIR), help="folder to write the pipeline into")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply data and step counts (0.01 for a smoke run)")
    args = parser.parse_args(argv)
    recipe = json.loads(json.dumps(RECIPE))
    for section, key in [(None, "scenes"), (None, "vae_extra_styled"), ("vae", "crop_steps"), ("vae", "full_steps"),
                         ("unet", "steps")]:
        holder = recipe[section] if section else recipe
        holder[key] = max(2, int(holder[key] * args.scale))

    started = time.perf_counter()

    def log(message):
        print(f"[{time.perf_counter() - started:7.1f}s] {message}", flush=True)

    torch.manual_seed(recipe["seed"])
    timings = {}

    pixels, captions = make_scenes(recipe["scenes"], recipe["seed"], styled=recipe["vae_extra_styled"])
    timings["data_s"] = round(time.perf_counter() - started, 1)
    log(f"rendered {len(pixels)} scenes")

    pipe = architecture.build_untrained_pipeline()
    mark = time.perf_counter()
    results = {"vae": train_vae(pipe.vae, pixels, recipe, log)}
    timings["vae_s"] = round(time.perf_counter() - mark, 1)

    # Latents of the unstyled scenes only; SD's scaling factor makes them unit variance.
    latent_mean, latent_std = encode_latents(pipe.vae, pixels[: recipe["scenes"]])
    scaling_factor = float(1 / latent_mean.std())
    pipe.vae.register_to_config(scaling_factor=scaling_factor)
    log(f"latent scaling factor {scaling_factor:.4f}")

    mark = time.perf_counter()
    results["unet"] = train_unet(pipe, latent_mean, latent_std, captions[: recipe["scenes"]], recipe, log)
    timings["unet_s"] = round(time.perf_counter() - mark, 1)
    timings["total_s"] = round(time.perf_counter() - started, 1)

    out = Path(args.out)
    # UNet and VAE in fp16 (half the size); the text encoder (2 MB) in fp32, its config saying so: transformers
    # loads a part in its config's dtype, and stock `DiffusionPipeline.from_pretrained(folder)` then mixed an fp16
    # encoder with an fp32 UNet ("mat1 and mat2 must have the same dtype", issue 18).
    for part, dtype in ((pipe.unet, torch.float16), (pipe.vae, torch.float16), (pipe.text_encoder, torch.float32)):
        part.to(dtype)
    pipe.save_pretrained(out, safe_serialization=True)
    record = {
        "command": "python -m embedded.pretrain" + (f" --scale {args.scale}" if args.scale != 1 else ""),
        "recipe": recipe,
        "results": results,
        "latent_scaling_factor": scaling_factor,
        "held_out_pairs": sorted(map(list, scenes.HELD_OUT)),
        "timings": timings,
        "machine": {"cpu_threads": torch.get_num_threads(), "platform": platform.platform()},
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
    }
    (out / "recipe.json").write_text(json.dumps(record, indent=2) + "\n")
    log(f"saved to {out} ({sum(f.stat().st_size for f in out.rglob('*') if f.is_file()) / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
