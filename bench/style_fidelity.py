"""Does a trained style show up, in proportion to its slider, and leave the content alone?

    python -m bench.style_fidelity            # about 12 minutes on 2 CPU cores

For each example style (embedded/examples.py): train it with the default preset, then draw the
content of its training captions with fixed seeds at several scales and
measure the style distance between those images and the style's training images; and draw a fixed
grid of one-object prompts to check that the colour asked for survives. Then blend two styles.

Style distance (set to set, so the particular objects drawn average out): the distance between the
sets' mean colour histograms plus that between their mean Gram matrices of fixed filter responses
(edges, lines, dots, at three scales), each relative to the reference's length and estimated
without bias, so that two sets of the same style are about 0 apart (printed as a check). Reported:
- style shift = 1 - d(scale 1) / d(scale 0)                       floor: >= 0.5 for every style
- d falls monotonically as the scale grows (0, 0.25, ..., 1)
- content: the object colour asked for is read back at scale 1 about as often as at scale 0
  (for styles that do not recolour, i.e. textures and lines)
- blending styles A and B at (s, 1 - s) moves monotonically from B to A
- training time with the default preset                            floor: < 3 minutes
Prints one table, writes a picture grid (styles by scales).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.embedded_quality import draw, seen_scenes
from embedded import scenes
from embedded.examples import EXAMPLE_SIZE, EXAMPLES
from models.base import load_base
from styles.blend import DEFAULT_GUIDANCE, DEFAULT_STEPS, Blender
from styles.library import StyleLibrary
from trainer.config import DEFAULT_PRESET, make_config, parse_overrides
from trainer.data import ImageSet
from trainer.events import Finished
from trainer.train import train

SCALES = (0.0, 0.25, 0.5, 0.75, 1.0)
GRID_PROMPTS = 24
COLOUR_BINS = 4  # per channel: a 64-bin joint RGB histogram
GRAM_SCALES = (1, 2, 4)  # the filters run on the image and on 2x and 4x averaged copies: fine and coarse texture

# Fixed 3x3 filters on luminance: horizontal and vertical edges, the two diagonals, a spot (dot) detector.
FILTERS = torch.tensor(
    [
        [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]],
        [[-1, -2, -1], [0, 0, 0], [1, 2, 1]],
        [[0, 1, 2], [-1, 0, 1], [-2, -1, 0]],
        [[2, 1, 0], [1, 0, -1], [0, -1, -2]],
        [[-1, -1, -1], [-1, 8, -1], [-1, -1, -1]],
    ],
    dtype=torch.float32,
)[:, None] / 8


def colour_features(image: Image.Image) -> np.ndarray:
    """Joint RGB histogram: which colours the picture is made of, and how much of each."""
    pixels = np.minimum(np.asarray(image.convert("RGB")).reshape(-1, 3) // (256 // COLOUR_BINS), COLOUR_BINS - 1)
    index = (pixels[:, 0] * COLOUR_BINS + pixels[:, 1]) * COLOUR_BINS + pixels[:, 2]
    return np.bincount(index, minlength=COLOUR_BINS**3) / len(index)


def texture_features(image: Image.Image) -> np.ndarray:
    """Gram matrices of the fixed filters' responses at three scales: edges, lines, dots and how they co-occur."""
    luminance = torch.from_numpy(np.asarray(image.convert("L"), dtype=np.float32) / 255)[None, None]
    grams = []
    for scale in GRAM_SCALES:
        pooled = torch.nn.functional.avg_pool2d(luminance, scale) if scale > 1 else luminance
        responses = torch.nn.functional.conv2d(pooled, FILTERS).flatten(1)  # filters x pixels
        grams.append((responses @ responses.T / responses.shape[1]).flatten().numpy())
    return np.concatenate(grams)


def set_distance(features: np.ndarray, reference: np.ndarray) -> float:
    """Distance between the two sets' mean features, relative to the reference mean's length.

    It uses the unbiased estimate of the squared distance (the linear-kernel MMD^2 that KID also
    uses): cross terms only, no image paired with itself. A plain distance between 24-image means
    stays well above 0 for two sets of the same style, which capped any measured shift; this one
    is about 0 for them.
    """
    n, m = len(features), len(reference)
    within_a = (features.sum(0) @ features.sum(0) - (features * features).sum()) / (n * (n - 1))
    within_b = (reference.sum(0) @ reference.sum(0) - (reference * reference).sum()) / (m * (m - 1))
    across = features.mean(0) @ reference.mean(0)
    squared = within_a + within_b - 2 * across
    return float(np.sqrt(max(squared, 0.0)) / np.linalg.norm(reference.mean(0)))


def style_distance(images: list[Image.Image], reference: list[Image.Image]) -> float:
    """Colour distance + texture distance between a set of images and a style's training images."""
    return sum(
        set_distance(np.stack([features(i) for i in images]), np.stack([features(i) for i in reference]))
        for features in (colour_features, texture_features)
    )


def colour_right(images: list[Image.Image], scene_list: list[scenes.Scene]) -> float:
    return float(np.mean([scenes.read_colours(image)[1] == scene.colour for image, scene in zip(images, scene_list)]))


def monotonic(values: list[float], decreasing: bool = True) -> bool:
    pairs = zip(values, values[1:])
    return all(b <= a for a, b in pairs) if decreasing else all(b >= a for a, b in pairs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.style_fidelity", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="base model (default: the embedded one)")
    parser.add_argument("--workspace", default="bench/out/fidelity", help="where the trained styles go (replaced)")
    parser.add_argument("--grid", default="bench/results/style_grid.png", help="picture grid to write")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="a TrainConfig field on top of the default preset, e.g. --set learning_rate=2e-4")
    args = parser.parse_args(argv)
    overrides = parse_overrides(args.overrides)

    base = load_base(args.model)
    library = StyleLibrary(args.workspace)
    for name in library.names():
        library.delete(name)
    blender = Blender(base, library)

    def draw_styled(prompts: list[str], styles: dict[str, float]) -> list[Image.Image]:
        blender.apply(styles)
        return draw(base.pipe, prompts, 0, DEFAULT_STEPS, DEFAULT_GUIDANCE)  # image i always has seed i

    # Content check and picture grid: one centred object per prompt, so its colour can be read back.
    scene_list = seen_scenes(GRID_PROMPTS, seed=11)
    content_prompts = [scene.caption() for scene in scene_list]
    content_base = draw_styled(content_prompts, {})
    rows, training_sets, grid_rows = [], {}, []
    for name, example in EXAMPLES.items():
        pairs = example.images()
        training_sets[name] = [image for image, _ in pairs]
        cfg = make_config(DEFAULT_PRESET, **overrides, style_name=name, num_samples=0)
        images = ImageSet(training_sets[name], [c for _, c in pairs], [f"{name}{i}" for i in range(len(pairs))])
        started = time.perf_counter()
        last = None
        with blender.lend_base() as plain:  # the blender's pipeline, with no style in it, for the run
            for last in train(cfg, images, plain):
                pass
        seconds = time.perf_counter() - started
        if not isinstance(last, Finished):
            raise SystemExit(f"training {name} failed: {last}")
        library.save(name, last.adapter.to_bytes())
        # The distance is measured on the training images' own content (their captions), so what
        # differs between the sets is the look, not which objects were drawn.
        prompts = [caption for _, caption in pairs]
        distances = [style_distance(draw_styled(prompts, {name: s}), training_sets[name]) for s in SCALES]
        content = {s: draw_styled(content_prompts, {name: s}) if s else content_base for s in (0.0, 0.5, 1.0)}
        rows.append(
            {
                "style": f"{name} ({example.kind})",
                "train_s": seconds,
                "d": distances,
                "shift": 1 - distances[-1] / distances[0],
                "monotonic": monotonic(distances),
                "colour0": colour_right(content[0.0], scene_list),
                "colour1": colour_right(content[1.0], scene_list),
                "recolours": example.recolours,
            }
        )
        grid_rows.append([content[s] for s in (0.0, 0.5, 1.0)])

    # Blend the first two styles: A at s, B at 1 - s. Each distance is measured on its own style's
    # training captions, as above, so that it compares looks rather than which objects were drawn.
    a, b = list(EXAMPLES)[:2]
    captions = {name: [caption for _, caption in EXAMPLES[name].images()] for name in (a, b)}
    blend_d = []
    for s in SCALES:
        weights = {a: s, b: 1 - s}
        blend_d.append(tuple(style_distance(draw_styled(captions[x], weights), training_sets[x]) for x in (a, b)))

    cfg = make_config(DEFAULT_PRESET, **overrides)
    print(f"Style fidelity: {DEFAULT_PRESET} preset ({cfg.steps} steps, rank {cfg.rank}, lr {cfg.learning_rate:g}), "
          f"{EXAMPLE_SIZE} prompts per distance, {len(content_prompts)} for colour, "
          f"{torch.get_num_threads()} CPU threads")
    header = "".join(f"{'d@' + format(s, 'g'):>7s}" for s in SCALES)
    print(f"{'style':20s}{'train':>8s}{header}{'shift':>8s}{'monotonic':>11s}{'colour right @0 -> @1':>24s}")
    ok = True
    for row in rows:
        colour = f"{row['colour0']:.0%} -> {row['colour1']:.0%}" + (" (recolours)" if row["recolours"] else "")
        print(f"{row['style']:20s}{row['train_s']:7.0f}s" + "".join(f"{d:7.3f}" for d in row["d"])
              + f"{row['shift']:8.2f}{str(row['monotonic']):>11s}{colour:>24s}")
        ok &= row["shift"] >= 0.5 and row["monotonic"] and row["train_s"] < 180
        ok &= row["recolours"] or row["colour1"] >= row["colour0"] - 0.1
    towards_a = monotonic([d for d, _ in blend_d]) and monotonic([d for _, d in blend_d], decreasing=False)
    print(f"blend {a} at s, {b} at 1-s: d to {a} " + " ".join(f"{d:.3f}" for d, _ in blend_d)
          + f" | d to {b} " + " ".join(f"{d:.3f}" for _, d in blend_d) + f" | monotonic: {towards_a}")
    ok &= towards_a
    print("d = 0 means within the sampling noise of the style's own images.")
    print("floors (shift >= 0.5, monotonic, content kept, blend monotonic, training < 3 min):",
          "met" if ok else "NOT met")

    if args.grid:
        save_grid(grid_rows, Path(args.grid))
        print("grid:", args.grid)


def save_grid(grid_rows: list[list[list[Image.Image]]], path: Path, shown: int = 4, zoom: int = 2) -> None:
    """Rows: styles; columns: scales 0, 0.5, 1; each cell the first `shown` prompts side by side."""
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
