"""Training: the loss falls, the UNet changes, the file holds only UNet attention LoRA weights."""

from __future__ import annotations

import dataclasses
import json
import re
import threading

import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from styles import formats
from styles.library import StyleLibrary
from styles.metadata import lora_config, style_info
from tests.conftest import pattern_image, save_style, train_style
from trainer.checkpoints import CheckpointDir
from trainer.config import LR_SCHEDULES, PRESETS, TrainConfig, make_config
from trainer.data import ImageSet
from trainer.events import Cancelled, Failed, Finished, Sample, Started, Step, Validation
from trainer.graphs import UNetForward
from trainer.train import TRAINING_ADAPTER, diffusion_loss, encode_images, encode_prompts, train


def _images(n=3):
    return ImageSet(images=[pattern_image(i) for i in range(n)], captions=[None] * n, names=[str(i) for i in range(n)])


def _fixed_batch(base, images, cfg):
    """A fixed batch (latents, embeddings, noise, timesteps) to measure the loss on before and after."""
    generator = torch.Generator().manual_seed(123)
    mean, _ = encode_images(base.pipe, images.images)
    latents = mean * base.pipe.vae.config.scaling_factor
    embeds = encode_prompts(base.pipe, [cfg.caption_for(None)] * len(images))
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.tensor([100, 500, 900])
    return latents, embeds, noise, timesteps


def test_training_lowers_the_loss_and_changes_the_unet(base, library):
    images = _images()
    cfg = make_config("Quick", validation_prompts=0, style_name="stripes", steps=30, learning_rate=1e-3, num_samples=1)
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(base.pipe.scheduler.config)
    batch = _fixed_batch(base, images, cfg)
    with torch.no_grad():
        loss_before = diffusion_loss(UNetForward(base.pipe.unet), scheduler, *batch).item()
        out_before = base.pipe.unet(batch[0], batch[3], batch[1]).sample

    events = iter(train(cfg, images, base))
    # Run the loop but stop before the adapter is removed, to measure with it in place.
    seen = []
    for event in events:
        seen.append(event)
        if isinstance(event, Step) and event.step == cfg.steps:
            break
    with torch.no_grad():
        loss_after = diffusion_loss(UNetForward(base.pipe.unet), scheduler, *batch).item()
        out_after = base.pipe.unet(batch[0], batch[3], batch[1]).sample
    rest = list(events)

    assert isinstance(seen[0], Started) and seen[0].total_steps == 30
    assert [e.step for e in seen if isinstance(e, Step)] == list(range(1, 31))
    assert loss_after < loss_before * 0.98, (loss_before, loss_after)
    assert (out_after - out_before).abs().max() > 1e-3
    assert isinstance(rest[0], Sample) and len(rest[0].images) == 1
    save_style(library, rest[-1])
    assert isinstance(rest[-1], Finished) and library.exists("stripes")
    # The adapter is removed again: the base UNet gives its original output.
    with torch.no_grad():
        assert torch.equal(base.pipe.unet(batch[0], batch[3], batch[1]).sample, out_before)
    assert TRAINING_ADAPTER not in getattr(base.pipe.unet, "peft_config", {})
    assert not any(isinstance(m, BaseTunerLayer) for m in base.pipe.unet.modules())  # peft's wrappers are gone too


def test_style_file_holds_only_unet_attention_lora_weights(library):
    finished = train_style(library, "ink", seed=1, rank=4, alpha=2.0)
    tensors, metadata = formats.read_style(finished.path)
    assert tensors, "no tensors saved"
    for key, value in tensors.items():
        assert key.startswith("unet.") and ".attn" in key, key
        assert key.endswith((
            ".to_q.lora_A.weight", ".to_k.lora_A.weight", ".to_v.lora_A.weight", ".to_out.0.lora_A.weight",
            ".to_q.lora_B.weight", ".to_k.lora_B.weight", ".to_v.lora_B.weight", ".to_out.0.lora_B.weight"
        )), key
        assert 4 in value.shape
    assert lora_config(metadata) == {"r": 4, "lora_alpha": 2.0, "target_modules": ["to_k", "to_out.0", "to_q", "to_v"]}
    info = style_info(metadata)
    assert TrainConfig.from_dict(__import__("json").loads(info["config"])).rank == 4
    assert info["trigger"] == "ink" and info["base_model"].startswith("embedded:") and len(info["unet_hash"]) == 16


def test_same_seed_gives_the_same_adapter(tmp_path):
    first = formats.read_style(train_style(StyleLibrary(tmp_path / "a"), "s", seed=7).path)[0]
    second = formats.read_style(train_style(StyleLibrary(tmp_path / "b"), "s", seed=7).path)[0]
    third = formats.read_style(train_style(StyleLibrary(tmp_path / "c"), "s", seed=8).path)[0]
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert any(not torch.equal(first[k], third[k]) for k in first)


def test_existing_style_is_not_overwritten(base, library):
    """train() hands its style back; saving it under a taken name is refused and the old file stays."""
    train_style(library, "taken", seed=1)
    before = library.path_for("taken").read_bytes()
    events = list(train(make_config("Quick", validation_prompts=0, style_name="taken", steps=2), _images(), base))
    with pytest.raises(FileExistsError, match="already exists"):
        save_style(library, events[-1])
    assert library.path_for("taken").read_bytes() == before


def test_stop_flag_cancels_without_saving_a_style(base, library):
    stop = threading.Event()
    events = []
    cfg = make_config("Quick", validation_prompts=0, style_name="halt", steps=50)
    for event in train(cfg, _images(), base, stop=stop):
        events.append(event)
        if isinstance(event, Step) and event.step == 3:
            stop.set()
    assert isinstance(events[-1], Cancelled) and events[-1].step == 3 and events[-1].checkpoint is None
    assert not library.exists("halt")


def _run(cfg, library, checkpoints=None, resume=False, stop_at=None):
    """Train on a fresh base, as the CLI does: stop after step `stop_at`, save the style if the run finishes."""
    from models.base import load_base

    stop, events = threading.Event(), []
    for event in train(cfg, _images(), load_base(), stop=stop, checkpoints=checkpoints, resume=resume):
        events.append(event)
        if isinstance(event, Step) and event.step == stop_at:
            stop.set()
    if isinstance(events[-1], Finished):
        save_style(library, events[-1])
    return events


@pytest.mark.parametrize("schedule", LR_SCHEDULES)
def test_a_stopped_and_resumed_run_ends_with_the_uninterrupted_runs_adapter(tmp_path, schedule):
    from safetensors.torch import load_file

    cfg = make_config("Quick", validation_prompts=0, style_name="same", steps=12, learning_rate=1e-3,
                      lr_schedule=schedule, num_samples=0, checkpoint_every=4)
    _run(cfg, StyleLibrary(tmp_path / "a"))  # straight through: the style to compare with
    checkpoints = CheckpointDir(tmp_path / "ckpt", keep=2)
    library = StyleLibrary(tmp_path / "b")
    stopped = _run(cfg, library, checkpoints, stop_at=6)  # stops after step 6: a checkpoint is written on the way out
    assert isinstance(stopped[-1], Cancelled) and stopped[-1].checkpoint.endswith("step-000006.safetensors")
    # pruned to 2
    assert [p.name for p in checkpoints.paths()] == ["step-000004.safetensors", "step-000006.safetensors"]
    resumed = _run(cfg, library, checkpoints, resume=True)
    assert resumed[0].resumed_from == 6 and len(resumed[0].losses) == 6
    assert [e.step for e in resumed if isinstance(e, Step)] == list(range(7, 13))
    rates = [e.lr for e in stopped + resumed if isinstance(e, Step)]
    if schedule == "cosine":  # from the full rate, falling every step, to near 0 at the end
        assert rates[0] == 1e-3 and all(b < a for a, b in zip(rates, rates[1:])) and rates[-1] < 0.03e-3
    else:
        assert rates == [1e-3] * 12
    expected, got = load_file(StyleLibrary(tmp_path / "a").path_for("same")), load_file(library.path_for("same"))
    # Same seed, same data, same order of random draws: equal to float rounding (1e-6 is generous on CPU).
    assert expected.keys() == got.keys() and all(torch.allclose(expected[k], got[k], atol=1e-6) for k in expected)
    assert not list(checkpoints.folder.glob("*.tmp"))


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path):
    checkpoints = CheckpointDir(tmp_path / "ckpt", keep=3)
    cfg = make_config("Quick", validation_prompts=0, style_name="fall", steps=8, num_samples=0, checkpoint_every=4)
    _run(cfg, StyleLibrary(tmp_path / "ws"), checkpoints, stop_at=6)
    newest = checkpoints.paths()[-1]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a torn write from another tool
    state, notes = checkpoints.load_latest()
    assert state.step == 4 and "step-000006.safetensors is unreadable" in notes[0]
    resumed = _run(cfg, StyleLibrary(tmp_path / "ws"), checkpoints, resume=True)
    assert resumed[0].resumed_from == 4 and isinstance(resumed[-1], Finished)


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    import trainer.train as train_module

    real_loss, calls = train_module.diffusion_loss, []

    def loss_that_explodes_at_step_6(*args, **kwargs):
        calls.append(1)
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if len(calls) == 6 else loss

    monkeypatch.setattr(train_module, "diffusion_loss", loss_that_explodes_at_step_6)
    checkpoints = CheckpointDir(tmp_path / "ckpt")
    cfg = make_config("Quick", validation_prompts=0, style_name="nan", steps=10, num_samples=0, checkpoint_every=4)
    events = _run(cfg, StyleLibrary(tmp_path / "ws"), checkpoints)
    assert isinstance(events[-1], Failed) and "loss became nan at step 6" in events[-1].message
    assert "step-000004" in events[-1].message and not StyleLibrary(tmp_path / "ws").exists("nan")
    state, _ = checkpoints.load_latest()
    assert state.step == 4 and all(torch.isfinite(v).all() for v in state.adapter.values())


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"style_name": "../evil"}, "not allowed"),
        ({"style_name": "ok", "rank": 0}, "rank = 0 is outside"),
        ({"style_name": "ok", "precision": "fp8"}, "precision must be one of"),
        ({"style_name": "ok", "lr_schedule": "linear"}, "lr_schedule must be one of constant, cosine"),
        ({"style_name": "ok", "target_modules": []}, "target_modules is empty"),
    ],
)
def test_invalid_config_is_refused_with_the_reason(overrides, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**overrides).validate()


def test_presets_and_overrides():
    assert set(PRESETS) == {"Quick", "Balanced", "Best", "Low memory"}
    balanced = make_config("Balanced", style_name="x")
    assert (balanced.rank, balanced.lora_alpha, balanced.learning_rate, balanced.steps,
            balanced.batch_size) == (8, 8.0, 3e-4, 1000, 4)
    assert make_config("Best", style_name="x", rank=8).lora_alpha == 8.0
    cfg = make_config("Quick", style_name="x", steps=3)
    assert TrainConfig.from_dict(dataclasses.asdict(cfg)) == cfg
    with pytest.raises(ValueError, match="Unknown training settings: bogus"):
        TrainConfig.from_dict({"bogus": 1})


def test_caption_dropout_trains_on_the_empty_caption(library):
    """With every caption dropped, what the captions say cannot change the adapter; without, it does."""
    from safetensors.torch import load_file

    def adapter(name, caption, dropout):
        images = ImageSet(images=[pattern_image(i) for i in range(2)], captions=[caption] * 2, names=["a", "b"])
        cfg = make_config("Quick", validation_prompts=0, style_name=name, steps=4, learning_rate=1e-3, num_samples=0,
                          caption_dropout=dropout)
        from models.base import load_base

        events = list(train(cfg, images, load_base()))
        assert isinstance(events[-1], Finished), events[-1]
        return load_file(save_style(library, events[-1]))

    red, blue = adapter("red", "a red circle", 1.0), adapter("blue", "a blue star", 1.0)
    assert all(torch.equal(red[key], blue[key]) for key in red)
    kept_red, kept_blue = adapter("kept-red", "a red circle", 0.0), adapter("kept-blue", "a blue star", 0.0)
    assert not all(torch.equal(kept_red[key], kept_blue[key]) for key in kept_red)


# -- memory and speed options (issue 5) --------------------------------------------------------------------
def _losses(events):
    assert isinstance(events[-1], Finished), events[-1]
    return [e.loss for e in events if isinstance(e, Step)]


def test_gradient_checkpointing_gives_the_same_losses_and_is_switched_off_again(base, library):
    """Recomputing activations changes memory, not maths: the same steps give the same losses."""
    # one name: one caption
    options = dict(style_name="same", steps=4, learning_rate=1e-3, num_samples=0, checkpoint_every=0,
                   validation_prompts=0)
    checkpointed = _losses(list(train(make_config("Quick", gradient_checkpointing=True, **options), _images(), base)))
    unet = base.pipe.unet
    # the borrowed UNet is as it was
    assert not any(getattr(m, "gradient_checkpointing", False) for m in unet.modules())
    plain = _losses(list(train(make_config("Quick", **options), _images(), base)))
    assert len(plain) == 4 and plain[0] != plain[-1]
    assert plain == pytest.approx(checkpointed, rel=1e-5, abs=1e-7)


def test_a_failed_graph_capture_falls_back_to_the_eager_unet_with_the_reason(base):
    """Where CUDA graphs cannot be captured (here: no CUDA at all), the step runs eagerly and gives the same output."""
    from trainer.graphs import GraphedForward

    latents, embeds, _, timesteps = _fixed_batch(base, _images(), make_config("Quick", style_name="graphs"))
    eager = UNetForward(base.pipe.unet)
    graphed = GraphedForward(eager)
    with torch.no_grad():
        assert torch.equal(graphed(latents, timesteps, embeds), eager(latents, timesteps, embeds))
    assert graphed.graphed is None and "CUDA" in graphed.failure


def test_channels_last_trains_and_gives_the_unet_back_as_it_came(base, library):
    from models.base import load_base

    cfg = make_config("Quick", validation_prompts=0, style_name="nhwc", steps=2, num_samples=0, channels_last=True)
    events = list(train(cfg, _images(), base))
    assert isinstance(events[-1], Finished), events[-1]
    convs = [m.weight for m in base.pipe.unet.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(w.is_contiguous() and not w.is_contiguous(memory_format=torch.channels_last)
               for w in convs if w.shape[-1] > 1)
    # The style records the base's hash, taken while the weights were channels-last: the same as a fresh base's.
    assert style_info(formats.read_style(save_style(library, events[-1]))[1])["unet_hash"] == load_base().unet_hash


def test_adamw8bit_without_bitsandbytes_names_the_fix(monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "bitsandbytes" else real_find_spec(name, *args))
    with pytest.raises(ValueError, match=r"optimizer adamw8bit needs the optional bitsandbytes package.*"
                                         r"`pip install bitsandbytes`.*or choose optimizer adamw"):
        TrainConfig(style_name="ok", optimizer="adamw8bit").validate()
    TrainConfig(style_name="ok", optimizer="adamw").validate()


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"optimizer": "adamw8bit"},
         "8-bit AdamW (optimizer adamw8bit) needs a CUDA GPU and this run is on the cpu: choose optimizer adamw"),
        ({"compile": True}, "compile is for CUDA GPUs and this run is on the cpu: turn compile off"),
    ],
)
def test_gpu_only_options_fail_on_the_cpu_with_the_reason(base, library, monkeypatch, overrides, message):
    import trainer.config

    # as if installed: the device is the problem
    monkeypatch.setattr(trainer.config, "bitsandbytes_installed", lambda: True)
    cfg = make_config("Quick", validation_prompts=0, style_name="gpu-only", steps=2, **overrides)
    events = list(train(cfg, _images(), base))
    assert len(events) == 1 and isinstance(events[0], Failed) and message in events[0].message
    assert not library.exists("gpu-only")


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"optimizer": "sgd"}, "optimizer must be one of adamw, adamw8bit, not 'sgd'"),
        ({"gradient_checkpointing": "yes"}, "gradient_checkpointing must be true or false, not 'yes'"),
        ({"compile": 1}, "compile must be true or false, not 1"),
    ],
)
def test_invalid_memory_options_are_refused_with_the_reason(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        TrainConfig(style_name="ok", **overrides).validate()


def test_low_memory_preset_validates_and_trains_on_the_cpu(base, library):
    from trainer.config import bitsandbytes_installed

    cfg = make_config("Low memory", style_name="small", steps=2, num_samples=0).validate()
    assert cfg.gradient_checkpointing and cfg.batch_size == 1 and cfg.rank <= 16
    assert cfg.optimizer == ("adamw8bit" if bitsandbytes_installed() else "adamw")  # chosen when the preset was made
    if cfg.optimizer == "adamw8bit":
        cfg.optimizer = "adamw"  # 8-bit AdamW needs a CUDA GPU: a CPU run takes plain AdamW
    events = list(train(cfg, _images(), base))
    assert isinstance(events[-1], Finished) and [e.step for e in events if isinstance(e, Step)] == [1, 2]
    saved = TrainConfig.from_dict(
        json.loads(style_info(formats.read_style(save_style(library, events[-1]))[1])["config"])
    )
    assert saved.gradient_checkpointing and saved.optimizer == cfg.optimizer  # the style file says how it was made


def test_the_memory_options_appear_in_the_ui_as_choices():
    """The Advanced accordion is derived from the fields: on/off fields become True/False drop-downs."""
    from trainer.config import BOOLEANS, OPTIMIZERS, config_fields

    fields = {f.name: f for f in config_fields()}
    for name in ("gradient_checkpointing", "channels_last", "compile"):
        assert (fields[name].default is False and fields[name].metadata["choices"] == BOOLEANS
                and fields[name].metadata["help"])
    assert fields["optimizer"].default == "adamw" and fields["optimizer"].metadata["choices"] == OPTIMIZERS


def test_train_speed_bench_runs_and_prints_the_speed_up(capsys):
    from bench.train_speed import main

    threads = torch.get_num_threads()
    try:
        assert main(["--steps", "2", "--warmup", "1", "--rounds", "1", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(("| 1 |", "| 4 |"))]
    assert len(rows) == 2, out
    for row in rows:
        assert re.search(r"\| \d+\.\d\dx \|", row), row  # the speed-up, baseline step / ours


def test_train_speed_bench_refuses_full_size_models_without_a_gpu(capsys):
    from bench.train_speed import main

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["--arch", "sd15"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def _validated_run(keep: str, steps: int = 6) -> list:
    from models.base import load_base

    cfg = make_config("Quick", style_name="val", steps=steps, learning_rate=3e-3, num_samples=0, checkpoint_every=2,
                      validation_prompts=2, keep=keep)
    return list(train(cfg, _images(), load_base()))


def test_every_checkpoint_is_validated_and_the_style_is_the_best_one_unless_last_is_asked():
    best_run, last_run = _validated_run("best"), _validated_run("last")
    scores = [(e.step, e.score) for e in best_run if isinstance(e, Validation)]
    assert [step for step, _ in scores] == [2, 4, 6]
    assert [(e.step, e.score) for e in last_run if isinstance(e, Validation)] == scores  # same seed, same draws
    best_step, best_score = max(scores, key=lambda pair: pair[1])
    best, last = best_run[-1].adapter, last_run[-1].adapter
    assert best.info["steps_done"] == str(best_step) and float(best.info["validation_score"]) == round(best_score, 4)
    assert last.info["steps_done"] == "6" and json.loads(last.info["validation_scores"]) == [list(s) for s in scores]
    # The best adapter is the one the run had at that step: what a run of that many steps ends with.
    shorter = _validated_run("last", steps=best_step)[-1].adapter
    assert all(torch.equal(best.tensors[k], shorter.tensors[k]) for k in best.tensors)
    validation = next(e for e in best_run if isinstance(e, Validation))
    assert len(validation.images) == 2 and all(p.endswith(", val") for p in validation.prompts)
    started = best_run[0]
    assert len(started.captions) == 3 and all(caption.endswith(", val") for caption in started.captions)
