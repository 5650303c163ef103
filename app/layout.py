"""The Gradio page: places the components of the Train, Generate and Styles tabs, and wires each event
to its handler in app/handlers.py. Nothing here decides anything.

Controls for training settings are derived from TrainConfig's fields, never declared twice.
"""

from __future__ import annotations

import json
import typing
from types import SimpleNamespace

import gradio as gr
import pandas as pd

from app import handlers
from app.handlers import (
    ADVANCED_FIELDS,
    CAPTION_COLUMNS,
    GRID_SCALES,
    GRID_SEEDS,
    JOB_COLUMNS,
    STYLE_COLUMNS,
    bind,
    field_label,
)
from app.studio import Studio
from embedded.examples import EXAMPLES
from styles.blend import DEFAULT_GUIDANCE, DEFAULT_STEPS
from trainer.config import DEFAULT_CAPTION_TEMPLATE, DEFAULT_PRESET, PRESETS
from trainer.data import MB

REFRESH_EVERY_S = 3.0  # styles trained or deleted elsewhere appear in every open page
JOBS_EVERY_S = 2.0  # the queue table and the job picker follow jobs started elsewhere
# Tiny images scaled up stay crisp; the caption editor's thumbnails have one size whatever the picture's.
CSS = """.pixelated img { image-rendering: pixelated; }
#caption-editor img { width: 80px; height: 80px; object-fit: contain; image-rendering: pixelated; }
.tiles { --tile: 200px; }
.tiles.small { --tile: 128px; }
.tiles .grid-container { grid-template-columns: repeat(var(--grid-cols), minmax(0, var(--tile))) !important;
                         grid-template-rows: none !important; grid-auto-rows: var(--tile) !important;
                         padding-top: 32px; }"""  # below the gallery's label, not under it


class Page(SimpleNamespace):
    """The page's components by name (page.status, page.job_picker, ...; page.advanced: field -> control),
    and the Blocks they live in (page.demo). Handlers return {page.<component>: value} dicts."""


def build_ui(studio: Studio) -> Page:
    """The whole page for one studio, its events wired; serve it with page.demo.launch()."""
    page = Page()
    with gr.Blocks(title="Style Studio") as page.demo:
        gr.Markdown("# Style Studio\nTrain image styles on your own machine and blend them. "
                    f"Base model: `{studio.base.model_id}`")
        page.known_names = gr.State(None)  # the style names the sliders were drawn for
        page.slider_values = gr.State({})  # slider values at the time they were drawn
        page.blend = gr.JSON(value={}, visible=False, label="styles")  # {style: scale}, kept by the sliders
        with gr.Tab("Train"):
            _train_tab(page, studio)
            _jobs_panel(page)
        with gr.Tab("Generate"):
            _generate_tab(page, studio)
        with gr.Tab("Styles"):
            _styles_tab(page)
        _wire_training(page, studio)
        _wire_jobs(page, studio)
        _wire_styles(page, studio)
    return page


# -- layout -----------------------------------------------------------------------------------------
def _train_tab(page: Page, studio: Studio) -> None:
    with gr.Accordion("No images at hand? Train an example style in one click", open=True):
        with gr.Row():
            page.example = gr.Radio(
                [(f"{name}: {e.description}", name) for name, e in EXAMPLES.items()],
                value=next(iter(EXAMPLES)), label="Example style", scale=4,
            )
            page.example_button = gr.Button("Train this example", variant="secondary", scale=1)
        page.example_images = _gallery("Some of its images", 8, "tiles small", height=190,
                                       value=handlers.example_preview(next(iter(EXAMPLES))))
    limits = studio.limits
    page.files = gr.File(label=f"Images: files or a zip (optional .txt captions with the same name); up to "
                               f"{limits.max_file_bytes // MB} MB a file, {limits.max_files} files and "
                               f"{limits.max_total_bytes // MB} MB in all", file_count="multiple",
                         file_types=["image", ".zip", ".txt"], height=220, elem_id="training-files")
    _caption_editor(page)
    with gr.Row():
        page.style_name = gr.Textbox(label="Style name", placeholder="my-style")
        page.trigger = gr.Textbox(label="Trigger word", placeholder="defaults to the style name")
    page.caption_template = gr.Textbox(value=DEFAULT_CAPTION_TEMPLATE, label="Caption template",
                                       info="For images with neither a .txt caption nor one from the captioner; "
                                            "{trigger} becomes the trigger word.")
    page.preset = gr.Radio(list(PRESETS), value=DEFAULT_PRESET, label="Preset")
    with gr.Accordion("Advanced", open=False):
        page.advanced = {f.name: _advanced_control(f) for f in ADVANCED_FIELDS}
        with gr.Row():
            page.preset_name = gr.Textbox(label="Save these settings as", placeholder="my-preset", scale=2)
            page.save_preset_button = gr.Button("Save preset", scale=1)
            page.saved_presets = gr.Dropdown(label="Saved presets", choices=studio.preset_names(), value=None,
                                             allow_custom_value=True, scale=2)
            page.load_preset_button = gr.Button("Load preset", scale=1)
        page.preset_message = gr.Markdown()
    page.train_button = gr.Button("Train", variant="primary")
    # API-only endpoints: submit (captions as JSON), submit and stream until the job ends, caption an upload
    page.api_submit, page.api_train = gr.Button(visible=False), gr.Button(visible=False)
    page.api_example, page.api_caption = gr.Button(visible=False), gr.Button(visible=False)
    page.captions_json = gr.JSON(value=None, visible=False, label="captions")  # {image name: caption}


def _caption_editor(page: Page) -> None:
    with gr.Accordion("Captions: what each picture shows (check and edit them before training)", open=True):
        gr.Markdown(
            "Each caption says what is in its picture, so the style learns the look rather than the objects. "
            "**The trigger word is added to every caption at training** (unless the caption has it already); "
            "`{trigger}` in a caption becomes the trigger word, and an empty caption falls back to the captioner or "
            "the template. Source: `.txt` (a caption file uploaded with the picture), `captioner` (the base "
            "model's captioner), `template` (the caption template below)."
        )
        page.caption_button = gr.Button("Caption images", size="sm")
        page.caption_note = gr.Markdown()
        page.captions = gr.Dataframe(
            value=pd.DataFrame(columns=CAPTION_COLUMNS), headers=CAPTION_COLUMNS,
            datatype=["markdown", "str", "str", "str"], interactive=True, static_columns=[0, 1, 3], wrap=True,
            column_widths=["104px", "22%", "52%", "12%"], label="Captions (only the caption column is editable)",
            elem_id="caption-editor", max_height=640,
        )
        page.caption_rows = gr.State([])  # the rows as captioned, to tell the user's edits from them


def _gallery(label: str, columns: int, tile: str = "", **options) -> gr.Gallery:
    """A gallery that shows each picture whole, in square tiles, `columns` to a row.

    Gradio's default (fit_columns) stretched a lone picture to the full width, a square tile taller than
    the gallery's box, which showed a band of it. `tile` "" shares the width between the columns; "tiles"
    (200 px) or "tiles small" (128 px) makes tiles of that size, so a row of a few small pictures stays small.
    """
    classes = ["pixelated", *tile.split()]
    return gr.Gallery(label=label, columns=columns, fit_columns=False, object_fit="contain", elem_classes=classes,
                      **options)


def _advanced_control(field):
    """A control for one TrainConfig field; empty means 'use the preset's value'."""
    meta = field.metadata
    label = field_label(field)
    info = meta["help"] + " Empty: the preset's value."
    if "choices" in meta:
        return gr.Dropdown(choices=list(meta["choices"]), value=None, label=label, info=info)
    if typing.get_origin(field.type) is list or str(field.type).startswith("list"):
        return gr.Textbox(value="", label=label, info=info + " Comma-separated.",
                          placeholder=", ".join(field.default_factory()))
    # A text box, not gr.Number: a Number shows and sends 0 once its accordion opens, so "empty: the
    # preset's value" would turn into rank 0 for anyone who only meant to change the steps. Ranges are
    # left to TrainConfig.validate(), whose message names the field.
    return gr.Textbox(value="", label=label, info=info, placeholder="preset's value", elem_id=f"advanced-{field.name}")


def _jobs_panel(page: Page) -> None:
    gr.Markdown("### Jobs\nOne job trains at a time; the others wait in the queue. Pick a job to follow it.")
    with gr.Row():
        page.job_picker = gr.Dropdown(label="Job", choices=[], allow_custom_value=True, scale=1)
        page.keep_name = gr.Textbox(label="Keep as style (empty: the job's name)", scale=2)
    with gr.Row():
        page.cancel_button = gr.Button("Cancel", variant="stop")
        page.resume_button = gr.Button("Resume")
        page.keep_button = gr.Button("Keep checkpoint as style")
        page.discard_button = gr.Button("Discard checkpoint")
    page.job_message = gr.Markdown()
    page.status = gr.Markdown(label="Status")
    # No fixed height: a fixed one cut off the colour legend below the loss chart.
    page.loss_plot = gr.LinePlot(x="step", y="loss", color="series", title="Loss", label="Loss", elem_id="loss-plot")
    page.samples = _gallery("Samples", 4, "tiles", height=262)  # a row of tiles; more rows scroll
    page.validation_plot = gr.LinePlot(
        x="step", y="score", title="Validation score on held-out prompts (0: the base model; higher: more style)",
        label="Validation score", elem_id="validation-plot")
    page.validation_strip = _gallery("Validation pictures: one row per checkpoint, newest first; ★ the best", 4,
                                     "tiles", height=handlers.STRIP_TOP_PX + handlers.STRIP_ROW_PX,
                                     elem_id="validation-strip")
    page.jobs = gr.Dataframe(headers=JOB_COLUMNS, interactive=False, label="Queue and history")
    page.known_job_ids = gr.State(None)


def _generate_tab(page: Page, studio: Studio) -> None:
    page.prompt = gr.Textbox(label="Prompt", value="a red circle")
    page.negative = gr.Textbox(label="Negative prompt")
    with gr.Row():
        page.seed = gr.Number(value=0, precision=0, label="Seed")
        page.steps = gr.Slider(1, 100, value=DEFAULT_STEPS, step=1, label="Steps")
        page.guidance = gr.Slider(0, 20, value=DEFAULT_GUIDANCE, step=0.5, label="Guidance")
        page.width = gr.Number(value=studio.base.resolution, precision=0, label="Width")
        page.height = gr.Number(value=studio.base.resolution, precision=0, label="Height")
    gr.Markdown("**Styles** (0 turns a style off; negative values push away from it)")

    @gr.render(inputs=[page.known_names, page.slider_values])
    def style_sliders(names, values):
        if not names:
            gr.Markdown("No styles yet: train one in the Train tab.")
        triggers = {info.name: info.trigger for info in studio.library.list()}
        for name in names or []:
            slider = gr.Slider(-2, 2, value=(values or {}).get(name, 0.0), step=0.05, label=name,
                               info=f"trigger: {triggers.get(name, name)}")
            # Updated in the browser, not on the server: two sliders moved in quick succession
            # would each send the blend as it was before the other's update, and one move would be lost.
            slider.change(
                None, [slider, page.blend], page.blend, api_visibility="private", show_progress="hidden",
                js=f"(value, current) => ({{...(current || {{}}), {json.dumps(name)}: value}})",
            )

    page.add_triggers = gr.Checkbox(value=True, label="Add the trigger words of the styles in use to the prompt")
    page.generate_button = gr.Button("Generate", variant="primary")
    page.gallery = _gallery("Output", 4, format="png")
    page.info = gr.Markdown(label="Info")
    _grid_form(page)


def _grid_form(page: Page) -> None:
    with gr.Accordion("Scale grid: styles or seeds across scales, in one picture", open=False):
        gr.Markdown("Columns are scales. Each cell sets the styles of its row to its column's scale and every other "
                    "style to 0 (the 0 column is the base model). **Styles** rows: each style alone, at the seed "
                    "above; **Seeds** rows: the chosen styles together, one row per seed. Prompt, size, steps and "
                    "guidance are those above.")
        with gr.Row():
            page.grid_rows = gr.Radio([("Styles (each alone)", "styles"), ("Seeds (the styles together)", "seeds")],
                                      value="styles", label="Rows")
            page.grid_styles = gr.Dropdown(choices=[], value=[], multiselect=True, label="Styles (empty: every style)",
                                           allow_custom_value=True)  # the API names any style; the grid checks them
        with gr.Row():
            page.grid_scales = gr.Textbox(value=GRID_SCALES, label="Scales (the columns)")
            page.grid_seeds = gr.Textbox(value=GRID_SEEDS, label="Seeds (the rows, when rows are seeds)")
        page.grid_button = gr.Button("Draw grid")
        # A whole image, never cropped: gr.Image fits the picture in its box (a gallery's tiles crop).
        page.grid_image = gr.Image(label="Grid", type="filepath", format="png", interactive=False, height=720,
                                   elem_id="grid-image")
        page.grid_info = gr.Markdown()


def _styles_tab(page: Page) -> None:
    page.thumbs = _gallery("Styles", 6, "tiles", height=262)
    page.table = gr.Dataframe(headers=STYLE_COLUMNS, interactive=False)
    page.picker = gr.Dropdown(label="Style", choices=[], allow_custom_value=True)  # the API names any style
    with gr.Row():
        page.new_name = gr.Textbox(label="New name")
        page.rename_button = gr.Button("Rename")
        page.delete_button = gr.Button("Delete", variant="stop")
        page.export_layout = gr.Radio(
            [("kohya (A1111, ComfyUI, diffusers)", "kohya"), ("diffusers / PEFT", "diffusers")],
            value="kohya", label="Download layout",
        )
        page.export_button = gr.Button("Download .safetensors")
    page.download = gr.File(label="Download", elem_id="style-download")
    with gr.Row():
        page.import_file = gr.File(label="Import a LoRA made elsewhere (.safetensors: kohya, diffusers or PEFT)",
                                   type="filepath")  # any suffix: a .ckpt gets our message, not a bare refusal
        page.import_name = gr.Textbox(label="Name for it (default: the file's name)")
        page.import_button = gr.Button("Import")
    page.styles_message = gr.Markdown(label="Message")


# -- events -----------------------------------------------------------------------------------------
def _refresh_styles(page: Page, studio: Studio) -> dict:
    """The arguments of the event that re-reads the library into the sliders, table, gallery and picker."""
    return dict(fn=bind(handlers.refresh_styles, studio, page), inputs=[page.blend, page.known_names, page.grid_styles],
                outputs=[page.slider_values, page.known_names, page.blend, page.table, page.thumbs, page.picker,
                         page.grid_styles], api_visibility="private", show_progress="hidden")


def _refresh_jobs(page: Page, studio: Studio) -> dict:
    """The arguments of the event that re-reads the job queue into its table and picker."""
    return dict(fn=bind(handlers.refresh_jobs, studio, page), inputs=[page.job_picker, page.known_job_ids],
                outputs=[page.jobs, page.job_picker, page.known_job_ids], api_visibility="private",
                show_progress="hidden")


def _wire_training(page: Page, studio: Studio) -> None:
    advanced = dict(inputs_kwargs=page.advanced)  # every TrainConfig field, by name
    form = [page.files, page.style_name, page.trigger, page.caption_template, page.preset]
    progress = [page.status, page.loss_plot, page.samples]
    queued = [page.job_picker, page.job_message]
    page.train_button.click(bind(handlers.submit_form, studio, page), [*form, page.captions, page.caption_rows], queued,
                            api_visibility="private", **advanced)
    page.api_submit.click(bind(handlers.submit_training, studio, page), [*form, page.captions_json], queued,
                          api_name="submit_training", **advanced)
    page.api_train.click(bind(handlers.train_style, studio, page), [*form, page.captions_json], progress,
                         api_name="train_style", concurrency_limit=None, **advanced
                         ).then(**_refresh_styles(page, studio))
    # The caption editor fills itself when files are uploaded (or on its button); the API gets plain rows.
    show_captions = dict(fn=bind(handlers.show_captions, studio, page),
                         inputs=[page.files, page.caption_template, page.advanced["auto_caption"]],
                         outputs=[page.captions, page.caption_rows, page.caption_note], api_visibility="private")
    page.files.change(**show_captions)
    page.caption_button.click(**show_captions)
    page.api_caption.click(bind(handlers.caption_images, studio), [page.files, page.caption_template],
                           [page.captions_json, page.caption_note], api_name="caption_images")
    page.save_preset_button.click(bind(handlers.save_preset, studio, page), [page.preset_name, page.preset],
                                  [page.preset_message, page.saved_presets], api_name="save_preset", **advanced)
    page.load_preset_button.click(bind(handlers.load_preset, studio, page), [page.saved_presets],
                                  [page.preset, *page.advanced.values()], api_name="load_preset")
    page.example.change(handlers.example_preview, [page.example], [page.example_images], api_visibility="private",
                        show_progress="hidden")
    page.example_button.click(bind(handlers.submit_example, studio, page), [page.example, page.preset],
                              [page.files, page.style_name, page.job_picker, page.job_message],
                              api_name="submit_example")
    page.api_example.click(bind(handlers.train_example, studio, page), [page.example, page.preset],
                           [page.files, page.style_name, *progress], api_name="train_example",
                           concurrency_limit=None).then(**_refresh_styles(page, studio))


def _wire_jobs(page: Page, studio: Studio) -> None:
    progress = [page.status, page.loss_plot, page.samples, page.validation_plot, page.validation_strip]
    follow = bind(handlers.follow_job, studio, page)
    refresh_jobs = _refresh_jobs(page, studio)
    # Picking a job (or submitting one, which picks it) follows it until it ends, from any page, after any reload.
    page.job_picker.change(follow, [page.job_picker], progress, api_name="follow_job", show_progress="hidden",
                           concurrency_limit=None).then(**_refresh_styles(page, studio))
    page.demo.load(**refresh_jobs)
    gr.Timer(JOBS_EVERY_S).tick(**refresh_jobs)
    gr.api(bind(handlers.list_jobs, studio), api_name="list_jobs")
    page.cancel_button.click(bind(handlers.cancel_job, studio), [page.job_picker], [page.job_message],
                             api_name="cancel_job").then(**refresh_jobs)
    page.resume_button.click(bind(handlers.resume_job, studio), [page.job_picker], [page.job_message],
                             api_name="resume_job").then(follow, [page.job_picker], progress, show_progress="hidden",
                                                         api_visibility="private")
    page.keep_button.click(bind(handlers.keep_job, studio), [page.job_picker, page.keep_name], [page.job_message],
                           api_name="keep_job").then(**_refresh_styles(page, studio)).then(**refresh_jobs)
    page.discard_button.click(bind(handlers.discard_job, studio), [page.job_picker], [page.job_message],
                              api_name="discard_job").then(**refresh_jobs)


def _wire_styles(page: Page, studio: Studio) -> None:
    refresh = _refresh_styles(page, studio)
    page.demo.load(**refresh)
    gr.Timer(REFRESH_EVERY_S).tick(**refresh)
    options = [page.negative, page.seed, page.steps, page.guidance, page.width, page.height]
    page.generate_button.click(bind(handlers.generate, studio, page),
                               [page.prompt, *options, page.blend, page.add_triggers], [page.gallery, page.info],
                               api_name="generate")
    grid = [page.prompt, page.grid_rows, page.grid_styles, page.grid_seeds, page.grid_scales]
    page.grid_button.click(bind(handlers.generate_grid, studio, page), [*grid, *options, page.add_triggers],
                           [page.grid_image, page.grid_info], api_name="generate_grid")
    gr.api(bind(handlers.list_styles, studio), api_name="list_styles")
    page.export_button.click(bind(handlers.export_style, studio), [page.picker, page.export_layout], [page.download],
                             api_name="export_style")
    page.import_button.click(bind(handlers.import_style, studio), [page.import_file, page.import_name],
                             [page.styles_message], api_name="import_style").then(**refresh)
    page.delete_button.click(bind(handlers.delete_style, studio), [page.picker], [page.styles_message],
                             api_name="delete_style").then(**refresh)
    page.rename_button.click(bind(handlers.rename_style, studio), [page.picker, page.new_name], [page.styles_message],
                             api_name="rename_style").then(**refresh)
