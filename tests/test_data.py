"""Ingest: every odd image kind becomes a clean, whole RGB picture; unusable and hostile files are named with a reason.

(Aspect-ratio buckets and the square crop of training are tested in tests/test_buckets.py.)"""

from __future__ import annotations

import io
import struct
import zipfile
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from tests.conftest import pattern_image, png_bytes
from trainer.data import UploadLimits, ingest, read_capped, square_crop

RES = 32


def _write(tmp_path, name, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _rgba_transparent():
    image = Image.new("RGBA", (40, 40), (255, 0, 0, 255))
    image.paste((0, 0, 0, 0), (0, 0, 40, 20))  # top half fully transparent black
    return png_bytes(image)


def _palette_with_transparency():
    image = Image.new("P", (40, 40), 1)
    image.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    image.paste(0, (0, 0, 40, 20))
    return png_bytes(image, transparency=0)  # index 0 (black) is transparent: top half -> white


def _sixteen_bit():
    values = np.full((40, 40), 65535, dtype=np.uint16)
    values[:20] = 32768
    return png_bytes(Image.fromarray(values))


def _cmyk():
    return png_bytes(Image.new("CMYK", (40, 40), (0, 255, 255, 0)), format="JPEG", quality=100)  # red


def _grayscale():
    return png_bytes(Image.new("L", (40, 40), 200))


def _animated():
    frames = [Image.new("RGB", (40, 40), (255, 0, 0)), Image.new("RGB", (40, 40), (0, 0, 255))]
    import io

    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=100)
    return buffer.getvalue()


def _exif_rotated():
    # Stored 80 wide x 40 high, left half red, right half blue; orientation 6 means "rotate 90 CW to view".
    image = Image.new("RGB", (80, 40), (255, 0, 0))
    image.paste((0, 0, 255), (40, 0, 80, 40))
    exif = Image.Exif()
    exif[0x0112] = 6
    return png_bytes(image, format="JPEG", exif=exif.tobytes(), quality=100)


# name, bytes, (row, col) of a probe pixel in the RES x RES centre square of the result, expected RGB there
CASES = [
    ("alpha.png", _rgba_transparent, (2, 16), (255, 255, 255)),
    ("alpha.png", _rgba_transparent, (29, 16), (255, 0, 0)),
    ("palette.png", _palette_with_transparency, (2, 16), (255, 255, 255)),
    ("palette.png", _palette_with_transparency, (29, 16), (0, 0, 255)),
    ("sixteen.png", _sixteen_bit, (2, 16), (128, 128, 128)),
    ("sixteen.png", _sixteen_bit, (29, 16), (255, 255, 255)),
    ("cmyk.jpg", _cmyk, (16, 16), (255, 0, 0)),
    ("gray.png", _grayscale, (16, 16), (200, 200, 200)),
    ("anim.gif", _animated, (16, 16), (255, 0, 0)),
    # After rotating 90 CW, red (was left) is on top and blue at the bottom.
    ("rotated.jpg", _exif_rotated, (2, 16), (255, 0, 0)),
    ("rotated.jpg", _exif_rotated, (29, 16), (0, 0, 255)),
]


@pytest.mark.parametrize("name,make,probe,expected", CASES, ids=[f"{c[0]}@{c[2]}" for c in CASES])
def test_odd_images_are_normalised(tmp_path, name, make, probe, expected):
    result = ingest(_write(tmp_path, name, make()), resolution=RES)
    image = result.images[0]
    assert image.mode == "RGB" and min(image.size) == RES  # whole, scaled down to the resolution on its short side
    assert np.abs(np.asarray(square_crop(image, RES))[probe].astype(int) - expected).max() <= 6


def test_centre_crop_keeps_the_middle(tmp_path):
    image = Image.new("RGB", (120, 40), (0, 0, 0))
    image.paste((0, 255, 0), (40, 0, 80, 40))  # green middle third
    result = ingest(_write(tmp_path, "wide.png", png_bytes(image)), resolution=RES)
    assert result.images[0].size == (3 * RES, RES) and result.original_sizes == [(120, 40)]  # ingest keeps it whole
    assert (np.asarray(square_crop(result.images[0], RES))[:, 4:28] == (0, 255, 0)).all()


def test_no_usable_image_is_a_clear_error(tmp_path):
    bad = _write(tmp_path, "notes.html", b"<html></html>")
    with pytest.raises(ValueError, match=r"notes.html: not an image"):
        ingest([bad], resolution=RES)


def test_folder_with_captions(image_folder):
    result = ingest(image_folder, resolution=RES)
    assert result.names == ["img0.png", "img1.png", "img2.png", "img3.png"]
    assert result.captions == ["a red circle in zq style", None, None, None]


def test_zip_with_captions_and_unsafe_members(tmp_path, image_zip):
    with zipfile.ZipFile(image_zip, "a") as archive:
        archive.writestr("../escape.png", png_bytes(pattern_image(9)))
        archive.writestr("__MACOSX/._img0.png", b"junk")
    result = ingest(image_zip, resolution=RES)
    assert len(result) == 4 and result.captions[0] == "a red circle in zq style"
    assert result.skipped == [
        ("set.zip/../escape.png", "unsafe path inside the zip (absolute, a drive, or containing '..')")
    ]
    assert not (tmp_path.parent / "escape.png").exists()


def test_files_and_caption_uploaded_together(tmp_path):
    image = _write(tmp_path, "cat.png", png_bytes(pattern_image(3)))
    caption = _write(tmp_path, "cat.txt", b"my caption\n")
    result = ingest([caption, image], resolution=RES)
    assert result.captions == ["my caption"]


# -- hostile uploads ------------------------------------------------------------------------------
# The helpers below are shared with tests/test_hostile.py, which sends the same files to the running app.


def png_claiming(width: int, height: int, rows: int | None = None) -> bytes:
    """A 1-bit grayscale PNG whose header says width x height; its data holds `rows` rows of zeros
    (all of them by default: a real decompression bomb, tiny on disk; 0: the header alone)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    compressor, row = zlib.compressobj(9), bytes(1 + (width + 7) // 8)  # filter byte + packed bits
    pixels = b"".join(compressor.compress(row) for _ in range(height if rows is None else rows)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def patch_member(archive: bytes, name: str, file_size: int | None = None, flags: int | None = None) -> bytes:
    """The zip with one member's declared (uncompressed) size or flag bits rewritten in both its
    local header and its central directory record, as a hand-made hostile zip would have them."""
    data, encoded = bytearray(archive), name.encode()
    for signature, size_at, flags_at, name_at in ((b"PK\x03\x04", 22, 6, 30), (b"PK\x01\x02", 24, 8, 46)):
        at = data.find(signature)
        while data[at + name_at:at + name_at + len(encoded)] != encoded:
            at = data.find(signature, at + 1)
        if file_size is not None:
            struct.pack_into("<I", data, at + size_at, file_size)
        if flags is not None:
            struct.pack_into("<H", data, at + flags_at, flags)
    return bytes(data)


def corrupt_png() -> bytes:
    data = bytearray(png_bytes(pattern_image(2)))
    data[len(data) // 2] ^= 0xFF  # inside the image data: its chunk CRC no longer matches
    return bytes(data)


GOOD = png_bytes(pattern_image(0))
SMALL = UploadLimits(max_file_bytes=200_000, max_total_bytes=2_000_000, max_files=20, max_pixels=1_000_000)

# name, bytes (made lazily), expected words in the reason. Each goes in with a good image, which must still count.
HOSTILE_FILES = [
    ("page.html", lambda: b"<!doctype html><html><body><script>alert(1)</script></body></html>", "not an image"),
    ("drawing.svg", lambda: b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"><rect/></svg>',
     "not an image"),
    ("install.sh", lambda: b"#!/bin/sh\nrm -rf ~\n", "not an image"),
    ("script.png", lambda: b"#!/bin/sh\nrm -rf ~\n", "not an image"),  # the name does not decide
    # never reaches Ghostscript
    ("poster.eps", lambda: b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\nshowpage\n", "not an image"),
    ("archive.png", lambda: zip_bytes({"a.png": GOOD}), "not an image"),
    ("empty.png", lambda: b"", "empty file"),
    ("truncated.png", lambda: png_bytes(pattern_image(1))[:200], "cannot be decoded"),
    # header intact, data cut
    ("cut-data.png", lambda: png_bytes(pattern_image(1, 256))[:-300], "image file is truncated"),
    ("truncated.jpg", lambda: png_bytes(pattern_image(1, 256), format="JPEG")[:12_000], "image file is truncated"),
    ("cut-header.jpg", lambda: png_bytes(pattern_image(1, 256), format="JPEG")[:600], "cannot be decoded"),
    ("corrupt.png", corrupt_png, "cannot be decoded"),
    ("tiny.png", lambda: png_bytes(Image.new("RGB", (4, 4))), "too small"),
    ("huge.png", lambda: bytes(300_000), "larger than 0.2 MB"),
    # 2000 rows of zeros: 4 MP decoded, 2 KB on disk
    ("bomb.png", lambda: png_claiming(2000, 2000), "too many pixels (2000x2000"),
    # over PIL's own limit: its error
    ("claims.png", lambda: png_claiming(50_000, 50_000, rows=0), "decompression bomb"),
]


@pytest.mark.parametrize("name,make,reason", HOSTILE_FILES, ids=[c[0] for c in HOSTILE_FILES])
def test_hostile_files_are_refused_by_name_and_the_rest_still_count(tmp_path, name, make, reason):
    good = _write(tmp_path, "good.png", GOOD)
    bad = _write(tmp_path, name, make())
    result = ingest([bad, good], resolution=RES, limits=SMALL)
    assert result.names == ["good.png"]
    assert len(result.skipped) == 1 and result.skipped[0][0] == name and reason in result.skipped[0][1], result.skipped


# member name, bytes, expected words in the reason; each sits in one zip beside a good image.
HOSTILE_MEMBERS = [
    ("../evil.png", lambda: GOOD, "unsafe path"),
    ("set/../../evil.png", lambda: GOOD, "unsafe path"),
    ("/etc/evil.png", lambda: GOOD, "unsafe path"),
    ("..\\evil.png", lambda: GOOD, "unsafe path"),  # Windows separators, read as such on POSIX too
    ("C:/evil.png", lambda: GOOD, "unsafe path"),
    ("C:evil.png", lambda: GOOD, "unsafe path"),
    ("\\\\server\\share\\evil.png", lambda: GOOD, "unsafe path"),
    ("../evil.txt", lambda: b"a caption", "unsafe path"),  # captions are refused by name too, not dropped
    ("inner.zip", lambda: zip_bytes({"a.png": GOOD}), "zip inside a zip is not read"),
    ("zeros.png", lambda: bytes(300_000), "larger than 0.2 MB"),  # compresses to almost nothing; its header is honest
    ("empty.png", lambda: b"", "empty file"),
    ("page.html", lambda: b"<html></html>", "not an image"),
]


@pytest.mark.parametrize("member,make,reason", HOSTILE_MEMBERS, ids=[c[0] for c in HOSTILE_MEMBERS])
def test_hostile_zip_members_are_refused_by_name(tmp_path, member, make, reason):
    archive = _write(tmp_path, "set.zip", zip_bytes({"good.png": GOOD, member: make()}))
    before = set(tmp_path.parent.rglob("*"))  # other tests' files live here too: compare, don't match names
    result = ingest(archive, resolution=RES, limits=SMALL)
    assert result.names == ["set.zip/good.png"]
    assert (result.skipped == [(f"set.zip/{member}", result.skipped[0][1])]
            and reason in result.skipped[0][1]), result.skipped
    assert set(tmp_path.parent.rglob("*")) == before  # nothing extracted anywhere


def test_zip_member_whose_header_understates_its_size_is_stopped(tmp_path):
    # The header says 1000 bytes; the data inflates to 5 MB. zipfile stops at the declared size,
    # and the checksum of what it returned does not match, so the member is refused unread-through.
    archive = zip_bytes({"good.png": GOOD, "bomb.png": bytes(5_000_000)})
    path = _write(tmp_path, "lying.zip", patch_member(archive, "bomb.png", file_size=1000))
    result = ingest(path, resolution=RES, limits=SMALL)
    assert result.names == ["lying.zip/good.png"]
    assert result.skipped[0][0] == "lying.zip/bomb.png" and "Bad CRC-32" in result.skipped[0][1]


def test_zip_member_whose_header_overstates_its_size_is_refused_unread(tmp_path):
    archive = zip_bytes({"good.png": GOOD, "bomb.png": GOOD})
    path = _write(tmp_path, "lying.zip", patch_member(archive, "bomb.png", file_size=3_000_000_000))
    result = ingest(path, resolution=RES)  # default caps: 3 GB is over the 50 MB a file may hold
    assert result.skipped == [("lying.zip/bomb.png", "larger than 50 MB (2861 MB): scale it down first")]


def test_encrypted_zip_member_is_refused(tmp_path):
    path = _write(tmp_path, "locked.zip",
                  patch_member(zip_bytes({"good.png": GOOD, "locked.png": GOOD}), "locked.png", flags=0x1))
    result = ingest(path, resolution=RES)
    assert result.names == ["locked.zip/good.png"] and "encrypted" in result.skipped[0][1]


def test_reads_are_cut_off_at_the_declared_size():
    # Whatever a header claimed, reading stops once a stream passes it.
    with pytest.raises(ValueError, match="holds more than the 10 bytes it declared"):
        read_capped(io.BytesIO(bytes(100)), 10)
    assert read_capped(io.BytesIO(bytes(10)), 10) == bytes(10)


def test_pil_decompression_bomb_warning_range_is_refused_too(tmp_path):
    # Between 1x and 2x Image.MAX_IMAGE_PIXELS PIL only warns; a caller's higher max_pixels does not open that range.
    big = UploadLimits(max_pixels=10**12)
    path = _write(tmp_path, "claims.png", png_claiming(10_000, 10_000, rows=0))  # 100 MP, PIL's limit is ~89 MP
    with pytest.warns(Image.DecompressionBombWarning):
        result = ingest([path, _write(tmp_path, "good.png", GOOD)], resolution=RES, limits=big)
    assert result.names == ["good.png"] and "too many pixels (10000x10000" in result.skipped[0][1]


def test_truncated_images_are_not_padded():
    # PIL pads truncated images with grey when this global is True; nothing may turn it on.
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize(
    "limits,match",
    [
        (UploadLimits(max_files=3), r"holds 4 files; at most 3"),
        (UploadLimits(max_total_bytes=100_000), r"at most 100000 bytes is read at once"),
    ],
)
def test_caps_on_the_whole_upload_refuse_it_before_reading(tmp_path, limits, match):
    paths = [_write(tmp_path, f"img{i}.png", png_bytes(pattern_image(i)) + bytes(30_000)) for i in range(4)]
    with pytest.raises(ValueError, match=match):
        ingest(paths, resolution=RES, limits=limits)


def test_zip_members_count_unpacked_against_the_total(tmp_path):
    # Three members of 80 KB of zeros: a 1 KB zip that unpacks to 240 KB, over a 200 KB total.
    archive = _write(tmp_path, "zeros.zip", zip_bytes({f"z{i}.png": bytes(80_000) for i in range(3)}))
    assert archive.stat().st_size < 2_000
    with pytest.raises(ValueError, match=r"holds 0.2 MB \(zip members counted unpacked\)"):
        ingest(archive, resolution=RES, limits=UploadLimits(max_total_bytes=200_000))


def test_zip_members_count_against_the_number_of_files(tmp_path):
    archive = _write(tmp_path, "many.zip", zip_bytes({f"img{i}.png": GOOD for i in range(6)}))
    with pytest.raises(ValueError, match=r"holds 6 files; at most 5 \(images and captions, zip members included\)"):
        ingest(archive, resolution=RES, limits=UploadLimits(max_files=5))


def test_defaults_fit_fifty_large_photos():
    limits = UploadLimits()
    assert limits.max_files >= 100 and limits.max_total_bytes >= 50 * 20 * 1024 * 1024
    assert limits.max_pixels >= 8688 * 5792  # a 50 MP camera
    assert limits.largest_upload_file == limits.max_total_bytes  # one zip may carry the whole set
