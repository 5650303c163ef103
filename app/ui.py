"""The Gradio Blocks page: Train, Generate and Styles tabs, plus the named API endpoints.

Controls for training settings are derived from TrainConfig's fields, never declared twice.
Every handler turns a ValueError into gr.Error, so the user sees the message and the app keeps serving.
"""

from __future__ import annotations

import functools
import inspect
import time
import typing

import gradio as gr
import pandas as pd

from app.studio import Studio, describe
from styles.blend import DEFAULT_GUIDANCE, DEFAULT_STEPS
from trainer.config import DEFAULT_CAPTION_TEMPLATE, DEFAULT_PRESET, PRESETS, config_fields
from trainer.events import Failed, Finished, Sample, Step
from trainer.examples import EXAMPLES

TOP_FIELDS = ("style_name", "trigger", "caption_template")  # shown above the Advanced accordion
ADVANCED_FIELDS = [f for f in config_fields() if f.name not in TOP_FIELDS]
PROGRESS_EVERY_S = 0.5  # throttle UI updates from a fast training loop
REFRESH_EVERY_S = 3.0  # styles trained or deleted elsewhere appear in every open page
CSS = ".pixelated img { image-rendering: pixelated; }"  # tiny images scaled up stay crisp


def user_errors(fn):
    """Show ValueError / FileExistsError messages to the user instead of a stack trace."""

    def convert(err):
        return gr.Error(str(err), print_exception=False)

    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except (ValueError, FileExistsError) as err:
                raise convert(err) from None

    else:

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except (ValueError, FileExistsError) as err:
                raise convert(err) from None

    return wrapper


def advanced_control(field):
    """A control for one TrainConfig field; empty means 'use the preset's value'."""
    meta = field.metadata
    label = field.name.replace("_", " ").capitalize()
    info = meta["help"] + " Empty: the preset's value."
    if "choices" in meta:
        return gr.Dropdown(choices=list(meta["choices"]), value=None, label=label, info=info)
    if typing.get_origin(field.type) is list or str(field.type).startswith("list"):
        return gr.Textbox(value="", label=label, info=info + " Comma-separated.", placeholder=", ".join(field.default_factory()))
    precision = 0 if field.type in (int, "int") else None
    # No minimum/maximum here: TrainConfig.validate() refuses bad values with a message naming the field.
    return gr.Number(value=None, label=label, info=info, precision=precision)


def parse_advanced(values: dict) -> dict:
    settings = {}
    for field in ADVANCED_FIELDS:
        value = values.get(field.name)
        if value is None or value == "":
            continue
        if field.name == "target_modules":
            value = [part.strip() for part in str(value).split(",") if part.strip()]
        elif field.type in (int, "int"):
            value = int(value)
        elif field.type in (float, "float"):
            value = float(value)
        settings[field.name] = value
    return settings


def with_advanced_parameters(fn):
    """Give fn(..., **advanced) a signature naming every advanced field (default None).

    Gradio names API parameters after the function's parameters and makes those with a None
    default optional, so API clients can pass e.g. steps=50 and leave the rest to the preset.
    """

    signature = inspect.signature(fn)
    fixed = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    extra = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=None) for f in ADVANCED_FIELDS]
    fn.__signature__ = signature.replace(parameters=fixed + extra)
    return fn


def build_ui(studio: Studio) -> gr.Blocks:
    def stream_training(paths, preset, **settings):
        """Run a training job; yield (status, loss table, samples), throttled; raise ValueError if it fails."""
        events = studio.train(paths, preset or DEFAULT_PRESET, **settings)
        losses, samples, last_yield, status = [], [], 0.0, ""
        for event in events:
            status = describe(event)
            if isinstance(event, Step):
                losses.append((event.step, event.loss))
                if time.monotonic() - last_yield < PROGRESS_EVERY_S and event.step != event.total_steps:
                    continue
            if isinstance(event, Sample):
                samples = [(image, prompt) for image, prompt in zip(event.images, event.prompts)]
            last_yield = time.monotonic()
            yield status, pd.DataFrame(losses, columns=["step", "loss"]), samples
            if isinstance(event, Failed):
                raise ValueError(event.message)
        if not isinstance(event, Finished):
            raise ValueError(status)

    @with_advanced_parameters
    @user_errors
    def train_style(files, style_name, trigger=None, caption_template=None, preset=None, **advanced):
        """Train a style from uploaded images (files, a zip, .txt captions); streams progress.

        Every TrainConfig field is an optional keyword (rank, steps, learning_rate, ...): empty uses the preset.
        """
        yield from stream_training(
            [getattr(f, "name", f) for f in (files or [])],
            preset,
            style_name=(style_name or "").strip(),
            trigger=(trigger or "").strip(),
            caption_template=caption_template or DEFAULT_CAPTION_TEMPLATE,
            **parse_advanced(advanced),
        )

    @user_errors
    def train_example(example, preset=None):
        """Train one of the bundled example styles (no uploads needed); streams progress like train_style."""
        paths, name = studio.example(example)
        files_value = [str(path) for path in paths]
        yield files_value, name, f"Training the example style **{name}**…", None, []
        for update in stream_training(files_value, preset, style_name=name):
            yield files_value, name, *update

    def example_preview(example):
        return [(image, caption) for image, caption in EXAMPLES[example].images(8)] if example in EXAMPLES else []

    @user_errors
    def generate(prompt, negative_prompt=None, seed=0, steps=DEFAULT_STEPS, guidance=DEFAULT_GUIDANCE, width=0, height=0, styles=None):
        """Generate images with styles blended at the given scales, e.g. styles={"ink": 0.8}."""
        result = studio.generate(
            prompt,
            styles=styles or {},
            negative_prompt=negative_prompt or "",
            seed=int(seed or 0),
            steps=int(steps),
            guidance=float(guidance),
            width=int(width or 0),
            height=int(height or 0),
        )
        blend = ", ".join(f"{name} {scale:+.2f}" for name, scale in result.active.items()) or "none (base model)"
        notes = "".join(f"\n\n⚠ {w}" for w in result.warnings)
        return [str(p) for p in result.paths], f"Seed {int(seed or 0)} · styles: {blend}{notes}"

    def list_styles() -> list[dict]:
        """Every style in the library with its trigger word and training settings."""
        return studio.list_styles()

    @user_errors
    def export_style(name):
        """Download a style as .safetensors (diffusers layout: stock load_lora_weights reads it)."""
        return str(studio.export(name))

    @user_errors
    def delete_style(name):
        """Delete a style and its thumbnail from the library."""
        studio.delete(name)
        return f"Deleted **{name}**."

    @user_errors
    def rename_style(old, new):
        """Rename a style (its file and thumbnail)."""
        studio.rename(old, (new or "").strip())
        return f"Renamed **{old}** to **{new}**."

    def refresh(current_blend, known_names):
        """Re-read the library; update sliders, tables and pickers only when the set of styles changed."""
        names = studio.library.names()
        if known_names is not None and list(known_names) == names:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        blend = {name: (current_blend or {}).get(name, 0.0) for name in names}
        infos = studio.library.list()
        table = pd.DataFrame([info.summary() for info in infos], columns=STYLE_COLUMNS)
        thumbs = [(str(i.thumbnail), f"{i.name} · trigger: {i.trigger}") for i in infos if i.thumbnail]
        picker = gr.update(choices=names, value=names[0] if names else None)
        return blend, names, blend, table, thumbs, picker

    with gr.Blocks(title="Style Studio") as demo:
        gr.Markdown(f"# Style Studio\nTrain image styles on your own machine and blend them. Base model: `{studio.base.model_id}`")
        known_names = gr.State(None)  # the style names the sliders were drawn for
        slider_values = gr.State({})  # slider values at the time they were drawn
        blend = gr.JSON(value={}, visible=False, label="styles")  # {style: scale}, kept by the sliders

        with gr.Tab("Train"):
            with gr.Accordion("No images at hand? Train an example style in one click", open=True):
                with gr.Row():
                    example = gr.Radio(
                        [(f"{name}: {e.description}", name) for name, e in EXAMPLES.items()],
                        value=next(iter(EXAMPLES)), label="Example style", scale=4,
                    )
                    example_button = gr.Button("Train this example", variant="secondary", scale=1)
                example_images = gr.Gallery(value=example_preview(next(iter(EXAMPLES))), label="Some of its images",
                                            columns=8, height=110, elem_classes="pixelated")
            files = gr.File(label="Images: files or a zip (optional .txt captions with the same name)", file_count="multiple",
                            file_types=["image", ".zip", ".txt"])
            with gr.Row():
                style_name = gr.Textbox(label="Style name", placeholder="my-style")
                trigger = gr.Textbox(label="Trigger word", placeholder="defaults to the style name")
            caption_template = gr.Textbox(value=DEFAULT_CAPTION_TEMPLATE, label="Caption template",
                                          info="For images without a .txt caption; {trigger} becomes the trigger word.")
            preset = gr.Radio(list(PRESETS), value=DEFAULT_PRESET, label="Preset")
            with gr.Accordion("Advanced", open=False):
                advanced = [advanced_control(f) for f in ADVANCED_FIELDS]
            train_button = gr.Button("Train", variant="primary")
            status = gr.Markdown(label="Status")
            loss_plot = gr.LinePlot(x="step", y="loss", title="Loss", label="Loss", height=220)
            samples = gr.Gallery(label="Samples", columns=4, height=260, elem_classes="pixelated")

        with gr.Tab("Generate"):
            prompt = gr.Textbox(label="Prompt", value="a red circle")
            negative = gr.Textbox(label="Negative prompt")
            with gr.Row():
                seed = gr.Number(value=0, precision=0, label="Seed")
                steps = gr.Slider(1, 100, value=DEFAULT_STEPS, step=1, label="Steps")
                guidance = gr.Slider(0, 20, value=DEFAULT_GUIDANCE, step=0.5, label="Guidance")
                width = gr.Number(value=studio.base.resolution, precision=0, label="Width")
                height = gr.Number(value=studio.base.resolution, precision=0, label="Height")
            gr.Markdown("**Styles** (0 turns a style off; negative values push away from it)")

            @gr.render(inputs=[known_names, slider_values])
            def style_sliders(names, values):
                if not names:
                    gr.Markdown("No styles yet: train one in the Train tab.")
                for name in names or []:
                    slider = gr.Slider(-2, 2, value=(values or {}).get(name, 0.0), step=0.05, label=name)
                    slider.change(
                        lambda value, current, name=name: {**(current or {}), name: value},
                        [slider, blend], blend, api_visibility="private", show_progress="hidden",
                    )

            generate_button = gr.Button("Generate", variant="primary")
            gallery = gr.Gallery(label="Output", columns=4, height=360, elem_classes="pixelated", format="png")
            info = gr.Markdown(label="Info")

        with gr.Tab("Styles"):
            thumbs = gr.Gallery(label="Styles", columns=6, height=200, elem_classes="pixelated")
            table = gr.Dataframe(headers=STYLE_COLUMNS, interactive=False)
            picker = gr.Dropdown(label="Style", choices=[], allow_custom_value=True)  # the API names any style
            with gr.Row():
                new_name = gr.Textbox(label="New name")
                rename_button = gr.Button("Rename")
                delete_button = gr.Button("Delete", variant="stop")
                export_button = gr.Button("Download .safetensors")
            download = gr.File(label="Download")
            styles_message = gr.Markdown(label="Message")

        refresh_outputs = [slider_values, known_names, blend, table, thumbs, picker]
        refresh_args = dict(fn=refresh, inputs=[blend, known_names], outputs=refresh_outputs, api_visibility="private",
                            show_progress="hidden")
        demo.load(**refresh_args)
        gr.Timer(REFRESH_EVERY_S).tick(**refresh_args)

        train_button.click(
            train_style,
            [files, style_name, trigger, caption_template, preset],
            [status, loss_plot, samples],
            inputs_kwargs=dict(zip([f.name for f in ADVANCED_FIELDS], advanced)),
            api_name="train_style",
        ).then(**refresh_args)
        example.change(example_preview, [example], [example_images], api_visibility="private", show_progress="hidden")
        example_button.click(
            train_example, [example, preset], [files, style_name, status, loss_plot, samples], api_name="train_example"
        ).then(**refresh_args)
        generate_button.click(
            generate, [prompt, negative, seed, steps, guidance, width, height, blend], [gallery, info], api_name="generate"
        )
        gr.api(list_styles, api_name="list_styles")
        export_button.click(export_style, [picker], [download], api_name="export_style")
        delete_button.click(delete_style, [picker], [styles_message], api_name="delete_style").then(**refresh_args)
        rename_button.click(rename_style, [picker, new_name], [styles_message], api_name="rename_style").then(**refresh_args)
    return demo


STYLE_COLUMNS = ["name", "trigger", "base_model", "family", "created", "rank", "alpha", "steps", "learning_rate"]
