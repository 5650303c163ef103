"""The running app in headless Chromium (Playwright): what a user sees and clicks.

Needs Debian's chromium (/usr/bin/chromium) and the playwright package; `.ci/run` installs both and
sets STYLE_STUDIO_REQUIRE_BROWSER=1, so there a missing browser fails instead of skipping.
Screenshots go to test-artifacts/ (or $TEST_ARTIFACTS).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from tests.running_app import ROOT, start_app, stop_app

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS", ROOT / "test-artifacts"))
# Chromium's own background connections are refused on a closed network, many at a time: turn them off.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
STEP_TIMEOUT_MS = 240_000
pytestmark = pytest.mark.slow  # a real app and a real browser, training real jobs


def _require_browser():
    missing = []
    if importlib.util.find_spec("playwright") is None:
        missing.append("the playwright package (pip install playwright)")
    if not Path(CHROMIUM).exists():
        missing.append("Debian's chromium (apt-get install chromium)")
    if missing:
        message = "browser tests need " + " and ".join(missing)
        if os.environ.get("STYLE_STUDIO_REQUIRE_BROWSER"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture
def page(tmp_path):
    """A Chromium page on a fresh app in a workspace of its own; yields (page, workspace)."""
    _require_browser()
    from playwright.sync_api import sync_playwright

    workspace = tmp_path / "workspace"
    workspace.mkdir()
    process, _, url = start_app(workspace)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 1600})
            page.set_default_timeout(STEP_TIMEOUT_MS)
            page.goto(url)
            yield page, workspace
            browser.close()
    finally:
        stop_app(process)


def _screenshot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=ARTIFACTS / f"{name}.png", full_page=True)


def _pick_job(page, job_id: str) -> None:
    page.get_by_label("Job", exact=True).click()
    page.get_by_role("option", name=job_id, exact=True).click()


def test_train_tab_follows_a_job_live_then_cancel_and_keep(page):
    """One click queues an example; the Train tab shows step, loss, it/s, time left and samples; picking another
    job switches the whole view at once; Cancel acts on the job shown, then Keep; in Styles, Delete asks first."""
    page, workspace = page
    from playwright.sync_api import expect

    expect.set_options(timeout=STEP_TIMEOUT_MS)

    page.get_by_role("tab", name="Train").click()
    page.get_by_label("Balanced").check()  # 1000 steps: time enough to queue, pick and cancel before it ends
    page.get_by_role("button", name="Train this example").click()

    status = page.get_by_text(re.compile(r"Job 0001 · \w+ · running · step \d+ of 1000"))
    expect(status).to_be_visible()
    expect(status).to_contain_text(re.compile(r"loss \d\.\d{4} · [\d.]+ it/s · .* left"))
    # Samples arrive after the first step (then every 100 steps) from fixed prompts and seeds, while the job runs.
    samples = page.locator(".pixelated").filter(has=page.get_by_text("Samples")).locator("img")
    expect(samples.first).to_be_visible()
    samples.first.scroll_into_view_if_needed()  # gallery pictures load lazily: only near the viewport
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=samples.first.element_handle())
    shown = _whole(page, samples.first)
    assert shown["whole"] and shown["scale"] == int(shown["scale"]) >= 2, shown  # whole, crisp, not tiny
    expect(page.get_by_text(re.compile("running · step"))).to_be_visible()
    _screenshot(page, "train-tab-running")

    # A second job, queued: the page follows it. A fresh page follows the running job, not the newest.
    page.get_by_role("radio", name=re.compile("^polka")).check()
    page.get_by_role("button", name="Train this example").click()
    expect(page.get_by_text(re.compile(r"Job 0002 · polka · queued"))).to_be_visible()
    page.reload()
    expect(page.get_by_text(re.compile(r"Job 0001 · \w+ · running"))).to_be_visible(timeout=30_000)
    # Picking a job switches status, chart and samples within 2 s, and the buttons act on the job shown.
    _pick_job(page, "0002")
    expect(page.get_by_text(re.compile(r"Job 0002 · polka · queued"))).to_be_visible(timeout=2_000)
    expect(samples).to_have_count(0, timeout=2_000)  # the running job's samples went with it
    _pick_job(page, "0001")
    expect(page.get_by_text(re.compile(r"Job 0001 · \w+ · running"))).to_be_visible(timeout=2_000)

    page.get_by_role("button", name="Cancel").click()
    expect(page.get_by_text(re.compile(r"Job 0001 · \w+ · cancelled"))).to_be_visible()
    page.get_by_role("button", name="Keep checkpoint as style").click()
    kept = page.get_by_text(re.compile(r"Saved the checkpoint of job 0001 as style"))
    expect(kept).to_be_visible()
    history = page.get_by_role("grid", name="Queue and history")
    expect(history).to_contain_text(re.compile("0001.*Kept the checkpoint at step"))
    _screenshot(page, "train-tab-cancelled-kept")
    _pick_job(page, "0002")  # it runs now; stop it, so the rest of the test has the CPU
    expect(kept).to_be_hidden(timeout=2_000)  # the message was about the job shown before
    page.get_by_role("button", name="Cancel").click()
    expect(page.get_by_text(re.compile(r"Job 0002 · polka · (cancelled|running)"))).to_be_visible()
    from styles.library import StyleLibrary

    assert StyleLibrary(workspace).exists("sunset")

    # Styles: the kept style's table row gives the step its weights come from, not the preset's 1000; Delete asks.
    page.get_by_role("tab", name="Styles").click()
    step = StyleLibrary(workspace).get("sunset").steps_done
    row = page.get_by_role("row").filter(has=page.get_by_role("gridcell", name="sunset", exact=True)).first
    expect(row).to_contain_text(str(step))
    assert step < 1000
    page.get_by_role("button", name="Delete", exact=True).click()
    confirm = page.get_by_role("button", name="Confirm delete sunset")
    expect(confirm).to_be_visible()
    assert StyleLibrary(workspace).exists("sunset")  # asked, not deleted
    _screenshot(page, "styles-tab-delete-asks")
    confirm.click()
    expect(page.get_by_text("Deleted sunset.")).to_be_visible()
    expect(confirm).to_be_hidden()
    assert not StyleLibrary(workspace).exists("sunset")


def test_upload_train_blend_two_sliders_generate_and_download(page, tmp_path):
    """A user's whole round: upload images, train a style, move two style sliders, generate, read a picture's recipe
    back, download the export in both layouts."""
    page, workspace = page
    from playwright.sync_api import expect

    from core.files import read_safetensors_header
    from styles.library import StyleLibrary
    from tests.conftest import pattern_image, train_style

    expect.set_options(timeout=STEP_TIMEOUT_MS)
    train_style(StyleLibrary(workspace), "sunset", seed=3)  # a style already in the library: the page picks it up
    uploads = []
    for i in range(4):
        uploads.append(tmp_path / f"zig{i}.png")
        pattern_image(40 + i).save(uploads[-1])
    uploads.append(tmp_path / "notes.html")  # a file of another type: the page takes it, our check names it
    uploads[-1].write_text("<html>not a picture</html>")

    # Train: upload, name, a preset (it fills the Advanced settings), a short run (steps), Train; the job ends.
    page.get_by_role("tab", name="Train").click()
    files = page.locator("#training-files")
    files.locator("input[type=file]").set_input_files([str(p) for p in uploads])
    expect(files.get_by_text("zig3")).to_be_visible()
    expect(files.get_by_role("cell", name="notes.html")).to_be_visible()  # the gate took it
    page.get_by_label("Style name").fill("zigzag")
    page.get_by_label("Quick").check()
    page.get_by_text("Advanced", exact=True).click()
    steps = page.locator("#advanced-steps textarea")
    expect(steps).to_have_value("200")  # the preset's value, shown
    expect(page.get_by_text("Cuda graphs")).to_have_count(0)  # CUDA-only: hidden on this CPU
    steps.fill("30")
    page.locator("#advanced-validation_prompts textarea").fill("0")
    page.get_by_role("button", name="Train", exact=True).click()
    expect(page.get_by_text(re.compile(r"Queued job 0001 \(position 1\)\. 4 images accepted: zig0\.png.*"
                                       r"Skipped 1: notes\.html: not an image"))).to_be_visible()
    _screenshot(page, "train-tab-uploaded-submitted")
    expect(page.get_by_text(re.compile(r"Job 0001 · zigzag · finished"))).to_be_visible()
    _screenshot(page, "train-tab-uploaded-finished")

    # Generate: one slider per style (the library's 'sunset' and the new 'zigzag'), from 0; negative scales once
    # allowed. Move both, generate at a random seed (-1).
    page.get_by_role("tab", name="Generate").click()
    expect(page.get_by_label("range slider for sunset")).to_have_attribute("min", "0")  # 0 is off, not half on
    page.get_by_label("Allow negative scales").check()
    expect(page.get_by_label("range slider for zigzag")).to_have_attribute("min", "-2")  # drawn again: -2 to 2
    for name, value in (("sunset", "0.8"), ("zigzag", "-0.5")):
        number = page.get_by_label(f"number input for {name}")
        number.fill(value)
        number.press("Enter")
    page.get_by_label("Seed (-1: random)").fill("-1")
    page.get_by_role("button", name="Generate").click()
    expect(page.get_by_text(re.compile(r"styles: sunset \+0\.80, zigzag -0\.50"))).to_be_visible()
    seed = re.search(r"Seed (\d+) ·", page.get_by_text(re.compile(r"Seed \d+ · styles")).inner_text())[1]
    picture = page.locator(".pixelated").filter(has=page.get_by_text("Output")).locator("img").first
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=picture.element_handle())
    shown = _whole(page, picture)
    assert shown["whole"] and shown["scale"] == int(shown["scale"]) >= 4, shown  # whole, crisp, big enough
    assert picture.evaluate("img => getComputedStyle(img).imageRendering") == "pixelated"
    page.get_by_role("button", name="Reuse last seed").click()
    expect(page.get_by_label("Seed (-1: random)")).to_have_value(seed)
    _screenshot(page, "generate-tab-two-styles")
    # PNG info: the picture dropped back fills the form with its recipe.
    page.get_by_label("Prompt", exact=True).fill("something else")
    made = sorted((workspace / "outputs").glob("*.png"))[-1]
    page.locator("#png-info input[type=file]").set_input_files(str(made))
    expect(page.get_by_label("Prompt", exact=True)).to_have_value("a red circle, sunset, zigzag")
    expect(page.get_by_text(f"Filled the form from {made.name}")).to_be_visible()

    # Styles: download the export in both layouts, under two names; the kohya one is a style file with its alpha.
    page.get_by_role("tab", name="Styles").click()
    picker = page.get_by_label("Style", exact=True)
    picker.click()
    page.get_by_role("option", name="zigzag").click()
    link = page.locator("#style-download a[download]")
    saved = {}
    for layout, name in (("^kohya", "zigzag.safetensors"), ("^diffusers", "zigzag_diffusers.safetensors")):
        page.get_by_role("radio", name=re.compile(layout)).check()
        page.get_by_role("button", name="Download .safetensors").click()
        expect(page.locator("#style-download").get_by_role("cell", name=name)).to_be_visible()
        with page.expect_download() as download:
            link.click()
        assert download.value.suggested_filename == name
        saved[name] = tmp_path / name
        download.value.save_as(saved[name])
    metadata, table = read_safetensors_header(saved["zigzag.safetensors"])
    assert metadata["ss_output_name"] == "zigzag" and all(key.startswith("lora_unet_") for key in table)
    _screenshot(page, "styles-tab-download")


def _edit_cell(table, row: int, column: int, text: str) -> None:
    """Type `text` into a cell of an editable gr.Dataframe, as a user does: double-click, type, Enter."""
    cell = table.locator(f'[data-testid="cell-{row}-{column}"]')
    cell.dblclick()
    box = cell.locator("textarea, input").first
    box.fill(text)
    box.press("Enter")


def _whole(page, image) -> dict:
    """The <img>'s natural size, the size its picture is drawn at (object-fit applied) and its scale, and whether
    it is drawn whole: inside its box, not cropped by object-fit: cover, not stretched out of its proportions."""
    return page.evaluate(
        """img => { const r = img.getBoundingClientRect(), box = img.parentElement.getBoundingClientRect();
                    const fit = getComputedStyle(img).objectFit, [w, h] = [img.naturalWidth, img.naturalHeight];
                    let s = Math.min(r.width / w, r.height / h);
                    if (fit === "scale-down") s = Math.min(s, 1);
                    if (fit === "none") s = 1;
                    const drawn = fit === "fill" ? [r.width, r.height] : [w * s, h * s];
                    const inside = r.left >= box.left - 1 && r.right <= box.right + 1 && r.top >= box.top - 1
                                   && r.bottom <= box.bottom + 1;
                    const whole = inside && fit !== "cover" && drawn[0] <= r.width + 1 && drawn[1] <= r.height + 1
                                  && Math.abs(drawn[0] / drawn[1] - w / h) < 0.02;
                    return {natural: [w, h], drawn, fit, whole, scale: drawn[0] / w}; }""", image.element_handle())


def test_caption_editor_then_a_job_with_its_validation_curve_and_strip(page, tmp_path):
    """Upload pictures (one with a .txt), see and edit their captions, train; the Jobs panel shows the loss line,
    the validation score per checkpoint and the pictures of every checkpoint."""
    page, workspace = page
    from playwright.sync_api import expect

    from tests.conftest import pattern_image

    expect.set_options(timeout=STEP_TIMEOUT_MS)
    uploads = []
    for i in range(3):
        uploads.append(tmp_path / f"zig{i}.png")
        pattern_image(40 + i).save(uploads[-1])
    (tmp_path / "zig0.txt").write_text("a striped square")
    uploads.append(tmp_path / "zig0.txt")

    page.get_by_role("tab", name="Train").click()
    page.locator("#training-files input[type=file]").set_input_files([str(p) for p in uploads])
    editor = page.locator("#caption-editor")
    expect(editor.get_by_text("zig2.png")).to_be_visible()
    expect(editor.get_by_text("a striped square")).to_be_visible()
    expect(editor.get_by_text(".txt", exact=True)).to_be_visible()
    thumbnails = editor.locator("[data-testid^=cell-] img[alt=thumbnail]")  # one per row of the table
    expect(thumbnails).to_have_count(3)
    for i in range(3):
        page.wait_for_function("img => img.complete && img.naturalWidth === 64", arg=thumbnails.nth(i).element_handle())
    _edit_cell(editor, 1, 2, "two wide stripes")  # zig1.png's caption
    expect(editor.get_by_text("two wide stripes")).to_be_visible()
    _screenshot(page, "train-tab-caption-editor")

    page.get_by_label("Style name").fill("zigzag")
    page.get_by_label("Quick").check()  # first: choosing a preset fills in its values
    page.get_by_text("Advanced", exact=True).click()
    for field, value in (("steps", "20"), ("checkpoint_every", "10"), ("validation_prompts", "2"),
                         ("num_samples", "1")):
        page.locator(f"#advanced-{field} textarea").fill(value)
    page.get_by_role("button", name="Train", exact=True).click()
    expect(page.get_by_text(re.compile(r"Queued job 0001 \(position 1\)\. 3 images accepted.*"
                                       r"Captions from the caption editor: [23]\."))).to_be_visible()
    images = workspace / "jobs" / "0001" / "images"
    assert (images / "0001.txt").read_text() == "two wide stripes"  # the edit reached the job
    assert (images / "0000.txt").read_text() == "a striped square"

    expect(page.get_by_text(re.compile(r"Job 0001 · zigzag · finished"))).to_be_visible()
    expect(page.get_by_text(re.compile(r"Best validation: step (10|20), score -?\d\.\d{3}"))).to_be_visible()
    strip = page.locator("#validation-strip")
    expect(strip.get_by_text(re.compile(r"^(★ )?step 20 · score -?\d\.\d{3}$"))).to_have_count(2)
    expect(strip.get_by_text(re.compile(r"^(★ )?step 10 · score -?\d\.\d{3}$"))).to_have_count(2)
    expect(strip.get_by_text(re.compile(r"^★ step"))).to_have_count(2)  # the best checkpoint's row
    # The curve and the loss chart draw lines (a line needs a path with more than one point).
    for plot in ("#validation-plot", "#loss-plot"):
        line = page.locator(f"{plot} .mark-line path").first
        expect(line).to_be_attached()
        assert line.get_attribute("d").count("L") >= 1, plot
    expect(page.locator("#loss-plot").get_by_text("mean of 20")).to_be_visible()  # the legend is not cut off
    for plot in ("#loss-plot", "#validation-plot"):  # whole steps on the step axis (it drew 0.5, 1.0, 1.5)
        ticks = page.evaluate("""plot => [...document.querySelectorAll(plot + ' .role-axis')]
            .filter(axis => axis.querySelector('.role-axis-title')?.textContent === 'step')
            .flatMap(axis => [...axis.querySelectorAll('.role-axis-label text')].map(t => t.textContent))""", plot)
        assert ticks and all(re.fullmatch(r"\d+", tick) for tick in ticks), (plot, ticks)
    page.locator("#validation-plot").scroll_into_view_if_needed()
    _screenshot(page, "train-tab-job-validation")


def test_trigger_words_beside_the_sliders_and_a_whole_grid(page):
    """The Generate tab names each style's trigger word, adds it to the prompt, and draws a scale grid whole."""
    page, workspace = page
    from playwright.sync_api import expect

    from styles.library import StyleLibrary
    from tests.conftest import train_style

    expect.set_options(timeout=STEP_TIMEOUT_MS)
    library = StyleLibrary(workspace)  # styles in the library: the page picks them up
    train_style(library, "sunset", seed=3, steps=4, num_samples=0, trigger="snst")
    train_style(library, "ink", seed=1, steps=4, num_samples=0)
    copies = ("ink-2", "ink-3", "ink-4", "ink-5", "ink-6")  # seven styles: their sliders must not push Generate
    for copy in copies:  # and its picture below the fold
        shutil.copy(library.path_for("ink"), library.path_for(copy))

    page.set_viewport_size({"width": 1280, "height": 800})
    page.get_by_role("tab", name="Generate").click()
    expect(page.get_by_label("number input for ink-6")).to_be_attached()
    for part in (page.get_by_role("button", name="Generate", exact=True), page.locator(".tiles.big").first):
        box = part.bounding_box()
        assert box["y"] + min(box["height"], 200) < 800, box
    expect(page.get_by_text("trigger: snst")).to_be_visible()
    expect(page.get_by_text("trigger: ink", exact=True).first).to_be_visible()
    checkbox = page.get_by_label("Add the trigger words of the styles in use to the prompt")
    expect(checkbox).to_be_checked()
    number = page.get_by_label("number input for sunset")
    number.fill("0.8")
    number.press("Enter")
    steps = page.get_by_label("number input for Steps")
    steps.fill("4")
    steps.press("Enter")
    page.get_by_role("button", name="Generate", exact=True).click()
    expect(page.get_by_text(re.compile(r"prompt used: a red circle, snst"))).to_be_visible()
    _screenshot(page, "generate-tab-trigger-words")

    # A long generation shows its step, and Stop ends it as news, not as an error (issue 18, item 10).
    steps.fill("100")
    steps.press("Enter")
    page.get_by_role("button", name="Generate", exact=True).click()
    expect(page.locator("#generation-status")).to_contain_text(re.compile(r"Drawing: step \d+ of 100"))
    page.get_by_role("button", name="Stop", exact=True).click()
    expect(page.get_by_text(re.compile(r"Generation cancelled at step \d+ of 100\. Nothing was saved\."))
           ).to_be_visible()
    expect(page.locator("#generation-status")).to_have_text("")
    assert not page.get_by_text("Error", exact=True).is_visible()
    steps.fill("4")
    steps.press("Enter")

    for copy in copies:  # the grid of two styles
        library.delete(copy)
    expect(page.get_by_label("number input for ink-6")).to_have_count(0)
    page.get_by_text("Scale grid: styles or seeds across scales, in one picture", exact=True).click()
    page.get_by_role("button", name="Draw grid").click()
    expect(page.get_by_text(re.compile(r"Grid of 2 rows × 5 scales \(seed 0"))).to_be_visible()
    picture = page.locator("#grid-image img").first
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=picture.element_handle())
    shown = _whole(page, picture)
    assert shown["whole"] and shown["drawn"][0] >= 0.9 * min(shown["natural"][0], 1100), shown  # whole, and big
    grids = list((workspace / "outputs").glob("grid-*.png"))
    assert len(grids) == 1
    picture.scroll_into_view_if_needed()
    _screenshot(page, "generate-tab-grid")
    page.set_viewport_size({"width": 1280, "height": 1600})

    from core.files import read_safetensors_header

    # Issue 20: a blend of two styles, ink on the up blocks only, saved as a style; it gets a slider, and its
    # download is a kohya file (sd-scripts' names) that holds the blend.
    number = page.get_by_label("number input for ink")
    number.fill("0.5")
    number.press("Enter")
    page.get_by_text("Blend: blocks, steps, restyle a picture, save", exact=True).click()
    table = page.locator("#blend-table")
    expect(table.locator('[data-testid="cell-0-0"]')).to_contain_text("ink")
    _edit_cell(table, 0, 1, "look only")  # rows in library order: ink, sunset
    page.get_by_label("Save the blend as a style named").fill("sunset-ink")
    page.get_by_role("button", name="Save as style").click()
    expect(page.get_by_text("Saved the blend as style sunset-ink (exact).")).to_be_visible()
    expect(page.get_by_label("number input for sunset-ink")).to_be_attached()
    page.locator("#blend-form").scroll_into_view_if_needed()
    _screenshot(page, "generate-tab-blend-saved")
    page.get_by_role("tab", name="Styles").click()
    page.get_by_label("Style", exact=True).click()
    page.get_by_role("option", name="sunset-ink").click()
    page.get_by_role("radio", name=re.compile("^kohya")).check()
    page.get_by_role("button", name="Download .safetensors").click()
    expect(page.locator("#style-download").get_by_role("cell", name="sunset-ink.safetensors")).to_be_visible()
    exported = json.loads(read_safetensors_header(library.path_for("sunset-ink"))[0]["style_studio.blend_of"])
    assert exported["styles"] == {"ink": 0.5, "sunset": 0.8} and exported["blocks"] == {"ink": "look only"}
