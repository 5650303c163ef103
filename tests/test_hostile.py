"""Hostile uploads sent to the app's server through its API: each is refused with a message naming
the problem, the app keeps serving, and nothing is written outside the workspace or left half-written in it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import pattern_image, png_bytes
from tests.running_app import serving
from tests.test_data import patch_member, png_claiming, zip_bytes

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import handle_file  # noqa: E402

GOOD = png_bytes(pattern_image(0))

# upload name, bytes, style name, words the error must contain. Every upload here holds nothing usable,
# so no job is queued; the default caps apply (the app runs without --max-* flags).
HOSTILE_UPLOADS = [
    # gradio's own file_types check turns a .html away by its extension; the same page named .png reaches ingest.
    ("page.html", lambda: b"<!doctype html><html><body><script>alert(1)</script></body></html>", "s",
     "Invalid file type"),
    ("page.png", lambda: b"<!doctype html><html><body><script>alert(1)</script></body></html>", "s",
     "page.png: not an image"),
    ("drawing.svg", lambda: b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"/>', "s",
     "drawing.svg: not an image"),
    ("empty.png", lambda: b"", "s", "empty.png: empty file"),
    ("truncated.png", lambda: png_bytes(pattern_image(1))[:200], "s", "truncated.png: cannot be decoded"),
    ("slip.zip", lambda: zip_bytes({"../escape.png": GOOD, "..\\escape.png": GOOD, "/tmp/escape.png": GOOD}), "s",
     "slip.zip/../escape.png: unsafe path inside the zip"),
    # The header says 3 GB (the data is 1 MB of zeros): refused by the 50 MB cap before a byte is inflated.
    ("bomb.zip",
     lambda: patch_member(zip_bytes({"bomb.png": bytes(1_000_000)}), "bomb.png", file_size=3_000_000_000), "s",
     "bomb.zip/bomb.png: larger than 50 MB (2861 MB)"),
    # 10000 x 10000 pixels of zeros: 12 MB decoded at 1 bit, 100 MB as RGB, a few KB on disk.
    ("bomb.png", lambda: png_claiming(10_000, 10_000), "s", "bomb.png: too many pixels (10000x10000"),
    ("good.png", lambda: GOOD, "../evil", "Style name '../evil' is not allowed"),
    ("good.png", lambda: GOOD, ".hidden", "Style name '.hidden' is not allowed"),
]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The app's server (its own serve(), in this process) for the whole module, with gradio's upload cache in
    the test's own folder. Yields (client, workspace, its files once started, upload cache, folder for the
    hostile files)."""
    root = tmp_path_factory.mktemp("hostile")
    workspace, cache, uploads = root / "workspace", root / "gradio-cache", root / "uploads"
    for folder in (workspace, cache, uploads):
        folder.mkdir()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("GRADIO_TEMP_DIR", str(cache))  # read when the page is built and served
        with serving(workspace) as (client, _, _):
            yield client, (workspace, _files(workspace)), (cache, _files(cache)), uploads


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != "app.log"}


@pytest.mark.parametrize("index", range(len(HOSTILE_UPLOADS)), ids=[f"{c[0]}-{c[2]}" for c in HOSTILE_UPLOADS])
def test_hostile_upload_is_refused_with_its_reason(app, index):
    client, _, _, uploads = app
    name, make, style_name, words = HOSTILE_UPLOADS[index]
    path = uploads / str(index) / name  # a folder each: several cases share a file name
    path.parent.mkdir()
    path.write_bytes(make())
    with pytest.raises(Exception) as caught:
        client.predict(files=[handle_file(str(path))], style_name=style_name, api_name="/submit_training")
    assert words in str(caught.value)


def test_app_still_serves_and_nothing_was_written(app):
    client, (workspace, workspace_files), (cache, cache_files), uploads = app
    for index, (name, make, style_name, _) in enumerate(HOSTILE_UPLOADS):  # every one, whatever ran before
        path = uploads / f"again-{index}" / name
        path.parent.mkdir()
        path.write_bytes(make())
        with pytest.raises(Exception):
            client.predict(files=[handle_file(str(path))], style_name=style_name, api_name="/submit_training")
    assert client.predict(api_name="/list_styles") == []
    assert client.predict(api_name="/list_jobs") == []  # nothing was queued
    # Nothing new in the workspace: no style, no job folder, no staging or *.tmp file left behind.
    assert _files(workspace) == workspace_files
    # Outside it, what gradio added to its upload cache is the uploads themselves, byte for byte (or
    # empty: its upload route leaves a 0-byte tmp* file per upload): no zip member was extracted.
    sent = {p.read_bytes() for p in uploads.rglob("*") if p.is_file()}
    added = [cache / name for name in _files(cache) - cache_files]
    assert len(added) >= len(sent) >= 8  # the uploads did land here, so the check below means something
    assert all(p.read_bytes() in sent or p.stat().st_size == 0 for p in added), [p.name for p in added]
    root = workspace.parent
    assert {p.name for p in root.iterdir()} == {"workspace", "gradio-cache", "uploads"}
    assert not list(root.rglob("escape*")) and not Path("/tmp/escape.png").exists()
    assert not list(root.rglob("*.tmp"))
