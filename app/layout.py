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
from styles.blend import DEFAULT_GUIDANCE, DEFAULT_STEPS, DEFAULT_STRENGTH
from trainer.config import DEFAULT_CAPTION_TEMPLATE, DEFAULT_PRESET, PRESETS
from trainer.data import MB

REFRESH_EVERY_S = 3.0  # styles trained or deleted elsewhere appear in every open page
JOBS_EVERY_S = 2.0  # the queue table and the job picker follow jobs started elsewhere
FOLLOW_EVERY_S = 1.0  # the picked job's status, loss chart and pictures
# Tiny images scaled up stay crisp; the caption editor's thumbnails have one size whatever the picture's.
# Gallery tiles (issue 18): the picture in a square, its caption on a line below it (an overlaid caption hid the
# picture's bottom and was cut off), never object-fit: cover (Gradio's default in the preview's strip).
# Many styles' sliders scroll in their box, in one column (a flex box of limited height wrapped them side by side).
CAPTION_PX = 34  # the caption under a tile's picture: two lines, so a style's name and trigger word are not cut off
CSS = f""".pixelated img {{ image-rendering: pixelated; }}
#caption-editor img {{ width: 80px; height: 80px; object-fit: contain; image-rendering: pixelated; }}
.pixelated img {{ object-fit: contain !important; }}
.pixelated .grid-container {{ padding-top: 32px; }}
.pixelated .thumbnail-lg {{ display: flex; flex-direction: column; align-items: center; justify-content: center;
                           aspect-ratio: auto; }}
.pixelated .thumbnail-lg > img {{ flex: 1 1 0; min-height: 0; }}
.pixelated img.fitted {{ flex: none; margin: auto; }}
.pixelated .caption-label {{ position: static; max-width: 100%; width: 100%; flex: none; height: {CAPTION_PX}px;
                            border: none; border-top: 1px solid var(--border-color-primary); border-radius: 0;
                            text-align: center; white-space: normal; line-height: 1.25; padding: 1px 4px;
                            display: -webkit-box; -webkit-line-clamp: 2; -webkit-box-orient: vertical; }}
.tiles {{ --tile: 192px; }}
.tiles.small {{ --tile: 128px; }}
.tiles.big {{ --tile: 512px; }}
.tiles .grid-container {{ grid-template-columns: repeat(var(--grid-cols), minmax(0, calc(var(--tile) + 2px)))
                         !important; grid-template-rows: none !important;
                         grid-auto-rows: calc(var(--tile) + {CAPTION_PX}px + 2px) !important; }}
#style-sliders {{ max-height: 46vh; overflow-y: auto; overflow-x: hidden; flex-wrap: nowrap !important; }}
#style-sliders > *, #style-sliders .form {{ flex: none !important; flex-wrap: nowrap !important; }}"""

# A picture in a .pixelated gallery is drawn at a whole multiple of its size, the largest that fits its tile (a
# 64 px picture in a 192 px tile: 3x), so its pixels stay square; bigger than its tile, it is scaled down to fit.
# CSS cannot read an image's natural size, hence this script; it refits when a tile's size changes (a tab shown).
FIT_JS = """() => {
  const fit = img => {
    if (!img.naturalWidth || !img.closest('.pixelated')) return;
    img.classList.remove('fitted'); img.style.width = img.style.height = '';
    const room = img.getBoundingClientRect();
    const k = Math.floor(Math.min(room.width / img.naturalWidth, room.height / img.naturalHeight));
    if (k < 1) return;
    img.classList.add('fitted');
    img.style.width = img.naturalWidth * k + 'px'; img.style.height = img.naturalHeight * k + 'px';
  };
  const tiles = new ResizeObserver(entries =>
    entries.forEach(e => e.target.querySelectorAll('img').forEach(fit)));
  const watch = img => {
    if (!img.closest('.pixelated')) return;
    tiles.observe(img.parentElement);  // its first report fits the picture once it is laid out
    if (img.complete) fit(img);
  };
  // A picture loads (a new src), or is put in the page already loaded (from the cache: its load event fired
  // before it was in the document, where this listener does not hear it).
  document.addEventListener('load', e => { if (e.target.tagName === 'IMG') watch(e.target); }, true);
  new MutationObserver(records => records.forEach(r => r.addedNodes.forEach(node => {
    if (node.nodeType === 1) (node.tagName === 'IMG' ? [node] : node.querySelectorAll('img')).forEach(watch);
  }))).observe(document.body, {childList: true, subtree: true});
}"""


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
        page.demo.load(None, js=FIT_JS)  # in the browser only: pictures at a whole multiple of their size
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
        page.example_images = _gallery("Some of its images", 8, "tiles small", height=_tiles_height(128),
                                       value=handlers.example_preview(next(iter(EXAMPLES))))
    limits = studio.limits
    page.files = gr.File(label=f"Images: files or a zip (optional .txt captions with the same name); up to "
                               f"{limits.max_file_bytes // MB} MB a file, {limits.max_files} files and "
                               f"{limits.max_total_bytes // MB} MB in all", file_count="multiple",
                         height=220, elem_id="training-files")
    # No file_types: Gradio's own check refused a whole upload for one file of another type, naming none; our
    # ingest (trainer/data.py) names each file it cannot use and why, and the rest still trains.
    _caption_editor(page)
    with gr.Row():
        page.style_name = gr.Textbox(label="Style name", placeholder="my-style")
        page.trigger = gr.Textbox(label="Trigger word", placeholder="defaults to the style name")
    page.caption_template = gr.Textbox(value=DEFAULT_CAPTION_TEMPLATE, label="Caption template",
                                       info="For images with neither a .txt caption nor one from the captioner; "
                                            "{trigger} becomes the trigger word.")
    page.preset = gr.Radio(list(PRESETS), value=DEFAULT_PRESET, label="Preset")
    with gr.Accordion("Advanced", open=False):
        # The chosen preset's values, filled in (blank boxes said only "preset's value"); three to a row.
        values = handlers.preset_values(studio, DEFAULT_PRESET)
        on_gpu = str(studio.base.device).startswith("cuda")
        page.advanced = {}
        for start in range(0, len(ADVANCED_FIELDS), 3):
            with gr.Row():
                for f in ADVANCED_FIELDS[start:start + 3]:
                    page.advanced[f.name] = _advanced_control(f, values[f.name], on_gpu or not handlers.cuda_only(f))
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
            datatype=["markdown", "str", "str", "str", "str"], interactive=True, static_columns=[0, 1, 3, 4],
            wrap=True, column_widths=["104px", "20%", "46%", "11%", "11%"],
            label="Captions (only the caption column is editable; 'trains at': the picture's aspect-ratio bucket)",
            elem_id="caption-editor", max_height=640,
        )
        page.caption_rows = gr.State([])  # the rows as captioned, to tell the user's edits from them


def _gallery(label: str, columns: int, tile: str = "", **options) -> gr.Gallery:
    """A gallery that shows each picture whole, in square tiles, `columns` to a row.

    Gradio's default (fit_columns) stretched a lone picture to the full width, a square tile taller than
    the gallery's box, which showed a band of it. `tile` "" shares the width between the columns; "tiles"
    (192 px), "tiles small" (128 px) or "tiles big" (512 px) makes tiles of that size, so a row of a few small
    pictures stays small; FIT_JS draws each picture at a whole multiple of its size.
    """
    classes = ["pixelated", *tile.split()]
    return gr.Gallery(label=label, columns=columns, fit_columns=False, object_fit="contain", elem_classes=classes,
                      **options)


def _tiles_height(tile: int, rows: int = 1) -> int:
    """A tiled gallery's height for `rows` rows of `tile` px pictures: its label, the rows (picture, caption,
    borders, gaps), its padding; more rows scroll."""
    return 32 + rows * (tile + CAPTION_PX + 2) + (rows - 1) * 16 + 24


def _advanced_control(field, value, visible: bool = True):
    """A control for one TrainConfig field, showing `value`; empty means 'use the preset's value'.
    CUDA-only settings are hidden on a machine without CUDA (`visible`)."""
    meta = field.metadata
    label = field_label(field)
    info = meta["help"] + " Empty: the preset's value."
    if "choices" in meta:
        return gr.Dropdown(choices=list(meta["choices"]), value=value, label=label, info=info, visible=visible)
    if typing.get_origin(field.type) is list or str(field.type).startswith("list"):
        return gr.Textbox(value=value, label=label, info=info + " Comma-separated.", visible=visible,
                          placeholder=", ".join(field.default_factory()))
    # A text box, not gr.Number: a Number shows and sends 0 once its accordion opens, so "empty: the
    # preset's value" would turn into rank 0 for anyone who only meant to change the steps. Ranges are
    # left to TrainConfig.validate(), whose message names the field.
    return gr.Textbox(value=value, label=label, info=info, placeholder="preset's value", visible=visible,
                      elem_id=f"advanced-{field.name}")


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
    page.loss_plot = gr.LinePlot(x="step", y="loss", color="series", title="Loss", label="Loss", elem_id="loss-plot",
                                 x_axis_format="d")
    page.samples = _gallery("Samples", 4, "tiles", height=_tiles_height(192))  # a row of tiles; more rows scroll
    page.validation_plot = gr.LinePlot(
        x="step", y="score", title="Validation score on held-out prompts (0: the base model; higher: more style)",
        label="Validation score", elem_id="validation-plot", x_axis_format="d")
    page.validation_strip = _gallery("Validation pictures: one row per checkpoint, newest first; ★ the best", 4,
                                     "tiles", height=handlers.STRIP_TOP_PX + handlers.STRIP_ROW_PX,
                                     elem_id="validation-strip")
    page.jobs = gr.Dataframe(headers=JOB_COLUMNS, interactive=False, label="Queue and history")
    page.known_job_ids = gr.State(None)
    page.job_seen = gr.State(None)  # what the job view shows now (handlers.tick_job sends only changes)
    page.api_follow = gr.Button(visible=False)  # API: stream a job until it ends


def _generate_tab(page: Page, studio: Studio) -> None:
    # Two columns, the form left and Generate with its output right: with many styles, their sliders pushed the
    # button and the picture below the fold (issue 18).
    with gr.Row(equal_height=False):
        with gr.Column(scale=1):
            page.prompt = gr.Textbox(label="Prompt", value="a red circle")
            page.negative = gr.Textbox(label="Negative prompt")
            with gr.Row():
                # No precision: gradio's own rounding crashed on NaN before our check could name it (issue 18).
                page.seed = gr.Number(value=0, label="Seed (-1: random)", min_width=120)
                page.reuse_seed = gr.Button("♻ Reuse last seed", size="sm", min_width=80)
                page.width = gr.Number(value=studio.base.resolution, label="Width", min_width=80)
                page.height = gr.Number(value=studio.base.resolution, label="Height", min_width=80)
            with gr.Row():
                page.steps = gr.Slider(1, 100, value=DEFAULT_STEPS, step=1, label="Steps")
                page.guidance = gr.Slider(0, 20, value=DEFAULT_GUIDANCE, step=0.5, label="Guidance")
            _style_sliders(page, studio)
            page.add_triggers = gr.Checkbox(value=True,
                                            label="Add the trigger words of the styles in use to the prompt")
            _blend_form(page, studio)
            page.png_info = gr.File(label="PNG info: drop a picture made here (or in AUTOMATIC1111) to fill the form "
                                          "with its recipe", type="filepath", height=150, elem_id="png-info")
        with gr.Column(scale=1):
            with gr.Row():
                page.generate_button = gr.Button("Generate", variant="primary", scale=4)
                page.stop_generation = gr.Button("Stop", variant="stop", scale=1, min_width=80)
            page.generation_status = gr.Markdown(elem_id="generation-status")  # place in line, step of steps
            page.api_queue = gr.Button(visible=False)  # API only: where this client's generation stands
            # API only: /generate and /save_blend with blocks and bands as JSON ({style: setting})
            page.api_generate, page.api_save_blend = gr.Button(visible=False), gr.Button(visible=False)
            page.api_blocks = gr.JSON(value=None, visible=False, label="blocks")
            page.api_bands = gr.JSON(value=None, visible=False, label="bands")
            page.api_mode = gr.Textbox(value="sum", visible=False, label="mode")  # sum | ties | elect (styles/mix)
            page.info = gr.Markdown(label="Info")
            page.gallery = _gallery("Output", 1, "tiles big", format="png", height=_tiles_height(512))
    page.last_seed = gr.State(None)  # the seed of the last picture: what "Reuse last seed" puts back
    # Who a generation belongs to: one id per page (or API client session), so Stop cancels only its own.
    page.owner = gr.State(handlers.new_owner)
    page.status_timer = gr.Timer(1.0, active=False)  # ticks only while this page's generation waits or runs
    _grid_form(page)


def _blend_form(page: Page, studio: Studio) -> None:
    """Beyond the sliders (issue 20): each style's block strengths and step band, the blend mode, a start picture
    to restyle, saving the blend as a style, and named blends."""
    with gr.Accordion("Blend: blocks, steps, restyle a picture, save", open=False, elem_id="blend-form"):
        # The styles add up (as A1111 and ComfyUI blend). The sign-electing modes of styles/mix.py stay off the page:
        # measured by bench/blend_mix, neither kept more of each style in a mix than the sum (issue 20).
        page.blend_mode = gr.State("sum")
        page.blend_table = gr.Dataframe(
            value=handlers.blend_table(studio.library.names()), headers=handlers.BLEND_COLUMNS,
            datatype=["str", "str", "number", "number"], interactive=True, static_columns=[0], wrap=True,
            label="Per style: blocks (all, look only, layout only, or down=0, mid=0.5, up=1, up.1=1.2, text=1) and "
                  "the steps it is on, from % to %", elem_id="blend-table")
        with gr.Row():
            page.start_image = gr.Image(label="Restyle a picture (optional start image)", type="filepath",
                                        height=160, sources=["upload"], elem_id="start-image")
            page.strength = gr.Slider(0.05, 1, value=DEFAULT_STRENGTH, step=0.05, label="Strength",
                                      info="How much of the picture is redrawn")
        with gr.Row():
            page.blend_name = gr.Textbox(label="Save the blend as a style named", min_width=160)
            page.blend_rank = gr.Number(value=0, label="Rank (0: exact)", precision=0, minimum=0, min_width=100)
            page.save_blend = gr.Button("Save as style", size="sm", min_width=100)
        with gr.Row():
            page.mix_name = gr.Textbox(label="Blend name", min_width=120)
            page.save_mix = gr.Button("Save blend", size="sm", min_width=90)
            page.mix_picker = gr.Dropdown(studio.mixes(), value=None, label="Saved blends", min_width=140)
            page.load_mix = gr.Button("Load", size="sm", min_width=70)
        page.blend_message = gr.Markdown()


def _style_sliders(page: Page, studio: Studio) -> None:
    """One slider per style, 0 (off) to 2; with "Allow negative scales", -2 to 2. In a box that scrolls."""
    page.allow_negative = gr.Checkbox(value=False, label="Allow negative scales (push away from a style)")
    page.slider_min = gr.State(0.0)  # the sliders' low end: 0, or -2 with negative scales allowed

    # Drawn from the live blend, when the set of styles changes (slider_values: a refresh, a PNG's recipe) or the
    # range does; a slider's own moves change the blend only, in the browser.
    @gr.render(inputs=[page.known_names, page.blend, page.slider_min],
               triggers=[page.demo.load, page.known_names.change, page.slider_values.change, page.slider_min.change])
    def style_sliders(names, values, low):
        with gr.Column(elem_id="style-sliders", variant="panel"):
            gr.Markdown("**Styles** (0 turns a style off)" if names else "No styles yet: train one in the Train tab.")
            triggers = {info.name: info.trigger for info in studio.library.list()}
            for name in names or []:
                # From 0, not -2: a slider at 0 drawn from -2 looked half on.
                slider = gr.Slider(low or 0, 2, value=(values or {}).get(name, 0.0), step=0.05,
                                   label=name, info=f"trigger: {triggers.get(name, name)}")
                # Updated in the browser, not on the server: two sliders moved in quick succession
                # would each send the blend as it was before the other's update, and one move would be lost.
                slider.change(
                    None, [slider, page.blend], page.blend, api_visibility="private", show_progress="hidden",
                    js=f"(value, current) => ({{...(current || {{}}), {json.dumps(name)}: value}})",
                )


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
    page.thumbs = _gallery("Styles", 5, "tiles", height=_tiles_height(192))
    page.table = gr.Dataframe(headers=STYLE_COLUMNS, interactive=False)
    page.style_problems = gr.Markdown(elem_id="style-problems")  # files that cannot be used, each with its reason
    page.picker = gr.Dropdown(label="Style", choices=[], allow_custom_value=True)  # the API names any style
    with gr.Row():
        page.new_name = gr.Textbox(label="New name")
        page.rename_button = gr.Button("Rename")
        with gr.Column(min_width=160):
            page.delete_button = gr.Button("Delete", variant="stop")
            page.confirm_delete = gr.Button("Confirm delete", variant="stop", visible=False, elem_id="confirm-delete")
        page.delete_pending = gr.State(None)  # the style Delete asked about: the only one Confirm deletes
        page.export_layout = gr.Radio(
            [("kohya: AUTOMATIC1111, ComfyUI, Forge, sd-scripts, diffusers", "kohya"),
             ("diffusers / PEFT: diffusers and PEFT code only (plain LoRA)", "diffusers")],
            value="kohya", label="Download layout",
        )
        page.export_button = gr.Button("Download .safetensors")
    page.styles_message = gr.Markdown(label="Message")  # beside the buttons it answers, not below the import form
    page.download = gr.File(label="Download", elem_id="style-download", height=90)
    with gr.Row():
        page.import_file = gr.File(label="Import an adapter made elsewhere (.safetensors: LoRA, LoCon, LoHa, LoKr, "
                                         "DoRA; kohya, ComfyUI, diffusers or PEFT layout)",
                                   type="filepath")  # any suffix: a .ckpt gets our message, not a bare refusal
        page.import_name = gr.Textbox(label="Name for it (default: the file's name)")
        page.import_button = gr.Button("Import")
    # API-only endpoints: delete, rename and import in one call, without the page's confirm step and form clearing
    page.api_delete, page.api_rename, page.api_import = (gr.Button(visible=False) for _ in range(3))


# -- events -----------------------------------------------------------------------------------------
def _refresh_styles(page: Page, studio: Studio) -> dict:
    """The arguments of the event that re-reads the library into the sliders, table, gallery and picker."""
    return dict(fn=bind(handlers.refresh_styles, studio, page),
                inputs=[page.blend, page.known_names, page.grid_styles, page.picker],
                outputs=[page.slider_values, page.known_names, page.blend, page.table, page.style_problems,
                         page.thumbs, page.picker, page.grid_styles], api_visibility="private",
                show_progress="hidden")


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
                         inputs=[page.files, page.caption_template, page.advanced["auto_caption"],
                                 page.advanced["bucketing"]],
                         outputs=[page.captions, page.caption_rows, page.caption_note], api_visibility="private")
    page.files.change(**show_captions)
    page.caption_button.click(**show_captions)
    page.api_caption.click(bind(handlers.caption_images, studio), [page.files, page.caption_template],
                           [page.captions_json, page.caption_note], api_name="caption_images")
    page.save_preset_button.click(bind(handlers.save_preset, studio, page), [page.preset_name, page.preset],
                                  [page.preset_message, page.saved_presets], api_name="save_preset", **advanced)
    page.load_preset_button.click(bind(handlers.load_preset, studio, page), [page.saved_presets],
                                  [page.preset, *page.advanced.values()], api_name="load_preset")
    # .input, not .change: Load preset sets the preset too, and must not have its values overwritten.
    page.preset.input(bind(handlers.fill_preset, studio, page), [page.preset], list(page.advanced.values()),
                      api_visibility="private", show_progress="hidden")
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
    view = [*progress, page.job_seen]
    refresh_jobs = _refresh_jobs(page, studio)
    # Picking a job shows it at once; the timer keeps the picked job's view live (only changes are sent), from any
    # page, after any reload. The buttons act on the picker's value, which is the job shown.
    show = dict(fn=bind(handlers.show_job, studio, page), inputs=[page.job_picker, page.job_message],
                outputs=[*view, page.job_message], show_progress="hidden", api_visibility="private")
    page.job_picker.change(**show)
    gr.Timer(FOLLOW_EVERY_S).tick(bind(handlers.tick_job, studio, page), [page.job_picker, page.job_seen],
                                  [*view, page.job_message], show_progress="hidden", api_visibility="private")
    page.api_follow.click(bind(handlers.follow_job, studio, page), [page.job_picker], progress, api_name="follow_job",
                          concurrency_limit=None)
    page.demo.load(**refresh_jobs)
    gr.Timer(JOBS_EVERY_S).tick(**refresh_jobs)
    gr.api(bind(handlers.list_jobs, studio), api_name="list_jobs")
    page.cancel_button.click(bind(handlers.cancel_job, studio), [page.job_picker], [page.job_message],
                             api_name="cancel_job").then(**refresh_jobs)
    page.resume_button.click(bind(handlers.resume_job, studio), [page.job_picker], [page.job_message],
                             api_name="resume_job").then(**show)
    page.keep_button.click(bind(handlers.keep_job, studio), [page.job_picker, page.keep_name], [page.job_message],
                           api_name="keep_job").then(**_refresh_styles(page, studio)).then(**refresh_jobs)
    page.discard_button.click(bind(handlers.discard_job, studio), [page.job_picker], [page.job_message],
                              api_name="discard_job").then(**refresh_jobs)


def _wire_styles(page: Page, studio: Studio) -> None:
    refresh = _refresh_styles(page, studio)
    page.demo.load(**refresh)
    gr.Timer(REFRESH_EVERY_S).tick(**refresh)
    options = [page.negative, page.seed, page.steps, page.guidance, page.width, page.height]
    # Generations wait in the engine's own line (styles.generation), not in gradio's queue: there each has a
    # place to show and can be stopped, while it waits or between two denoising steps (issue 18).
    watch = dict(fn=handlers.watch_generation, outputs=[page.status_timer], api_visibility="private",
                 show_progress="hidden", queue=False)
    unwatch = dict(fn=bind(handlers.watch_generation, False), outputs=[page.status_timer, page.generation_status],
                   api_visibility="private", show_progress="hidden", queue=False)  # .then: after an error too
    page.generate_button.click(**watch).then(
        bind(handlers.generate_form, studio, page),
        [page.prompt, *options, page.blend, page.add_triggers, page.owner, page.blend_table, page.blend_mode,
         page.start_image, page.strength],
        [page.gallery, page.info, page.last_seed], api_visibility="private", concurrency_limit=None).then(**unwatch)
    # The API's /generate: blocks and bands as JSON (the page sends its blend table through generate_form).
    page.api_generate.click(
        bind(handlers.generate, studio, page),
        [page.prompt, *options, page.blend, page.add_triggers, page.owner, page.api_blocks, page.api_bands,
         page.api_mode, page.start_image, page.strength],
        [page.gallery, page.info, page.last_seed], api_name="generate", concurrency_limit=None)
    page.save_blend.click(bind(handlers.save_blend_form, studio),
                          [page.blend_name, page.blend, page.blend_table, page.blend_mode, page.blend_rank],
                          [page.blend_message], api_visibility="private").then(**refresh)
    page.api_save_blend.click(bind(handlers.save_blend, studio),
                              [page.blend_name, page.blend, page.api_blocks, page.api_mode, page.blend_rank],
                              [page.blend_message], api_name="save_blend").then(**refresh)
    page.save_mix.click(bind(handlers.save_mix, studio), [page.mix_name, page.blend, page.blend_table, page.blend_mode],
                        [page.mix_picker, page.blend_message], api_visibility="private")
    page.load_mix.click(bind(handlers.load_mix, studio, page), [page.mix_picker],
                        [page.blend, page.slider_values, page.allow_negative, page.blend_table, page.info],
                        api_visibility="private")
    page.known_names.change(handlers.blend_rows, [page.known_names, page.blend_table], [page.blend_table],
                            api_visibility="private", show_progress="hidden")
    page.status_timer.tick(bind(handlers.generation_status, studio), [page.owner], [page.generation_status],
                           api_visibility="private", show_progress="hidden", concurrency_limit=None)
    page.stop_generation.click(bind(handlers.cancel_generation, studio), [page.owner], [page.generation_status],
                               api_name="cancel_generation", concurrency_limit=None)
    page.api_queue.click(bind(handlers.generation_status, studio), [page.owner], [page.generation_status],
                         api_name="generation_queue", concurrency_limit=None)
    page.reuse_seed.click(handlers.reuse_seed, [page.last_seed, page.seed], [page.seed], api_visibility="private")
    page.allow_negative.change(handlers.negative_scales, [page.blend, page.allow_negative],
                               [page.blend, page.slider_min], api_visibility="private", show_progress="hidden")
    form = [page.prompt, page.negative, page.seed, page.steps, page.guidance, page.width, page.height]
    page.png_info.upload(bind(handlers.png_info, studio, page), [page.png_info],
                         [*form, page.blend, page.slider_values, page.allow_negative, page.blend_table,
                          page.info], api_visibility="private")
    grid = [page.prompt, page.grid_rows, page.grid_styles, page.grid_seeds, page.grid_scales]
    page.grid_button.click(**watch).then(
        bind(handlers.generate_grid, studio, page), [*grid, *options, page.add_triggers, page.owner],
        [page.grid_image, page.grid_info], api_name="generate_grid", concurrency_limit=None).then(**unwatch)
    gr.api(bind(handlers.list_styles, studio), api_name="list_styles")
    page.export_button.click(bind(handlers.export_style, studio), [page.picker, page.export_layout], [page.download],
                             api_name="export_style")
    page.api_import.click(bind(handlers.import_style, studio), [page.import_file, page.import_name],
                          [page.styles_message], api_name="import_style").then(**refresh)
    page.api_delete.click(bind(handlers.delete_style, studio), [page.picker], [page.styles_message],
                          api_name="delete_style").then(**refresh)
    page.api_rename.click(bind(handlers.rename_style, studio), [page.picker, page.new_name], [page.styles_message],
                          api_name="rename_style").then(**refresh)
    private = dict(api_visibility="private")
    page.import_button.click(bind(handlers.import_form, studio, page), [page.import_file, page.import_name],
                             [page.styles_message, page.picker, page.import_name, page.import_file], **private
                             ).then(**refresh)
    page.rename_button.click(bind(handlers.rename_form, studio, page), [page.picker, page.new_name],
                             [page.styles_message, page.picker, page.new_name], **private).then(**refresh)
    # Delete asks first; Confirm deletes the style it named; picking another style takes the question back.
    page.delete_button.click(bind(handlers.ask_delete, studio, page), [page.picker],
                             [page.confirm_delete, page.delete_pending, page.styles_message], **private)
    page.confirm_delete.click(bind(handlers.confirm_delete, studio, page), [page.delete_pending],
                              [page.styles_message, page.confirm_delete, page.delete_pending], **private
                              ).then(**refresh)
    page.picker.input(bind(handlers.cancel_delete, page), [page.picker], [page.confirm_delete, page.delete_pending],
                      show_progress="hidden", **private)
