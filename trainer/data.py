"""Ingest an image set: files, zips or folders -> validated, normalised RGB images with captions.

Every image becomes a square RGB picture at the training resolution: EXIF orientation applied,
transparency composited on white, palette / grayscale / 16-bit / CMYK converted, the first frame
of an animation taken. A file that cannot be used is reported by name with the reason, and the
rest of the set still trains.

Uploads come from strangers, so nothing is trusted: every file and zip member is size-checked
from what it declares before a byte is read, read through a hard cap, decoded only after its
header's pixel count passes, and never written to disk. See `UploadLimits` for the caps.
"""

from __future__ import annotations

import contextlib
import io
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
    images: list[Image.Image] = field(default_factory=list)  # RGB, resolution x resolution
    captions: list[str | None] = field(default_factory=list)  # None: use the caption template
    names: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file name, reason)

    def __len__(self) -> int:
        return len(self.images)

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
                image = square_crop(normalise(_read(entry), limits.max_pixels), resolution)
            except ValueError as err:
                result.skipped.append((entry.name, str(err)))
                continue
            caption = captions.get(_stem(entry.name))
            result.images.append(image)
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


def square_crop(image: Image.Image, resolution: int) -> Image.Image:
    """The centre square, resized to `resolution` x `resolution`.

    Cropping before resizing (resize's `box`) keeps memory at the output size: resizing a
    1000000x16 strip by its short side first would ask for billions of pixels.
    """
    side = min(image.size)
    left, top = (image.width - side) / 2, (image.height - side) / 2
    return image.resize((resolution, resolution), Image.Resampling.LANCZOS, box=(left, top, left + side, top + side))


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
