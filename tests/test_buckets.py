"""Aspect-ratio buckets (issue 19): pictures train whole at the size nearest their shape, a batch holds one size,
SDXL is told each picture's original size and crop, and a resumed bucketed run is the uninterrupted one."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch
from PIL import Image

import trainer.train as train_module
from styles.library import StyleLibrary
from tests import tiny_models
from tests.conftest import pattern_image, png_bytes, save_style
from trainer.checkpoints import CheckpointDir
from trainer.config import make_config
from trainer.data import (
    MAX_ASPECT,
    ImageSet,
    bucket_of,
    bucket_sizes,
    bucket_step,
    ingest,
    prepare,
    size_multiple,
    square_crop,
)
from trainer.events import Cancelled, Finished, Step
from trainer.train import Bucket, PerShape, draw_batch, train

RED, GREEN, BLUE = (255, 0, 0), (0, 200, 0), (0, 0, 255)
# (resolution, the UNet's multiple): the embedded model, the tiny test models, SD 1.x, SD 2.x at 768, SDXL
SCALES = [(64, 16), (32, 4), (512, 64), (768, 64), (1024, 32)]


def striped(width: int, height: int) -> Image.Image:
    """A green picture with a red stripe down its left edge and a blue one down its right edge."""
    image = Image.new("RGB", (width, height), GREEN)
    image.paste(RED, (0, 0, width // 16, height))
    image.paste(BLUE, (width - width // 16, 0, width, height))
    return image


def ingested(tmp_path, sizes: list[tuple[int, int]], resolution: int) -> ImageSet:
    """Pictures of `sizes` written as PNGs and ingested, as an upload is."""
    paths = []
    for i, (width, height) in enumerate(sizes):
        picture = pattern_image(i, size=max(width, height)).crop((0, 0, width, height))
        paths.append(tmp_path / f"{i}.png")
        paths[-1].write_bytes(png_bytes(picture))
    return ingest(paths, resolution)


def _near(pixel, colour) -> bool:
    return np.abs(np.asarray(pixel, dtype=int) - colour).max() <= 40


@pytest.mark.parametrize("resolution, multiple", SCALES)
def test_buckets_are_multiples_of_the_unets_step_with_about_the_resolutions_pixels(resolution, multiple):
    step = bucket_step(resolution, multiple)
    buckets = bucket_sizes(resolution, step)
    assert step % multiple == 0 and step == (64 if resolution >= 512 else multiple)
    assert len(buckets) >= 5 and (resolution, resolution) in buckets  # several shapes, the square among them
    for width, height in buckets:
        assert width % step == 0 and height % step == 0, (width, height)
        assert 0.9 <= width * height / resolution**2 <= 1.13, (width, height)  # about resolution², never far over
        assert 1 / MAX_ASPECT <= width / height <= MAX_ASPECT
        assert (height, width) in buckets  # portrait and landscape alike


NEAREST = [  # (picture size, resolution, step, its bucket)
    ((600, 400), 512, 64, (640, 384)),  # 3:2 -> 5:3, the nearest of 9:7, 5:3 and 11:6
    ((400, 600), 512, 64, (384, 640)),
    ((1000, 1010), 512, 64, (512, 512)),
    ((3000, 1000), 512, 64, (704, 384)),  # beyond 2:1: the widest bucket
    ((100, 1000), 512, 64, (384, 704)),
    ((96, 64), 64, 16, (80, 48)),  # the embedded model
    ((1920, 1080), 1024, 64, (1344, 768)),  # SDXL's own 16:9 bucket
]


@pytest.mark.parametrize("size, resolution, step, expected", NEAREST, ids=[str(case[0]) for case in NEAREST])
def test_a_picture_goes_to_the_bucket_nearest_its_aspect_ratio(size, resolution, step, expected):
    buckets = bucket_sizes(resolution, step)
    assert bucket_of(size, buckets) == expected
    distance = [abs(math.log(w / h) - math.log(size[0] / size[1])) for w, h in buckets]
    assert distance[buckets.index(expected)] == min(distance)


def test_a_wide_photo_keeps_its_edges_in_a_bucket_and_is_cropped_square_without(tmp_path):
    """A 3:2 photo's left and right edges survive bucketing (only a few rows go); bucketing off crops it square."""
    (tmp_path / "wide.png").write_bytes(png_bytes(striped(300, 200)))
    images = ingest(tmp_path / "wide.png", resolution=64)
    assert images.images[0].size == (96, 64) and images.original_sizes == [(300, 200)]  # whole, scaled down

    [bucketed] = prepare(images, 64, bucket_sizes(64, bucket_step(64, 16)))
    pixels = np.asarray(bucketed.image)
    assert bucketed.image.size == (80, 48)
    assert all(_near(pixels[row, 1], RED) and _near(pixels[row, -2], BLUE) for row in range(48))
    # Resized to cover 80x48 (80x53), then 5 rows cropped, 2 at the top: SDXL's crop corner is (top, left).
    assert bucketed.original_size == (300, 200) and bucketed.crop_top_left == (2, 0)

    [square] = prepare(images, 64, None)  # bucketing off: the centre square, as before buckets
    assert square.image.size == (64, 64) and square.crop_top_left == (0, 0)
    assert np.array_equal(np.asarray(square.image), np.asarray(square_crop(images.images[0], 64)))
    assert not any(_near(pixel, RED) or _near(pixel, BLUE) for pixel in np.asarray(square.image).reshape(-1, 3))


def test_with_one_bucket_the_batches_are_drawn_as_before_buckets():
    """One size (bucketing off, or a set of one shape): the same random draws as the loop made before buckets."""
    bucket = Bucket(torch.arange(5), torch.zeros(5, 4, 2, 2), torch.ones(5, 4, 2, 2))
    drawn, pick = draw_batch([bucket], 3, torch.Generator().manual_seed(4))
    assert drawn is bucket and torch.equal(pick, torch.randint(5, (3,), generator=torch.Generator().manual_seed(4)))


def test_a_graph_per_shape():
    made = []

    def make():
        made.append(len(made))
        return lambda x: x * 2

    forward = PerShape(make)
    assert torch.equal(forward(torch.ones(1, 4, 6, 4)), torch.full((1, 4, 6, 4), 2.0))
    forward(torch.ones(1, 4, 4, 6))
    forward(torch.ones(1, 4, 6, 4))
    assert made == [0, 1]  # one per shape, made at its first call


def _recording(monkeypatch) -> list:
    """Record every step's batch (image indices), latents and conditioning on their way to the UNet."""
    steps, draw, loss = [], train_module.draw_batch, train_module.diffusion_loss

    def draw_batch(buckets, batch_size, generator):
        bucket, pick = draw(buckets, batch_size, generator)
        steps.append({"batch": bucket.indices[pick].tolist()})
        return bucket, pick

    def diffusion_loss(forward, scheduler, latents, cond, *args, **kwargs):
        steps[-1] |= {"latents": tuple(latents.shape), "time_ids": cond.time_ids}
        return loss(forward, scheduler, latents, cond, *args, **kwargs)

    monkeypatch.setattr(train_module, "draw_batch", draw_batch)
    monkeypatch.setattr(train_module, "diffusion_loss", diffusion_loss)
    return steps


QUICK = dict(validation_prompts=0, num_samples=0, auto_caption=False, checkpoint_every=0, learning_rate=1e-3)
MIXED = [(96, 64), (64, 96), (64, 64), (90, 60), (64, 128)]  # landscape, portrait, square, landscape, tall


def test_batches_never_mix_buckets(tmp_path, base, monkeypatch):
    images = ingested(tmp_path, MIXED, 64)
    prepared = prepare(images, 64, bucket_sizes(64, 16))
    sizes = [p.image.size for p in prepared]
    assert sizes == [(80, 48), (48, 80), (64, 64), (80, 48), (48, 96)]
    steps = _recording(monkeypatch)
    events = list(train(make_config("Quick", style_name="mixed", steps=8, batch_size=3, **QUICK), images, base))
    assert isinstance(events[-1], Finished), events[-1]
    for step in steps:
        [size] = {sizes[i] for i in step["batch"]}  # one bucket per batch
        assert step["latents"] == (3, 4, size[1] // 4, size[0] // 4)  # the embedded VAE downsamples 4x
    assert len({tuple(s["latents"]) for s in steps}) > 1  # and the run did visit several buckets


def test_sdxl_is_told_each_pictures_original_size_and_crop(tmp_path, monkeypatch):
    """SDXL's size ids (Podell et al. 2023, 2.2): original size before resizing, crop top-left, target = bucket."""
    from models.base import Base

    base = Base.of(tiny_models.sdxl_pipeline(), "tiny-sdxl", torch.device("cpu"), torch.float32)
    (tmp_path / "wide.png").write_bytes(png_bytes(striped(300, 200)))
    (tmp_path / "tall.png").write_bytes(png_bytes(striped(200, 300)))
    images = ingest([tmp_path / "wide.png", tmp_path / "tall.png"], tiny_models.RESOLUTION)
    assert size_multiple(base.pipe) == 4
    steps = _recording(monkeypatch)
    cfg = make_config("Quick", style_name="xl", steps=6, batch_size=2, caption_dropout=0.5, **QUICK)
    assert isinstance(list(train(cfg, images, base))[-1], Finished)
    # 300x200 at 32 px: fitted to 48x32, bucket 40x24 (5:3), covered at 40x27: 1 row cropped at the top.
    expected = {0: [200, 300, 1, 0, 24, 40], 1: [300, 200, 0, 1, 40, 24]}
    for step in steps:
        assert step["time_ids"].tolist() == [expected[i] for i in step["batch"]]
    assert {i for step in steps for i in step["batch"]} == {0, 1}

    steps.clear()  # bucketing off: the square, told as a whole picture of the training size, as before buckets
    assert isinstance(list(train(make_config("Quick", style_name="xl", steps=1, batch_size=2, bucketing=False,
                                             **QUICK), images, base))[-1], Finished)
    assert steps[0]["time_ids"].tolist() == [[32, 32, 0, 0, 32, 32]] * 2


def _run(cfg, images, checkpoints=None, resume=False, stop_at=None):
    from models.base import load_base

    stop, events = threading.Event(), []
    for event in train(cfg, images, load_base(), stop=stop, checkpoints=checkpoints, resume=resume):
        events.append(event)
        if isinstance(event, Step) and event.step == stop_at:
            stop.set()
    return events


def test_a_resumed_bucketed_run_equals_the_uninterrupted_one_bit_for_bit(tmp_path):
    images = ingested(tmp_path, MIXED, 64)
    cfg = make_config("Quick", style_name="same", steps=6, batch_size=2, **{**QUICK, "checkpoint_every": 2})
    straight = _run(cfg, images)
    checkpoints = CheckpointDir(tmp_path / "ckpt", keep=2)
    stopped = _run(cfg, images, checkpoints, stop_at=3)  # stops after step 3, with a checkpoint on the way out
    assert isinstance(stopped[-1], Cancelled) and stopped[-1].checkpoint.endswith("step-000003.safetensors")
    resumed = _run(cfg, images, checkpoints, resume=True)
    assert resumed[0].resumed_from == 3 and isinstance(resumed[-1], Finished)
    losses = [e.loss for e in straight if isinstance(e, Step)]
    assert [e.loss for e in stopped + resumed if isinstance(e, Step)] == losses
    expected, got = straight[-1].adapter.tensors, resumed[-1].adapter.tensors
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    save_style(StyleLibrary(tmp_path / "ws"), resumed[-1])  # and it is a style like any other
