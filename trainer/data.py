"""Ingest an image set: files, zips or folders -> validated, normalised RGB images with captions.

Every image becomes an RGB picture, whole and scaled down to what training at its resolution can
use (`fit`): EXIF orientation applied, transparency composited on white, palette / grayscale /
16-bit / CMYK converted, the first frame of an animation taken. A file that cannot be used is
reported by name with the reason, and the rest of the set still trains.

Training then gives each picture its shape (`prepare`): the aspect-ratio bucket nearest its own
(issue 19), so a portrait or a landscape keeps its whole picture, or with bucketing off the centre
square. Nothing here imports torch: a UI can show each image's bucket (`bucket_of`).

Uploads come from strangers, so nothing is trusted: every file and zip member is size-checked
from what it declares before a byte is read, read through a hard cap, decoded only after its
header's pixel count passes, and never written to disk. See `UploadLimits` for the caps.
"""

from __future__ import annotations

import contextlib
import io
import math
import struct
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

CAPTION_SUFFIX = ".txt"
ARCHIVE_SUFFIX = ".zip"
MIN_SIDE = 16  # pixels; anything smaller carries no usable style information
MIN_IMAGES = 1
MAX_ASPECT = 2.0  # buckets run from 1:2 to 2:1; a picture beyond that is cropped to the nearest end
FIT_LONG_SIDE = 4  # ingest keeps a long side of at most this many times the resolution (bounds a strip's memory)
MB = 1024 * 1024
# The formats read, as Pillow names them. Others (EPS runs Ghostscript, for one) are refused unread.
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
READ_CHUNK = MB  # files and zip members are read this much at a time, so a cap stops them mid-way
# What Pillow's decoders raise on malformed data; each becomes a refusal naming the file.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, TypeError, ZeroDivisionError)
# What reading a damaged zip member raises: bad CRC, broken deflate stream, unknown method, password.
ZIP_MEMBER_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError, RuntimeError)


@dataclass(frozen=True)
class UploadLimits:
    """Caps on one upload. The defaults fit a set of 50 large camera photos, as files or in one zip.

    >>> ingest("set.zip", 512, limits=UploadLimits(max_total_bytes=200 * MB))  # doctest: +SKIP
    """

    max_file_bytes: int = 50 * MB  # one image or caption, loose or inside a zip (a 50 MP JPEG is ~25 MB)
    max_total_bytes: int = 1024 * MB  # the whole upload, zip members counted uncompressed
    max_files: int = 200  # images and captions together, zip members included
    max_pixels: int = 64_000_000  # width x height of one image, from its header, before decoding

    @property
    def largest_upload_file(self) -> int:
        """The biggest single file worth accepting (the web server's cap): a zip may carry the whole set."""
        return max(self.max_file_bytes, self.max_total_bytes)


@dataclass
class ImageSet:
    images: list[Image.Image] = field(default_factory=list)  # RGB, whole: at most resolution on the short side (fit)
    captions: list[str | None] = field(default_factory=list)  # None: use the caption template
    names: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file name, reason)
    # (width, height) of each picture as it was uploaded, before fit; empty: the images' own sizes
    original_sizes: list[tuple[int, int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    def original_size(self, index: int) -> tuple[int, int]:
        return self.original_sizes[index] if index < len(self.original_sizes) else self.images[index].size

    def skipped_lines(self) -> list[str]:
        return [f"{name}: {reason}" for name, reason in self.skipped]


@dataclass
class _Entry:
    """One candidate file, known by name and declared size before any of its bytes are read."""

    name: str  # as the user knows it: "cat.png" or "set.zip/set/cat.png"
    size: int = 0  # bytes it declares: the file's size on disk, or the zip member's header
    open: Callable[[], BinaryIO] | None = None  # None when it is refused unread
    refused: str = ""  # why it is refused unread

    @property
    def is_caption(self) -> bool:
        return self.name.lower().endswith(CAPTION_SUFFIX)


def ingest(sources, resolution: int, min_images: int = MIN_IMAGES, limits: UploadLimits | None = None) -> ImageSet:
    """Read images and captions from files, zip archives and folders.

    `sources` is a path or a list of paths. Captions come from a `.txt` file with the same stem
    as its image (beside it, in the same zip, or uploaded with it). A file over a cap in `limits`
    is refused by name like any unusable file; an upload over the total size or file count raises
    ValueError before anything is read. Raises ValueError, naming every refused file, when fewer
    than `min_images` usable images remain.

    >>> s = ingest(["photos.zip", "extra.png"], resolution=512)  # doctest: +SKIP
    """
    limits = limits or UploadLimits()
    if isinstance(sources, (str, Path)):
        sources = [sources]
    result = ImageSet()
    with contextlib.ExitStack() as archives:  # zips stay open while their members are read one at a time
        entries = list(_collect_entries([Path(s) for s in sources], limits, archives))
        _check_upload(entries, limits)

        # Captions first, so each image finds its own wherever it comes in the upload.
        captions, caption_errors = {}, {}
        for entry in entries:
            if entry.is_caption:
                try:
                    captions[_stem(entry.name)] = _read(entry)
                except ValueError as err:
                    caption_errors[entry.name] = str(err)

        # Then the images, one at a time: only the current one is held undecoded in memory.
        for entry in entries:
            if entry.is_caption:
                if entry.name in caption_errors:
                    result.skipped.append((entry.name, caption_errors[entry.name]))
                continue
            try:
                image = normalise(_read(entry), limits.max_pixels)
            except ValueError as err:
                result.skipped.append((entry.name, str(err)))
                continue
            caption = captions.get(_stem(entry.name))
            result.original_sizes.append(image.size)
            result.images.append(fit(image, resolution))
            result.captions.append(_decode_caption(caption) if caption is not None else None)
            result.names.append(entry.name)
    if len(result) < min_images:
        detail = "; ".join(result.skipped_lines()) or "no files were given"
        raise ValueError(
            f"Need at least {min_images} usable image(s), found {len(result)}. Refused: {detail}. "
            f"Upload {_format_list()} images, as files or in a zip."
        )
    return result


def normalise(data: bytes, max_pixels: int = UploadLimits.max_pixels) -> Image.Image:
    """Decode image bytes into an upright 8-bit RGB image, or raise ValueError saying why not."""
    if not data:
        raise ValueError("empty file")
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        raise ValueError(f"not an image (its content is none of {_format_list()})") from None
    except Image.DecompressionBombError as err:  # over twice PIL's own Image.MAX_IMAGE_PIXELS
        raise ValueError(f"too many pixels, a likely decompression bomb ({err})") from None
    except DECODE_ERRORS as err:
        raise ValueError(f"cannot be decoded ({err})") from None
    # A decompression bomb is small on disk and huge once decoded: judge it by the size its header
    # declares, before a pixel is decoded. PIL only warns between 1x and 2x its own limit, so that
    # range is refused here too.
    pixels, cap = image.width * image.height, min(max_pixels, Image.MAX_IMAGE_PIXELS or max_pixels)
    if pixels > cap:
        raise ValueError(
            f"too many pixels ({image.width}x{image.height} = {pixels / 1e6:.1f} megapixels, at most "
            f"{cap / 1e6:.1f}): a likely decompression bomb, or a picture to scale down first"
        )
    if min(image.size) < MIN_SIDE:
        raise ValueError(f"too small ({image.width}x{image.height} px; at least {MIN_SIDE} px per side)")
    try:
        image.seek(0)  # first frame of an animation
        # Truncated files fail here because ImageFile.LOAD_TRUNCATED_IMAGES stays False (nothing in
        # this project sets it; tests/test_data.py checks): padding a cut-off photo with grey would
        # teach the style grey bands.
        image.load()
        image = ImageOps.exif_transpose(image)
    except Image.DecompressionBombError as err:
        raise ValueError(f"too many pixels, a likely decompression bomb ({err})") from None
    except DECODE_ERRORS as err:
        raise ValueError(f"cannot be decoded ({err})") from None
    return _to_rgb(image)


def fit(image: Image.Image, resolution: int) -> Image.Image:
    """The whole picture, scaled down (never up) until its short side is at most `resolution` and its long
    side at most FIT_LONG_SIDE times that.

    That is all a square crop or an aspect bucket at `resolution` uses (a bucket's short side is at most
    about `resolution`), and it bounds what a set holds in memory: a 24-megapixel photo is kept at 768x512
    for 512 px training. A fitted picture fits again as it is, so a job's saved images re-ingest unchanged.
    """
    scale = min(1.0, resolution / min(image.size), FIT_LONG_SIDE * resolution / max(image.size))
    if scale == 1.0:
        return image
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def square_crop(image: Image.Image, resolution: int) -> Image.Image:
    """The centre square, resized to `resolution` x `resolution`.

    Cropping before resizing (resize's `box`) keeps memory at the output size: resizing a
    1000000x16 strip by its short side first would ask for billions of pixels.
    """
    side = min(image.size)
    left, top = (image.width - side) / 2, (image.height - side) / 2
    return image.resize((resolution, resolution), Image.Resampling.LANCZOS, box=(left, top, left + side, top + side))


# -- aspect-ratio buckets (issue 19) -------------------------------------------------------------


@dataclass(frozen=True)
class Prepared:
    """One training picture as the UNet sees it, and what SDXL's size conditioning says about it."""

    image: Image.Image  # at its bucket's size (the target size), or the square's with bucketing off
    original_size: tuple[int, int]  # (width, height) of the picture before it was resized
    crop_top_left: tuple[int, int]  # (top, left) of the crop, in the pixels of the picture resized to cover


def bucket_step(resolution: int, multiple: int) -> int:
    """The pixel step between bucket sides: an eighth of the resolution, at most 64 px (kohya's and SDXL's
    step at 512-1024 px), rounded up to `multiple`, the step the UNet needs (see `size_multiple`).

    An eighth keeps the same handful of shapes at every scale: the embedded model (64 px, UNet multiple
    16) gets buckets 16 px apart rather than one 64 px square.
    >>> bucket_step(512, 64), bucket_step(1024, 32), bucket_step(64, 16)
    (64, 64, 16)
    """
    return multiple * math.ceil(min(64, max(1, resolution // 8)) / multiple)


def bucket_sizes(resolution: int, step: int, max_aspect: float = MAX_ASPECT) -> list[tuple[int, int]]:
    """The (width, height) buckets for training at `resolution`, from the tallest to the widest.

    Aspect ratio bucketing as NovelAI described it and kohya's sd-scripts builds it (BucketManager,
    make_bucket_resolutions in library/train_util.py): sides are multiples of `step`; each width gets
    the height whose pixel count is nearest resolution² (sd-scripts takes the largest below it; nearest
    gives a coarse grid such as the embedded model's its 2:1 shapes, at most half a step of rows over),
    kept within 1:max_aspect..max_aspect:1, every shape also turned on its side, and the square nearest
    `resolution` always among them.
    >>> bucket_sizes(64, 16)
    [(48, 96), (48, 80), (64, 64), (80, 48), (96, 48)]
    """
    side = max(step, round(resolution / step) * step)
    area, found = resolution * resolution, {(side, side)}
    for width in range(step, int(resolution * max_aspect) + step, step):
        height = max(step, round(area / width / step) * step)
        if 1 / max_aspect <= width / height <= max_aspect:
            found |= {(width, height), (height, width)}
    return sorted(found, key=lambda size: (size[0] / size[1], size))


def bucket_of(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest the picture's `size` (width, height), compared as log
    ratios so that 1:2 and 2:1 are as far from square; a tie goes to the taller bucket.

    >>> bucket_of((600, 400), bucket_sizes(512, 64))
    (640, 384)
    """
    aspect = math.log(size[0] / size[1])
    return min(buckets, key=lambda bucket: abs(math.log(bucket[0] / bucket[1]) - aspect))


def cover_crop(image: Image.Image, bucket: tuple[int, int]) -> tuple[Image.Image, tuple[int, int]]:
    """`image` resized (aspect kept) to cover `bucket`, centre-cropped by what sticks out, and the crop's
    top-left corner (top, left) in the resized picture's pixels (as sd-scripts records it for SDXL).

    Only one side is cropped, by the remainder of the aspect ratios. One resize with a `box` does both,
    so memory stays at the bucket's size.
    """
    width, height = bucket
    scale = max(width / image.width, height / image.height)
    covered = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    left, top = (covered[0] - width) // 2, (covered[1] - height) // 2
    right, bottom = min(image.width, (left + width) / scale), min(image.height, (top + height) / scale)  # float-safe
    box = (left / scale, top / scale, right, bottom)  # the bucket's region of the source picture
    return image.resize(bucket, Image.Resampling.LANCZOS, box=box), (top, left)


def prepare(images: ImageSet, resolution: int, buckets: list[tuple[int, int]] | None) -> list[Prepared]:
    """Every picture of `images` at the size it trains at: its nearest bucket of `buckets`, or with
    `buckets` None (bucketing off) the centre square as before buckets.

    The square is told to SDXL as before too: a whole picture of the training size, uncropped (the
    conditioning the pipeline generates with), so a run with bucketing off trains as it did.
    >>> [p.image.size for p in prepare(ingest("photos/", 64), 64, bucket_sizes(64, 16))]  # doctest: +SKIP
    [(80, 48), (64, 64), (48, 80)]
    """
    if buckets is None:
        return [Prepared(square_crop(image, resolution), (resolution, resolution), (0, 0)) for image in images.images]
    prepared = []
    for index, image in enumerate(images.images):
        picture, corner = cover_crop(image, bucket_of(image.size, buckets))
        prepared.append(Prepared(picture, images.original_size(index), corner))
    return prepared


def size_multiple(pipe) -> int:
    """What every side of a training picture must be a multiple of: the VAE's downscale times the UNet's
    (it halves the latents at every down block but the last). 64 for SD 1.x/2.x, 32 for SDXL, 16 for
    the embedded model."""
    return pipe.vae_scale_factor * 2 ** (len(pipe.unet.config.block_out_channels) - 1)


def read_capped(stream: BinaryIO, cap: int) -> bytes:
    """All of `stream`, read in chunks; ValueError as soon as it passes `cap` bytes (its declared size)."""
    chunks, total = [], 0
    while chunk := stream.read(READ_CHUNK):
        total += len(chunk)
        if total > cap:
            raise ValueError(f"holds more than the {_size(cap)} it declared (stopped reading at {_size(total)})")
        chunks.append(chunk)
    return b"".join(chunks)


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


def _collect_entries(paths: list[Path], limits: UploadLimits, archives: contextlib.ExitStack):
    """Yield an _Entry for every candidate file, expanding folders and zips; reads no file contents."""
    for path in paths:
        if path.is_dir():
            for child in sorted(p for p in path.rglob("*") if p.is_file()):
                if not _is_hidden(child.relative_to(path).as_posix()):
                    yield from _collect_entries([child], limits, archives)
        elif path.suffix.lower() == ARCHIVE_SUFFIX:
            yield from _zip_entries(path, limits, archives)
        elif path.is_file():
            size = path.stat().st_size
            if size > limits.max_file_bytes:
                yield _Entry(_shown(path.name), size, refused=_too_big(size, limits))
            else:
                yield _Entry(_shown(path.name), size, open=lambda path=path: open(path, "rb"))
        else:
            yield _Entry(_shown(path.name), refused="file not found")


def _zip_entries(path: Path, limits: UploadLimits, archives: contextlib.ExitStack):
    """Entries for a zip's members, read later by name into memory: nothing is ever extracted to disk."""
    try:
        archive = archives.enter_context(zipfile.ZipFile(path))
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
        yield _Entry(_shown(path.name), refused=f"not a valid zip archive ({err})")
        return
    candidates = 0  # members that could be pictures: a zip with none is named, not silently empty (issue 18)
    for info in sorted(archive.infolist(), key=lambda i: i.filename):
        entry = _Entry(_shown(f"{path.name}/{info.filename}"), info.file_size)
        candidates += not (info.is_dir() or _is_hidden(info.filename) or entry.is_caption)
        if _unsafe_member(info.filename):  # before the hidden-file rule, which would drop '../x' silently
            entry.refused = "unsafe path inside the zip (absolute, a drive, or containing '..')"
        elif info.is_dir() or _is_hidden(info.filename):
            continue
        elif info.filename.lower().endswith(ARCHIVE_SUFFIX):
            entry.refused = "a zip inside a zip is not read: upload it on its own"
        elif info.flag_bits & 0x1:
            entry.refused = "encrypted: zip it again without a password"
        elif info.file_size > limits.max_file_bytes:
            entry.refused = _too_big(info.file_size, limits)  # the header's word; the read is capped as well
        else:
            entry.open = lambda info=info: archive.open(info)
        yield entry
    if not candidates:
        yield _Entry(_shown(path.name), refused="the zip holds no images (only captions, folders or hidden files)"
                     if archive.infolist() else "the zip is empty: it holds no images")


def _check_upload(entries: list[_Entry], limits: UploadLimits) -> None:
    """Refuse the whole upload, before reading it, when it holds too many files or too many bytes."""
    if len(entries) > limits.max_files:
        raise ValueError(
            f"The upload holds {len(entries)} files; at most {limits.max_files} (images and captions, "
            "zip members included) are read at once. Upload a smaller set: 10-50 images is plenty for a style."
        )
    total = sum(entry.size for entry in entries if entry.open)
    if total > limits.max_total_bytes:
        raise ValueError(
            f"The upload holds {_size(total)} (zip members counted unpacked); at most "
            f"{_size(limits.max_total_bytes)} is read at once. Upload fewer images, or scale them down "
            "first (2048 px on the long side is more than training uses)."
        )


def _read(entry: _Entry) -> bytes:
    """An entry's bytes, read in chunks and never past the size it declared (itself within the per-file cap).

    So the bytes read add up to at most the declared total that `_check_upload` allowed, whatever a
    zip header says or however a file grows after its size was taken.
    """
    if entry.refused:
        raise ValueError(entry.refused)
    try:
        with entry.open() as stream:
            return read_capped(stream, entry.size)
    except ZIP_MEMBER_ERRORS as err:
        # A bad CRC is also how a zip header that understates its member's size ends: zipfile stops
        # at the declared size, and the bytes it returned do not match the checksum.
        raise ValueError(f"damaged or unreadable ({err})") from None


def _unsafe_member(name: str) -> bool:
    # Read as a Windows path too, so '..\\x', 'C:/x' and '\\\\server\\x' are caught on any system.
    windows = PureWindowsPath(name)
    return bool(windows.drive or windows.root) or ".." in windows.parts


def _shown(name: str) -> str:
    """A file name as messages show it: names are the uploader's text, so no control characters, no pages of it."""
    name = "".join(c if c.isprintable() else "?" for c in name)
    return name if len(name) <= 200 else f"{name[:100]}...{name[-100:]}"


def _too_big(size: int, limits: UploadLimits) -> str:
    return f"larger than {_size(limits.max_file_bytes)} ({_size(size)}): scale it down first"


def _size(n: int) -> str:
    return f"{n / MB:.0f} MB" if n >= 10 * MB else f"{n / MB:.1f} MB" if n >= MB // 10 else f"{n} bytes"


def _format_list() -> str:
    names = [{"WEBP": "WebP"}.get(f, f) for f in FORMATS]
    return ", ".join(names[:-1]) + f" or {names[-1]}"


def _is_hidden(relative: str) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in PurePosixPath(relative).parts)


def _stem(name: str) -> str:
    return str(PurePosixPath(name).with_suffix("")).rsplit("/", 1)[-1]


def _decode_caption(data: bytes) -> str | None:
    text = data.decode("utf-8", errors="replace").strip()
    return text or None
