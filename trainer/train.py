"""train(): one readable LoRA training loop, top to bottom, yielding typed events.

Recipe (as in diffusers' train_text_to_image_lora.py, minus what a frozen VAE and text encoder
make redundant): the VAE latents and the text embeddings are computed once before the loop,
LoRA layers from peft go on the UNet's attention projections, and AdamW minimises the MSE
between the UNet's prediction and the noise (or the velocity, for v-prediction models).
"""

from __future__ import annotations

import math
import threading
import time
from datetime import datetime, timezone
from typing import Iterator

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import cast_training_params
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from styles import formats
from styles.library import StyleLibrary
from trainer.base import Base
from trainer.config import TrainConfig
from trainer.data import ImageSet
from trainer.events import Event, Failed, Finished, Sample, Started, Step

TRAINING_ADAPTER = "style_studio_training"  # not "training": nn.Module has that attribute
ENCODE_BATCH = 8
SAMPLE_STEPS = 20
MAX_GRAD_NORM = 1.0


def train(
    cfg: TrainConfig,
    images: ImageSet,
    base: Base,
    library: StyleLibrary,
    stop: threading.Event | None = None,
    overwrite: bool = False,
) -> Iterator[Event]:
    """Train a style and save it into `library`, yielding Started, Step..., Sample, Finished (or Failed).

    The base's UNet is borrowed for the run: the LoRA layers are removed again at the end.

    >>> for event in train(cfg, ingest("photos/", 64), load_base(), StyleLibrary("ws")):  # doctest: +SKIP
    ...     print(event)
    """
    cfg.validate()
    if not overwrite:
        try:
            library.ensure_free(cfg.style_name)
        except FileExistsError as err:
            yield Failed(str(err))
            return
    pipe, unet, device = base.pipe, base.pipe.unet, base.device
    yield Started(total_steps=cfg.steps, num_images=len(images), skipped=images.skipped_lines())

    # 1. Cache what the frozen parts compute: latent distributions and caption embeddings.
    latent_mean, latent_std = encode_images(pipe, images.images)
    captions = [cfg.caption_for(caption) for caption in images.captions]
    text_embeds = encode_prompts(pipe, captions)
    empty_embed = encode_prompts(pipe, [""])  # for caption dropout: the classifier-free guidance branch

    # 2. LoRA layers on the attention projections; their init is seeded so a run is reproducible.
    lora_config = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.lora_alpha,
        init_lora_weights="gaussian",
        target_modules=list(cfg.target_modules),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        unet.add_adapter(lora_config, adapter_name=TRAINING_ADAPTER)
    try:
        unet.set_adapter(TRAINING_ADAPTER)
        unet.enable_adapters()  # a blender may have switched LoRA layers off (every scale at 0)
        cast_training_params(unet, dtype=torch.float32)  # trainable LoRA weights stay fp32
        params = [p for p in unet.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, fused=device.type == "cuda")
        noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        generator = torch.Generator().manual_seed(cfg.seed)

        # 3. The loop.
        unet.train()
        started, loss_value, done = time.perf_counter(), float("nan"), 0
        for step in range(cfg.steps):
            if stop is not None and stop.is_set():
                yield Failed(f"Training was cancelled after {done} of {cfg.steps} steps; no style was saved.")
                return
            batch = torch.randint(len(images), (cfg.batch_size,), generator=generator)
            # Sample the latents from the cached distribution, as encoding every step would.
            eps = torch.randn(latent_mean[batch].shape, generator=generator)
            latents = (latent_mean[batch] + latent_std[batch] * eps) * pipe.vae.config.scaling_factor
            noise = torch.randn(latents.shape, generator=generator)
            timesteps = torch.randint(noise_scheduler.config.num_train_timesteps, (cfg.batch_size,), generator=generator)
            embeds = text_embeds[batch]
            if cfg.caption_dropout:
                dropped = torch.rand(cfg.batch_size, generator=generator) < cfg.caption_dropout
                embeds = torch.where(dropped[:, None, None], empty_embed, embeds)
            loss = diffusion_loss(
                unet, noise_scheduler, latents.to(device), embeds.to(device), noise.to(device), timesteps.to(device), base.dtype
            )
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            loss_value, done = loss.item(), step + 1
            if not math.isfinite(loss_value):
                yield Failed(
                    f"The loss became {loss_value} at step {done}; no style was saved. "
                    "Lower the learning rate or use fp32 precision."
                )
                return
            rate = done / (time.perf_counter() - started)
            yield Step(done, cfg.steps, loss_value, cfg.learning_rate, rate, (cfg.steps - done) / rate)
        unet.eval()

        # 4. Samples from the finished adapter, then the style file.
        prompts = [cfg.caption_for(None)] * cfg.num_samples
        samples = render_samples(pipe, prompts, cfg.seed)
        if samples:
            yield Sample(step=done, images=samples, prompts=prompts)
        info = {
            "config": cfg.to_json(),
            "trigger": cfg.trigger_word,
            "base_model": base.model_id,
            "family": base.family,
            "unet_hash": base.unet_hash,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "num_images": str(len(images)),
            "final_loss": f"{loss_value:.6f}",
        }
        tensors, metadata = formats.encode_style(
            get_peft_model_state_dict(unet, adapter_name=TRAINING_ADAPTER),
            cfg.rank,
            cfg.lora_alpha,
            list(cfg.target_modules),
            info,
        )
        thumbnail = samples[0] if samples else images.images[0]
        path = library.save(cfg.style_name, tensors, metadata, thumbnail=thumbnail, overwrite=overwrite)
        yield Finished(style_name=cfg.style_name, path=str(path), steps_done=done)
    finally:
        unet.eval()
        unet.delete_adapters(TRAINING_ADAPTER)


def diffusion_loss(unet, noise_scheduler, latents, text_embeds, noise, timesteps, dtype=torch.float32) -> torch.Tensor:
    """MSE between the UNet's prediction and its target (noise, or velocity for v-prediction)."""
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    prediction = unet(noisy.to(dtype), timesteps, text_embeds.to(dtype)).sample
    return F.mse_loss(prediction.float(), target.float())


@torch.no_grad()
def encode_images(pipe, images) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the VAE's latent distribution for each image (on the CPU)."""
    vae = pipe.vae
    pixels = torch.stack([pipe.image_processor.preprocess(image)[0] for image in images])
    means, stds = [], []
    for chunk in pixels.split(ENCODE_BATCH):
        dist = vae.encode(chunk.to(vae.device, vae.dtype)).latent_dist
        means.append(dist.mean.float().cpu())
        stds.append(dist.std.float().cpu())
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str]) -> torch.Tensor:
    """Text-encoder hidden states for each prompt (on the CPU)."""
    ids = pipe.tokenizer(
        prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    return pipe.text_encoder(ids.to(pipe.text_encoder.device))[0].float().cpu()


@torch.no_grad()
def render_samples(pipe, prompts: list[str], seed: int) -> list:
    """One image per prompt, seeds seed, seed+1, ...: the same every time for the same adapter."""
    return [
        pipe(prompt, num_inference_steps=SAMPLE_STEPS, generator=torch.Generator().manual_seed(seed + i)).images[0]
        for i, prompt in enumerate(prompts)
    ]
