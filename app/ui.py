"""The Gradio Blocks page: Train, Generate and Styles tabs, plus the named API endpoints.

Controls for training settings are derived from TrainConfig's fields, never declared twice.
Every handler turns a ValueError into gr.Error, so the user sees the message and the app keeps serving.
"""

from __future__ import annotations

import functools
import inspect
import json
import time
import typing

import gradio as gr
import pandas as pd

from app.studio import Studio, describe
from styles.blend import DEFAULT_GUIDANCE, DEFAULT_STEPS
from trainer.config import DEFAULT_CAPTION_TEMPLATE, DEFAULT_PRESET, PRESETS, config_fields
from trainer.data import MB
from embedded.examples import EXAMPLES

TOP_FIELDS = ("style_name", "trigger", "caption_template")  # shown above the Advanced accordion
ADVANCED_FIELDS = [f for f in config_fields() if f.name not in TOP_FIELDS]
PROGRESS_EVERY_S = 0.5  # throttle UI updates from a fast training loop
REFRESH_EVERY_S = 3.0  # styles trained or deleted elsewhere appear in every open page
JOBS_EVERY_S = 2.0  # the queue table and the job picker follow jobs started elsewhere
LOSS_AVERAGE_STEPS = 20  # the chart's smoothed line: the mean of the last this many steps
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


def field_label(field) -> str:
    """The label a TrainConfig field goes by in the UI and in its messages: 'learning_rate' -> 'Learning rate'."""
    return field.name.replace("_", " ").capitalize()


def advanced_control(field):
    """A control for one TrainConfig field; empty means 'use the preset's value'."""
    meta = field.metadata
    label = field_label(field)
    info = meta["help"] + " Empty: the preset's value."
    if "choices" in meta:
        return gr.Dropdown(choices=list(meta["choices"]), value=None, label=label, info=info)
    if typing.get_origin(field.type) is list or str(field.type).startswith("list"):
        return gr.Textbox(value="", label=label, info=info + " Comma-separated.", placeholder=", ".join(field.default_factory()))
    # A text box, not gr.Number: a Number shows and sends 0 once its accordion opens, so "empty: the
    # preset's value" would turn into rank 0 for anyone who only meant to change the steps. Ranges are
    # left to TrainConfig.validate(), whose message names the field.
    return gr.Textbox(value="", label=label, info=info, placeholder="preset's value", elem_id=f"advanced-{field.name}")


def shown_value(field, value):
    """A saved setting as its Advanced control shows it (lists comma-joined, numbers as text, None empty)."""
    if value is None:
        return None if "choices" in field.metadata else ""
    if isinstance(value, list):
        return ", ".join(value)
    return value if "choices" in field.metadata else str(value)


def parse_advanced(values: dict) -> dict:
    settings = {}
    for field in ADVANCED_FIELDS:
        value = values.get(field.name)
        if value is None or value == "":
            continue
        if field.name == "target_modules":
            value = [part.strip() for part in str(value).split(",") if part.strip()]
        elif field.type in (int, "int", float, "float"):
            value = _number(field, value)
        settings[field.name] = value
    return settings


def _number(field, value) -> int | float:
    whole = field.type in (int, "int")
    try:
        number = float(str(value).strip())
        if whole and not number.is_integer():
            raise ValueError
    except ValueError:
        raise ValueError(f"{field_label(field)} must be {'a whole number' if whole else 'a number'}, not {value!r}.") from None
    return int(number) if whole else number


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


def loss_chart(losses: list[float]) -> pd.DataFrame:
    """Long-form rows (step, loss, series) for the raw per-step loss and its running mean.

    One step's loss depends on its random timestep and noise, so the raw line jumps about; the
    running mean is the line that shows whether training is going anywhere.
    """
    raw = pd.Series(losses, dtype=float)
    steps = range(1, len(raw) + 1)
    return pd.concat([
        pd.DataFrame({"step": steps, "loss": raw, "series": "per step"}),
        pd.DataFrame({"step": steps, "loss": raw.rolling(LOSS_AVERAGE_STEPS, min_periods=1).mean(),
                      "series": f"mean of {LOSS_AVERAGE_STEPS}"}),
    ], ignore_index=True)


def build_ui(studio: Studio) -> gr.Blocks:
    def job_view(job_id):
        """(status, loss table, samples) of one job, as the Train tab shows it."""
        record, progress = studio.jobs.get(job_id), studio.jobs.progress(job_id)
        status = describe(record, progress, studio.jobs.position(job_id))
        return status, loss_chart(progress.losses), list(progress.samples)

    @user_errors
    def follow_job(job_id):
        """Stream a job's status, loss chart and samples until it is no longer queued or running."""
        if not job_id:
            return
        last_yield = 0.0
        for record in studio.jobs.follow(job_id):
            if record.state == "running" and time.monotonic() - last_yield < PROGRESS_EVERY_S:
                continue
            last_yield = time.monotonic()
            yield job_view(job_id)
        yield job_view(job_id)

    def follow_until_done(job_id):
        """follow_job, then raise the job's message if it did not finish (API clients see the error)."""
        yield from follow_job(job_id)
        record = studio.jobs.get(job_id)
        if record.state != "finished":
            raise gr.Error(f"Job {job_id} {record.state}: {record.message}", print_exception=False)

    def _settings(style_name, trigger, caption_template, advanced):
        return dict(
            style_name=(style_name or "").strip(),
            trigger=(trigger or "").strip(),
            caption_template=caption_template or DEFAULT_CAPTION_TEMPLATE,
            **parse_advanced(advanced),
        )

    @with_advanced_parameters
    @user_errors
    def submit_training(files, style_name, trigger=None, caption_template=None, preset=None, **advanced):
        """Queue a training job from uploaded images (files, a zip, .txt captions); returns its job id.

        Every TrainConfig field is an optional keyword (rank, steps, learning_rate, ...): empty uses the preset.
        """
        paths = [getattr(f, "name", f) for f in (files or [])]
        job_id = studio.submit(paths, preset or DEFAULT_PRESET, **_settings(style_name, trigger, caption_template, advanced))
        return job_id, f"Queued job {job_id} (position {studio.jobs.position(job_id)})."

    @with_advanced_parameters
    @user_errors
    def train_style(files, style_name, trigger=None, caption_template=None, preset=None, **advanced):
        """Queue a training job and stream its progress (status, loss table, samples) until it ends."""
        job_id, _ = submit_training(files, style_name, trigger, caption_template, preset, **advanced)
        yield from follow_until_done(job_id)

    @user_errors
    def submit_example(example, preset=None):
        """Queue one of the bundled example styles (no uploads needed); returns (files, style name, job id, message)."""
        paths, name = studio.example(example)
        job_id = studio.submit([str(path) for path in paths], preset or DEFAULT_PRESET, style_name=name)
        return [str(path) for path in paths], name, job_id, f"Queued the example style **{name}** as job {job_id}."

    @user_errors
    def train_example(example, preset=None):
        """Train an example style and stream its progress until it ends: (files, style name, status, losses, samples)."""
        files_value, name, job_id, _ = submit_example(example, preset)
        for update in follow_until_done(job_id):
            yield files_value, name, *update

    @with_advanced_parameters
    @user_errors
    def save_preset(preset_name, preset=None, **advanced):
        """Save the preset and the advanced settings that are filled in as workspace/presets/<name>.toml."""
        path = studio.save_preset((preset_name or "").strip(), preset or DEFAULT_PRESET, **parse_advanced(advanced))
        return f"Saved preset **{path.stem}** ({path.name}; `python -m trainer --config` reads it too).", gr.update(
            choices=studio.preset_names(), value=path.stem)

    @user_errors
    def load_preset(preset_name):
        """The saved preset's built-in preset and advanced settings, to fill the form."""
        preset, values = studio.load_preset(preset_name)
        shown = [shown_value(f, values.get(f.name)) for f in ADVANCED_FIELDS]
        return preset, *shown

    def jobs_table():
        rows = [
            [r.id, r.style_name, r.state, studio.jobs.position(r.id) or "", f"{r.step}/{r.total_steps}",
             r.checkpoint_step or "", r.message]
            for r in studio.jobs.jobs()
        ]
        return pd.DataFrame(rows, columns=JOB_COLUMNS)

    def list_jobs() -> list[dict]:
        """Every training job, newest first: id, style, state, queue position, step, last checkpoint, message."""
        return jobs_table().to_dict(orient="records")

    def refresh_jobs(picked, known_ids):
        ids = [r.id for r in studio.jobs.jobs()]
        if known_ids == ids:
            picker_update = gr.skip()
        elif picked:
            # New choices only: `picked` is what the picker held when this tick started, and a job submitted
            # meanwhile has picked itself since; writing the old value back would follow the wrong job.
            picker_update = gr.update(choices=ids)
        else:
            picker_update = gr.update(choices=ids, value=ids[0] if ids else None)
        return jobs_table(), picker_update, ids

    @user_errors
    def cancel_job(job_id):
        """Cancel a queued job, or stop a running one (it keeps a checkpoint to resume or keep)."""
        return studio.jobs.cancel(job_id)

    @user_errors
    def resume_job(job_id):
        """Queue a stopped job again; it continues from its newest checkpoint."""
        studio.jobs.resume(job_id)
        return f"Job {job_id} is queued to resume."

    @user_errors
    def keep_job(job_id, style_name=None):
        """Save a stopped job's newest checkpoint as a style (optionally under another name)."""
        name = studio.jobs.keep(job_id, (style_name or "").strip() or None)
        return f"Saved the checkpoint of job {job_id} as style **{name}**."

    @user_errors
    def discard_job(job_id):
        """Delete a stopped job's checkpoints and images."""
        studio.jobs.discard(job_id)
        return f"Discarded the checkpoints of job {job_id}."

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
    def export_style(name, layout="kohya"):
        """Download a style as .safetensors: layout 'kohya' (A1111, ComfyUI, diffusers) or 'diffusers' (diffusers/PEFT)."""
        return str(studio.export(name, layout))

    @user_errors
    def import_style(file, name=""):
        """Import a LoRA made elsewhere (kohya, diffusers or PEFT .safetensors) as a style; returns a message."""
        if not file:
            raise ValueError("Choose a .safetensors LoRA file to import.")
        imported, notes = studio.import_style(file, name or "")
        left_out = "".join(f"\n- {note}" for note in notes)
        return f"Imported **{imported}**." + (f" Left out:{left_out}" if left_out else "")

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
            limits = studio.limits
            files = gr.File(label=f"Images: files or a zip (optional .txt captions with the same name); up to "
                                  f"{limits.max_file_bytes // MB} MB a file, {limits.max_files} files and "
                                  f"{limits.max_total_bytes // MB} MB in all", file_count="multiple",
                            file_types=["image", ".zip", ".txt"], height=220, elem_id="training-files")
            with gr.Row():
                style_name = gr.Textbox(label="Style name", placeholder="my-style")
                trigger = gr.Textbox(label="Trigger word", placeholder="defaults to the style name")
            caption_template = gr.Textbox(value=DEFAULT_CAPTION_TEMPLATE, label="Caption template",
                                          info="For images without a .txt caption; {trigger} becomes the trigger word.")
            preset = gr.Radio(list(PRESETS), value=DEFAULT_PRESET, label="Preset")
            with gr.Accordion("Advanced", open=False):
                advanced = [advanced_control(f) for f in ADVANCED_FIELDS]
                with gr.Row():
                    preset_name = gr.Textbox(label="Save these settings as", placeholder="my-preset", scale=2)
                    save_preset_button = gr.Button("Save preset", scale=1)
                    saved_presets = gr.Dropdown(label="Saved presets", choices=studio.preset_names(), value=None,
                                                allow_custom_value=True, scale=2)
                    load_preset_button = gr.Button("Load preset", scale=1)
                preset_message = gr.Markdown()
            train_button = gr.Button("Train", variant="primary")
            api_train = gr.Button(visible=False)  # API-only endpoints: submit, then stream until the job ends
            api_example = gr.Button(visible=False)
            gr.Markdown("### Jobs\nOne job trains at a time; the others wait in the queue. Pick a job to follow it.")
            with gr.Row():
                job_picker = gr.Dropdown(label="Job", choices=[], allow_custom_value=True, scale=1)
                keep_name = gr.Textbox(label="Keep as style (empty: the job's name)", scale=2)
            with gr.Row():
                cancel_button = gr.Button("Cancel", variant="stop")
                resume_button = gr.Button("Resume")
                keep_button = gr.Button("Keep checkpoint as style")
                discard_button = gr.Button("Discard checkpoint")
            job_message = gr.Markdown()
            status = gr.Markdown(label="Status")
            loss_plot = gr.LinePlot(x="step", y="loss", color="series", title="Loss", label="Loss", height=220)
            samples = gr.Gallery(label="Samples", columns=4, height=260, object_fit="contain", elem_classes="pixelated")
            jobs = gr.Dataframe(headers=JOB_COLUMNS, interactive=False, label="Queue and history")
            known_job_ids = gr.State(None)

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
                    # Updated in the browser, not on the server: two sliders moved in quick succession
                    # would each send the blend as it was before the other's update, and one move would be lost.
                    slider.change(
                        None, [slider, blend], blend, api_visibility="private", show_progress="hidden",
                        js=f"(value, current) => ({{...(current || {{}}), {json.dumps(name)}: value}})",
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
                export_layout = gr.Radio(
                    [("kohya (A1111, ComfyUI, diffusers)", "kohya"), ("diffusers / PEFT", "diffusers")],
                    value="kohya", label="Download layout",
                )
                export_button = gr.Button("Download .safetensors")
            download = gr.File(label="Download", elem_id="style-download")
            with gr.Row():
                import_file = gr.File(label="Import a LoRA made elsewhere (.safetensors: kohya, diffusers or PEFT)",
                                      type="filepath")  # any suffix: a .ckpt gets our message, not a bare refusal
                import_name = gr.Textbox(label="Name for it (default: the file's name)")
                import_button = gr.Button("Import")
            styles_message = gr.Markdown(label="Message")

        refresh_outputs = [slider_values, known_names, blend, table, thumbs, picker]
        refresh_args = dict(fn=refresh, inputs=[blend, known_names], outputs=refresh_outputs, api_visibility="private",
                            show_progress="hidden")
        demo.load(**refresh_args)
        gr.Timer(REFRESH_EVERY_S).tick(**refresh_args)

        advanced_kwargs = dict(zip([f.name for f in ADVANCED_FIELDS], advanced))
        train_inputs = [files, style_name, trigger, caption_template, preset]
        train_button.click(submit_training, train_inputs, [job_picker, job_message], inputs_kwargs=advanced_kwargs,
                           api_name="submit_training")
        api_train.click(train_style, train_inputs, [status, loss_plot, samples], inputs_kwargs=advanced_kwargs,
                        api_name="train_style", concurrency_limit=None).then(**refresh_args)
        save_preset_button.click(save_preset, [preset_name, preset], [preset_message, saved_presets],
                                 inputs_kwargs=advanced_kwargs, api_name="save_preset")
        load_preset_button.click(load_preset, [saved_presets], [preset, *advanced], api_name="load_preset")
        example.change(example_preview, [example], [example_images], api_visibility="private", show_progress="hidden")
        example_button.click(submit_example, [example, preset], [files, style_name, job_picker, job_message],
                             api_name="submit_example")
        api_example.click(train_example, [example, preset], [files, style_name, status, loss_plot, samples],
                          api_name="train_example", concurrency_limit=None).then(**refresh_args)
        # Picking a job (or submitting one, which picks it) follows it until it ends, from any page, after any reload.
        job_picker.change(follow_job, [job_picker], [status, loss_plot, samples], api_name="follow_job",
                          show_progress="hidden", concurrency_limit=None).then(**refresh_args)
        jobs_args = dict(fn=refresh_jobs, inputs=[job_picker, known_job_ids], outputs=[jobs, job_picker, known_job_ids],
                         api_visibility="private", show_progress="hidden")
        demo.load(**jobs_args)
        gr.Timer(JOBS_EVERY_S).tick(**jobs_args)
        gr.api(list_jobs, api_name="list_jobs")
        cancel_button.click(cancel_job, [job_picker], [job_message], api_name="cancel_job").then(**jobs_args)
        resume_button.click(resume_job, [job_picker], [job_message], api_name="resume_job").then(
            follow_job, [job_picker], [status, loss_plot, samples], show_progress="hidden", api_visibility="private")
        keep_button.click(keep_job, [job_picker, keep_name], [job_message], api_name="keep_job").then(**refresh_args).then(**jobs_args)
        discard_button.click(discard_job, [job_picker], [job_message], api_name="discard_job").then(**jobs_args)
        generate_button.click(
            generate, [prompt, negative, seed, steps, guidance, width, height, blend], [gallery, info], api_name="generate"
        )
        gr.api(list_styles, api_name="list_styles")
        export_button.click(export_style, [picker, export_layout], [download], api_name="export_style")
        import_button.click(import_style, [import_file, import_name], [styles_message], api_name="import_style").then(**refresh_args)
        delete_button.click(delete_style, [picker], [styles_message], api_name="delete_style").then(**refresh_args)
        rename_button.click(rename_style, [picker, new_name], [styles_message], api_name="rename_style").then(**refresh_args)
    return demo


JOB_COLUMNS = ["job", "style", "state", "queue", "step", "checkpoint", "message"]
STYLE_COLUMNS = ["name", "trigger", "base_model", "family", "created", "rank", "alpha", "steps", "learning_rate"]
