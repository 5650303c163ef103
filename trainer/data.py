"""Ingest an image set: files, zips or folders -> validated, normalised RGB images with captions.

Every image becomes a square RGB picture at the training resolution: EXIF orientation applied,
transparency composited on white, palette / grayscale / 16-bit / CMYK converted, the first frame
of an animation taken. A file that cannot be used is reported by name with the reason, and the
rest of the set still trains.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

CAPTION_SUFFIX = ".txt"
ARCHIVE_SUFFIX = ".zip"
MIN_SIDE = 16  # pixels; anything smaller carries no usable style information
MIN_IMAGES = 1


@dataclass
class ImageSet:
    images: list[Image.Image] = field(default_factory=list)  # RGB, resolution x resolution
    captions: list[str | None] = field(default_factory=list)  # None: use the caption template
    names: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file name, reason)

    def __len__(self) -> int:
        return len(self.images)

    def skipped_lines(self) -> list[str]:
        return [f"{name}: {reason}" for name, reason in self.skipped]


def ingest(sources, resolution: int, min_images: int = MIN_IMAGES) -> ImageSet:
    """Read images and captions from files, zip archives and folders.

    `sources` is a path or a list of paths. Captions come from a `.txt` file with the same stem
    as its image (beside it, in the same zip, or uploaded with it). Raises ValueError, naming
    every refused file, when fewer than `min_images` usable images remain.

    >>> s = ingest(["photos.zip", "extra.png"], resolution=512)  # doctest: +SKIP
    """
    if isinstance(sources, (str, Path)):
        sources = [sources]
    # (name, bytes) pairs in a stable order; a str instead of bytes is the reason a file was refused
    entries = list(_collect_entries([Path(s) for s in sources]))
    captions = {
        _stem(name): data
        for name, data in entries
        if name.lower().endswith(CAPTION_SUFFIX) and isinstance(data, bytes)
    }
    result = ImageSet()
    for name, data in entries:
        if name.lower().endswith(CAPTION_SUFFIX):
            continue
        try:
            if isinstance(data, str):
                raise ValueError(data)
            image = square_crop(normalise(data), resolution)
        except ValueError as err:
            result.skipped.append((name, str(err)))
            continue
        caption = captions.get(_stem(name))
        result.images.append(image)
        result.captions.append(_decode_caption(caption) if caption is not None else None)
        result.names.append(name)
    if len(result) < min_images:
        detail = "; ".join(result.skipped_lines()) or "no files were given"
        raise ValueError(
            f"Need at least {min_images} usable image(s), found {len(result)}. Refused: {detail}. "
            "Upload PNG, JPEG, WebP, GIF, BMP or TIFF images, as files or in a zip."
        )
    return result


def normalise(data: bytes) -> Image.Image:
    """Decode image bytes into an upright 8-bit RGB image, or raise ValueError saying why not."""
    if not data:
        raise ValueError("empty file")
    try:
        image = Image.open(io.BytesIO(data))
        image.seek(0)  # first frame of an animation
        image.load()
    except UnidentifiedImageError:
        raise ValueError("not an image (the file's content is not a known image format)") from None
    except (OSError, SyntaxError, Image.DecompressionBombError) as err:
        raise ValueError(f"cannot be decoded ({err})") from None
    if min(image.size) < MIN_SIDE:
        raise ValueError(f"too small ({image.width}x{image.height} px; at least {MIN_SIDE} px per side)")
    image = ImageOps.exif_transpose(image)
    return _to_rgb(image)


def square_crop(image: Image.Image, resolution: int) -> Image.Image:
    """Resize so the short side is `resolution`, then crop the centre square."""
    scale = resolution / min(image.size)
    size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
    image = image.resize(size, Image.Resampling.LANCZOS)
    left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit and 32-bit grayscale: PIL's convert("L") clips instead of scaling, so scale by hand.
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
        image = Image.fromarray(np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode == "P" or image.mode == "PA":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "La", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV, RGB


def _collect_entries(paths: list[Path]):
    """Yield (display name, bytes or refusal reason) for every candidate file, expanding folders and zips."""
    for path in paths:
        if path.is_dir():
            for child in sorted(p for p in path.rglob("*") if p.is_file()):
                if not _is_hidden(child.relative_to(path).as_posix()):
                    yield from _collect_entries([child])
        elif path.suffix.lower() == ARCHIVE_SUFFIX:
            yield from _zip_entries(path)
        elif path.is_file():
            yield path.name, path.read_bytes()
        else:
            yield path.name, "file not found"


def _zip_entries(path: Path):
    """Read zip members into memory by name; nothing is ever extracted to disk."""
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        yield path.name, "not a valid zip archive"
        return
    with archive:
        for info in sorted(archive.infolist(), key=lambda i: i.filename):
            member = PurePosixPath(info.filename)
            name = f"{path.name}/{info.filename}"
            if member.is_absolute() or ".." in member.parts:
                yield name, "unsafe path inside the zip (absolute or containing '..')"
                continue
            if info.is_dir() or _is_hidden(info.filename):
                continue
            yield name, archive.read(info)


def _is_hidden(relative: str) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in PurePosixPath(relative).parts)


def _stem(name: str) -> str:
    return str(PurePosixPath(name).with_suffix("")).rsplit("/", 1)[-1]


def _decode_caption(data: bytes) -> str | None:
    text = data.decode("utf-8", errors="replace").strip()
    return text or None
