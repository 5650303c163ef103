"""Does a trained style carry over to new content, in proportion to its slider?  (issue 17)

    python -m bench.style_fidelity              # both training seeds; about 35 minutes on 2 CPU cores
    python -m bench.style_fidelity --seeds 0    # one seed, half the time

For each example style (embedded/examples.py), trained with the default preset twice: with its
captions, and as a user's upload without any .txt caption (auto-captioned as the app does). Then
it draws a fixed set of one-object prompts that never appear in any example's training data (new
shape / colour / background combinations), with the style applied as the app applies it by
default (its trigger word added to the prompt), at scales 0, 0.25, 0.5, 0.75 and 1. Reported:

- held-out shift = 1 - d(scale 1) / d(scale 0), d the style distance (trainer/fidelity.py) to a
  reference set of the style (its transform on 48 random scenes, none of them training images)
                                                                       floor: >= 0.5 for every style
- ceiling: the shift of a perfect transfer, the style's own transform applied to the base's
  pictures of the held-out prompts; and the noise floor: d between the two halves of the reference
- paired shift: each picture against its own ideal (its scale-0 picture passed through the style's
  transform), so drawing training-like content instead of the prompt cannot score
- monotonic: d falls as the scale grows                                floor: yes
- content kept: the object colour asked for, read back at scale 1 vs scale 0 (styles that do not
  recolour)                                                            floor: within 5 points
- train caps: the old measure (the training captions drawn, against the training images), beside it
- blend: styles A and B at (s, 1 - s) on the held-out prompts, d to A falls and d to B rises
- training time with the default preset, auto-captioning included      floor: < 3 minutes
Prints one table and writes a picture grid (styles by scales, held-out prompts).
"""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import embedded
from bench.embedded_quality import draw
from embedded import scenes
from embedded.examples import EXAMPLE_SEED, EXAMPLES, Example
from models.base import load_base
from models.prompts import content_prompts
from styles.blend import DEFAULT_GUIDANCE, DEFAULT_STEPS, Blender
from styles.library import StyleLibrary
from trainer.config import DEFAULT_PRESET, make_config, parse_overrides
from trainer.data import ImageSet
from trainer.events import Finished, Started, Step
from trainer.fidelity import distance_parts, monotonic, paired_distance, shift, style_distance
from trainer.train import train

SCALES = (0.0, 0.25, 0.5, 0.75, 1.0)
HELD_OUT_COUNT = 24
HELD_OUT_SEED = 2026  # the prompts; image i of every set has seed i
REFERENCE_SIZE = 48
REFERENCE_SEED = EXAMPLE_SEED + 1000  # other scenes than the training images'


def held_out_scenes(count: int = HELD_OUT_COUNT, seed: int = HELD_OUT_SEED) -> list[scenes.Scene]:
    """One-object scenes whose (shape, colour, background) no example trains on, in pairs the base knows.

    Pairs kept out of pretraining (scenes.HELD_OUT) are left out too: the base draws them less
    reliably, and this measures the style, not the base. So are the prompts a job validates on.
    """
    trained = {(s.shape, s.colour, s.background) for example in EXAMPLES.values() for s, _, _ in example.scenes()}
    # A job's validation prompts choose which checkpoint becomes the style: the test prompts are other ones.
    validation = set(content_prompts(embedded.EMBEDDED_ID, 16))
    rng = random.Random(seed)
    result = []
    for shape, colour, background in scenes.one_object_draws(rng):
        if len(result) == count:
            return result
        if (shape, colour, background) in trained:
            continue
        scene = scenes.Scene(shape, colour, background, size=rng.choice(["small", "", "big"]),
                             position=rng.choice(list(scenes.POSITIONS)))
        if scene not in result and scenes.Scene(shape, colour, background).caption() not in validation:
            result.append(scene)


def ideal(example: Example, image: Image.Image) -> Image.Image:
    """What a perfect transfer makes of a base picture: the style's own transform applied to it."""
    return example.transform(image.convert("RGB"), scenes.object_mask(image))


def colour_right(images: list[Image.Image], scene_list: list[scenes.Scene]) -> float:
    return float(np.mean([scenes.read_colours(image)[1] == scene.colour for image, scene in zip(images, scene_list)]))


@dataclass
class Setting:
    example: Example
    captioned: bool  # with its .txt captions, or uploaded without (auto-captioned)
    seed: int

    @property
    def style_name(self) -> str:
        return f"{self.example.name}-{'cap' if self.captioned else 'nocap'}-s{self.seed}"


def train_setting(blender: Blender, library: StyleLibrary, setting: Setting,
                  overrides: dict) -> tuple[float, str, str]:
    """Train one setting's style into the library as the app would; (seconds, caption note, step kept)."""
    pairs = setting.example.images()
    # A user's upload has no .txt files: its captions are None, and train() captions them as the app does.
    captions = [c if setting.captioned else None for _, c in pairs]
    names = [f"{setting.example.name}{i}" for i in range(len(pairs))]
    images = ImageSet([image for image, _ in pairs], captions, names)
    cfg = make_config(DEFAULT_PRESET, **{"num_samples": 0, **overrides}, style_name=setting.style_name,
                      trigger=setting.example.name, seed=setting.seed)
    started, note, last = time.perf_counter(), "own captions", None
    with blender.lend_base() as plain:  # the blender's pipeline, with no style in it, for the run
        for last in train(cfg, images, plain):
            if isinstance(last, Started) and not setting.captioned:
                note = " ".join(last.notes)
            elif isinstance(last, Step) and last.step % 250 == 0:
                print(f"    {setting.style_name}: step {last.step}, {last.it_per_s:.1f} it/s", flush=True)
    if not isinstance(last, Finished):
        raise SystemExit(f"training {setting.style_name} failed: {last}")
    library.save(setting.style_name, last.adapter.to_bytes(), overwrite=True)
    return time.perf_counter() - started, note, last.adapter.info.get("steps_done", "")


class Drawer:
    """Draws prompt sets with a blend applied as the app applies it (trigger words added), seed i for image i."""

    def __init__(self, blender: Blender):
        self.blender = blender

    def __call__(self, prompts: list[str], styles: dict[str, float]) -> list[Image.Image]:
        active = self.blender.apply(styles)
        prompts = [self.blender.prompt_with_triggers(prompt, active) for prompt in prompts]
        return draw(self.blender.base.pipe, prompts, 0, DEFAULT_STEPS, DEFAULT_GUIDANCE)


def measure(drawer: Drawer, setting: Setting, held_out: list[scenes.Scene], base_images: list[Image.Image],
            reference: list[Image.Image]) -> dict:
    """Every held-out figure of one trained style (see the module docstring)."""
    example, name = setting.example, setting.style_name
    prompts = [scene.caption() for scene in held_out]
    drawn = {s: drawer(prompts, {name: s}) if s else base_images for s in SCALES}
    distances = [style_distance(drawn[s], reference) for s in SCALES]
    ideals = [ideal(example, image) for image in base_images]
    rng = random.Random(HELD_OUT_SEED)
    renders = [scenes.render(scene, rng) for scene in held_out]  # the held-out prompts, drawn perfectly
    perfect = [example.transform(image, mask) for image, mask in renders]
    # The old measure, beside it: the training captions drawn, against the training images.
    training = example.images()
    train_prompts, train_images = [c for _, c in training], [i for i, _ in training]
    train_d = [style_distance(drawer(train_prompts, {name: s}), train_images) for s in (0.0, 1.0)]
    return {
        "setting": setting,
        "d": distances,
        "shift": shift(distances[-1], distances[0]),
        "ceiling": shift(style_distance(perfect, reference), style_distance([i for i, _ in renders], reference)),
        "paired": shift(paired_distance(drawn[1.0], ideals), paired_distance(base_images, ideals)),
        "parts": [shift(a, b) for a, b in zip(distance_parts(drawn[1.0], reference),
                                              distance_parts(base_images, reference))],
        "monotonic": monotonic(distances),
        "colour0": colour_right(base_images, held_out),
        "colour1": colour_right(drawn[1.0], held_out),
        "train_shift": shift(train_d[1], train_d[0]),
        "images": drawn,
    }


def noise_floor(reference: list[Image.Image]) -> float:
    half = len(reference) // 2
    return style_distance(reference[:half], reference[half:])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.style_fidelity", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="base model (default: the embedded one)")
    parser.add_argument("--workspace", default="bench/out/fidelity", help="where the trained styles go (replaced)")
    parser.add_argument("--grid", default="bench/results/style_grid.png", help="picture grid to write")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds (report two)")
    parser.add_argument("--styles", nargs="+", default=list(EXAMPLES), choices=list(EXAMPLES))
    parser.add_argument("--modes", nargs="+", default=["captions", "upload"], choices=["captions", "upload"],
                        help="captions: the examples' own .txt captions; upload: no .txt, auto-captioned")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="a TrainConfig field on top of the default preset, e.g. --set learning_rate=2e-4")
    args = parser.parse_args(argv)
    overrides = parse_overrides(args.overrides)

    base = load_base(args.model)
    library = StyleLibrary(args.workspace)
    for name in library.names():
        library.delete(name)
    blender = Blender(base, library)
    drawer = Drawer(blender)
    held_out = held_out_scenes()
    prompts = [scene.caption() for scene in held_out]
    base_images = drawer(prompts, {})
    references = {name: [image for image, _ in EXAMPLES[name].images(REFERENCE_SIZE, REFERENCE_SEED)]
                  for name in args.styles}

    rows = []
    for seed in args.seeds:
        for name in args.styles:
            for mode in args.modes:
                setting = Setting(EXAMPLES[name], mode == "captions", seed)
                seconds, note, kept = train_setting(blender, library, setting, overrides)
                row = measure(drawer, setting, held_out, base_images, references[name])
                rows.append({**row, "train_s": seconds, "note": note, "kept": kept})
                print(f"  {setting.style_name}: trained in {seconds:.0f} s ({note}); held-out shift "
                      f"{row['shift']:.2f}, paired {row['paired']:.2f}", flush=True)

    cfg = make_config(DEFAULT_PRESET, **overrides)
    print(f"\nStyle fidelity on {len(prompts)} held-out prompts: {DEFAULT_PRESET} preset ({cfg.steps} steps, rank "
          f"{cfg.rank}, lr {cfg.learning_rate:g}, targets {', '.join(cfg.target_modules)}), "
          f"{torch.get_num_threads()} CPU threads")
    ok = print_table(rows, references)
    ok &= print_blend(drawer, library, rows, prompts, references)
    print("floors (held-out shift >= 0.5, monotonic, colour kept within 5 points, blend monotonic, "
          "training < 3 min):", "met" if ok else "NOT met")
    if args.grid:
        save_grid([[row["images"][s] for s in (0.0, 0.5, 1.0)] for row in rows if row["setting"].seed == args.seeds[0]],
                  Path(args.grid))
        print("grid:", args.grid)


def print_table(rows: list[dict], references: dict[str, list[Image.Image]]) -> bool:
    header = "".join(f"{'d@' + format(s, 'g'):>7s}" for s in SCALES)
    print(f"{'style':22s}{'train':>7s}{'step':>6s}{header}{'shift':>7s}{'ceil':>6s}{'paired':>8s}{'mono':>6s}"
          f"{'colour @0->@1':>15s}{'train caps':>11s}")
    ok = True
    for row in rows:
        setting = row["setting"]
        kept = setting.example.recolours or row["colour1"] >= row["colour0"] - 0.05
        colour = f"{row['colour0']:.0%}->{row['colour1']:.0%}" + ("" if setting.example.recolours else
                                                                     " ok" if kept else " !")
        print(f"{setting.style_name:22s}{row['train_s']:6.0f}s{row['kept']:>6s}"
              + "".join(f"{d:7.3f}" for d in row["d"])
              + f"{row['shift']:7.2f}{row['ceiling']:6.2f}{row['paired']:8.2f}{'yes' if row['monotonic'] else 'NO':>6s}"
              + f"{colour:>15s}{row['train_shift']:11.2f}")
        ok &= row["shift"] >= 0.5 and row["monotonic"] and row["train_s"] < 180 and kept
    print("shift by part (colour / texture / structure): " + "; ".join(
        f"{row['setting'].style_name} " + " / ".join(f"{p:.2f}" for p in row["parts"]) for row in rows))
    floors = ", ".join(f"{name} {noise_floor(reference):.3f}" for name, reference in references.items())
    print(f"noise floor (d between the two halves of each style's reference set): {floors}")
    captioners = sorted({row["note"] for row in rows})
    print("captions:", "; ".join(captioners))
    return ok


def print_blend(drawer: Drawer, library: StyleLibrary, rows: list[dict], prompts: list[str],
                references: dict[str, list[Image.Image]]) -> bool:
    """The first two styles of the first setting kind, A at s and B at 1 - s, on the held-out prompts."""
    first = rows[0]["setting"]
    pair = [row["setting"] for row in rows if row["setting"].captioned == first.captioned
            and row["setting"].seed == first.seed][:2]
    if len(pair) < 2:
        return True
    a, b = pair
    distances = []
    for s in SCALES:
        images = drawer(prompts, {a.style_name: s, b.style_name: 1 - s})
        distances.append([style_distance(images, references[x.example.name]) for x in (a, b)])
    ok = monotonic([d for d, _ in distances]) and monotonic([d for _, d in distances], decreasing=False)
    print(f"blend {a.style_name} at s, {b.style_name} at 1-s (s = 0 .. 1): d to {a.example.name} "
          + " ".join(f"{d:.3f}" for d, _ in distances) + f" | d to {b.example.name} "
          + " ".join(f"{d:.3f}" for _, d in distances) + f" | monotonic both ways: {'yes' if ok else 'NO'}")
    return ok


def save_grid(grid_rows: list[list[list[Image.Image]]], path: Path, shown: int = 4, zoom: int = 2) -> None:
    """Rows: styles; columns: scales 0, 0.5, 1; each cell the first `shown` held-out prompts side by side."""
    side = grid_rows[0][0][0].width * zoom
    gap = side // 4
    width = len(grid_rows[0]) * (shown * side + gap) - gap
    grid = Image.new("RGB", (width, len(grid_rows) * (side + gap) - gap), "white")
    for r, row in enumerate(grid_rows):
        for c, cell in enumerate(row):
            for i, image in enumerate(cell[:shown]):
                x = c * (shown * side + gap) + i * side
                grid.paste(image.resize((side, side), Image.Resampling.NEAREST), (x, r * (side + gap)))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


if __name__ == "__main__":
    main()
