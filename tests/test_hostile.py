"""Hostile uploads sent to the app's server through its API: each is refused with a message naming
the problem, the app keeps serving, and nothing is written outside the workspace or left half-written in it."""

from __future__ import annotations

import re
import time
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
    # Any file passes the server's gate (issue 18, item 13); our own check names it, by its content, whatever its name.
    ("page.html", lambda: b"<!doctype html><html><body><script>alert(1)</script></body></html>", "s",
     "page.html: not an image"),
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
    the test's own folder. Yields (client, (workspace, its files once started), (upload cache, its files), folder
    for the hostile files, the Studio)."""
    root = tmp_path_factory.mktemp("hostile")
    workspace, cache, uploads = root / "workspace", root / "gradio-cache", root / "uploads"
    for folder in (workspace, cache, uploads):
        folder.mkdir()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("GRADIO_TEMP_DIR", str(cache))  # read when the page is built and served
        with serving(workspace) as (client, _, studio):
            yield client, (workspace, _files(workspace)), (cache, _files(cache)), uploads, studio


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != "app.log"}


@pytest.mark.parametrize("index", range(len(HOSTILE_UPLOADS)), ids=[f"{c[0]}-{c[2]}" for c in HOSTILE_UPLOADS])
def test_hostile_upload_is_refused_with_its_reason(app, index):
    client, _, _, uploads, _ = app
    name, make, style_name, words = HOSTILE_UPLOADS[index]
    path = uploads / str(index) / name  # a folder each: several cases share a file name
    path.parent.mkdir()
    path.write_bytes(make())
    with pytest.raises(Exception) as caught:
        client.predict(files=[handle_file(str(path))], style_name=style_name, api_name="/submit_training")
    assert words in str(caught.value)


def test_app_still_serves_and_nothing_was_written(app):
    client, (workspace, workspace_files), (cache, cache_files), uploads, _ = app
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


def test_a_damaged_style_file_is_listed_as_unreadable_and_refused_by_generate(app):
    """Issue 18, item 12: /list_styles names a damaged file and why; /generate refuses it with that reason."""
    import safetensors.torch
    import torch

    client, (workspace, _), _, _, _ = app
    damaged = workspace / "styles" / "cut.safetensors"
    damaged.write_bytes(safetensors.torch.save({"unet.a.lora_A.weight": torch.zeros(4, 64)})[:-10])
    try:
        (listed,) = client.predict(api_name="/list_styles")
        assert listed["name"] == "cut" and listed["trigger"] is None
        assert listed["unreadable"].startswith("Style 'cut' cannot be used: cut.safetensors is damaged (truncated")
        with pytest.raises(Exception, match=r"Style 'cut' cannot be used: cut.safetensors is damaged \(truncated"):
            client.predict(prompt="a red circle", steps=1, styles={"cut": 1}, api_name="/generate")
        client.predict(name="cut", api_name="/delete_style")
        assert client.predict(api_name="/list_styles") == [] and not damaged.exists()
    finally:
        damaged.unlink(missing_ok=True)


# option given to /generate -> words its refusal must hold (issue 18, items 10 and 15). NaN and Infinity are not
# here: gradio_client refuses to send them (JSON has no such numbers); tests/test_blend.py checks them.
HOSTILE_OPTIONS = [
    (dict(prompt="x" * 3_000_000), "Prompt is 3,000,000 characters long: too long. Use at most 10,000 characters"),
    (dict(negative_prompt="x" * 20_000), "Negative prompt is 20,000 characters long"),
    (dict(seed=2**64), "Seed is 18446744073709551616: too large. Use a whole number from 0 to 18446744073709551615"),
    (dict(width=1024), "Width is 1024: too large. Use 0 for this model's native 64 px, or a multiple of 16 from 16 to "
                       "128"),
    (dict(styles=["ink"]), "Styles is ['ink']: not a table of style names and scales"),
    (dict(styles={"x" * 100_000: 1}), "Unknown style(s): xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx…. Available"),
]


@pytest.mark.parametrize("options, words", HOSTILE_OPTIONS, ids=[words[:24] for _, words in HOSTILE_OPTIONS])
def test_hostile_generation_options_are_refused_with_what_to_change(app, options, words):
    client, (workspace, _), _, _, _ = app
    outputs = set((workspace / "outputs").iterdir())
    with pytest.raises(Exception) as caught:
        client.predict(**{"prompt": "a red circle", "steps": 1, **options}, api_name="/generate")
    assert words in str(caught.value) and len(str(caught.value)) < 400
    assert set((workspace / "outputs").iterdir()) == outputs  # refused before anything was drawn


def test_a_running_generation_is_stopped_by_its_own_client_only_and_the_app_serves_on(app):
    """Issue 18, item 10: one request cannot hold the pipeline: its client (page or API session) sees its place and
    step, and Stop ends it within a step; another client can neither see it as its own nor stop it."""
    from gradio_client import Client

    client, (workspace, _), _, _, studio = app
    outputs = set((workspace / "outputs").iterdir())
    job = client.submit(prompt="a red circle", steps=100, api_name="/generate")
    deadline, status = time.monotonic() + 60, ""
    while not re.match(r"Drawing: step [1-9]\d* of 100", status) and time.monotonic() < deadline:
        status = client.predict(api_name="/generation_queue")
    assert re.match(r"Drawing: step [1-9]\d* of 100", status), status
    other = Client(client.src, verbose=False)
    assert other.predict(api_name="/generation_queue") == ""
    assert other.predict(api_name="/cancel_generation") == "No generation of yours is running or waiting."
    assert studio.generation_queue(owner="")["position"] is None and studio.blender.line.running() is not None
    assert client.predict(api_name="/cancel_generation") == (
        "Cancelled 1 generation: a running one stops at its next step.")
    gallery, info = job.result(timeout=60)  # a stop asked for is news, not an error
    assert re.fullmatch(r"Generation cancelled at step \d+ of 100\. Nothing was saved\.", info), info
    assert client.predict(api_name="/generation_queue") == ""
    gallery, _ = client.predict(prompt="a red circle", steps=1, api_name="/generate")
    assert len(gallery) == 1
    for drawn in set((workspace / "outputs").iterdir()) - outputs:  # the workspace as the other tests expect it
        drawn.unlink()
