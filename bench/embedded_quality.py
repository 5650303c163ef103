"""Does the embedded model draw what the prompt asks for?  `python -m bench.embedded_quality`

Prompts pair each shape with the colour it never had in pretraining (scenes.HELD_OUT), on every
other background colour; for comparison the same number of seen pairs. Each image's background
and object colours are read back (scenes.read_colours) and compared with the prompt.
Floors (issue 3): background right in >= 85% and object colour right in >= 75% of held-out
images, and one image at native resolution in under 1 s.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from embedded import scenes
from models.base import load_base
from styles.blend import DEFAULT_GUIDANCE, DEFAULT_STEPS

BATCH = 9


def held_out_scenes() -> list[scenes.Scene]:
    return [
        scenes.Scene(shape, colour, background)
        for shape, colour in sorted(scenes.HELD_OUT)
        for background in scenes.COLOURS
        if background != colour
    ]


def seen_scenes(count: int, seed: int = 1) -> list[scenes.Scene]:
    """`count` one-object prompts whose (shape, colour) pair was seen in pretraining."""
    draws = scenes.one_object_draws(random.Random(seed))
    return [scenes.Scene(*draw) for draw, _ in zip(draws, range(count))]


@torch.no_grad()
def draw(pipe, prompts: list[str], seed: int, steps: int, guidance: float) -> list:
    """One image per prompt, in batches; image i has its own seed (seed * 1000 + i), so batching changes nothing."""
    images = []
    for start in range(0, len(prompts), BATCH):
        chunk = prompts[start : start + BATCH]
        generator = [torch.Generator().manual_seed(seed * 1000 + start + i) for i in range(len(chunk))]
        images += pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=generator).images
    return images


def accuracy(pipe, scene_list, seeds, steps, guidance) -> tuple[float, float, list]:
    background_right = object_right = 0
    images = []
    for seed in seeds:
        drawn = draw(pipe, [scene.caption() for scene in scene_list], seed, steps, guidance)
        for scene, image in zip(scene_list, drawn):
            background, colour = scenes.read_colours(image)
            background_right += background == scene.background
            object_right += colour == scene.colour
        images += drawn
    total = len(scene_list) * len(seeds)
    return background_right / total, object_right / total, images


def seconds_per_image(pipe, steps: int, guidance: float, repeats: int = 5) -> float:
    times = []
    for i in range(repeats + 1):
        started = time.perf_counter()
        pipe("a red circle on a blue background", num_inference_steps=steps, guidance_scale=guidance,
             generator=torch.Generator().manual_seed(i))
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])  # the first call warms up


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.embedded_quality", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="base model (default: the embedded one)")
    parser.add_argument("--seeds", type=int, default=2, help="images per prompt")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    parser.add_argument("--grid", default="", help="save the held-out images as one PNG here")
    args = parser.parse_args(argv)

    pipe = load_base(args.model).pipe
    seeds = range(args.seeds)
    held = held_out_scenes()
    rows = [
        ("held-out (shape, colour) pairs", *accuracy(pipe, held, seeds, args.steps, args.guidance)),
        ("seen pairs", *accuracy(pipe, seen_scenes(len(held)), seeds, args.steps, args.guidance)),
    ]
    seconds = seconds_per_image(pipe, args.steps, args.guidance)
    print(f"{torch.get_num_threads()} CPU threads, {args.steps} steps, guidance {args.guidance}, "
          f"{len(held)} prompts x {args.seeds} seeds per row")
    print(f"{'prompts':34s} {'background right':>17s} {'object colour right':>20s}")
    for name, background, colour, _ in rows:
        print(f"{name:34s} {background:17.1%} {colour:20.1%}")
    print(f"one {pipe.unet.config.sample_size * pipe.vae_scale_factor} px image: {seconds:.2f} s (median of 5)")
    _, background, colour, images = rows[0]
    floors = background >= 0.85 and colour >= 0.75 and seconds < 1.0
    print("floors (held-out background >= 85%, object >= 75%, < 1 s):", "met" if floors else "NOT met")
    if args.grid:
        from PIL import Image

        side, columns = images[0].width, len(scenes.COLOURS) - 1
        grid = Image.new("RGB", (side * columns, side * (len(images[: len(held)]) // columns)))
        for i, image in enumerate(images[: len(held)]):
            grid.paste(image, ((i % columns) * side, (i // columns) * side))
        grid.save(args.grid)
        print("grid:", args.grid)


if __name__ == "__main__":
    main()
