"""train(): one readable LoRA training loop, top to bottom, yielding typed events.

Recipe (as in diffusers' train_text_to_image_lora.py, minus what a frozen VAE and text encoder
make redundant): the VAE latents and the text embeddings are computed once before the loop,
LoRA layers from peft go on the UNet's attention projections, and AdamW minimises the MSE
between the UNet's prediction and the noise (or the velocity, for v-prediction models).
SDXL's UNet takes more conditioning than the text embeddings (a pooled text embedding and the
image-size ids); `Conditioning` carries it, so the loop reads the same for every family.
Pictures train whole in aspect-ratio buckets (issue 19, trainer/data.py): a batch holds one bucket's
pictures, and the latents are cached per bucket.

Lighter and faster than that example on a GPU (issue 5; `python -m bench.train_speed` measures
both): frozen weights in bf16/fp16 with fp32 LoRA weights and no autocast (base.py), no VAE or
text encoder at all in the loop (they wait on the CPU), fused AdamW, and SDPA attention (diffusers'
default AttnProcessor2_0), and the UNet's forward and backward replayed as CUDA graphs
(trainer/graphs.py). TrainConfig switches on more: gradient checkpointing, 8-bit AdamW,
channels-last convolutions and torch.compile.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import gather_object, is_tensorboard_available
from diffusers import DDPMScheduler
from diffusers.training_utils import cast_training_params, compute_snr
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from models.base import Base, BaseInUse
from styles.formats import StyleAdapter
from trainer.checkpoints import CheckpointDir, TrainingState
from trainer.config import TrainConfig
from trainer.data import ImageSet, Prepared, bucket_sizes, bucket_step, prepare, size_multiple, square_crop
from trainer.events import Cancelled, Checkpoint, Event, Failed, Finished, Sample, Started, Step, Validation
from trainer.graphs import GraphedForward, UNetForward
from trainer.pace import Pace
from trainer.validation import Validator

TRAINING_ADAPTER = "style_studio_training"  # not "training": nn.Module has that attribute
ENCODE_BATCH = 8
SAMPLE_STEPS = 20
MAX_GRAD_NORM = 1.0


def train(
    cfg: TrainConfig,
    images: ImageSet,
    base: Base,
    stop: threading.Event | None = None,
    checkpoints: CheckpointDir | None = None,
    resume: bool = False,
    log_dir: str | Path | None = None,
) -> Iterator[Event]:
    """Train a style, yielding Started, Step..., Sample, Checkpoint, and last Finished, which hands the adapter back.

    The caller saves `Finished.adapter` through the library (train() writes no style file):
    >>> for event in train(cfg, ingest("photos/", 64), load_base()):              # doctest: +SKIP
    ...     if isinstance(event, Finished):
    ...         library.save(cfg.style_name, event.adapter.to_bytes(), thumbnail=event.thumbnail)

    With `checkpoints`, the run saves its state every `cfg.checkpoint_every` steps and when it is
    stopped (then it ends with Cancelled), and `resume=True` continues from the newest readable
    checkpoint: the result equals an uninterrupted run's. A failure ends with Failed.
    The base's pipeline is claimed for the run (models.base.Base.claim: a pipeline a Blender holds
    is refused) and given back as it came. Under `accelerate launch`, every process runs this and
    gradients are averaged (data parallel). With `log_dir` and the optional tensorboard package
    installed, losses also go to TensorBoard.
    """
    cfg.validate()
    pipe, unet, device = base.pipe, base.pipe.unet, base.device
    run = object()  # this run, as the claimant of the base's pipeline
    try:
        check_device_options(cfg, device)
        base.claim(run, "a training run")
    except (ValueError, BaseInUse) as err:
        yield Failed(str(err))
        return
    tensorboard = log_dir is not None and is_tensorboard_available()
    try:
        # One process unless run by `accelerate launch`; its trackers write TensorBoard logs when asked.
        accelerator = Accelerator(cpu=device.type == "cpu", log_with="tensorboard" if tensorboard else None,
                                  project_dir=log_dir)
        if tensorboard:
            accelerator.init_trackers("train", config={k: str(v) for k, v in cfg.to_dict().items()})
        state, notes = checkpoints.load_latest() if checkpoints and resume else (None, [])
        if state and len(state.generators) != accelerator.num_processes:  # it continues, but not as the same run
            notes.append(f"The checkpoint was written by {len(state.generators)} process(es) and this run has "
                         f"{accelerator.num_processes}: its batches will differ from an uninterrupted run's.")
        first_step = state.step if state else 0
        losses = list(state.losses) if state else []
        # 1. Captions: an image's own, else its content from the captioner, with the trigger word (issue 17).
        captions, caption_notes = training_captions(cfg, images, base)
        yield Started(cfg.steps, len(images), images.skipped_lines(), first_step, losses[:], notes + caption_notes,
                      captions, images.names)

        # 2. Each picture at its training size: its aspect-ratio bucket, or the centre square (issue 19).
        resolution = cfg.resolution or base.resolution
        buckets = bucket_sizes(resolution, bucket_step(resolution, size_multiple(pipe))) if cfg.bucketing else None
        prepared = prepare(images, resolution, buckets)
        # Cache what the frozen parts compute: latent distributions (per bucket, as a batch holds one size)
        # and caption embeddings, with SDXL's size ids from each picture's original size and crop.
        cached = cache_buckets(pipe, prepared)
        conditioning = encode_conditioning(pipe, captions, *size_conditioning(prepared))
        empty = encode_conditioning(pipe, [""], [prepared[0].image.size])  # caption dropout: the unconditional branch
        sample_prompts = [captions[i % len(captions)] for i in range(cfg.num_samples)]  # fixed prompts and seeds

        # A validation set of new content, scored against the base model's own pictures of it (issue 17).
        def draw(prompts: list[str], seed: int) -> list:
            """Validation pictures, one prompt at a time: a stop asked for meanwhile is answered within a picture."""
            pictures = []
            for i, prompt in enumerate(prompts):
                if stop is not None and stop.is_set():
                    raise StopAsked
                pictures += render_samples(pipe, [prompt], seed + i)
            return pictures

        def validate(done: int) -> Iterator[Validation]:
            with contextlib.suppress(StopAsked):  # skipped: the loop stops (with a checkpoint) or the run ends
                yield validator.validate(draw, done, adapter_state)

        validator = None
        if cfg.validation_prompts and accelerator.is_main_process:
            with contextlib.suppress(StopAsked):  # stopped already: the loop below cancels at once
                # Scored against the squares the pipeline draws: the centre squares of the training pictures.
                validator = Validator.start(draw, base.model_id, cfg.validation_prompts, captions, cfg.trigger_word,
                                            [square_crop(image, resolution) for image in images.images])
            if validator and state:
                validator.restore(state.scores, state.best_step, state.best_adapter)

        # 3. LoRA layers on the attention projections; their init is seeded so a run is reproducible.
        lora_config = LoraConfig(
            r=cfg.rank,
            lora_alpha=cfg.lora_alpha,
            init_lora_weights="gaussian",
            target_modules=list(cfg.target_modules),
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            unet.add_adapter(lora_config, adapter_name=TRAINING_ADAPTER)
        # The VAE and text encoder(s) now idle until samples are drawn: they wait on the CPU and leave the GPU
        # to the UNet (SDXL's take 1.8 GB in bf16), as kohya's sd-scripts does once latents are cached.
        move_encoders(pipe, torch.device("cpu"))
        if device.type == "cuda":
            torch.cuda.empty_cache()  # hand their blocks back, so the UNet's activations find room on a small card
        unet.set_adapter(TRAINING_ADAPTER)
        cast_training_params(unet, dtype=torch.float32)  # trainable LoRA weights stay fp32
        params = [p for p in unet.parameters() if p.requires_grad]
        optimizer = make_optimizer(params, cfg, device)
        if cfg.gradient_checkpointing:
            # Activations are recomputed block by block in the backward pass (Chen et al. 2016, "Training
            # deep nets with sublinear memory cost"). diffusers checkpoints with use_reentrant=False, so the
            # LoRA layers get gradients although the frozen UNet's inputs need none.
            unet.enable_gradient_checkpointing()
        if cfg.channels_last:
            unet.to(memory_format=torch.channels_last)  # conv weights NHWC; activations follow them
        noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        # Each process draws its own batches (data parallel); process 0 draws what a single process would.
        generator = torch.Generator().manual_seed(cfg.seed + accelerator.process_index)
        if state:  # continue exactly where the checkpoint left off
            set_peft_model_state_dict(unet, state.adapter, adapter_name=TRAINING_ADAPTER)
            optimizer.load_state_dict(state.optimizer)
            if cfg.optimizer == "adamw8bit":  # bitsandbytes counts steps in a Python int; a checkpoint holds tensors
                for moments in optimizer.state.values():
                    moments["step"] = int(moments["step"])
            if len(state.generators) == accelerator.num_processes:
                generator.set_state(state.generators[accelerator.process_index])
        def adapter_state() -> dict[str, torch.Tensor]:
            return get_peft_model_state_dict(unet, adapter_name=TRAINING_ADAPTER)

        model, optimizer = accelerator.prepare(unet, optimizer)  # DDP wrapper under accelerate launch
        forward = UNetForward(model)
        if cfg.compile:
            forward = torch.compile(forward)  # compiles on the first step; the unwrapped unet keeps the weights
        elif cfg.cuda_graphs and device.type == "cuda" and accelerator.num_processes == 1:
            # Captured at a bucket's first step (DDP's collectives would need more care). A graph replays the
            # shapes it was captured with, so each bucket gets its own, around a UNetForward of its own: the
            # capture replaces its module's forward with the graph's replay.
            forward = PerShape(lambda: GraphedForward(UNetForward(model)))
        style_info = {"base_model": base.model_id, "family": base.family, "unet_hash": base.unet_hash,
                      "prediction_type": base.prediction_type, "resolution": f"{resolution}x{resolution}",
                      "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
                      "num_images": str(len(images)), "processes": str(accelerator.num_processes),
                      "captions": json.dumps(captions)}  # what each image was trained with, trigger word included

        def save_checkpoint(done: int) -> Checkpoint | None:
            if not checkpoints:
                return None
            # Every process's generator, so that a resumed data-parallel run draws the batches it would have.
            generators = gather_object([generator.get_state()])  # a one-process run gets its own list back
            if not accelerator.is_main_process:
                return None
            adapter = get_peft_model_state_dict(unet, adapter_name=TRAINING_ADAPTER)
            scores, best = (validator.scores, validator.best_adapter) if validator else ([], None)
            path = checkpoints.save(
                TrainingState(done, adapter, optimizer.state_dict(), generators, losses,
                              info={**style_info, "config": cfg.to_json()}, scores=list(scores),
                              best_step=validator.best_step if validator else 0, best_adapter=best)
            )
            return Checkpoint(done, str(path))

        def stop_asked() -> bool:
            """Whether to stop now; all processes agree, so they stop at the same step
            (their collectives must match)."""
            asked = stop is not None and stop.is_set()
            if accelerator.num_processes == 1:
                return asked
            return bool(accelerator.reduce(torch.tensor([float(asked)], device=accelerator.device), "sum").item())

        # A stop asked for during a checkpoint's validation skipped it: draw it now, from that checkpoint's
        # weights, so a resumed run chooses its best among the same checkpoints as an uninterrupted one.
        if validator and state and cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0 \
                and state.step not in dict(validator.scores):
            yield from validate(state.step)

        # 4. The loop.
        unet.train()
        pace, done = Pace(), first_step  # the step time, smoothed: a steady time-left estimate
        step_ended = time.perf_counter()
        for step in range(first_step, cfg.steps):
            if stop_asked():  # leave a checkpoint to resume from or keep as a style
                saved = save_checkpoint(done) if done > first_step else None
                if saved:
                    yield saved
                yield Cancelled(done, saved.path if saved else (str(state.path) if state else None))
                return
            step_started = time.perf_counter()
            bucket, pick = draw_batch(cached, cfg.batch_size, generator)  # one bucket's images: one size
            batch = bucket.indices[pick]
            # Sample the latents from the cached distribution, as encoding every step would.
            mean, std = bucket.mean[pick], bucket.std[pick]
            latents = (mean + std * torch.randn(mean.shape, generator=generator)) * pipe.vae.config.scaling_factor
            noise = torch.randn(latents.shape, generator=generator)
            timesteps = torch.randint(
                noise_scheduler.config.num_train_timesteps, (cfg.batch_size,), generator=generator
            )
            cond = conditioning[batch]
            if cfg.caption_dropout:
                dropped = torch.rand(cfg.batch_size, generator=generator) < cfg.caption_dropout
                cond = cond.with_dropout(dropped, empty)
            try:
                loss = diffusion_loss(
                    forward, noise_scheduler, latents.to(device), cond.to(device), noise.to(device),
                    timesteps.to(device), base.dtype, cfg.min_snr_gamma
                )
                accelerator.backward(loss)
            except torch.OutOfMemoryError:
                yield Failed(OUT_OF_MEMORY.format(step=step + 1) + _kept(checkpoints))
                return
            loss_value = loss.item()
            if not math.isfinite(loss_value):  # checked before the step, so the weights stay good
                yield Failed(
                    f"The loss became {loss_value} at step {step + 1}; the run stopped. "
                    "Lower the learning rate or use fp32 precision." + _kept(checkpoints)
                )
                return
            accelerator.clip_grad_norm_(params, MAX_GRAD_NORM)
            lr = scheduled_lr(cfg, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            done = step + 1
            losses.append(loss_value)
            pace.add(time.perf_counter() - step_started, between=step_started - step_ended)
            step_ended = time.perf_counter()
            rate = pace.it_per_s
            yield Step(done, cfg.steps, loss_value, lr, rate, pace.seconds_left(cfg.steps - done))
            if tensorboard:
                accelerator.log({"loss": loss_value, "it_per_s": rate}, step=done)
            # Samples every sample_every steps, and after the first step too, so a run shows pictures from its start
            # rather than after minutes (issue 18). Their seeds are their own: training's random stream is untouched.
            first = done == 1 and cfg.sample_every
            if (first or cfg.sample_every and done % cfg.sample_every == 0) and done < cfg.steps \
                    and accelerator.is_main_process:
                yield Sample(done, render_samples(pipe, sample_prompts, cfg.seed), sample_prompts)
            if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.steps:
                if validator:
                    yield from validate(done)
                saved = save_checkpoint(done)
                if saved:
                    yield saved
        unet.eval()
        move_encoders(pipe, device)
        accelerator.wait_for_everyone()
        if not accelerator.is_main_process:
            return  # process 0 renders and hands the adapter back; the others hold the same weights

        # 5. Samples from the finished adapter, then the adapter itself, for the caller to save.
        samples = render_samples(pipe, sample_prompts, cfg.seed)
        if samples:
            yield Sample(step=done, images=samples, prompts=sample_prompts)
        thumbnail = samples[0] if samples else images.images[0]
        lora_state, kept_step, kept_info = adapter_state(), done, {"steps_done": str(done)}
        if validator:
            if not validator.scores or validator.scores[-1][0] != done:
                yield from validate(done)
            lora_state, kept_step, kept_info = kept_weights(cfg.keep, lora_state, done, validator.best_adapter,
                                                            validator.best_step, validator.scores)
            if lora_state is validator.best_adapter and validator.best_images:  # the kept weights' own picture
                thumbnail = validator.best_images[0]
        adapter = style_adapter(cfg, lora_state, {**style_info, **kept_info}, losses)
        yield Finished(cfg.style_name, done, adapter, thumbnail=thumbnail, kept_step=kept_step)
    finally:  # the pipeline is claimed for the run: give it back as it came
        unet.eval()
        if TRAINING_ADAPTER in getattr(unet, "peft_config", {}):
            unet.delete_adapters(TRAINING_ADAPTER)
            if not getattr(unet, "peft_config", None):
                unet.unload_lora()  # the emptied peft wrappers out too: the base's own layers back in place
        if cfg.gradient_checkpointing:
            unet.disable_gradient_checkpointing()
        if cfg.channels_last:
            unet.to(memory_format=torch.contiguous_format)
        move_encoders(pipe, device)
        if tensorboard:
            accelerator.end_training()
        base.release(run)


OUT_OF_MEMORY = (
    "The GPU ran out of memory at step {step}. Lower the batch size, the resolution or the rank, "
    "or pick the Low memory preset, then resume."
)


def check_device_options(cfg: TrainConfig, device: torch.device) -> None:
    """Raise ValueError naming each option of `cfg` this device cannot run (validate() checks the rest)."""
    problems = []
    if cfg.optimizer == "adamw8bit":
        if device.type != "cuda":
            problems.append(f"8-bit AdamW (optimizer adamw8bit) needs a CUDA GPU and this run is on the {device.type}: "
                            "choose optimizer adamw")
        else:
            try:
                importlib.import_module("bitsandbytes")
            except Exception as err:  # installed but broken, e.g. built for another CUDA version
                problems.append(f"optimizer adamw8bit: bitsandbytes does not load ({err}); reinstall it "
                                "(`pip install -U bitsandbytes`) or choose optimizer adamw")
    if cfg.compile and device.type != "cuda":
        # Refused rather than slow: on a CPU, inductor compiled the embedded UNet's forward and backward for
        # 4 minutes (one thread) before the first step, 15 times a whole Quick run there; it needs a C++
        # compiler, and the steps after it were no faster.
        problems.append(f"compile is for CUDA GPUs and this run is on the {device.type}: turn compile off")
    if problems:
        raise ValueError("This machine cannot train with these settings: " + "; ".join(problems) + ".")


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over the LoRA weights: torch's fused kernel on CUDA (one launch for every tensor, where the
    default foreach implementation launches several per step), foreach on the CPU; or bitsandbytes'
    8-bit AdamW (Dettmers et al. 2022, "8-bit optimizers via block-wise quantization"), whose two
    moments take 2 bytes per weight instead of 8."""
    if cfg.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=cfg.learning_rate)
    cuda = device.type == "cuda"
    return torch.optim.AdamW(params, lr=cfg.learning_rate, fused=cuda, foreach=not cuda)


def scheduled_lr(cfg: TrainConfig, step: int) -> float:
    """The learning rate of step `step` (0-based). A pure function of the step rather than a torch
    LR scheduler, so a run resumed from a checkpoint needs no scheduler state to continue exactly."""
    if cfg.lr_schedule == "cosine":  # half a cosine, from the full rate down to 0 (Loshchilov & Hutter 2017, SGDR)
        return cfg.learning_rate * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
    return cfg.learning_rate


def move_encoders(pipe, device: torch.device) -> None:
    """Move the frozen VAE and text encoder(s) to `device` (nn.Module.to: diffusers' own .to logs a warning)."""
    for name in ("vae", "text_encoder", "text_encoder_2"):
        part = getattr(pipe, name, None)
        if isinstance(part, torch.nn.Module):
            torch.nn.Module.to(part, device)


class StopAsked(Exception):
    """A stop was asked for while validation pictures were being drawn: the validation is skipped."""


def training_captions(cfg: TrainConfig, images: ImageSet, base: Base) -> tuple[list[str], list[str]]:
    """The caption each image trains with, and notes for the user.

    An image's own caption (its .txt, or what the user wrote in the caption editor) is kept; the
    others are captioned by the base model's captioner when cfg.auto_caption is on (models/captions.py),
    so the words that vary between images name their content and the adapter is left the look to
    learn; the template is the fallback. Every caption gets the trigger word (TrainConfig.caption_for).
    """
    content, notes = list(images.captions), []
    missing = [i for i, caption in enumerate(content) if not (caption and caption.strip())]
    if missing and cfg.auto_caption:
        from models.captions import auto_captions  # loads a captioner model only when one is needed

        found, note = auto_captions([images.images[i] for i in missing], base.model_id, base.family)
        for i, caption in zip(missing, found):
            content[i] = caption
        notes.append(note)
    return [cfg.caption_for(caption) for caption in content], notes


def _kept(checkpoints: CheckpointDir | None) -> str:
    latest = checkpoints.paths()[-1:] if checkpoints else []
    return f" The last good checkpoint ({latest[0].stem}) is kept: resume from it." if latest else ""


def style_adapter(cfg: TrainConfig, lora_state: dict, info: dict[str, str], losses: list[float]) -> StyleAdapter:
    """The style a run made: its peft UNet LoRA state dict, and how it was made (TrainConfig, base model, ...)."""
    info = {
        "config": cfg.to_json(),
        "trigger": cfg.trigger_word,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "final_loss": f"{losses[-1]:.6f}" if losses else "nan",
        **info,
    }
    return StyleAdapter(lora_state, cfg.rank, cfg.lora_alpha, list(cfg.target_modules), info)


def checkpoint_adapter(state: TrainingState, style_name: str) -> StyleAdapter:
    """A checkpoint's adapter as a finished style named `style_name` (a stopped run the user wants to keep):
    its best validation so far, as a finished run would choose, unless the run was set to keep the last step."""
    info = dict(state.info)
    cfg = TrainConfig.from_dict({**json.loads(info.pop("config")), "style_name": style_name})
    adapter, _, kept_info = kept_weights(cfg.keep, state.adapter, state.step, state.best_adapter, state.best_step,
                                         state.scores)
    return style_adapter(cfg, adapter, {**info, **kept_info}, state.losses)


def kept_weights(keep: str, last: dict, last_step: int, best: dict | None, best_step: int | None,
                 scores: list[tuple[int, float]]) -> tuple[dict, int, dict[str, str]]:
    """The weights a run hands back, their step, and the metadata that says so (issue 17).

    The best validation's weights unless `keep` is "last" or nothing was validated; the metadata gives
    the step and, when that step was validated, its score and the whole curve."""
    weights, step = (best, best_step) if keep == "best" and best else (last, last_step)
    info = {"steps_done": str(step)}
    score = dict(scores).get(step)
    if score is not None:
        info |= {"validation_score": f"{score:.4f}", "validation_scores": json.dumps(scores)}
    return weights, step, info


@dataclass
class Conditioning:
    """What the UNet is conditioned on, one row per image: text embeddings and, for SDXL, its added conditioning.

    SDXL's UNet also takes the pooled embedding of its second text encoder and six image-size ids
    (original size, crop top-left, target size; SDXL paper section 2.2) as `added_cond_kwargs`.
    """

    text: torch.Tensor  # (n, tokens, width)
    pooled: torch.Tensor | None = None  # SDXL: (n, width of text_encoder_2's projection)
    time_ids: torch.Tensor | None = None  # SDXL: (n, 6)

    def __getitem__(self, index) -> Conditioning:
        return Conditioning(*(None if t is None else t[index] for t in (self.text, self.pooled, self.time_ids)))

    def to(self, device) -> Conditioning:
        return Conditioning(*(None if t is None else t.to(device) for t in (self.text, self.pooled, self.time_ids)))

    def with_dropout(self, dropped: torch.Tensor, empty: Conditioning) -> Conditioning:
        """Rows where `dropped` is set get the empty prompt's text embeddings, pooled one included; sizes stay."""
        text = torch.where(dropped[:, None, None], empty.text, self.text)
        pooled = None if self.pooled is None else torch.where(dropped[:, None], empty.pooled, self.pooled)
        return Conditioning(text, pooled, self.time_ids)

    def tensors(self, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """The conditioning arguments of UNetForward: text embeddings, then SDXL's pooled embedding and time ids."""
        return tuple(t.to(dtype) for t in (self.text, self.pooled, self.time_ids) if t is not None)


def diffusion_loss(forward, noise_scheduler, latents, cond, noise, timesteps, dtype=torch.float32,
                   min_snr_gamma: float = 0.0) -> torch.Tensor:
    """MSE between the UNet's prediction and its target (noise, or velocity for v-prediction).

    `forward` is the UNet as a UNetForward (or its graphed or compiled form).
    `cond` is a Conditioning, or the text embeddings alone for an SD 1.x/2.x UNet.
    With `min_snr_gamma`, each sample's loss is weighted by min(SNR, gamma) / SNR (or / (SNR + 1) for
    v-prediction): Min-SNR weighting (Hang et al. 2023, arXiv 2303.09556), as diffusers' and kohya's
    trainers do it, which gives the low-noise steps, where fine detail is decided, less say.
    """
    cond = cond if isinstance(cond, Conditioning) else Conditioning(cond)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    v_prediction = noise_scheduler.config.prediction_type == "v_prediction"
    target = noise_scheduler.get_velocity(latents, noise, timesteps) if v_prediction else noise
    prediction = forward(noisy.to(dtype), timesteps, *cond.tensors(dtype))
    if not min_snr_gamma:
        return F.mse_loss(prediction.float(), target.float())
    snr = compute_snr(noise_scheduler, timesteps)
    weights = torch.clamp(snr, max=min_snr_gamma) / (snr + 1 if v_prediction else snr)
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * weights).mean()


@dataclass
class Bucket:
    """The training pictures of one size: their places in the set and their cached latent distributions."""

    indices: torch.Tensor  # (k,) indices into the image set (its captions, its conditioning)
    mean: torch.Tensor  # (k, channels, height / f, width / f)
    std: torch.Tensor


def cache_buckets(pipe, prepared: list[Prepared]) -> list[Bucket]:
    """The pictures grouped by size (smallest width first), each group VAE-encoded once.

    A latent tensor stacks one size only, so each bucket caches its own; with one size (bucketing off,
    or a set of one shape) the single bucket holds every image in order, as the cache did before buckets.
    """
    buckets = []
    for size in sorted({p.image.size for p in prepared}):
        indices = [i for i, p in enumerate(prepared) if p.image.size == size]
        mean, std = encode_images(pipe, [prepared[i].image for i in indices])
        buckets.append(Bucket(torch.tensor(indices), mean, std))
    return buckets


def draw_batch(buckets: list[Bucket], batch_size: int, generator: torch.Generator) -> tuple[Bucket, torch.Tensor]:
    """A bucket and `batch_size` places in it, drawn with replacement: a batch never mixes sizes.

    The bucket is the one of an image drawn from the whole set, so each image is drawn as often as
    without buckets (1 / n per sample). A bucket with fewer images than the batch repeats some, each
    with its own noise, timestep and latent sample, rather than training a smaller batch: every step's
    loss stays a mean over `batch_size` draws (as steady as the others), and a lone portrait weighs a
    sample's share of its step, not the whole step. With one bucket nothing extra is drawn, so the
    random stream (and a run with bucketing off) is the one from before buckets. All draws come from
    `generator`, whose state each checkpoint keeps: a resumed run draws the same batches.
    """
    bucket = buckets[0]
    if len(buckets) > 1:
        ends = torch.tensor([len(b.indices) for b in buckets]).cumsum(0)  # bucket b holds images ends[b-1]..ends[b]-1
        anchor = torch.randint(int(ends[-1]), (1,), generator=generator)
        bucket = buckets[int(torch.searchsorted(ends, anchor, right=True))]
    return bucket, torch.randint(len(bucket.indices), (batch_size,), generator=generator)


class PerShape:
    """A forward per input shape, each made by `make()` at its shape's first call: a CUDA graph replays only
    the shapes it was captured with, and each bucket has its own. Each captured graph keeps its own memory
    pool; where a capture finds too little memory, GraphedForward runs that bucket eagerly."""

    def __init__(self, make):
        self.make, self.forwards = make, {}

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        shapes = tuple(tuple(a.shape) for a in args)
        if shapes not in self.forwards:
            self.forwards[shapes] = self.make()
        return self.forwards[shapes](*args)


@torch.no_grad()
def encode_images(pipe, images) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the VAE's latent distribution for each image, all of one size (on the CPU)."""
    vae = pipe.vae
    # SDXL's VAE overflows in fp16 (its config says force_upcast): encode in fp32, as diffusers' SDXL
    # LoRA script does. nn.Module.to, because diffusers 0.42's ModelMixin.to logs a warning on every
    # dtype cast (its "modules to keep in fp32" check is true even when there are none).
    upcast = vae.config.force_upcast and vae.dtype != torch.float32
    dtype = vae.dtype
    if upcast:
        torch.nn.Module.to(vae, torch.float32)
    pixels = torch.stack([pipe.image_processor.preprocess(image)[0] for image in images])
    means, stds = [], []
    try:
        for chunk in pixels.split(ENCODE_BATCH):
            dist = vae.encode(chunk.to(vae.device, vae.dtype)).latent_dist
            means.append(dist.mean.float().cpu())
            stds.append(dist.std.float().cpu())
    finally:
        if upcast:
            torch.nn.Module.to(vae, dtype)
    return torch.cat(means), torch.cat(stds)


def encode_conditioning(pipe, prompts: list[str], sizes: list[tuple[int, int]],
                        originals: list[tuple[int, int]] | None = None,
                        crops: list[tuple[int, int]] | None = None) -> Conditioning:
    """The UNet's conditioning for each prompt (on the CPU); for SDXL, image i's size ids from `sizes[i]`
    (width, height, as trained), `originals[i]` (width, height, before resizing) and `crops[i]` (top, left)."""
    if pipe.unet.config.get("addition_embed_type") != "text_time":
        return Conditioning(encode_prompts(pipe, prompts))
    text, pooled = encode_sdxl_prompts(pipe, prompts)
    return Conditioning(text, pooled, sdxl_time_ids(sizes, originals, crops))


def size_conditioning(prepared: list[Prepared]) -> tuple[list, list, list]:
    """encode_conditioning's `sizes`, `originals` and `crops` of the prepared pictures."""
    return [p.image.size for p in prepared], [p.original_size for p in prepared], [p.crop_top_left for p in prepared]


@torch.no_grad()
def encode_sdxl_prompts(pipe, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's text embeddings and pooled embeddings for each prompt (on the CPU).

    The pipeline's own encode_prompt, as diffusers' train_text_to_image_lora_sdxl.py encodes them:
    both encoders' penultimate hidden states side by side, and the second encoder's projection.
    """
    chunks = [
        pipe.encode_prompt(
            prompts[i : i + ENCODE_BATCH], device=pipe.text_encoder_2.device, do_classifier_free_guidance=False
        )
        for i in range(0, len(prompts), ENCODE_BATCH)
    ]
    text = torch.cat([chunk[0] for chunk in chunks])
    pooled = torch.cat([chunk[2] for chunk in chunks])
    return text.float().cpu(), pooled.float().cpu()


def sdxl_time_ids(sizes: list[tuple[int, int]], originals: list[tuple[int, int]] | None = None,
                  crops: list[tuple[int, int]] | None = None) -> torch.Tensor:
    """SDXL's size ids per image, (original height, width, crop top, left, target height, width).

    SDXL's micro-conditioning (Podell et al. 2023, section 2.2): the size a picture had before it was
    resized, where its crop began (in the resized picture, as sd-scripts records it) and the size it
    trains at (its bucket), so the model learns what a small or cropped source looks like and generates
    whole, sharp pictures when asked with crop (0, 0) and a large original. Without `originals` and
    `crops`, a picture is whole at its trained size: original = target, crop (0, 0).
    """
    originals = originals or sizes
    crops = crops or [(0, 0)] * len(sizes)
    return torch.tensor([[oh, ow, top, left, height, width]
                         for (width, height), (ow, oh), (top, left) in zip(sizes, originals, crops, strict=True)],
                        dtype=torch.float32)


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str]) -> torch.Tensor:
    """Text-encoder hidden states for each prompt (on the CPU)."""
    ids = pipe.tokenizer(
        prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    return pipe.text_encoder(ids.to(pipe.text_encoder.device))[0].float().cpu()


@torch.no_grad()
def render_samples(pipe, prompts: list[str], seed: int) -> list:
    """One image per prompt, seeds seed, seed+1, ...: the same every time for the same adapter.

    The VAE and text encoder(s) join the UNet on its device for this, wherever they waited.
    """
    if not prompts:
        return []
    was_training, waiting_on = pipe.unet.training, pipe.vae.device
    pipe.unet.eval()
    move_encoders(pipe, pipe.unet.device)
    try:
        return [
            pipe(prompt, num_inference_steps=SAMPLE_STEPS, generator=torch.Generator().manual_seed(seed + i)).images[0]
            for i, prompt in enumerate(prompts)
        ]
    finally:
        move_encoders(pipe, waiting_on)
        pipe.unet.train(was_training)
