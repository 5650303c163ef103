"""How far a set of pictures is from a style: the measure behind the held-out benchmark and a job's validation score.

Style distance, set to set, so the particular objects drawn average out: the distance between the
sets' mean colour histograms, plus that between their mean Gram matrices of fixed filter responses
(edges, lines, dots, at three scales; Gatys et al. 2016 describe a style by such Gram matrices),
plus that between their mean autocorrelations of fine detail (where a pattern repeats). Each is
relative to the reference's length and estimated without bias, so two sets of the same style are
about 0 apart. A style's shift is 1 - d(styled) / d(base): 0 when the style changed nothing, 1
when the styled pictures are as close to the style as its own pictures are to each other.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageFilter

COLOUR_BINS = 4  # per channel: a 64-bin joint RGB histogram
GRAM_SCALES = (1, 2, 4)  # the filters run on the image and on 2x and 4x averaged copies: fine and coarse texture
STRUCTURE_OFFSETS = 17  # autocorrelation offsets 0..16 px, both axes
FEATURE_SIDE = 64  # pictures are compared at this size, so a 512 px photo and a 64 px one weigh alike

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


def _sized(image: Image.Image) -> Image.Image:
    image = image.convert("RGB")
    if image.size != (FEATURE_SIDE, FEATURE_SIDE):
        image = image.resize((FEATURE_SIDE, FEATURE_SIDE), Image.Resampling.BOX)
    return image


def colour_features(image: Image.Image) -> np.ndarray:
    """Joint RGB histogram: which colours the picture is made of, and how much of each."""
    pixels = np.minimum(np.asarray(_sized(image)).reshape(-1, 3) // (256 // COLOUR_BINS), COLOUR_BINS - 1)
    index = (pixels[:, 0] * COLOUR_BINS + pixels[:, 1]) * COLOUR_BINS + pixels[:, 2]
    return np.bincount(index, minlength=COLOUR_BINS**3) / len(index)


def texture_features(image: Image.Image) -> np.ndarray:
    """Gram matrices of the fixed filters' responses at three scales: edges, lines, dots and how they co-occur."""
    luminance = torch.from_numpy(np.asarray(_sized(image).convert("L"), dtype=np.float32) / 255)[None, None]
    grams = []
    for scale in GRAM_SCALES:
        pooled = torch.nn.functional.avg_pool2d(luminance, scale) if scale > 1 else luminance
        responses = torch.nn.functional.conv2d(pooled, FILTERS).flatten(1)  # filters x pixels
        grams.append((responses @ responses.T / responses.shape[1]).flatten().numpy())
    return np.concatenate(grams)


def structure_features(image: Image.Image) -> np.ndarray:
    """The normalised autocorrelation of the picture's fine detail, at offsets of 0-16 px: its rhythm.

    The Gram matrices above are averages over the picture, so a set of outlined objects and a set of
    dotted pictures can have the same ones (both add dark high-frequency detail; measured: their set
    distance was 0). Where the detail repeats tells them apart: dots printed every 12 px correlate at
    12 px everywhere, an outline follows its object's edge. Normalised by the detail's own energy,
    so this measures the pattern, and the Gram matrices its amount.
    """
    luminance = _sized(image).convert("L")
    detail = np.asarray(luminance, dtype=np.float32) - np.asarray(luminance.filter(ImageFilter.BoxBlur(3)),
                                                                   dtype=np.float32)
    spectrum = np.fft.fft2(detail / 255)
    correlation = np.real(np.fft.ifft2(spectrum * np.conj(spectrum)))  # circular, by the Wiener-Khinchin theorem
    return (correlation / (correlation[0, 0] + 1e-6))[:STRUCTURE_OFFSETS, :STRUCTURE_OFFSETS].ravel()


FEATURES = (colour_features, texture_features, structure_features)


def set_distance(features: np.ndarray, reference: np.ndarray) -> float:
    """Distance between the two sets' mean features, relative to the reference mean's length.

    It uses the unbiased estimate of the squared distance (the linear-kernel MMD^2 that KID also
    uses): cross terms only, no image paired with itself. A plain distance between 24-image means
    stays well above 0 for two sets of the same style; this one is about 0 for them.
    """
    n, m = len(features), len(reference)
    within_a = (features.sum(0) @ features.sum(0) - (features * features).sum()) / (n * (n - 1))
    within_b = (reference.sum(0) @ reference.sum(0) - (reference * reference).sum()) / (m * (m - 1))
    across = features.mean(0) @ reference.mean(0)
    squared = within_a + within_b - 2 * across
    return float(np.sqrt(max(squared, 0.0)) / np.linalg.norm(reference.mean(0)))


def style_distance(images: list[Image.Image], reference: list[Image.Image]) -> float:
    """Colour + texture + structure distance between a set of images (two or more) and a style's pictures."""
    return sum(distance_parts(images, reference))


def distance_parts(images: list[Image.Image], reference: list[Image.Image]) -> list[float]:
    """The colour, texture and structure distances that style_distance adds up."""
    return [set_distance(np.stack([features(i) for i in images]), np.stack([features(i) for i in reference]))
            for features in FEATURES]


def paired_distance(images: list[Image.Image], ideals: list[Image.Image]) -> float:
    """Mean over pairs of each image's feature distance to its own ideal, relative to the ideal's length.

    Unlike the set distance it cannot be met by drawing other content that happens to look like the
    style's pictures: image i must look like ideal i (the same picture, styled).
    """
    total = 0.0
    for image, ideal in zip(images, ideals, strict=True):
        for features in FEATURES:
            mine, target = features(image), features(ideal)
            total += float(np.linalg.norm(mine - target) / np.linalg.norm(target))
    return total / len(images)


def shift(distance: float, base_distance: float) -> float:
    """1 - d / d(base): how much of the way from the base's look to the style's the pictures went."""
    return 1 - distance / base_distance if base_distance > 0 else 0.0


def monotonic(values: list[float], decreasing: bool = True) -> bool:
    pairs = list(zip(values, values[1:]))
    return all(b <= a for a, b in pairs) if decreasing else all(b >= a for a, b in pairs)
