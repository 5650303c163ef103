"""The app: its handlers called in-process on a Studio (no server), and one smoke test of the running
app (`python -m app` as a subprocess, driven through gradio_client)."""

from __future__ import annotations

import io
import json
import time
import zipfile
from pathlib import Path

import gradio as gr
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from app import handlers
from app.layout import build_ui
from app.studio import Studio
from tests.conftest import pattern_image, train_style
from tests.running_app import start_app, stop_app

JOB_TIMEOUT_S = 240


@pytest.fixture
def studio(tmp_path):
    """A Studio on the embedded model in a workspace of its own; its job queue runs children for real."""
    studio = Studio(tmp_path / "workspace")
    yield studio
    studio.close()


@pytest.fixture
def page(studio):
    return build_ui(studio)


@pytest.fixture
def uploads(tmp_path):
    """Loose PNGs and a zip with a caption file, as a user would upload them
    (paths as str, as gradio hands them over)."""
    folder = tmp_path / "uploads"
    folder.mkdir()
    files = []
    for i in range(3):
        pattern_image(i).save(folder / f"loose{i}.png")
        files.append(str(folder / f"loose{i}.png"))
    with zipfile.ZipFile(folder / "more.zip", "w") as archive:
        for i in range(3, 5):
            archive.writestr(f"more/z{i}.png", _png(pattern_image(i)))
        archive.writestr("more/z3.txt", "a blue star, zigzag style")
    return files, str(folder / "more.zip")


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _last(updates):
    """The last update a streaming handler yields."""
    last = None
    for last in updates:
        pass
    return last


# -- the running app -------------------------------------------------------------------------------
@pytest.mark.slow
def test_upload_train_generate_blend_export_delete(uploads, tmp_path):
    """`python -m app` as a user starts it: the whole round through its API, and what its server refuses."""
    from gradio_client import handle_file

    loose, archive = uploads
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    try:
        process, client, _ = start_app(workspace)
    except RuntimeError as err:
        pytest.fail(str(err))
    try:
        def train(name, files, **settings):
            return client.predict(files=[handle_file(str(f)) for f in files], style_name=name, preset="Quick", steps=8,
                                  num_samples=1, api_name="/train_style", **settings)

        # Upload files (one style) and a zip with a caption (another), train both.
        status, _, samples = train("zigzag", [*loose[:2], archive], learning_rate=5e-3)
        assert "finished" in status and len(samples) == 1
        status, _, _ = train("pastel", loose, seed=3, learning_rate=5e-3)
        assert "finished" in status
        listed = {style["name"]: style for style in client.predict(api_name="/list_styles")}
        assert set(listed) == {"zigzag", "pastel"} and listed["zigzag"]["steps"] == 8 and listed["zigzag"]["rank"] == 8

        # Generate with no style, each style, and both at different scales: all different, base reproducible.
        def generate(styles):
            gallery, info = client.predict(prompt="a red circle", seed=7, steps=6, styles=styles, api_name="/generate")
            return Image.open(gallery[0]["image"]), info

        base_image, _ = generate({})
        zero_image, _ = generate({"zigzag": 0, "pastel": 0})
        blended, info = generate({"zigzag": 0.8, "pastel": -0.5})
        assert np.array_equal(np.asarray(base_image), np.asarray(zero_image))
        assert not np.array_equal(np.asarray(base_image), np.asarray(blended))
        assert "zigzag +0.80" in info and "pastel -0.50" in info
        recipe = json.loads(blended.text["style_studio"])
        assert recipe["styles"] == {"zigzag": 0.8, "pastel": -0.5} and recipe["seed"] == 7

        # Export: a kohya-layout safetensors (the default download) that stock diffusers loads...
        exported = client.predict(name="zigzag", api_name="/export_style")
        assert Path(exported).name == "zigzag.safetensors"  # A1111 calls a LoRA by its file name
        import torch
        from diffusers import StableDiffusionPipeline

        from embedded import MODEL_DIR

        pipe = StableDiffusionPipeline.from_pretrained(MODEL_DIR, dtype=torch.float32)
        plain = pipe("a red circle", num_inference_steps=4, generator=torch.Generator().manual_seed(1),
                     output_type="np").images
        pipe.load_lora_weights(exported)
        styled = pipe("a red circle", num_inference_steps=4, generator=torch.Generator().manual_seed(1),
                      output_type="np").images
        assert pipe.get_list_adapters()["unet"] and np.abs(styled - plain).max() > 1e-3
        # ...and that imports back as a style which draws what the original draws.
        message = client.predict(file=handle_file(exported), name="zigzag-back", api_name="/import_style")
        assert "Imported **zigzag-back**" in message
        again, _ = generate({"zigzag-back": 0.8, "pastel": -0.5})
        assert np.abs(np.asarray(again, dtype=int) - np.asarray(blended, dtype=int)).max() <= 1
        with pytest.raises(Exception, match="pickle"):  # a pickle is refused with the reason, never opened
            client.predict(file=handle_file(str(_pickle(tmp_path))), name="evil", api_name="/import_style")
        assert "zigzag-back" in [s["name"] for s in client.predict(api_name="/list_styles")]

        # Delete, and the style is gone from the list and from generation.
        assert "Deleted" in client.predict(name="pastel", api_name="/delete_style")
        assert [s["name"] for s in client.predict(api_name="/list_styles")] == ["zigzag", "zigzag-back"]
        with pytest.raises(Exception, match="Unknown style"):
            client.predict(prompt="x", styles={"pastel": 1}, api_name="/generate")

        # The server's own check: an upload that is not of the page's file types never reaches the handler.
        page_file = tmp_path / "notes.html"
        page_file.write_text("<html>not a picture</html>")
        with pytest.raises(Exception, match="Invalid file type"):
            train("ok", [page_file])
        assert isinstance(client.predict(api_name="/list_styles"), list)
    finally:
        stop_app(process)


# -- training through the handlers -----------------------------------------------------------------
@pytest.mark.parametrize(
    "settings,junk,message",
    [
        (dict(style_name="../../etc"), None, "not allowed"),
        (dict(style_name="ok", rank=0), None, "rank = 0 is outside"),
        (dict(style_name="ok", rank="eight"), None, "Rank must be a whole number, not 'eight'"),
        # content checked by us, whatever the name says
        (dict(style_name="ok"), "notes.png", "notes.png: not an image"),
        (dict(style_name="ok"), "nothing", "No images were uploaded"),
    ],
)
def test_bad_training_input_is_refused_with_a_message_and_nothing_is_queued(
    studio, page, uploads, tmp_path, settings, junk, message
):
    files = list(uploads[0])
    if junk == "nothing":
        files = []
    elif junk:
        (tmp_path / junk).write_text("<html>not a picture</html>")
        files = [str(tmp_path / junk)]
    with pytest.raises(gr.Error, match=message):
        handlers.submit_training(studio, page, files, preset="Quick", steps=8, **settings)
    assert studio.jobs.jobs() == [] and handlers.list_styles(studio) == []
    assert not list((studio.workspace / "styles").glob("*.tmp"))


def test_submitting_picks_the_new_job_and_says_where_it_is_in_the_queue(studio, page, uploads):
    studio.jobs.close()  # nothing runs: the queue stays as submitted
    first = handlers.submit_training(studio, page, uploads[0], "first", preset="Quick", steps=2)
    second = handlers.submit_training(studio, page, uploads[0], "second", preset="Quick", steps=2)
    assert first == {page.job_picker: "0001", page.job_message: "Queued job 0001 (position 1)."}
    assert second[page.job_message] == "Queued job 0002 (position 2)."
    with pytest.raises(gr.Error, match="already queued"):
        handlers.submit_training(studio, page, uploads[0], "first", preset="Quick", steps=2)


def test_existing_style_is_not_overwritten(studio, page, uploads):
    train_style(studio.library, "keeper", seed=1)
    before = studio.library.path_for("keeper").read_bytes()
    with pytest.raises(gr.Error, match="already exists"):
        handlers.submit_training(studio, page, uploads[0], "keeper", preset="Quick", seed=5)
    assert studio.library.path_for("keeper").read_bytes() == before and studio.jobs.jobs() == []


@pytest.mark.slow
def test_example_style_trains_with_one_call_and_fills_the_form(studio, page):
    last = _last(handlers.train_example(studio, page, "ink", "Quick"))
    assert last[page.style_name] == "ink" and "finished" in last[page.status] and last[page.samples]
    files = last[page.files]
    assert len(files) == 48 and min(Path(f).name for f in files) == "ink_00.png"
    assert len(list((studio.workspace / "examples" / "ink").iterdir())) == 48
    assert "ink" in [style["name"] for style in handlers.list_styles(studio)]
    with pytest.raises(gr.Error, match="Unknown example 'nope'"):
        _last(handlers.train_example(studio, page, "nope"))
    queued = handlers.submit_example(studio, page, "ink", "Quick")  # the same example again: a free name
    assert queued[page.style_name] == "ink-2" and "as job 0002" in queued[page.job_message]


@pytest.mark.slow
def test_queue_cancel_keep_while_generation_keeps_working(studio, page, uploads):
    """Two jobs queue behind each other; the app generates meanwhile; cancel keeps a checkpoint to keep as a style."""
    loose, _ = uploads
    long_job = handlers.submit_training(studio, page, loose, "slow", preset="Quick", steps=100_000, checkpoint_every=5,
                                        num_samples=0)[page.job_picker]
    queued = handlers.submit_training(studio, page, loose, "waiting", preset="Quick", steps=4, num_samples=0)
    assert "position" in queued[page.job_message]
    queued = queued[page.job_picker]
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        jobs = {job["job"]: job for job in handlers.list_jobs(studio)}
        if jobs[long_job]["state"] == "running" and int(jobs[long_job]["step"].split("/")[0]) >= 6:
            break
        assert time.monotonic() < deadline, jobs
        time.sleep(0.5)
    assert jobs[queued]["state"] == "queued" and jobs[queued]["queue"] == 1
    started = time.monotonic()
    generated = handlers.generate(studio, page, "a red circle", steps=4)  # not blocked by training
    assert generated[page.gallery] and time.monotonic() - started < 60
    handlers.cancel_job(studio, long_job)
    status = _last(handlers.follow_job(studio, page, long_job))[page.status]  # returns when the job has stopped
    assert "cancelled" in status and "can be kept" in status
    assert "slow-kept" in handlers.keep_job(studio, long_job, "slow-kept")
    assert "finished" in _last(handlers.follow_job(studio, page, queued))[page.status]
    names = [style["name"] for style in handlers.list_styles(studio)]
    assert "slow-kept" in names and "waiting" in names and "slow" not in names
    with pytest.raises(gr.Error, match="only queued or running jobs can be cancelled"):
        handlers.cancel_job(studio, queued)


def test_presets_save_as_toml_and_load_back(studio, page):
    result = handlers.save_preset(studio, page, "crisp", "Best", rank=4, learning_rate=2e-4,
                                  target_modules="to_q, to_v")
    assert "crisp" in result[page.preset_message] and result[page.saved_presets]["value"] == "crisp"
    from trainer.config import make_config, read_settings

    values = read_settings(studio.workspace / "presets" / "crisp.toml")  # the file the CLI's --config reads
    assert make_config(values.pop("preset"), **values).target_modules == ["to_q", "to_v"]
    loaded = handlers.load_preset(studio, page, "crisp")
    assert loaded[page.preset] == "Best"
    assert loaded[page.advanced["rank"]] == "4" and loaded[page.advanced["learning_rate"]] == "0.0002"
    assert loaded[page.advanced["target_modules"]] == "to_q, to_v" and loaded[page.advanced["steps"]] == ""
    with pytest.raises(gr.Error, match="not allowed"):
        handlers.save_preset(studio, page, "../evil")
    with pytest.raises(gr.Error, match="No saved preset named 'nope'"):
        handlers.load_preset(studio, page, "nope")


# -- generation and the library through the handlers -------------------------------------------------
def test_bad_generation_input_is_refused(studio, page):
    train_style(studio.library, "keeper", seed=1)
    with pytest.raises(gr.Error, match="between -2.0 and 2.0"):
        handlers.generate(studio, page, "x", styles={"keeper": 5})
    with pytest.raises(gr.Error, match="multiples of"):
        handlers.generate(studio, page, "x", width=65)
    with pytest.raises(gr.Error, match="Write a prompt"):
        handlers.generate(studio, page, "  ")
    with pytest.raises(gr.Error, match="Unknown style.*Available styles: keeper"):
        handlers.generate(studio, page, "x", styles={"gone": 1})


def test_generate_reports_the_blend_and_saves_pngs_with_their_recipe(studio, page):
    train_style(studio.library, "ink", seed=1)
    result = handlers.generate(studio, page, "a red circle", seed=3, steps=4, styles={"ink": 0.5})
    assert result[page.info] == "Seed 3 · styles: ink +0.50"
    image = Image.open(result[page.gallery][0])
    assert Path(result[page.gallery][0]).parent == studio.workspace / "outputs"
    assert (json.loads(image.text["style_studio"])["styles"] == {"ink": 0.5}
            and "<lora:ink:0.5>" in image.text["parameters"])
    assert handlers.generate(studio, page, "a red circle", steps=4)[page.info] == "Seed 0 · styles: none (base model)"


def test_the_library_refresh_redraws_only_when_the_styles_change(studio, page):
    first = handlers.refresh_styles(studio, page, {}, None)
    assert first[page.known_names] == [] and first[page.thumbs] == [] and first[page.table].empty
    assert handlers.refresh_styles(studio, page, {}, []) == gr.skip()  # nothing changed: every output kept
    train_style(studio.library, "ink", seed=1)
    after = handlers.refresh_styles(studio, page, {"gone": 0.3}, [])
    assert after[page.known_names] == ["ink"] and after[page.blend] == {"ink": 0.0}  # a slider per style, at 0
    assert after[page.picker]["choices"] == ["ink"] and list(after[page.table]["name"]) == ["ink"]
    assert after[page.thumbs] == [(str(studio.library.get("ink").thumbnail), "ink · trigger: ink")]
    assert handlers.refresh_styles(studio, page, {"ink": 0.7}, ["ink"]) == gr.skip()


def test_the_jobs_refresh_keeps_the_picked_job(studio, page, uploads):
    studio.jobs.close()
    assert handlers.refresh_jobs(studio, page, None, None)[page.job_picker] == {
        "__type__": "update", "choices": [], "value": None
    }
    handlers.submit_training(studio, page, uploads[0], "first", preset="Quick")
    handlers.submit_training(studio, page, uploads[0], "second", preset="Quick")
    unpicked = handlers.refresh_jobs(studio, page, None, [])
    assert unpicked[page.job_picker]["value"] == "0002" and unpicked[page.known_job_ids] == ["0002", "0001"]
    picked = handlers.refresh_jobs(studio, page, "0001", [])  # a job is followed: only the choices change
    assert picked[page.job_picker] == {"__type__": "update", "choices": ["0002", "0001"]}
    assert page.job_picker not in handlers.refresh_jobs(studio, page, "0001", ["0002", "0001"])
    table = handlers.refresh_jobs(studio, page, "0001", ["0002", "0001"])[page.jobs]
    assert isinstance(table, pd.DataFrame) and list(table["queue"]) == [2, 1] and list(table["state"]) == ["queued"] * 2


def test_export_import_rename_delete(studio, page, tmp_path):
    train_style(studio.library, "ink", seed=1)
    kohya, diffusers_layout = handlers.export_style(studio, "ink"), handlers.export_style(studio, "ink", "diffusers")
    assert Path(kohya).name == Path(diffusers_layout).name == "ink.safetensors" and kohya != diffusers_layout
    with pytest.raises(gr.Error, match="'ink' already exists"):
        handlers.import_style(studio, kohya, "")  # named after the file, 'ink', which exists: refused, not replaced
    assert handlers.import_style(studio, kohya, "ink-back") == "Imported **ink-back**."
    with pytest.raises(gr.Error, match="pickle"):
        handlers.import_style(studio, str(_pickle(tmp_path)), "evil")
    with pytest.raises(gr.Error, match="Choose a .safetensors"):
        handlers.import_style(studio, None)
    assert handlers.rename_style(studio, "ink-back", " again ") == "Renamed **ink-back** to **again**."
    assert handlers.delete_style(studio, "again") == "Deleted **again**."
    assert [s["name"] for s in handlers.list_styles(studio)] == ["ink"]
    with pytest.raises(gr.Error, match="No style named 'again'"):
        handlers.delete_style(studio, "again")


def _pickle(folder: Path) -> Path:
    """A .ckpt whose unpickling would run code: it must be refused unread."""
    path = folder / "evil.ckpt"
    path.write_bytes(b"cos\nsystem\n(S'touch /tmp/style-studio-pwned'\ntR.")
    return path
