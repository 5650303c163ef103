"""The app: its handlers called in-process on a Studio (no server), and one smoke test of the running
app (`python -m app` as a subprocess, driven through gradio_client)."""

from __future__ import annotations

import io
import json
import re
import shutil
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
from styles.library import StyleLibrary
from tests.conftest import copy_styles, pattern_image, train_style
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


@pytest.fixture(scope="module")
def styles_made(tmp_path_factory):
    """ink and polka (trigger "dots"), 4-step styles made once for the module; `_add` copies them into a studio."""
    library = StyleLibrary(tmp_path_factory.mktemp("styles"))
    train_style(library, "ink", seed=1, steps=4, num_samples=0)
    train_style(library, "polka", seed=2, steps=4, num_samples=0, trigger="dots")
    return library


def _add(studio: Studio, made, *names: str) -> None:
    copy_styles(made, studio.library, *names, thumbnails=True)


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

        # Caption an upload (a zip with a .txt caption among loose files), then train it with one caption edited.
        rows, note = client.predict(files=[handle_file(f) for f in [*loose[:2], archive]], api_name="/caption_images")
        assert [row["name"] for row in rows] == ["loose0.png", "loose1.png", "more.zip/more/z3.png",
                                                 "more.zip/more/z4.png"]
        assert rows[2]["source"] == ".txt" and {rows[0]["source"], rows[1]["source"]} <= {"captioner", "template"}
        status, _, samples = train("zigzag", [*loose[:2], archive], learning_rate=5e-3,
                                   captions={"loose1.png": "a square of stripes"})
        assert "finished" in status and len(samples) == 1
        assert (workspace / "jobs" / "0001" / "images" / "0001.txt").read_text() == "a square of stripes"
        assert json.loads((workspace / "jobs" / "0001" / "captions.json").read_text())["0001.png"] == (
            "a square of stripes, zigzag")  # trained with the trigger word added
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
        assert recipe["prompt"] == "a red circle, zigzag, pastel"  # the trigger words of the styles in use
        # A grid of both styles at two scales: one PNG with its recipe; too many cells are refused.
        grid_path, grid_info = client.predict(prompt="a red circle", rows="styles", styles=["zigzag", "pastel"],
                                              scales="0, 1", steps=2, api_name="/generate_grid")
        grid = Image.open(grid_path)
        cells = json.loads(grid.text["style_studio"])["grid"]["cells"]
        assert "2 rows × 2 scales" in grid_info and [c["styles"] for c in cells] == [
            {}, {"zigzag": 1.0}, {}, {"pastel": 1.0}]
        assert grid.width > 2 * 192 and grid.height > 2 * 192
        with pytest.raises(Exception, match="at most 64"):
            client.predict(prompt="x", rows="seeds", styles=["zigzag"], seeds=", ".join(map(str, range(65))),
                           scales="1", api_name="/generate_grid")

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

        # Any file passes the server's gate (issue 18: its type check refused a whole upload for one file,
        # unnamed); our own check names the file and why.
        page_file = tmp_path / "notes.html"
        page_file.write_text("<html>not a picture</html>")
        with pytest.raises(Exception, match="notes.html: not an image"):
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
    assert first[page.job_picker] == "0001" and first[page.job_message].startswith("Queued job 0001 (position 1). ")
    assert second[page.job_message].startswith("Queued job 0002 (position 2). ")
    with pytest.raises(gr.Error, match=r"Job 0001 \(queued\) will save its style as 'first'"):
        handlers.submit_training(studio, page, uploads[0], "first", preset="Quick", steps=2)


def test_existing_style_is_not_overwritten(studio, page, uploads, styles_made):
    _add(studio, styles_made, "ink")
    before = studio.library.path_for("ink").read_bytes()
    with pytest.raises(gr.Error, match="already exists"):
        handlers.submit_training(studio, page, uploads[0], "ink", preset="Quick", seed=5)
    assert studio.library.path_for("ink").read_bytes() == before and studio.jobs.jobs() == []


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
    quiet = dict(num_samples=0, validation_prompts=0)  # this test is about the queue, not the pictures
    long_job = handlers.submit_training(studio, page, loose, "slow", preset="Quick", steps=100_000, checkpoint_every=5,
                                        **quiet)[page.job_picker]
    queued = handlers.submit_training(studio, page, loose, "waiting", preset="Quick", steps=4, **quiet)
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


# -- captions before training -------------------------------------------------------------------------
def _expected_source(studio) -> str:
    """What an image without a .txt gets: the embedded captioner's words when its weights are there."""
    from models.captions import auto_captions

    captions, _ = auto_captions([pattern_image(0)], studio.base.model_id, studio.base.family)
    return "captioner" if captions[0] else "template"


def test_caption_images_names_each_caption_and_its_source(studio, page, uploads):
    loose, archive = uploads
    rows, note = handlers.caption_images(studio, [*loose[:2], archive], "art of {trigger}")
    assert [row["name"] for row in rows] == ["loose0.png", "loose1.png", "more.zip/more/z3.png", "more.zip/more/z4.png"]
    assert rows[2] == {"name": "more.zip/more/z3.png", "caption": "a blue star, zigzag style", "source": ".txt",
                       "bucket": "64x64"}
    source = _expected_source(studio)
    assert {row["source"] for i, row in enumerate(rows) if i != 2} == {source} and note
    if source == "template":  # shown as it is: {trigger} is filled in at training, with the trigger of that moment
        assert rows[0]["caption"] == "art of {trigger}"
    off, note = handlers.caption_images(studio, loose[:1], "art of {trigger}", auto_caption=False)
    assert off == [{"name": "loose0.png", "caption": "art of {trigger}", "source": "template", "bucket": "64x64"}]
    assert "off" in note
    with pytest.raises(gr.Error, match="notes.png: not an image"):
        bad = Path(loose[0]).with_name("notes.png")
        bad.write_text("<html>")
        handlers.caption_images(studio, [str(bad)])


def test_the_caption_editor_shows_a_thumbnail_per_image(studio, page, uploads):
    shown = handlers.show_captions(studio, page, [uploads[1]], "art of {trigger}", None)
    table = shown[page.captions]
    assert list(table.columns) == handlers.CAPTION_COLUMNS and list(table["name"]) == [
        "more.zip/more/z3.png", "more.zip/more/z4.png"]
    assert list(table["source"]) == [".txt", _expected_source(studio)]
    for cell, row in zip(table["image"], shown[page.caption_rows]):
        assert cell.startswith("![thumbnail](gradio_api/file=") and Path(row["thumbnail"]).is_file()
        assert Path(row["thumbnail"]).parent == studio.workspace / "previews"
        assert Image.open(row["thumbnail"]).size == (64, 64)  # the picture as it trains, at most 128 px
    assert handlers.show_captions(studio, page, [], None, None)[page.captions].empty


def test_the_caption_editor_shows_the_size_each_picture_trains_at(studio, page, tmp_path):
    """Issue 19: a 2:1 photo trains whole in the embedded model's 96x48 bucket; without bucketing, square."""
    wide, tall = tmp_path / "wide.png", tmp_path / "tall.png"
    Image.new("RGB", (300, 150), (200, 30, 30)).save(wide)
    Image.new("RGB", (150, 250), (30, 30, 200)).save(tall)
    for bucketing, expected in ((None, ["96x48", "48x80"]), ("False", ["64x64", "64x64"])):
        table = handlers.show_captions(studio, page, [str(wide), str(tall)], None, "False", bucketing)[page.captions]
        assert list(table["trains at"]) == expected


def test_edited_captions_reach_the_jobs_images_folder(studio, page, uploads):
    studio.jobs.close()  # nothing runs: the job's folder stays as submitted
    loose, archive = uploads
    shown = handlers.show_captions(studio, page, [*loose[:2], archive], "art of {trigger}", False)
    table = shown[page.captions].copy()
    table.loc[0, "caption"] = "a green stripe by {trigger}"  # edited, with the placeholder
    table.loc[2, "caption"] = "a blue star"  # the .txt caption, edited
    # loose1 and z4 keep the template as shown: left to the template of the form when Train is pressed
    queued = handlers.submit_form(studio, page, [*loose[:2], archive], "zz", "zq", "an image of {trigger}",
                                  "Quick", table, shown[page.caption_rows], steps="2")
    assert "Captions from the caption editor: 2." in queued[page.job_message]
    images = studio.workspace / "jobs" / queued[page.job_picker] / "images"
    captions = {path.stem: path.read_text() for path in images.glob("*.txt")}
    assert captions == {"0000": "a green stripe by zq", "0002": "a blue star"}  # the others: the template, at training

    # The API takes {name: caption}, or /caption_images' rows; a name not in the upload is refused.
    queued = handlers.submit_training(studio, page, loose[:2], "yy", captions={"loose1.png": "two dots"})
    images = studio.workspace / "jobs" / queued[page.job_picker] / "images"
    assert (images / "0001.txt").read_text() == "two dots" and not (images / "0000.txt").exists()
    rows, _ = handlers.caption_images(studio, loose[:1])
    queued = handlers.submit_training(studio, page, loose[:1], "xx", captions=[{**rows[0], "caption": "a dot"}])
    assert (studio.workspace / "jobs" / queued[page.job_picker] / "images" / "0000.txt").read_text() == "a dot"
    with pytest.raises(gr.Error, match="not in the upload: gone.png"):
        handlers.submit_training(studio, page, loose[:1], "ww", captions={"gone.png": "x"})


# -- the jobs panel's instruments ---------------------------------------------------------------------
def test_the_validation_curve_strip_and_status_show_every_checkpoint(tmp_path):
    from app.studio import validation_line
    from trainer.jobs import JobRecord, Progress

    validation = [{"step": 10, "score": 0.2, "images": ["a10.png", "b10.png"], "prompts": ["p", "q"]},
                  {"step": 20, "score": 0.5, "images": ["a20.png", "b20.png"], "prompts": ["p", "q"]},
                  {"step": 30, "score": 0.4, "images": ["a30.png", "b30.png"], "prompts": ["p", "q"]}]
    chart = handlers.validation_chart(validation)
    assert list(chart["step"]) == [0, 10, 20, 30] and list(chart["score"]) == [0.0, 0.2, 0.5, 0.4]
    strip = handlers.validation_strip(validation)
    assert strip["height"] == handlers.STRIP_TOP_PX + 3 * handlers.STRIP_ROW_PX  # three rows shown whole
    assert strip["columns"] == 2 and [caption for _, caption in strip["value"]] == [
        "step 30 · score 0.400", "step 30 · score 0.400", "★ step 20 · score 0.500", "★ step 20 · score 0.500",
        "step 10 · score 0.200", "step 10 · score 0.200"]
    assert handlers.validation_chart([]) is None and handlers.loss_chart([]) is None  # no empty first frame
    record = JobRecord("0001", "ink", {"keep": "best"}, None, state="running")
    assert validation_line(record, Progress(validation=validation)) == (
        "The style will come from the best checkpoint so far: step 20, score 0.500.")
    record.config["keep"] = "last"
    line = validation_line(record, Progress(validation=validation))
    assert line.startswith("Latest validation: step 30, score 0.400; the style is the last step's adapter")
    assert validation_line(record, Progress()) == ""


def test_the_styles_table_shows_the_step_and_score_a_style_comes_from():
    from styles.library import StyleInfo

    table = handlers.styles_table([
        StyleInfo("ink", Path("ink.safetensors"), None, config={"steps": 200}, steps_done=120, validation_score=0.4567),
        StyleInfo("old", Path("old.safetensors"), None, config={"steps": 50})])
    assert list(table["steps"]) == [120, 50] and list(table["validation_score"]) == ["0.457", ""]


@pytest.mark.slow
def test_a_job_with_checkpoints_shows_its_validations(studio, page, uploads):
    queued = handlers.submit_training(studio, page, uploads[0], "checked", preset="Quick", steps=4, checkpoint_every=2,
                                      validation_prompts=2, num_samples=0)
    last = _last(handlers.follow_job(studio, page, queued[page.job_picker]))
    assert "finished" in last[page.status] and "Best validation: step" in last[page.status]
    assert list(last[page.validation_plot]["value"]["step"]) == [0, 2, 4]
    assert last[page.loss_plot]["x_lim"] == last[page.validation_plot]["x_lim"] == [0, 10]  # whole-step ticks
    strip = last[page.validation_strip]
    assert strip["columns"] == 2 and len(strip["value"]) == 4
    assert re.search(r"^(★ )?step 4 · score", strip["value"][0][1])
    info = studio.library.get("checked")
    assert info.steps_done in (2, 4) and info.validation_score is not None
    assert handlers.refresh_styles(studio, page, {}, None)[page.table]["validation_score"][0] != ""


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
def test_bad_generation_input_is_refused(studio, page, styles_made):
    _add(studio, styles_made, "ink")
    with pytest.raises(gr.Error, match="between -2.0 and 2.0"):
        handlers.generate(studio, page, "x", styles={"ink": 5})
    with pytest.raises(gr.Error, match="multiples of"):
        handlers.generate(studio, page, "x", width=65)
    with pytest.raises(gr.Error, match="Write a prompt"):
        handlers.generate(studio, page, "  ")
    with pytest.raises(gr.Error, match="Unknown style.*Available styles: ink"):
        handlers.generate(studio, page, "x", styles={"gone": 1})


def test_generate_reports_the_blend_and_saves_pngs_with_their_recipe(studio, page, styles_made):
    _add(studio, styles_made, "ink")
    result = handlers.generate(studio, page, "a red circle", seed=3, steps=4, styles={"ink": 0.5})
    # The trigger word of the style in use joins the prompt; the info line and the recipe say so.
    assert result[page.info] == "Seed 3 · styles: ink +0.50 · prompt used: `a red circle, ink`"
    image = Image.open(result[page.gallery][0])
    assert Path(result[page.gallery][0]).parent == studio.workspace / "outputs"
    recipe = json.loads(image.text["style_studio"])
    assert recipe["styles"] == {"ink": 0.5} and recipe["prompt"] == "a red circle, ink"
    assert image.text["parameters"].startswith("a red circle, ink <lora:ink:0.5>")
    assert handlers.generate(studio, page, "a red circle", steps=4)[page.info] == (
        "Seed 0 · styles: none (base model) · prompt used: `a red circle`")


@pytest.mark.parametrize("add_triggers,styles,prompt", [
    (True, {"ink": 0.5}, "a red circle, ink"),
    (False, {"ink": 0.5}, "a red circle"),  # the checkbox off: the prompt as written
    (True, {"ink": 0.0}, "a red circle"),  # a style at 0 is not in use: no trigger
    (True, {"ink": -0.5}, "a red circle, ink"),  # pushed away from: in use, its trigger says what to push from
])
def test_trigger_words_are_added_to_the_prompt_of_the_styles_in_use(studio, page, styles_made, add_triggers, styles,
                                                                    prompt):
    _add(studio, styles_made, "ink")
    result = handlers.generate(studio, page, "a red circle", seed=3, steps=2, styles=styles, add_triggers=add_triggers)
    assert json.loads(Image.open(result[page.gallery][0]).text["style_studio"])["prompt"] == prompt
    assert result[page.info].endswith(f"prompt used: `{prompt}`")


def test_generate_grid_saves_one_labelled_png_with_its_recipe(studio, page, styles_made):
    _add(studio, styles_made, "ink", "polka")
    result = handlers.generate_grid(studio, page, "a red circle", "styles", [], "0, 1, 2", "0, 0.5, 1", seed=4,
                                    steps=2)
    path = Path(result[page.grid_image])
    assert path.parent == studio.workspace / "outputs" and path.name.startswith("grid-")
    assert result[page.grid_info].startswith("Grid of 2 rows × 3 scales (seed 4; trigger words")
    grid = Image.open(path)
    recipe = json.loads(grid.text["style_studio"])
    cells = recipe["grid"]["cells"]  # no styles named: every style, in the library's order
    assert recipe["grid"]["row_labels"] == ["ink", "polka"] and [c["scale"] for c in cells] == [0, 0.5, 1] * 2
    assert cells[-1]["styles"] == {"polka": 1.0} and cells[-1]["prompt"] == "a red circle, dots"
    # 64 px pictures drawn 3x, whole, in a sheet that ends one gap after the last of them; labels on the left.
    from styles.grid import PAD

    assert all(c["box"][2] - c["box"][0] == c["box"][3] - c["box"][1] == 192 for c in cells)
    assert grid.size == (cells[-1]["box"][2] + PAD, cells[-1]["box"][3] + PAD)
    labels = np.asarray(grid.convert("L").crop((0, cells[0]["box"][1], cells[0]["box"][0], cells[0]["box"][3])))
    assert (labels < 128).any()
    assert "Y Type: Style, Y Values: ink, polka" in grid.text["parameters"] and "Seed: 4" in grid.text["parameters"]

    seeds = handlers.generate_grid(studio, page, "a red circle", "seeds", ["polka"], "7, 8", "1", steps=2,
                                   add_triggers=False)
    cells = json.loads(Image.open(seeds[page.grid_image]).text["style_studio"])["grid"]["cells"]
    assert [(c["row"], c["seed"], c["styles"], c["prompt"]) for c in cells] == [
        ("seed 7", 7, {"polka": 1.0}, "a red circle"), ("seed 8", 8, {"polka": 1.0}, "a red circle")]


@pytest.mark.parametrize("rows,seeds,scales,message", [
    ("seeds", ", ".join(map(str, range(13))), "0, 0.25, 0.5, 0.75, 1", "= 65 pictures; at most 64"),
    ("styles", "", "0, big", "'big' is not one"),
    ("seeds", "1.5", "0, 1", "Seeds must be whole numbers"),
])
def test_generate_grid_refuses_too_many_cells_and_bad_values_before_drawing(studio, page, styles_made, monkeypatch,
                                                                            rows, seeds, scales, message):
    _add(studio, styles_made, "ink")
    monkeypatch.setattr(studio.blender, "generate", lambda *a, **k: pytest.fail("drew a picture"))
    with pytest.raises(gr.Error, match=message):
        handlers.generate_grid(studio, page, "a red circle", rows, ["ink"], seeds, scales)
    assert not list((studio.workspace / "outputs").glob("grid-*"))


def test_the_library_refresh_redraws_only_when_the_styles_change(studio, page, styles_made):
    first = handlers.refresh_styles(studio, page, {}, None)
    assert first[page.known_names] == [] and first[page.thumbs] == [] and first[page.table].empty
    assert handlers.refresh_styles(studio, page, {}, []) == gr.skip()  # nothing changed: every output kept
    _add(studio, styles_made, "ink")
    after = handlers.refresh_styles(studio, page, {"gone": 0.3}, [])
    assert after[page.known_names] == ["ink"] and after[page.blend] == {"ink": 0.0}  # a slider per style, at 0
    assert after[page.picker]["choices"] == ["ink"] and list(after[page.table]["name"]) == ["ink"]
    assert after[page.thumbs] == [(str(studio.library.get("ink").thumbnail), "ink · trigger: ink")]
    assert handlers.refresh_styles(studio, page, {"ink": 0.7}, ["ink"]) == gr.skip()
    assert after[page.style_problems] == ""


def test_a_damaged_style_is_listed_with_its_reason_gets_no_slider_and_can_be_picked_to_delete(studio, page,
                                                                                              styles_made):
    """Issue 18, item 12: a file cut short after its header is shown as unusable, never as a style to blend."""
    _add(studio, styles_made, "ink", "polka")
    damaged = studio.library.path_for("polka")
    damaged.write_bytes(damaged.read_bytes()[:-100])
    shown = handlers.refresh_styles(studio, page, {"polka": 0.5}, None)
    assert shown[page.blend] == {"ink": 0.0} and shown[page.grid_styles]["choices"] == ["ink"]
    assert list(shown[page.table]["name"]) == ["ink"] and [t[1] for t in shown[page.thumbs]] == ["ink · trigger: ink"]
    assert "polka.safetensors is damaged (truncated" in shown[page.style_problems]
    assert shown[page.picker]["choices"] == ["ink", "polka"]  # so that it can be picked and deleted
    with pytest.raises(gr.Error, match="polka.safetensors is damaged"):
        handlers.generate(studio, page, "a red circle", steps=1, styles={"polka": 1.0})


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


def test_export_import_rename_delete(studio, page, styles_made, tmp_path):
    _add(studio, styles_made, "ink")
    kohya, diffusers_layout = handlers.export_style(studio, "ink"), handlers.export_style(studio, "ink", "diffusers")
    # Two names: both downloads land in one folder (A1111 calls a LoRA by its file name: the kohya one keeps it)
    assert Path(kohya).name == "ink.safetensors" and Path(diffusers_layout).name == "ink_diffusers.safetensors"
    with pytest.raises(gr.Error, match="'ink' already exists"):
        handlers.import_style(studio, kohya, "")  # named after the file, 'ink', which exists: refused, not replaced
    assert handlers.import_style(studio, kohya, "ink-back").startswith("Imported **ink-back**: it holds ")
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


# -- what a person meets (issue 18) ----------------------------------------------------------------
def test_picking_a_job_switches_the_view_at_once_and_a_fresh_page_picks_the_running_job(studio, page, uploads):
    from trainer.jobs import JobState

    studio.jobs.close()  # nothing runs: states are set by hand
    for name in ("first", "second", "third"):
        handlers.submit_training(studio, page, uploads[0], name, preset="Quick", steps=2)
    studio.jobs.get("0001").state = JobState.RUNNING
    assert handlers.refresh_jobs(studio, page, None, None)[page.job_picker]["value"] == "0001"  # not the newest
    shown = handlers.show_job(studio, page, "0001")
    assert "Job 0001" in shown[page.status]
    # The message under the buttons stays with its job: picking another one takes it away.
    assert handlers.show_job(studio, page, "0002", "Job 0001 is queued to resume.")[page.job_message] == ""
    assert page.job_message not in handlers.show_job(studio, page, "0002", "Queued job 0002 (position 2).")
    # The timer follows the picker: another job picked is shown on the next tick, then nothing is re-sent.
    switched = handlers.tick_job(studio, page, "0003", shown[page.job_seen])
    assert "Job 0003 · **third** · queued" in switched[page.status] and page.job_message not in switched
    assert handlers.tick_job(studio, page, "0003", switched[page.job_seen]) == gr.skip()
    # The shown job moves on: the action message under the buttons ("queued to resume") is cleared.
    handlers.cancel_job(studio, "0003")
    moved = handlers.tick_job(studio, page, "0003", switched[page.job_seen])
    assert "cancelled" in moved[page.status] and moved[page.job_message] == ""
    assert handlers.tick_job(studio, page, "9999", None) == gr.skip()  # an unknown id typed in: no error per tick


def test_the_charts_step_axis_has_whole_steps():
    assert handlers._steps_axis(4) == [0, 10] and handlers._steps_axis(200) == [0, 200]


def test_submit_says_what_the_upload_gave_and_an_empty_form_lists_all_that_is_missing(studio, page, uploads, tmp_path):
    studio.jobs.close()
    loose, archive = uploads
    (tmp_path / "notes.html").write_text("<html>not a picture</html>")
    empty_zip = tmp_path / "captions-only.zip"
    with zipfile.ZipFile(empty_zip, "w") as zipped:
        zipped.writestr("a.txt", "just a caption")
    message = handlers.submit_training(studio, page, [*loose, archive, str(tmp_path / "notes.html"), str(empty_zip)],
                                       "mixed", preset="Quick", steps=2)[page.job_message]
    assert "**5 images accepted**: loose0.png, loose1.png, loose2.png, more.zip/more/z3.png, more.zip/more/z4.png" in (
        message)
    assert "Captions from a .txt of the same name: more.zip/more/z3.png." in message
    assert "**Skipped 2**: notes.html: not an image" in message
    assert "captions-only.zip: the zip holds no images" in message
    with pytest.raises(gr.Error, match="To train, fill in the style name and images. No images were uploaded"):
        handlers.submit_training(studio, page, [], "")


def test_the_advanced_settings_show_the_presets_values_and_cuda_only_ones_hide_on_a_cpu(studio, page):
    steps = page.advanced["steps"]
    assert steps.value == "1000" and page.advanced["rank"].value == "8"  # Balanced, filled in: not blank
    quick = handlers.fill_preset(studio, page, "Quick")
    assert quick[steps] == "200" and quick[page.advanced["target_modules"]].startswith("to_")
    settings = handlers.parse_advanced({f.name: value.value if hasattr(value, "value") else value
                                        for f, value in zip(handlers.ADVANCED_FIELDS, quick.values())})
    assert settings["steps"] == 200 and settings["batch_size"] == 1  # what is shown submits as it is
    hidden = {name for name, control in page.advanced.items() if not control.visible}
    assert hidden == {"optimizer", "compile", "cuda_graphs"}  # this machine trains on its CPU


def test_the_upload_gate_takes_any_file_for_our_own_check_to_name(page):
    assert page.files.file_types is None  # gradio's type check refused the whole upload, naming no file


def test_delete_asks_first_and_the_picker_moves_to_the_neighbour(studio, page, styles_made):
    _add(studio, styles_made, "ink", "polka")
    shutil.copy(studio.library.path_for("ink"), studio.library.path_for("ash"))  # ash, ink, polka
    before = studio.library.names()
    asked = handlers.ask_delete(studio, page, "ink")
    assert asked[page.confirm_delete]["visible"] and asked[page.confirm_delete]["value"] == "Confirm delete ink"
    assert studio.library.exists("ink")  # Delete only asked
    done = handlers.confirm_delete(studio, page, asked[page.delete_pending])
    assert done[page.styles_message] == "Deleted **ink**." and not done[page.confirm_delete]["visible"]
    with pytest.raises(gr.Error, match="Press Delete first"):  # a second click of Confirm deletes nothing more
        handlers.confirm_delete(studio, page, done[page.delete_pending])
    refreshed = handlers.refresh_styles(studio, page, {}, before, [], "ink")
    assert refreshed[page.picker]["value"] == "polka"  # the next one, not the first in the alphabet (ash)
    assert handlers._neighbour([], ["polka"], "polka") is None


def test_import_picks_the_style_clears_the_form_and_the_gallery_shows_it(studio, page, styles_made):
    _add(studio, styles_made, "ink")
    exported = handlers.export_style(studio, "ink", "diffusers")
    done = handlers.import_form(studio, page, exported, "ink-copy")
    assert done[page.picker]["value"] == "ink-copy" and done[page.import_name] == "" and done[page.import_file] is None
    renamed = handlers.rename_form(studio, page, "ink-copy", " zed ")
    assert renamed[page.picker]["value"] == "zed" and renamed[page.new_name] == ""
    thumbs = dict((caption.split(" · ")[0], path) for path, caption in
                  handlers.refresh_styles(studio, page, {}, None)[page.thumbs])
    assert set(thumbs) == {"ink", "zed"} and Path(thumbs["zed"]).is_file()  # a placeholder: an import has no picture


def test_seed_minus_one_is_random_and_reused(studio, page):
    first = handlers.generate(studio, page, "a red circle", seed=-1, steps=2)
    seed = first[page.last_seed]
    assert 0 <= seed < 2**31 and first[page.info].startswith(f"Seed {seed} ·")
    recipe = json.loads(Image.open(first[page.gallery][0]).info["style_studio"])
    assert recipe["seed"] == seed
    assert handlers.reuse_seed(seed, -1) == seed and handlers.reuse_seed(None, 5) == 5
    assert handlers.negative_scales({"ink": -0.5, "polka": 0.3}, False) == ({"ink": 0.0, "polka": 0.3}, 0.0)
    assert handlers.negative_scales({"ink": -0.5}, True) == ({"ink": -0.5}, -2.0)


def test_png_info_fills_the_form_from_a_generated_picture(studio, page, styles_made, tmp_path):
    _add(studio, styles_made, "ink", "polka")
    made = handlers.generate(studio, page, "a blue star", "blurry", seed=11, steps=3, guidance=5.5,
                             styles={"ink": -0.5})
    filled = handlers.png_info(studio, page, made[page.gallery][0])
    assert filled[page.prompt] == "a blue star, ink" and filled[page.negative] == "blurry"
    assert (filled[page.seed], filled[page.steps], filled[page.guidance]) == (11, 3, 5.5)
    assert filled[page.width] == filled[page.height] == studio.base.resolution
    assert filled[page.blend] == {"ink": -0.5, "polka": 0.0} and filled[page.allow_negative] is True
    # An AUTOMATIC1111 picture: its parameters text, <lora:...> tags as styles; a style the library lacks is named.
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", "a castle <lora:polka:0.7> <lora:gone:1>\nNegative prompt: fog\n"
                                "Steps: 25, Sampler: Euler a, CFG scale: 7, Seed: 42, Size: 64x96, Model: sd15")
    Image.new("RGB", (64, 96)).save(tmp_path / "a1111.png", pnginfo=info)
    filled = handlers.png_info(studio, page, str(tmp_path / "a1111.png"))
    assert (filled[page.prompt], filled[page.seed], filled[page.height]) == ("a castle", 42, 96)
    assert filled[page.blend] == {"ink": 0.0, "polka": 0.7} and "gone" in filled[page.info]
    Image.new("RGB", (8, 8)).save(tmp_path / "bare.png")
    with pytest.raises(gr.Error, match="holds no recipe"):
        handlers.png_info(studio, page, str(tmp_path / "bare.png"))
    from tests.test_layers import _loads_torch

    assert not _loads_torch("import styles.pnginfo")  # the page reads a recipe without the engine


@pytest.mark.slow
def test_a_job_shows_samples_from_its_first_step(studio, page, uploads):
    """Samples came only every sample_every (100) steps: minutes of a run without a picture."""
    queued = handlers.submit_training(studio, page, uploads[0], "early", preset="Quick", steps=3, num_samples=1,
                                      validation_prompts=0, checkpoint_every=0, auto_caption=False)
    job_id = queued[page.job_picker]
    assert "finished" in _last(handlers.follow_job(studio, page, job_id))[page.status]
    samples = sorted(path.name for path in (studio.workspace / "jobs" / job_id / "samples").glob("*.png"))
    assert samples == ["step-000001-0.png", "step-000003-0.png"]  # after the first step, and at the end
