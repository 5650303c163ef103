"""A captioner of the embedded model's own world: it reads a scene back out of a picture.

Training a style on the embedded model works best when each image is captioned with its content
("two small striped red stars at the left on a blue background"): the adapter then learns the
look, not the objects. Users upload pictures without captions, so this small CNN writes them, in
exactly the grammar of `scenes.Scene.caption()`. One classification head per part of a caption:
count, shape, object colour, background colour, size, position and texture.

`python -m embedded.captioner` trains it from scratch on freshly rendered scenes (seeded, CPU, a
few minutes) and writes captioner/model.safetensors and captioner/recipe.json. Its training
renders go through random perturbations a style could add (noise, blur, dot and line screens,
dark outlines, tone shifts, gradient-map recolourings), so it reads styled pictures too.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import platform
import random
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from embedded import examples, scenes

# The label of each head, in the order of its outputs. An empty string is the unsaid default
# ("" size is medium, "" position is the centre, "" texture is plain).
HEADS: dict[str, tuple] = {
    "count": tuple(scenes.COUNTS.values()),
    "shape": scenes.SHAPES,
    "colour": tuple(scenes.COLOURS),
    "background": tuple(scenes.COLOURS),
    "size": tuple(scenes.SIZES),
    "position": tuple(scenes.POSITIONS),
    "texture": ("", *scenes.TEXTURES),
}
COLOUR_HEADS = ("colour", "background")
# Texture is a small part of a few pictures (a fifth of scenes have one): without more weight its
# head stays at "plain" while the others learn.
LOSS_WEIGHTS = {"texture": 3.0}
_COUNT_WORDS = {number: word for word, number in scenes.COUNTS.items()}
CONFIDENCE = 0.6  # a word goes into the caption only when its head's top probability reaches this
SIDE = 64  # every picture is read at the resolution the scenes are rendered at

WEIGHTS_DIR = Path(__file__).parent / "captioner"
WEIGHTS = WEIGHTS_DIR / "model.safetensors"

RECIPE = {
    "seed": 20261203,
    "pool": 10_000,  # scenes rendered once; every batch perturbs them afresh
    "steps": 1250,
    "batch": 128,
    "lr": 3e-3,
    "warmup": 100,
    "weight_decay": 1e-4,
    "eval_seed": 777,  # the held-out renders: a seed the training pool does not use
    "eval_count": 500,
}


# -- the model ---------------------------------------------------------------------------------

def _conv(inputs: int, outputs: int, stride: int = 1, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inputs, outputs, kernel, stride, 1, bias=False), nn.BatchNorm2d(outputs),
                         nn.ReLU(inplace=True))


class CaptionNet(nn.Module):
    """A small CNN: 64x64 RGB in [0, 1] -> logits for each head of HEADS.

    Besides RGB it sees each pixel's difference from the background colour (the median of the
    border): objects are what differs from the background, whatever the two colours are, and with
    that the shapes are learnt several times faster. The stem strides at once (a 4x4 patch conv)
    because a CPU thread trains it in minutes that way. The heads read the last 4x4 map both
    flattened, so where things are (position, count) survives, and pooled over the picture (mean
    and max), so a shape is recognised wherever it is; and the 16x16 map pooled too, where fine
    patterns (the textures: 3-4 px checks, stripes and dots) are still told apart.
    """

    def __init__(self, width: int = 96, hidden: int = 128):
        super().__init__()
        self.early = nn.Sequential(
            _conv(6, 24, stride=2, kernel=4),  # 32x32
            _conv(24, 32),
            _conv(32, 48, stride=2),  # 16x16
            _conv(48, 48),
        )
        self.late = nn.Sequential(
            _conv(48, width, stride=2),  # 8x8
            _conv(width, width),
            _conv(width, width, stride=2),  # 4x4
        )
        self.trunk = nn.Sequential(nn.Linear(width * 18 + 96, hidden), nn.ReLU(inplace=True), nn.Dropout(0.1))
        self.heads = nn.ModuleDict({name: nn.Linear(hidden, len(labels)) for name, labels in HEADS.items()})

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        early = self.early(torch.cat([pixels * 2 - 1, (pixels - _background(pixels)) * 2], dim=1))
        late = self.late(early)
        pooled = torch.cat([late.flatten(1), late.mean(dim=(2, 3)), late.amax(dim=(2, 3)),
                            early.mean(dim=(2, 3)), early.amax(dim=(2, 3))], dim=1)
        hidden = self.trunk(pooled)
        return {name: head(hidden) for name, head in self.heads.items()}


def _background(pixels: torch.Tensor, edge: int = 2) -> torch.Tensor:
    """(B,3,1,1) the median colour of each picture's border: its background, where a scene has one."""
    border = torch.cat([pixels[..., :edge, :].flatten(2), pixels[..., -edge:, :].flatten(2),
                        pixels[..., :, :edge].flatten(2), pixels[..., :, -edge:].flatten(2)], dim=2)
    return border.median(dim=2).values[..., None, None]


# -- captions ----------------------------------------------------------------------------------

def available() -> bool:
    """Whether the trained weights are there (`python -m embedded.captioner` writes them)."""
    return WEIGHTS.is_file()


def caption_images(images: Sequence[Image.Image], batch_size: int = 64) -> list[str]:
    """A scene caption for each picture, in the grammar of `Scene.caption()`, unsure words left out."""
    return [caption_from_probabilities(probs) for probs in predict(images, batch_size)]


@torch.no_grad()
def predict(images: Sequence[Image.Image], batch_size: int = 64) -> list[dict[str, list[float]]]:
    """Each head's probabilities over its labels (HEADS), for each picture."""
    model = _load_model()
    result = []
    for start in range(0, len(images), batch_size):
        pixels = torch.stack([_to_tensor(image) for image in images[start : start + batch_size]])
        probs = {name: logits.softmax(dim=1).tolist() for name, logits in model(pixels).items()}
        result += [{name: probs[name][i] for name in HEADS} for i in range(len(pixels))]
    return result


def caption_from_probabilities(probs: Mapping[str, Sequence[float]], threshold: float = CONFIDENCE) -> str:
    """The caption the heads' probabilities say, leaving out each word its head is unsure of.

    Count and shape are always said (a caption needs a noun). An unsure size, position or texture
    is left unsaid, which reads as the default; an unsure object colour drops its word and an unsure
    background drops "on a ... background" whole, since a wrong colour would teach the style a colour.
    """
    def top(head: str) -> tuple:  # the head's most likely label and its probability
        best = int(np.argmax(probs[head]))
        return HEADS[head][best], probs[head][best]

    def word(head: str) -> str:  # that label, or nothing when the head is unsure
        label, probability = top(head)
        return label if probability >= threshold else ""

    (count, _), (shape, _) = top("count"), top("shape")
    position, background = word("position"), word("background")
    words = [_COUNT_WORDS[count], word("size"), word("texture"), word("colour"),
             shape if count == 1 else scenes.PLURALS[shape]]
    if position:
        words += ["at", "the", position]
    if background:
        words += ["on", "a", background, "background"]
    words = [w for w in words if w]
    # English articles, as Scene.caption(): "an orange star", "on an orange background".
    return " ".join("an" if w == "a" and nxt[0] in "aeiou" else w for w, nxt in zip(words, words[1:] + ["x"]))


@functools.cache
def _load_model() -> CaptionNet:
    """The trained model, loaded once (weights stored in fp16 to keep the file small)."""
    model = CaptionNet()
    model.load_state_dict({name: t.float() if t.is_floating_point() else t for name, t in load_file(WEIGHTS).items()})
    return model.eval()


def _to_tensor(image: Image.Image) -> torch.Tensor:
    image = image.convert("RGB")
    if image.size != (SIDE, SIDE):
        image = image.resize((SIDE, SIDE), Image.Resampling.LANCZOS)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)


# -- training data -----------------------------------------------------------------------------

def scene_labels(scene: scenes.Scene) -> list[int]:
    """The index of the scene's label in each head of HEADS."""
    values = {"count": scene.count, "shape": scene.shape, "colour": scene.colour, "background": scene.background,
              "size": scene.size, "position": scene.position, "texture": scene.texture}
    return [HEADS[name].index(values[name]) for name in HEADS]


def render_pool(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`count` fresh scenes, held-out pairs included: uint8 pixels (N,3,64,64), masks (N,1,64,64), labels (N,7)."""
    rng = random.Random(seed)
    pixels = np.empty((count, SIDE, SIDE, 3), np.uint8)
    masks = np.empty((count, SIDE, SIDE), np.uint8)
    labels = []
    for i in range(count):
        scene = scenes.random_scene(rng, allow_held_out=True)
        image, mask = scenes.render(scene, rng, SIDE)
        pixels[i], masks[i] = np.asarray(image), np.asarray(mask)
        labels.append(scene_labels(scene))
    return (torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(masks)[:, None],
            torch.tensor(labels))


def augment(pixels: torch.Tensor, masks: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random perturbations a style could add, none of which changes what the scene is.

    pixels: (B,3,H,W) in [0, 1]; masks: (B,1,H,W) in [0, 1]. Each perturbation hits a random part
    of the batch with random parameters, ranges wide enough that the example styles' settings are
    just one point among many. Returns the perturbed pixels and `unknown` (B, len(HEADS)): True
    where a label no longer holds, so the loss leaves it out: the colours of a picture a gradient
    map recoloured, and the texture of one blurred so much that a 3 px pattern is gone.
    """
    batch = len(pixels)
    recoloured, smeared = _some(batch, 0.2, g), _some(batch, 0.1, g)
    for chosen, perturb in [(_some(batch, 0.25, g), _outline), (recoloured, _gradient_map),
                            (_some(batch, 0.3, g), _screen), (_some(batch, 0.4, g), _tone),
                            (_some(batch, 0.15, g), functools.partial(_blur, sigmas=(0.4, 1.0))),
                            (smeared, functools.partial(_blur, sigmas=(1.0, 1.8))),
                            (_some(batch, 0.3, g), _noise)]:
        index = chosen.nonzero()[:, 0]
        if len(index):  # perturb just the chosen pictures: the others would be thrown away
            pixels = pixels.index_put((index,), perturb(pixels[index], masks[index], g).clamp(0, 1))
    heads = list(HEADS)
    unknown = torch.zeros(batch, len(heads), dtype=torch.bool)
    for name in COLOUR_HEADS:
        unknown[:, heads.index(name)] = recoloured
    unknown[:, heads.index("texture")] = smeared
    return pixels, unknown


def visible(pixels: torch.Tensor, masks: torch.Tensor, least: float = 0.06) -> torch.Tensor:
    """(B,) whether the objects still stand out from the background (a gradient map can merge them)."""
    inside, outside = (masks > 0.5).float(), (masks < 0.05).float()
    mean_in = (pixels * inside).sum(dim=(2, 3)) / inside.sum(dim=(2, 3)).clamp(min=1)
    mean_out = (pixels * outside).sum(dim=(2, 3)) / outside.sum(dim=(2, 3)).clamp(min=1)
    return (mean_in - mean_out).norm(dim=1) >= least


def _some(batch: int, p: float, g: torch.Generator) -> torch.Tensor:
    return torch.rand(batch, generator=g) < p


def _noise(pixels: torch.Tensor, masks: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Gaussian noise of random strength (sigma 0.01-0.08)."""
    return pixels + _uniform((len(pixels), 1, 1, 1), 0.01, 0.08, g) * torch.randn(pixels.shape, generator=g)


def _uniform(shape, low: float, high: float, g: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=g)


def _outline(pixels: torch.Tensor, masks: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Objects outlined in a dark colour, 1-4 px wide: the band of `scenes.outline`, for the whole batch at once."""
    binary = (masks > 0.5).float()
    widths = torch.randint(1, 5, (len(pixels),), generator=g)
    band = torch.zeros_like(binary)
    for width in range(1, 5):
        grow, shrink = 2 * ((width + 1) // 2) + 1, 2 * (width // 2) + 1
        outside, inside = _dilate(binary, grow), -_dilate(-binary, shrink)
        band = torch.where((widths == width)[:, None, None, None], outside - inside, band)
    ink = _uniform((len(pixels), 3, 1, 1), 0.0, 0.25, g)
    return pixels + band * (ink - pixels)


def _dilate(binary: torch.Tensor, size: int) -> torch.Tensor:
    """A size x size max filter (PIL's MaxFilter): the max of shifted copies, row-wise then column-wise.

    A square's max is separable, and this is about three times faster than max_pool2d at stride 1 on a CPU.
    """
    half = size // 2
    if half == 0:
        return binary
    side = binary.shape[-1]
    padded = F.pad(binary, (half, half, 0, 0), value=-math.inf)
    rows = functools.reduce(torch.maximum, [padded[..., :, i : i + side] for i in range(size)])
    padded = F.pad(rows, (0, 0, half, half), value=-math.inf)
    return functools.reduce(torch.maximum, [padded[..., i : i + side, :] for i in range(size)])


def _gradient_map(pixels: torch.Tensor, masks: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Recolour by luminance along a random 5-stop palette, mostly running dark to light (as palettes do)."""
    batch, stops = len(pixels), 5
    palette = torch.rand(batch, stops, 3, generator=g)
    order = (palette @ torch.tensor([0.299, 0.587, 0.114])).argsort(dim=1)
    sort = _some(batch, 0.75, g)[:, None]
    palette = torch.where(sort[..., None], palette.gather(1, order[..., None].expand(-1, -1, 3)), palette)
    lum = (pixels * torch.tensor([0.299, 0.587, 0.114])[:, None, None]).sum(dim=1) * (stops - 1)  # (B,H,W)
    low = lum.long().clamp(0, stops - 2)
    t = (lum - low)[:, None]
    pick = functools.partial(_palette_at, palette)
    return pick(low) * (1 - t) + pick(low + 1) * t


def _palette_at(palette: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """palette (B,K,3) looked up at index (B,H,W) -> (B,3,H,W)."""
    batch, height, width = index.shape
    flat = palette.gather(1, index.reshape(batch, -1, 1).expand(-1, -1, 3))
    return flat.reshape(batch, height, width, 3).permute(0, 3, 1, 2)


def _screen(pixels: torch.Tensor, masks: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A screen of dark dots (mostly) or diagonal lines over the whole picture, at random period and weight."""
    batch, side = len(pixels), pixels.shape[-1]
    period = _uniform((batch, 1, 1), 4.0, 16.0, g)
    radius = period * _uniform((batch, 1, 1), 0.12, 0.4, g)
    x = torch.arange(side) + 0.5 + _uniform((batch, 1, 1), 0, 16, g)
    y = torch.arange(side)[:, None] + 0.5 + _uniform((batch, 1, 1), 0, 16, g)
    dx, dy = x % period - period / 2, y % period - period / 2
    dots = (dx**2 + dy**2).sqrt()
    lines = ((x + y) % period - period / 2).abs() / math.sqrt(2)
    distance = torch.where(_some(batch, 0.7, g)[:, None, None], dots, lines)
    cover = (radius + 0.5 - distance).clamp(0, 1)[:, None]  # antialiased edges
    darkness = _uniform((batch, 1, 1, 1), 0.25, 0.85, g)
    return pixels * (1 - darkness * cover)


def _tone(pixels: torch.Tensor, masks: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Brightness, contrast and a slight tint: small enough that every colour keeps its name."""
    batch = len(pixels)
    contrast = _uniform((batch, 1, 1, 1), 0.7, 1.3, g)
    brightness = _uniform((batch, 1, 1, 1), -0.12, 0.12, g)
    tint = _uniform((batch, 3, 1, 1), 0.93, 1.07, g)
    return ((pixels - 0.5) * contrast + 0.5 + brightness) * tint


def _blur(pixels: torch.Tensor, masks: torch.Tensor, g: torch.Generator,
          sigmas: tuple[float, float] = (0.4, 1.0)) -> torch.Tensor:
    """A Gaussian blur of random sigma (in the range `sigmas`, px) per picture, as a separable grouped convolution."""
    batch, channels, height, width = pixels.shape
    sigma = _uniform((batch, 1), *sigmas, g)
    kernel = torch.exp(-(torch.arange(-3, 4) ** 2) / (2 * sigma**2))
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(channels, dim=0)  # (B*C, 7)
    flat = F.pad(pixels.reshape(1, batch * channels, height, width), (3, 3, 3, 3), mode="replicate")
    flat = F.conv2d(flat, kernel[:, None, None, :], groups=batch * channels)
    flat = F.conv2d(flat, kernel[:, None, :, None], groups=batch * channels)
    return flat.reshape(batch, channels, height, width)


# -- training ----------------------------------------------------------------------------------

def train(model: CaptionNet, pool: tuple[torch.Tensor, torch.Tensor, torch.Tensor], recipe: dict,
          log: Callable[[str], None]) -> float:
    """Train on random batches of the pool, freshly perturbed each step; the smoothed final loss."""
    pixels, masks, labels = pool
    g = torch.Generator().manual_seed(recipe["seed"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=recipe["weight_decay"])

    def schedule(step):  # linear warm-up, then a cosine down to nothing
        return min(1.0, (step + 1) / recipe["warmup"]) * 0.5 * (1 + math.cos(math.pi * step / recipe["steps"]))

    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    running = None
    for step in range(recipe["steps"]):
        index = torch.randint(len(pixels), (recipe["batch"],), generator=g)
        batch_masks = masks[index].float() / 255
        styled, unknown = augment(pixels[index].float() / 255, batch_masks, g)
        loss = _loss(model(styled.contiguous(memory_format=torch.channels_last)), labels[index],
                     visible(styled, batch_masks)[:, None] & ~unknown)
        loss.backward()
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 100 == 0 or step == recipe["steps"] - 1:
            log(f"step {step + 1}/{recipe['steps']} loss {running:.4f}")
    model.eval()
    return running


def _loss(logits: dict[str, torch.Tensor], labels: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """Weighted sum of the heads' cross-entropies, each over the pictures whose label still holds (`known`).

    A picture whose objects merged into the background says nothing; a recoloured one says
    nothing about colours.
    """
    total = 0.0
    for i, name in enumerate(HEADS):
        weight = known[:, i].float()
        losses = F.cross_entropy(logits[name], labels[:, i], reduction="none")
        total = total + LOSS_WEIGHTS.get(name, 1.0) * (losses * weight).sum() / weight.sum().clamp(min=1)
    return total


@torch.no_grad()
def evaluate(model: CaptionNet, count: int, seed: int) -> dict[str, dict[str, float | None]]:
    """Accuracy of each head on `count` fresh renders, clean and through each example style.

    Colour heads are None for styles that recolour (their labels do not hold there).
    """
    rng = random.Random(seed)
    rendered = [(scene, *scenes.render(scene, rng, SIDE))
                for scene in (scenes.random_scene(rng, allow_held_out=True) for _ in range(count))]
    truth = torch.tensor([scene_labels(scene) for scene, _, _ in rendered])
    looks = {"clean": (lambda image, mask: image, False)}
    looks |= {name: (example.transform, example.recolours) for name, example in examples.EXAMPLES.items()}
    results = {}
    for look, (transform, recolours) in looks.items():
        pixels = torch.stack([_to_tensor(transform(image, mask)) for _, image, mask in rendered])
        logits = model(pixels)
        results[look] = {name: None if recolours and name in COLOUR_HEADS
                         else round((logits[name].argmax(dim=1) == truth[:, i]).float().mean().item(), 3)
                         for i, name in enumerate(HEADS)}
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m embedded.captioner", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(WEIGHTS_DIR), help="folder to write model.safetensors and recipe.json")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply pool and steps (0.05 for a smoke run)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the recorded timings use 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    recipe = dict(RECIPE)
    for key in ("pool", "steps", "warmup"):
        recipe[key] = max(2, int(recipe[key] * args.scale))

    started = time.perf_counter()

    def log(message):
        print(f"[{time.perf_counter() - started:6.1f}s] {message}", flush=True)

    torch.manual_seed(recipe["seed"])
    pool = render_pool(recipe["pool"], recipe["seed"])
    timings = {"data_s": round(time.perf_counter() - started, 1)}
    log(f"rendered {recipe['pool']} scenes")
    model = CaptionNet().to(memory_format=torch.channels_last)
    mark = time.perf_counter()
    final_loss = train(model, pool, recipe, log)
    timings["train_s"] = round(time.perf_counter() - mark, 1)
    accuracy = evaluate(model, recipe["eval_count"], recipe["eval_seed"])
    timings["total_s"] = round(time.perf_counter() - started, 1)
    # CPU seconds as well: on a shared machine the wall clock says more about the neighbours.
    timings["cpu_s"] = round(time.process_time(), 1)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({name: (t.half() if t.is_floating_point() else t).contiguous() for name, t in model.state_dict().items()},
              out / WEIGHTS.name)
    record = {
        "command": "python -m embedded.captioner" + (f" --scale {args.scale}" if args.scale != 1 else ""),
        "recipe": recipe,
        "final_loss_smoothed": round(final_loss, 4),
        "held_out_accuracy": accuracy,
        "timings": timings,
        "machine": {"cpu_threads": torch.get_num_threads(), "platform": platform.platform()},
        "versions": {"torch": torch.__version__},
    }
    (out / "recipe.json").write_text(json.dumps(record, indent=2) + "\n")
    for look, heads in accuracy.items():
        log(f"{look:>6}: " + "  ".join(f"{name} {'-' if acc is None else f'{acc:.3f}'}" for name, acc in heads.items()))
    log(f"saved to {out} ({(out / WEIGHTS.name).stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
