"""Ingest: every odd image kind becomes a clean RGB square; unusable files are named with a reason."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
from PIL import Image

from tests.conftest import pattern_image, png_bytes
from trainer.data import ingest

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


# name, bytes, (row, col) of a probe pixel in the RES x RES result, expected RGB there
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
    assert image.mode == "RGB" and image.size == (RES, RES)
    assert np.abs(np.asarray(image)[probe].astype(int) - expected).max() <= 6


def test_centre_crop_keeps_the_middle(tmp_path):
    image = Image.new("RGB", (120, 40), (0, 0, 0))
    image.paste((0, 255, 0), (40, 0, 80, 40))  # green middle third
    result = ingest(_write(tmp_path, "wide.png", png_bytes(image)), resolution=RES)
    assert (np.asarray(result.images[0])[:, 4:28] == (0, 255, 0)).all()


@pytest.mark.parametrize(
    "name,data,reason",
    [
        ("page.html", b"<html><body>hello</body></html>", "not an image"),
        ("empty.png", b"", "empty file"),
        ("truncated.png", png_bytes(pattern_image(1))[:200], "cannot be decoded"),
        ("tiny.png", png_bytes(Image.new("RGB", (4, 4))), "too small"),
    ],
)
def test_unusable_files_are_reported_and_the_rest_still_count(tmp_path, name, data, reason):
    good = _write(tmp_path, "good.png", png_bytes(pattern_image(0)))
    bad = _write(tmp_path, name, data)
    result = ingest([good, bad], resolution=RES)
    assert result.names == ["good.png"]
    assert result.skipped[0][0] == name and reason in result.skipped[0][1]


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
    assert result.skipped == [("set.zip/../escape.png", "unsafe path inside the zip (absolute or containing '..')")]
    assert not (tmp_path.parent / "escape.png").exists()


def test_files_and_caption_uploaded_together(tmp_path):
    image = _write(tmp_path, "cat.png", png_bytes(pattern_image(3)))
    caption = _write(tmp_path, "cat.txt", b"my caption\n")
    result = ingest([caption, image], resolution=RES)
    assert result.captions == ["my caption"]
