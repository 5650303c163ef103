"""The Gradio page: places the components of the Train, Generate and Styles tabs, and wires each event
to its handler in app/handlers.py. Nothing here decides anything.

Controls for training settings are derived from TrainConfig's fields, never declared twice.
"""

from __future__ import annotations

import json
import typing
from types import SimpleNamespace

import gradio as gr

from app import handlers
from app.handlers import ADVANCED_FIELDS, JOB_COLUMNS, STYLE_COLUMNS, bind, field_label
from app.studio import Studio
from embedded.examples import EXAMPLES
from styles.blend import DEFAULT_GUIDANCE, DEFAULT_STEPS
from trainer.config import DEFAULT_CAPTION_TEMPLATE, DEFAULT_PRESET, PRESETS
from trainer.data import MB

REFRESH_EVERY_S = 3.0  # styles trained or deleted elsewhere appear in every open page
JOBS_EVERY_S = 2.0  # the queue table and the job picker follow jobs started elsewhere
CSS = ".pixelated img { image-rendering: pixelated; }"  # tiny images scaled up stay crisp


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
        page.example_images = gr.Gallery(value=handlers.example_preview(next(iter(EXAMPLES))),
                                         label="Some of its images", columns=8, height=110, elem_classes="pixelated")
    limits = studio.limits
    page.files = gr.File(label=f"Images: files or a zip (optional .txt captions with the same name); up to "
                               f"{limits.max_file_bytes // MB} MB a file, {limits.max_files} files and "
                               f"{limits.max_total_bytes // MB} MB in all", file_count="multiple",
                         file_types=["image", ".zip", ".txt"], height=220, elem_id="training-files")
    with gr.Row():
        page.style_name = gr.Textbox(label="Style name", placeholder="my-style")
        page.trigger = gr.Textbox(label="Trigger word", placeholder="defaults to the style name")
    page.caption_template = gr.Textbox(value=DEFAULT_CAPTION_TEMPLATE, label="Caption template",
                                       info="For images without a .txt caption; {trigger} becomes the trigger word.")
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
    page.api_train = gr.Button(visible=False)  # API-only endpoints: submit, then stream until the job ends
    page.api_example = gr.Button(visible=False)


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
    page.loss_plot = gr.LinePlot(x="step", y="loss", color="series", title="Loss", label="Loss", height=220)
    page.samples = gr.Gallery(label="Samples", columns=4, height=260, object_fit="contain", elem_classes="pixelated")
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
        for name in names or []:
            slider = gr.Slider(-2, 2, value=(values or {}).get(name, 0.0), step=0.05, label=name)
            # Updated in the browser, not on the server: two sliders moved in quick succession
            # would each send the blend as it was before the other's update, and one move would be lost.
            slider.change(
                None, [slider, page.blend], page.blend, api_visibility="private", show_progress="hidden",
                js=f"(value, current) => ({{...(current || {{}}), {json.dumps(name)}: value}})",
            )

    page.generate_button = gr.Button("Generate", variant="primary")
    page.gallery = gr.Gallery(label="Output", columns=4, height=360, elem_classes="pixelated", format="png")
    page.info = gr.Markdown(label="Info")


def _styles_tab(page: Page) -> None:
    page.thumbs = gr.Gallery(label="Styles", columns=6, height=200, elem_classes="pixelated")
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
    return dict(fn=bind(handlers.refresh_styles, studio, page), inputs=[page.blend, page.known_names],
                outputs=[page.slider_values, page.known_names, page.blend, page.table, page.thumbs, page.picker],
                api_visibility="private", show_progress="hidden")


def _refresh_jobs(page: Page, studio: Studio) -> dict:
    """The arguments of the event that re-reads the job queue into its table and picker."""
    return dict(fn=bind(handlers.refresh_jobs, studio, page), inputs=[page.job_picker, page.known_job_ids],
                outputs=[page.jobs, page.job_picker, page.known_job_ids], api_visibility="private",
                show_progress="hidden")


def _wire_training(page: Page, studio: Studio) -> None:
    advanced = dict(inputs_kwargs=page.advanced)  # every TrainConfig field, by name
    form = [page.files, page.style_name, page.trigger, page.caption_template, page.preset]
    progress = [page.status, page.loss_plot, page.samples]
    page.train_button.click(bind(handlers.submit_training, studio, page), form, [page.job_picker, page.job_message],
                            api_name="submit_training", **advanced)
    page.api_train.click(bind(handlers.train_style, studio, page), form, progress, api_name="train_style",
                         concurrency_limit=None, **advanced).then(**_refresh_styles(page, studio))
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
    progress = [page.status, page.loss_plot, page.samples]
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
    generate_inputs = [page.prompt, page.negative, page.seed, page.steps, page.guidance, page.width, page.height,
                       page.blend]
    page.generate_button.click(bind(handlers.generate, studio, page), generate_inputs, [page.gallery, page.info],
                               api_name="generate")
    gr.api(bind(handlers.list_styles, studio), api_name="list_styles")
    page.export_button.click(bind(handlers.export_style, studio), [page.picker, page.export_layout], [page.download],
                             api_name="export_style")
    page.import_button.click(bind(handlers.import_style, studio), [page.import_file, page.import_name],
                             [page.styles_message], api_name="import_style").then(**refresh)
    page.delete_button.click(bind(handlers.delete_style, studio), [page.picker], [page.styles_message],
                             api_name="delete_style").then(**refresh)
    page.rename_button.click(bind(handlers.rename_style, studio), [page.picker, page.new_name], [page.styles_message],
                             api_name="rename_style").then(**refresh)
