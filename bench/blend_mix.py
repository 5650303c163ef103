"""Do styles keep their strength in a mix?  (issue 20, item 4)  `python -m bench.blend_mix`

    python -m bench.blend_mix --quick           # 2 styles, 400 steps, 12 prompts, seed 0: ~9 min on 2 CPU cores
    python -m bench.blend_mix --seeds 0         # 3 styles, default preset: 13-18 min on 2 busy CPU cores
    python -m bench.blend_mix --styles ink polka --set learning_rate=1e-3

Each example style (embedded/examples.py) is trained once per seed with the default preset, as
bench/style_fidelity.py trains it. On its held-out prompts (new shape / colour / background
combinations, image i with seed i, trigger words added as the app adds them):

- solo shift of style A = 1 - d_A(A at 1) / d_A(base), d_A the style distance (trainer/fidelity.py)
  to A's reference set (its transform on scenes that are not training images);
- for each pair (A, B) at scales (1, 1), blended by each mode: "sum" (what A1111, ComfyUI and
  set_adapters compute), "ties" (TIES-Merging's sign election + disjoint mean, arXiv 2306.01708),
  "elect" (sign election + disjoint sum), and "look only" on both (the up blocks only, as B-LoRA
  places the look, arXiv 2403.14572; summed): A kept = A's shift in the mix / A's solo shift, B's
  likewise. Multi-LoRA Composition (arXiv 2402.16843) reports that summed LoRAs dilute each other;
  this is that question on our styles.          floor: the best mode keeps >= 70 % of each style's solo shift
- colour: how often the object colour asked for is read back, base -> mix (content not lost; a
  palette style recolours on purpose).

Caveat: held-out shifts on the embedded model are small (README, Style fidelity: 0.02-0.25 solo),
so a kept ratio divides one small number by another and is noisy; a style whose solo shift is
under NOISE is not given a ratio. Run two seeds (`--seeds 0 1`) and report both.
Prints one table and writes a picture grid of one pair (rows: base, A, B, then each mix).
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import torch
from PIL import Image

from bench.embedded_quality import draw
from bench.style_fidelity import (
    REFERENCE_SEED,
    REFERENCE_SIZE,
    Setting,
    colour_right,
    held_out_scenes,
    save_grid,
    train_setting,
)
from core.threads import ALONE, torch_threads
from embedded.examples import EXAMPLES
from models.base import load_base
from styles.blend import DEFAULT_GUIDANCE, DEFAULT_STEPS, Blender
from styles.library import StyleLibrary
from trainer.config import DEFAULT_PRESET, make_config, parse_overrides
from trainer.fidelity import shift, style_distance

# (row label, blend mode, block preset on both styles)
MIXES = (("sum", "sum", None), ("ties", "ties", None), ("elect", "elect", None), ("look only", "sum", "look only"))
FLOOR = 0.70
NOISE = 0.02  # a solo shift below this is noise on this model (README: noise-level shifts of +-0.05 seen)
QUICK = {"styles": ["ink", "polka"], "steps": 400, "prompts": 12}


def draw_mix(blender: Blender, prompts: list[str], styles: dict[str, float], mode: str = "sum",
             blocks: str | None = None) -> list[Image.Image]:
    """The prompts drawn with this blend fused, trigger words added; image i with seed i (as Drawer)."""
    active = blender.apply(styles, {name: blocks for name in styles} if blocks else None, mode)
    prompts = [blender.prompt_with_triggers(prompt, active) for prompt in prompts]
    return draw(blender.base.pipe, prompts, 0, DEFAULT_STEPS, DEFAULT_GUIDANCE)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.blend_mix", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="base model (default: the embedded one)")
    parser.add_argument("--workspace", default="bench/out/blend_mix", help="where the trained styles go (replaced)")
    parser.add_argument("--grid", default="bench/results/blend_mix_grid.png", help="picture grid to write ('' none)")
    parser.add_argument("--seeds", type=int, nargs="+", help="training seeds (default 0 1, --quick 0; report two)")
    parser.add_argument("--styles", nargs="+", choices=list(EXAMPLES), help="default: sunset polka ink")
    parser.add_argument("--steps", type=int, help="training steps (default: the preset's)")
    parser.add_argument("--prompts", type=int, help="held-out prompts (default 24)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="a TrainConfig field on top of the default preset, e.g. --set rank=16")
    parser.add_argument("--quick", action="store_true",
                        help=f"{' and '.join(QUICK['styles'])}, {QUICK['steps']} steps, {QUICK['prompts']} prompts")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: core/threads.py's, alone)")
    args = parser.parse_args(argv)
    torch.set_num_threads(torch_threads(ALONE, args.threads))
    quick = QUICK if args.quick else {}
    seeds = args.seeds or ([0] if quick else [0, 1])
    names = args.styles or quick.get("styles") or ["sunset", "polka", "ink"]
    overrides = parse_overrides(args.overrides)
    if args.steps or quick:
        overrides["steps"] = args.steps or quick["steps"]

    base = load_base(args.model)
    library = StyleLibrary(args.workspace)
    for name in library.names():
        library.delete(name)
    blender = Blender(base, library)
    held_out = held_out_scenes(args.prompts or quick.get("prompts") or 24)
    prompts = [scene.caption() for scene in held_out]
    base_images = draw_mix(blender, prompts, {})
    references = {name: [image for image, _ in EXAMPLES[name].images(REFERENCE_SIZE, REFERENCE_SEED)]
                  for name in names}
    base_d = {name: style_distance(base_images, references[name]) for name in names}

    rows, grid, shown = [], [], -1.0
    for seed in seeds:
        # Each style trained once; its solo shift is what a mix is compared with.
        styles, solo, solo_images = {}, {}, {}
        for name in names:
            setting = Setting(EXAMPLES[name], True, seed)
            seconds, _, kept_step = train_setting(blender, library, setting, overrides)
            styles[name] = setting.style_name
            solo_images[name] = draw_mix(blender, prompts, {setting.style_name: 1.0})
            solo[name] = shift(style_distance(solo_images[name], references[name]), base_d[name])
            print(f"  {setting.style_name}: trained in {seconds:.0f} s (kept step {kept_step}); solo shift "
                  f"{solo[name]:.3f}", flush=True)
        for a, b in itertools.combinations(names, 2):
            pictures = [base_images, solo_images[a], solo_images[b]]
            for label, mode, blocks in MIXES:
                images = draw_mix(blender, prompts, {styles[a]: 1.0, styles[b]: 1.0}, mode, blocks)
                pictures.append(images)
                mixed = {x: shift(style_distance(images, references[x]), base_d[x]) for x in (a, b)}
                kept = {x: mixed[x] / solo[x] if solo[x] >= NOISE else None for x in (a, b)}
                rows.append({"seed": seed, "pair": (a, b), "mode": label, "shift": mixed, "solo": dict(solo),
                             "kept": kept, "colour": (colour_right(base_images, held_out),
                                                      colour_right(images, held_out))})
                print(f"    {a}+{b} {label}: shifts {mixed[a]:.3f} / {mixed[b]:.3f}", flush=True)
            # The grid shows the pair whose weaker style shows most alone: a mix of a style that does
            # nothing (sunset's solo shift is about 0 here) shows nothing about keeping strength.
            if min(solo[a], solo[b]) > shown:
                grid, shown, grid_pair = pictures, min(solo[a], solo[b]), (a, b)

    cfg = make_config(DEFAULT_PRESET, **overrides)
    print(f"\nStyles in a mix, {len(prompts)} held-out prompts, scales (1, 1): {DEFAULT_PRESET} preset "
          f"({cfg.steps} steps, rank {cfg.rank}, lr {cfg.learning_rate:g}), {torch.get_num_threads()} CPU threads")
    print_table(rows)
    if args.grid and grid:
        save_grid([[images] for images in grid], Path(args.grid))
        a, b = grid_pair
        print(f"grid: {args.grid} (rows: base, {a}, {b}, " + ", ".join(label for label, _, _ in MIXES)
              + "; the first 4 held-out prompts)")


def print_table(rows: list[dict]) -> None:
    def pct(value):
        return "-" if value is None else f"{value:.0%}"

    print("| seed | pair (A + B) | solo shift A / B | mode | shift A / B in mix | A kept | B kept | min kept "
          "| colour base -> mix |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        (a, b), kept = row["pair"], row["kept"]
        known = [k for k in kept.values() if k is not None]
        row["min"] = min(known) if len(known) == 2 else None
        recolour = " (recolours)" if any(EXAMPLES[x].recolours for x in (a, b)) else ""
        print(f"| {row['seed']} | {a} + {b} | {row['solo'][a]:.3f} / {row['solo'][b]:.3f} | {row['mode']} "
              f"| {row['shift'][a]:.3f} / {row['shift'][b]:.3f} | {pct(kept[a])} | {pct(kept[b])} "
              f"| {pct(row['min'])} | {row['colour'][0]:.0%} -> {row['colour'][1]:.0%}{recolour} |")
    # Per (seed, pair): the mode with the largest min kept, against the plain sum.
    verdicts = []
    for (seed, pair), group in itertools.groupby(rows, key=lambda r: (r["seed"], r["pair"])):
        group = [r for r in group if r["min"] is not None]
        if not group:
            verdicts.append(f"seed {seed} {'+'.join(pair)}: a solo shift under {NOISE}, no ratio")
            continue
        best = max(group, key=lambda r: r["min"])
        plain = next(r for r in group if r["mode"] == "sum")
        verdicts.append(f"seed {seed} {'+'.join(pair)}: best {best['mode']} min kept {best['min']:.0%} "
                        f"({'met' if best['min'] >= FLOOR else 'NOT met'}), sum {plain['min']:.0%}")
    print(f"floor, best mode keeps >= {FLOOR:.0%} of each style's solo shift: " + "; ".join(verdicts))


if __name__ == "__main__":
    main()
