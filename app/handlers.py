"""What the page does: one plain function per action, over a Studio and the page's components.

A handler with several outputs returns `{page.<component>: value}`: Gradio updates those components
and leaves the others as they are. Handlers that answer the API keep its parameter names and
docstrings; app/layout.py binds each to the studio and the page (`bind`) and wires it to its event.
Tests call them directly, in-process, without a server.

Every handler turns a ValueError into gr.Error, so the user sees the message and the app keeps serving.
"""

from __future__ import annotations

import functools
import inspect
import random
import time
import typing
from pathlib import Path
from urllib.parse import quote

import gradio as gr
import pandas as pd

from app.studio import Studio, best_validation, describe, validation_line
from embedded.examples import EXAMPLES
from styles.blend import DEFAULT_GUIDANCE, DEFAULT_STEPS, DEFAULT_STRENGTH
from styles.generation import GenerationCancelled
from styles.grid import DEFAULT_SCALES, DEFAULT_SEEDS
from styles.mix import BLOCK_PRESETS
from styles.pnginfo import read_recipe
from trainer.config import DEFAULT_CAPTION_TEMPLATE, DEFAULT_PRESET, config_fields, make_config

TOP_FIELDS = ("style_name", "trigger", "caption_template")  # shown above the Advanced accordion
ADVANCED_FIELDS = [f for f in config_fields() if f.name not in TOP_FIELDS]
PROGRESS_EVERY_S = 0.5  # throttle UI updates from a fast training loop
LOSS_AVERAGE_STEPS = 20  # the chart's smoothed line: the mean of the last this many steps
JOB_COLUMNS = ["job", "style", "state", "queue", "step", "checkpoint", "message"]
# "steps": the step its weights come from (its best validation, or a kept checkpoint); "validation_score": there
STYLE_COLUMNS = ["name", "trigger", "base_model", "family", "created", "rank", "alpha", "steps", "validation_score",
                 "learning_rate"]
CAPTION_COLUMNS = ["image", "name", "caption", "source", "trains at"]  # the caption editor; only "caption" is edited
GRID_SCALES = ", ".join(f"{scale:g}" for scale in DEFAULT_SCALES)  # the grid's columns, as the form shows them
GRID_SEEDS = ", ".join(map(str, DEFAULT_SEEDS))
# The validation strip: room for its label, then one row per checkpoint (a 192 px tile, its caption (layout.CAPTION_PX),
# borders, gap)
STRIP_TOP_PX, STRIP_ROW_PX = 56, 244


# -- plumbing ---------------------------------------------------------------------------------------
def user_errors(fn):
    """Show ValueError / OSError messages to the user instead of a stack trace or gradio's generic error."""

    def convert(err):
        if isinstance(err, OSError) and not isinstance(err, FileExistsError):  # the disk, not the input (issue 18)
            return gr.Error(f"A file could not be read or written: {err}. Check that the workspace has free space "
                            "and is writable, then try again.", print_exception=False)
        return gr.Error(str(err), print_exception=False)

    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except (ValueError, OSError) as err:
                raise convert(err) from None

    else:

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except (ValueError, OSError) as err:
                raise convert(err) from None

    return wrapper


def bind(fn, *args):
    """`fn` with its first arguments given (the studio, the page), as Gradio calls it.

    Gradio names an endpoint's API parameters after the callable's signature, which for a partial is
    what is left of fn's; the name and docstring are fn's own (no __wrapped__: the signature would
    then show the bound arguments again).
    """
    bound = functools.partial(fn, *args)
    bound.__name__, bound.__doc__ = fn.__name__, fn.__doc__
    return bound


def field_label(field) -> str:
    """The label a TrainConfig field goes by in the UI and in its messages: 'learning_rate' -> 'Learning rate'."""
    return field.name.replace("_", " ").capitalize()


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


def parse_advanced(values: dict) -> dict:
    """The Advanced controls' text as TrainConfig settings; empty ones are left to the preset."""
    settings = {}
    for field in ADVANCED_FIELDS:
        value = values.get(field.name)
        if value is None or value == "":
            continue
        if typing.get_origin(field.type) is list or str(field.type).startswith("list"):
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
        raise ValueError(
            f"{field_label(field)} must be {'a whole number' if whole else 'a number'}, not {value!r}."
        ) from None
    return int(number) if whole else number


def shown_value(field, value):
    """A saved setting as its Advanced control shows it (lists comma-joined, numbers as text, None empty)."""
    if value is None:
        return None if "choices" in field.metadata else ""
    if isinstance(value, list):
        return ", ".join(value)
    return value if "choices" in field.metadata else str(value)


def loss_chart(losses: list[float]) -> pd.DataFrame | None:
    """Long-form rows (step, loss, series) for the raw per-step loss and its running mean; None before the first step.

    One step's loss depends on its random timestep and noise, so the raw line jumps about; the
    running mean is the line that shows whether training is going anywhere. No rows is None, not an
    empty frame: Gradio's plot fixes its colour scale from the first data it draws, and an empty first
    frame left every later line without a colour, so the chart showed axes and no line.
    """
    if not losses:
        return None
    raw = pd.Series(losses, dtype=float)
    steps = range(1, len(raw) + 1)
    return pd.concat([
        pd.DataFrame({"step": steps, "loss": raw, "series": "per step"}),
        pd.DataFrame({"step": steps, "loss": raw.rolling(LOSS_AVERAGE_STEPS, min_periods=1).mean(),
                      "series": f"mean of {LOSS_AVERAGE_STEPS}"}),
    ], ignore_index=True)


def validation_chart(validation: list[dict]) -> pd.DataFrame | None:
    """(step, score) of every validation, from step 0 (the base model, score 0 by the score's definition,
    so that one validation already draws a line); None before the first."""
    if not validation:
        return None
    return pd.DataFrame({"step": [0] + [entry["step"] for entry in validation],
                         "score": [0.0] + [float(entry["score"]) for entry in validation]})


def validation_strip(validation: list[dict]):
    """The validation pictures of every checkpoint, newest first, one gallery row per checkpoint; ★ marks the best."""
    best = best_validation(validation)
    items = [(path, ("★ " if entry is best else "") + f"step {entry['step']} · score {entry['score']:.3f}")
             for entry in reversed(validation) for path in entry["images"]]
    columns = max((len(entry["images"]) for entry in validation), default=1)
    # As tall as its rows (STRIP_ROW_PX each, app/layout.py's CSS), up to three, then it scrolls.
    height = STRIP_TOP_PX + STRIP_ROW_PX * min(max(len(validation), 1), 3)
    return gr.update(value=items, columns=max(columns, 1), height=height)


# -- training ---------------------------------------------------------------------------------------
def _submit(studio: Studio, files, style_name, trigger, caption_template, preset, advanced: dict,
            captions: dict | None = None) -> tuple[str, str]:
    """Queue a training job from the form's values; returns its id and what the upload gave (upload_summary)."""
    paths = [getattr(f, "name", f) for f in (files or [])]
    missing = [what for what, given in (("the style name", (style_name or "").strip()), ("images", paths))
               if not given]
    if missing:  # every missing part at once, not one per press of Train
        raise ValueError(f"To train, fill in {' and '.join(missing)}."
                         + (" No images were uploaded: add image files or a zip of images." if not paths else ""))
    settings = dict(
        style_name=(style_name or "").strip(),
        trigger=(trigger or "").strip(),
        caption_template=caption_template or DEFAULT_CAPTION_TEMPLATE,
        **parse_advanced(advanced),
    )
    job_id, images = studio.queue(paths, preset or DEFAULT_PRESET, captions=captions, **settings)
    return job_id, upload_summary(images, captions)


def _names(names: list[str], most: int = 8) -> str:
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def upload_summary(images, edited: dict | None = None) -> str:
    """What an upload gave, said at submit time: the images accepted, the captions paired with them (a .txt of the
    same name, or the caption editor), the files skipped and why."""
    edited = edited or {}
    paired = [name for name, text in zip(images.names, images.captions) if text and name not in edited]
    lines = [f"**{_count(len(images), 'image')} accepted**: {_names(images.names)}."]
    if paired:
        lines.append(f"Captions from a .txt of the same name: {_names(paired)}.")
    if edited:
        lines.append(f"Captions from the caption editor: {len(edited)}.")
    rest = len(images) - len(paired) - len([name for name in images.names if name in edited])
    if rest:
        lines.append(f"{_count(rest, 'image')} without a caption: the captioner's or the template.")
    lines.append("The trigger word is added to each caption at training.")
    if images.skipped:
        lines.append(f"**Skipped {len(images.skipped)}**: " + "; ".join(images.skipped_lines()) + ".")
    return " ".join(lines)


def edited_captions(captions, shown: list[dict] | None = None) -> dict[str, str] | None:
    """Captions to train with, {image name: caption}, from the caption editor's table or an API client.

    `captions` is the editor's table (a DataFrame with name and caption columns), {name: caption}, or a
    list of {"name", "caption"} as /caption_images returns them. A template row left as it was `shown`
    is left out, so training fills in the caption template as the form has it when Train is pressed.
    """
    if captions is None or isinstance(captions, dict):
        return {str(name): str(text or "") for name, text in captions.items()} if captions else None
    rows = captions.to_dict(orient="records") if isinstance(captions, pd.DataFrame) else list(captions)
    before = {row["name"]: row for row in shown or []}
    result = {}
    for row in rows:
        name, text = str(row.get("name") or ""), str(row.get("caption") or "")
        if not name:  # the editor's blank row before anything was captioned
            continue
        if before.get(name, {}).get("source") == "template" and before[name]["caption"] == text:
            continue
        result[name] = text
    return result or None


def _queued_message(studio: Studio, job_id: str, summary: str) -> str:
    return f"Queued job {job_id} (position {studio.jobs.position(job_id)}). {summary}"


@with_advanced_parameters
@user_errors
def submit_training(studio: Studio, page, files, style_name, trigger=None, caption_template=None, preset=None,
                    captions=None, **advanced):
    """Queue a training job from uploaded images (files, a zip, .txt captions); returns its job id.

    `captions` ({image name: caption}, or /caption_images' list, edited) replace the uploaded ones.
    Every TrainConfig field is an optional keyword (rank, steps, learning_rate, ...): empty uses the preset.
    """
    job_id, summary = _submit(studio, files, style_name, trigger, caption_template, preset, advanced,
                              edited_captions(captions))
    return {page.job_picker: job_id, page.job_message: _queued_message(studio, job_id, summary)}


@with_advanced_parameters
@user_errors
def submit_form(studio: Studio, page, files, style_name, trigger, caption_template, preset, caption_table,
                shown_captions, **advanced):
    """The Train button: queue the form, with the caption editor's captions (see edited_captions)."""
    job_id, summary = _submit(studio, files, style_name, trigger, caption_template, preset, advanced,
                              edited_captions(caption_table, shown_captions))
    return {page.job_picker: job_id, page.job_message: _queued_message(studio, job_id, summary)}


@with_advanced_parameters
@user_errors
def train_style(studio: Studio, page, files, style_name, trigger=None, caption_template=None, preset=None,
                captions=None, **advanced):
    """Queue a training job and stream its progress (status, loss table, samples) until it ends."""
    job_id, _ = _submit(studio, files, style_name, trigger, caption_template, preset, advanced,
                        edited_captions(captions))
    yield from follow_until_done(studio, page, job_id)


def _caption_rows(studio: Studio, files, caption_template, auto_caption, bucketing=True) -> tuple[list[dict], str]:
    paths = [getattr(f, "name", f) for f in (files or [])]
    if not paths:
        return [], ""
    auto = auto_caption not in (False, "False", "false")  # the Advanced drop-downs: empty means the preset's (on)
    buckets = bucketing not in (False, "False", "false")
    rows, note = studio.caption_images(paths, caption_template or DEFAULT_CAPTION_TEMPLATE, auto, buckets)
    return [vars(row) for row in rows], note


@user_errors
def caption_images(studio: Studio, files, caption_template=None, auto_caption=True):
    """Each uploaded image's caption before training: [{"name", "caption", "source", "bucket"}] and a note
    (bucket: the size it trains at, its aspect-ratio bucket, e.g. "640x384").

    source: ".txt" (its own caption file), "captioner" (the base model's captioner) or "template" (the
    caption template, {trigger} filled in at training). Edit them and pass them to /submit_training as
    `captions`; training adds the trigger word to each.
    """
    rows, note = _caption_rows(studio, files, caption_template, auto_caption)
    return [{key: row[key] for key in ("name", "caption", "source", "bucket")} for row in rows], note


@user_errors
def show_captions(studio: Studio, page, files, caption_template=None, auto_caption=None, bucketing=None):
    """The caption editor: a row per uploaded image (thumbnail, name, caption, source, the size it trains at:
    its aspect-ratio bucket) and the captioner's note."""
    rows, note = _caption_rows(studio, files, caption_template, auto_caption, bucketing)
    table = pd.DataFrame(
        [[f"![thumbnail](gradio_api/file={quote(row['thumbnail'])})", row["name"], row["caption"], row["source"],
          row["bucket"]] for row in rows], columns=CAPTION_COLUMNS)
    return {page.captions: table, page.caption_rows: rows, page.caption_note: note}


def _submit_example(studio: Studio, example, preset) -> tuple[list[str], str, str]:
    """(files, style name, job id) of a queued example style."""
    paths, name = studio.example(example)
    job_id = studio.submit([str(path) for path in paths], preset or DEFAULT_PRESET, style_name=name)
    return [str(path) for path in paths], name, job_id


@user_errors
def submit_example(studio: Studio, page, example, preset=None):
    """Queue one of the bundled example styles (no uploads needed); returns (files, style name, job id, message)."""
    files, name, job_id = _submit_example(studio, example, preset)
    return {page.files: files, page.style_name: name, page.job_picker: job_id,
            page.job_message: f"Queued the example style **{name}** as job {job_id}."}


@user_errors
def train_example(studio: Studio, page, example, preset=None):
    """Train an example style and stream its progress until it ends: (files, style name, status, losses, samples)."""
    files, name, job_id = _submit_example(studio, example, preset)
    for update in follow_until_done(studio, page, job_id):
        yield {page.files: files, page.style_name: name, **update}


def example_preview(example) -> list:
    """Some images of an example style, with their captions."""
    return [(image, caption) for image, caption in EXAMPLES[example].images(8)] if example in EXAMPLES else []


@with_advanced_parameters
@user_errors
def save_preset(studio: Studio, page, preset_name, preset=None, **advanced):
    """Save the preset and the advanced settings that are filled in as workspace/presets/<name>.toml."""
    path = studio.save_preset((preset_name or "").strip(), preset or DEFAULT_PRESET, **parse_advanced(advanced))
    return {page.preset_message: f"Saved preset **{path.stem}** ({path.name}; "
                                 "`python -m trainer --config` reads it too).",
            page.saved_presets: gr.update(choices=studio.preset_names(), value=path.stem)}


def cuda_only(field) -> bool:
    """A setting that does something on a CUDA GPU only (its help says so): hidden where there is none."""
    return "CUDA GPU only" in field.metadata.get("help", "")


def preset_values(studio: Studio, preset) -> dict:
    """Every Advanced setting of a built-in preset on this base model's family, as its control shows it."""
    config = make_config(preset or DEFAULT_PRESET, studio.base.defaults_family)
    return {f.name: shown_value(f, getattr(config, f.name)) for f in ADVANCED_FIELDS}


def fill_preset(studio: Studio, page, preset):
    """Choosing a preset fills the Advanced controls with its values."""
    values = preset_values(studio, preset)
    return {page.advanced[f.name]: values[f.name] for f in ADVANCED_FIELDS}


@user_errors
def load_preset(studio: Studio, page, preset_name):
    """The saved preset's built-in preset and advanced settings, to fill the form."""
    preset, values = studio.load_preset(preset_name)
    return {page.preset: preset, **{page.advanced[f.name]: shown_value(f, values.get(f.name)) for f in ADVANCED_FIELDS}}


# -- jobs -------------------------------------------------------------------------------------------
def job_view(studio: Studio, page, job_id) -> dict:
    """A job's status, loss chart, samples, validation scores and validation pictures, as the Train tab shows them."""
    record, progress = studio.jobs.get(job_id), studio.jobs.progress(job_id)
    status = describe(record, progress, studio.jobs.position(job_id))
    validation = validation_line(record, progress)
    return {page.status: f"{status}\n\n{validation}" if validation else status,
            page.loss_plot: gr.update(value=loss_chart(progress.losses), x_lim=_steps_axis(record.step)),
            page.samples: list(progress.samples),
            page.validation_plot: gr.update(value=validation_chart(progress.validation),
                                            x_lim=_steps_axis(record.step)),
            page.validation_strip: validation_strip(progress.validation)}


def _steps_axis(steps_done: int) -> list[int]:
    """The charts' step axis: the steps so far, at least 10 wide, so its ticks are whole steps (a run's first steps
    drew ticks at 0.5, 1.0, 1.5)."""
    return [0, max(int(steps_done or 0), 10)]


def _job_key(studio: Studio, job_id) -> tuple | None:
    """What the job view depends on: when it is unchanged, a tick sends nothing. None for an unknown job."""
    try:
        record, progress = studio.jobs.get(job_id), studio.jobs.progress(job_id)
    except (ValueError, KeyError):
        return None
    return (record.id, str(record.state), record.step, record.message, len(progress.losses),
            tuple(path for path, _ in progress.samples), len(progress.validation), studio.jobs.position(job_id))


@user_errors
def show_job(studio: Studio, page, job_id, message=""):
    """Picking a job: its whole view at once (the timer's ticks keep it live, see tick_job). The message under the
    buttons goes unless it is about this job (a submit picks its job and says so in the same update)."""
    if not job_id:
        return {page.job_seen: None}
    update = {**job_view(studio, page, job_id), page.job_seen: _job_key(studio, job_id)}
    if message and f"job {str(job_id).lower()}" not in message.lower():
        update[page.job_message] = ""
    return update


def tick_job(studio: Studio, page, job_id, seen):
    """The picked job's view, when it changed since the last one sent (`seen`); nothing otherwise.

    A timer, not a stream per pick: a stream kept the page on the first job picked until that job ended,
    since Gradio runs a second pick only after the first event is done (issue 18). When the shown job ends (or
    stops), the action message under the buttons ("queued to resume", ...) is out of date: cleared. Not when it
    starts: the message of a submit (images accepted, files skipped) must stay long enough to be read.
    """
    key = _job_key(studio, job_id) if job_id else None
    if key is None or key == (tuple(seen) if seen else None):
        return gr.skip()
    update = {**job_view(studio, page, job_id), page.job_seen: key}
    if seen and seen[0] == key[0] and seen[1] != key[1] and key[1] not in ("queued", "running"):
        update[page.job_message] = ""
    return update


@user_errors
def follow_job(studio: Studio, page, job_id):
    """Stream a job's status, loss chart, samples, validation scores and validation pictures until it is no
    longer queued or running."""
    if not job_id:
        return
    last_yield = 0.0
    for record in studio.jobs.follow(job_id):
        if record.state == "running" and time.monotonic() - last_yield < PROGRESS_EVERY_S:
            continue
        last_yield = time.monotonic()
        yield job_view(studio, page, job_id)
    yield job_view(studio, page, job_id)


def follow_until_done(studio: Studio, page, job_id):
    """follow_job's status, loss and samples (what /train_style streams), then raise the job's message if it
    did not finish (API clients see the error)."""
    for update in follow_job(studio, page, job_id):
        yield {key: update[key] for key in (page.status, page.loss_plot, page.samples)}
    record = studio.jobs.get(job_id)
    if record.state != "finished":
        raise gr.Error(f"Job {job_id} {record.state}: {record.message}", print_exception=False)


def jobs_table(studio: Studio) -> pd.DataFrame:
    rows = [
        [r.id, r.style_name, r.state, studio.jobs.position(r.id) or "", f"{r.step}/{r.total_steps}",
         r.checkpoint_step or "", r.message]
        for r in studio.jobs.jobs()
    ]
    return pd.DataFrame(rows, columns=JOB_COLUMNS)


def list_jobs(studio: Studio) -> list[dict]:
    """Every training job, newest first: id, style, state, queue position, step, last checkpoint, message."""
    return jobs_table(studio).to_dict(orient="records")


def refresh_jobs(studio: Studio, page, picked, known_ids):
    """The jobs table, and the picker's choices when the set of jobs changed."""
    ids = [r.id for r in studio.jobs.jobs()]
    update = {page.jobs: jobs_table(studio), page.known_job_ids: ids}
    if known_ids != ids:
        # With a job picked, new choices only: `picked` is what the picker held when this tick started, and a
        # job submitted meanwhile has picked itself since; writing the old value back would follow the wrong job.
        update[page.job_picker] = gr.update(choices=ids) if picked else gr.update(choices=ids, value=_first_job(studio))
    return update


def _first_job(studio: Studio) -> str | None:
    """The job a fresh page shows: the running one, else the newest."""
    records = studio.jobs.jobs()
    running = [r.id for r in records if r.state == "running"]
    return (running or [r.id for r in records] or [None])[0]


@user_errors
def cancel_job(studio: Studio, job_id):
    """Cancel a queued job, or stop a running one (it keeps a checkpoint to resume or keep)."""
    return studio.jobs.cancel(job_id)


@user_errors
def resume_job(studio: Studio, job_id):
    """Queue a stopped job again; it continues from its newest checkpoint."""
    studio.jobs.resume(job_id)
    return f"Job {job_id} is queued to resume."


@user_errors
def keep_job(studio: Studio, job_id, style_name=None):
    """Save a stopped job's newest checkpoint as a style (optionally under another name)."""
    name = studio.jobs.keep(job_id, (style_name or "").strip() or None)
    return f"Saved the checkpoint of job {job_id} as style **{name}**."


@user_errors
def discard_job(studio: Studio, job_id):
    """Delete a stopped job's checkpoints and images."""
    studio.jobs.discard(job_id)
    return f"Discarded the checkpoints of job {job_id}."


# -- generation -------------------------------------------------------------------------------------
@user_errors
def generate(studio: Studio, page, prompt, negative_prompt=None, seed=0, steps=DEFAULT_STEPS, guidance=DEFAULT_GUIDANCE,
             width=0, height=0, styles=None, add_triggers=True, owner="", blocks=None, bands=None, mode=None,
             image=None, strength=DEFAULT_STRENGTH):
    """Generate images with styles blended at the given scales, e.g. styles={"ink": 0.8}.

    With add_triggers (the default), the trigger word of each style in use is added to the prompt. Seed -1 (any
    negative seed) draws a random seed; the line under the picture names the seed used. Generations take turns;
    /cancel_generation stops this client's, /generation_queue says where it stands. The blend's shape:
    blocks={"ink": "look only"} or {"ink": {"down": 0, "up": 1}}, bands={"ink": [0.3, 1]} (on from 30 % of the
    steps), mode "sum" | "ties" | "elect". `image`: a start picture to restyle, `strength` 0..1 how much is redrawn.
    """
    seed = random_seed(seed)
    try:
        result = studio.generate(prompt, styles=styles or {}, owner=owner, blocks=blocks or None, bands=bands or None,
                                 mode=mode or None, image=image or None, strength=strength,
                                 **_options(negative_prompt, seed, steps, guidance, width, height, add_triggers))
    except GenerationCancelled as stopped:  # the user's own Stop: said as news, not as an error; the picture stays
        return {page.info: f"{stopped} Nothing was saved."}
    blend = ", ".join(f"{name} {scale:+.2f}" for name, scale in result.active.items()) or "none (base model)"
    restyled = f" · restyled from the start picture at strength {float(strength):g}" if image else ""
    notes = "".join(f"\n\n⚠ {w}" for w in result.warnings)
    return {page.gallery: [str(p) for p in result.paths], page.last_seed: result.seed,
            page.info: f"Seed {result.seed} · styles: {blend}{restyled} · prompt used: `{result.prompt}`{notes}"}


BLEND_COLUMNS = ["style", "blocks", "from %", "to %"]  # the blend table: per style, block strengths and step band


def blend_table(names: list[str], blocks: dict | None = None, bands: dict | None = None) -> pd.DataFrame:
    """The blend table's rows: each style's block setting (a preset or "down=0, up=1") and step band in %."""
    rows = []
    for name in names:
        setting = (blocks or {}).get(name, "all")
        if isinstance(setting, dict):
            setting = ", ".join(f"{key}={value:g}" for key, value in setting.items()) or "all"
        start, end = (bands or {}).get(name, (0, 1))
        rows.append([name, setting, round(100 * start), round(100 * end)])
    return pd.DataFrame(rows, columns=BLEND_COLUMNS)


def blend_rows(names, table):
    """The blend table for the library's styles now: a style's row kept as edited, new styles' rows added."""
    blocks, bands = blend_settings_lenient(table)
    return blend_table(list(names or []), blocks, bands)


def blend_settings_lenient(table) -> tuple[dict, dict]:
    """blend_settings, with rows that do not parse left at their defaults (the table is being redrawn)."""
    rows = table.to_dict(orient="records") if isinstance(table, pd.DataFrame) else list(table or [])
    blocks, bands = {}, {}
    for row in rows:
        try:
            more_blocks, more_bands = blend_settings([row])
        except ValueError:
            continue
        blocks |= more_blocks
        bands |= {name: tuple(band) for name, band in more_bands.items()}
    return blocks, bands


def blend_settings(table) -> tuple[dict, dict]:
    """(blocks, bands) from the blend table; rows left at "all" and 0-100 % say nothing. ValueError names a cell
    that is not a preset, "block=factor" pairs, or a percentage."""
    rows = table.to_dict(orient="records") if isinstance(table, pd.DataFrame) else list(table or [])
    blocks, bands = {}, {}
    for row in rows:
        name = str(row.get("style") or "").strip()
        if not name:
            continue
        setting = str(row.get("blocks") or "all").strip()
        if setting != "all":
            blocks[name] = setting if setting in BLOCK_PRESETS else _block_pairs(setting, name)
        try:
            start, end = float(row.get("from %") or 0) / 100, float(row.get("to %") if row.get("to %") not in
                                                                    (None, "") else 100) / 100
        except (TypeError, ValueError):
            raise ValueError(f"The step band of {name!r} is not a percentage: use from 0 to 100.") from None
        if (start, end) != (0, 1):
            bands[name] = [start, end]
    return blocks, bands


def _block_pairs(text: str, name: str) -> dict:
    pairs = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        try:
            pairs[key.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise ValueError(f"Blocks of {name!r} is {text!r}: use a preset ({', '.join(BLOCK_PRESETS)}) or "
                             "pairs such as 'down=0, mid=0.5, up=1, up.1=1.2'.")
    return pairs


def _mix(blend, table, mode) -> dict:
    blocks, bands = blend_settings(table)
    styles = {name: scale for name, scale in (blend or {}).items() if scale}
    return {"styles": styles, "blocks": {n: b for n, b in blocks.items() if n in styles},
            "bands": {n: b for n, b in bands.items() if n in styles}, "mode": mode or "sum"}


@user_errors
def generate_form(studio: Studio, page, prompt, negative_prompt, seed, steps, guidance, width, height, blend,
                  add_triggers, owner, table, mode, image, strength):
    """The Generate button: the form's blend table read into blocks and bands (the API takes them as JSON)."""
    mix = _mix(blend, table, mode)
    return generate.__wrapped__(studio, page, prompt, negative_prompt, seed, steps, guidance, width, height, blend,
                                add_triggers, owner, mix["blocks"], mix["bands"], mix["mode"], image, strength)


@user_errors
def save_blend(studio: Studio, name, styles=None, blocks=None, mode=None, rank=0):
    """Save the blend as a style of its own: exact (rank 0: the styles' factors side by side) or re-ranked by SVD
    to `rank`, with the error it costs. It exports and loads like any style."""
    saved, report = studio.save_blend(name, styles or {}, blocks or None, mode or None, rank or 0)
    if not report["rank"]:
        return f"Saved the blend as style **{saved}** (exact)."
    worst = max(report["layers"].items(), key=lambda item: item[1], default=("", 0.0))
    return (f"Saved the blend as style **{saved}** at rank {report['rank']}: relative error "
            f"{100 * report['error']:.1f} % overall, {100 * worst[1]:.1f} % at most ({worst[0]}).")


@user_errors
def save_blend_form(studio: Studio, name, blend, table, mode, rank):
    mix = _mix(blend, table, mode)
    return save_blend.__wrapped__(studio, name, mix["styles"], mix["blocks"], mix["mode"], rank)


@user_errors
def save_mix(studio: Studio, name, blend, table, mode):
    """Keep the blend (scales, blocks, steps, mode) under a name, to load it again from the Generate tab."""
    studio.save_mix((name or "").strip(), _mix(blend, table, mode))
    return gr.update(choices=studio.mixes(), value=(name or "").strip()), f"Saved blend **{name.strip()}**."


@user_errors
def load_mix(studio: Studio, page, name):
    """A named blend into the form: sliders, blend table and mode."""
    mix = studio.load_mix(name)
    return _mix_update(studio, page, mix, f"Loaded blend **{name}**.")


def _mix_update(studio: Studio, page, mix: dict, message: str) -> dict:
    names = studio.library.names()
    scales = {name: float(scale) for name, scale in (mix.get("styles") or {}).items()}
    blend = {name: scales.get(name, 0.0) for name in names}
    missing = sorted(set(scales) - set(names))
    return {page.blend: blend, page.slider_values: blend, page.allow_negative: any(v < 0 for v in blend.values()),
            page.blend_table: blend_table(names, mix.get("blocks"), mix.get("bands")),
            page.info: message + (f" ⚠ Not in the library (left out): {', '.join(missing)}." if missing else "")
            + (f" ⚠ It was blended with mode {mix['mode']!r}, which only the API offers; the page adds the styles."
               if mix.get("mode") not in (None, "sum") else "")}


def new_owner() -> str:
    """A page's (or API session's) own id for its generations: what Stop cancels and the line shows."""
    return f"page-{random.getrandbits(64):016x}"


def watch_generation(watch=True):
    """The page's status timer on as a generation is asked for; off, and the status line cleared, once it ended
    (as it did or with an error)."""
    return gr.Timer(active=True) if watch else (gr.Timer(active=False), "")


def generation_status(studio: Studio, owner=""):
    """Where this page's generation stands: waiting (behind how many) or drawing (step of steps); "" when none."""
    queue = studio.generation_queue(owner)
    if queue["position"] is None:
        return ""
    if queue["position"] == 0:
        return f"Drawing: step {queue['step']} of {queue['steps']}." if queue["steps"] else "Drawing…"
    return f"Waiting: {_count(queue['position'], 'generation')} ahead of yours. **Stop** leaves the line."


def cancel_generation(studio: Studio, owner=""):
    """Stop this page's generation: a waiting one leaves the line, a running one stops at its next step."""
    return studio.cancel_generation(owner)


def random_seed(seed):
    """-1 (any negative seed) is a random seed, as in AUTOMATIC1111 (it was drawn as the literal seed -1); other
    values go on as given, for the studio to check."""
    try:
        negative = seed is not None and float(seed) < 0
    except (TypeError, ValueError):
        return seed
    return random.randrange(2**31) if negative else seed


def reuse_seed(last_seed, seed):
    """The Reuse button: the seed of the last picture into the Seed box (left as it is before any picture)."""
    return seed if last_seed is None else last_seed


def negative_scales(current_blend, negative):
    """Allow negative scales toggled: the sliders' low end (-2 or 0), and the blend with negatives at 0 when off."""
    blend = {name: (scale if negative else max(float(scale), 0.0)) for name, scale in (current_blend or {}).items()}
    return blend, -2.0 if negative else 0.0


@user_errors
def png_info(studio: Studio, page, path):
    """A dropped PNG's recipe into the form: prompt, negative prompt, seed, steps, guidance, size, style scales.

    Styles it names that the library lacks are listed; the library's other styles go to 0.
    """
    if not path:
        return gr.skip()
    recipe = read_recipe(path)
    update = _mix_update(studio, page, recipe, f"Filled the form from **{Path(path).name}**.")
    fields = {"prompt": page.prompt, "negative_prompt": page.negative, "seed": page.seed, "steps": page.steps,
              "guidance": page.guidance, "width": page.width, "height": page.height}
    update.update({fields[key]: recipe[key] for key in fields if recipe.get(key) not in (None, "", 0)})
    if "negative_prompt" in recipe:  # an empty negative prompt is part of the recipe too
        update[page.negative] = recipe["negative_prompt"]
    return update


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "s")


def _options(negative_prompt, seed, steps, guidance, width, height, add_triggers) -> dict:
    """The generation options of the form (or an API call), as Studio.generate and Studio.grid take them: passed
    on as sent (empty: the default), for Blender.check_options to name what is wrong (int(NaN) said nothing)."""
    return dict(negative_prompt=negative_prompt or "", seed=0 if seed is None else seed, steps=steps,
                guidance=guidance, width=width or 0, height=height or 0, add_triggers=add_triggers is not False)


@user_errors
def generate_grid(studio: Studio, page, prompt, rows="styles", styles=None, seeds=GRID_SEEDS, scales=GRID_SCALES,
                  negative_prompt=None, seed=0, steps=DEFAULT_STEPS, guidance=DEFAULT_GUIDANCE, width=0, height=0,
                  add_triggers=True, owner=""):
    """A scale grid in one PNG: columns are scales; rows are styles (each alone, at `seed`) or seeds (the
    styles together). In each cell every style of its row is at the column's scale, the others off.

    styles: names (empty: every style); scales and seeds: comma-separated, e.g. "0, 0.5, 1". Returns the
    PNG's path (saved in the workspace's outputs, its recipe in its text chunks) and a description.
    """
    names = [styles] if isinstance(styles, str) and styles else list(styles or [])
    seed = random_seed(seed)
    try:
        grid = studio.grid(prompt, rows or "styles", names, scales, seeds, owner=owner,
                           **_options(negative_prompt, seed, steps, guidance, width, height, add_triggers))
    except GenerationCancelled as stopped:
        return {page.grid_info: f"{stopped} The grid was not drawn."}
    layout = grid.recipe["grid"]
    size = f"{_count(len(layout['row_labels']), 'row')} × {_count(len(layout['scales']), 'scale')}"
    where = f"seed {int(seed or 0)}" if layout["rows"] == "styles" else f"styles: {' + '.join(layout['styles'])}"
    triggers = ("trigger words of the styles in use added to each cell's prompt" if add_triggers is not False
                else "prompt as written")
    notes = "".join(f"\n\n⚠ {w}" for w in grid.warnings)
    return {page.grid_image: str(grid.path),
            page.grid_info: f"Grid of {size} ({where}; {triggers}) saved as `{grid.path.name}`.{notes}"}


# -- the style library ------------------------------------------------------------------------------
def list_styles(studio: Studio) -> list[dict]:
    """Every style in the library with its trigger word and training settings."""
    return studio.list_styles()


@user_errors
def export_style(studio: Studio, name, layout="kohya"):
    """Download a style as .safetensors: layout 'kohya' (A1111, ComfyUI, Forge, sd-scripts, diffusers'
    load_lora_weights) or 'diffusers' (diffusers/PEFT code; plain LoRA only)."""
    return str(studio.export(name, layout))


@user_errors
def import_style(studio: Studio, file, name=""):
    """Import an adapter made elsewhere as a style: LoRA, LoCon, LoHa, LoKr, DoRA or full differences, in the kohya,
    ComfyUI, diffusers or PEFT layout (.safetensors); returns a message saying what it holds."""
    if not file:
        raise ValueError("Choose a .safetensors LoRA file to import.")
    imported, notes = studio.import_style(file, name or "")
    return _imported(imported, notes)


def _imported(name: str, notes: list[str]) -> str:
    """'Imported **x**: it holds ...', then what was assumed, one line each."""
    holds, assumed = (notes[0], notes[1:]) if notes and notes[0].startswith("holds ") else ("", notes)
    return (f"Imported **{name}**" + (f": it {holds}." if holds else ".")
            + "".join(f"\n- {note}" for note in assumed))


@user_errors
def import_form(studio: Studio, page, file, name=""):
    """The Import button: import, pick the imported style, empty the form (it kept the old name and file)."""
    if not file:
        raise ValueError("Choose a .safetensors LoRA file to import.")
    imported, notes = studio.import_style(file, name or "")
    return {page.styles_message: _imported(imported, notes), page.picker: _pick(studio, imported),
            page.import_name: "", page.import_file: None}


@user_errors
def delete_style(studio: Studio, name):
    """Delete a style and its thumbnail from the library."""
    studio.delete(name)
    return f"Deleted **{name}**."


@user_errors
def ask_delete(studio: Studio, page, name):
    """Delete asks first: a second button names the style, and only it deletes (a double click deleted two)."""
    studio.library.get(name or "")  # an unknown name gets the message listing the styles
    return {page.confirm_delete: gr.update(value=f"Confirm delete {name}", visible=True), page.delete_pending: name,
            page.styles_message: f"Delete **{name}** for good? Press **Confirm delete {name}**; pick another style "
                                 "to keep it."}


@user_errors
def confirm_delete(studio: Studio, page, pending):
    """Delete the style Delete asked about (not whatever the picker holds by now); hide the confirm button."""
    if not pending:
        raise ValueError("Press Delete first.")
    message = delete_style.__wrapped__(studio, pending)
    return {page.styles_message: message, page.confirm_delete: gr.update(visible=False), page.delete_pending: None}


def cancel_delete(page, name):
    """Picking another style takes the pending delete back."""
    return {page.confirm_delete: gr.update(visible=False), page.delete_pending: None}


@user_errors
def rename_style(studio: Studio, old, new):
    """Rename a style (its file and thumbnail)."""
    new = (new or "").strip()
    studio.rename(old, new)
    return f"Renamed **{old}** to **{new}**."


@user_errors
def rename_form(studio: Studio, page, old, new):
    """The Rename button: rename, keep the renamed style picked, empty the New name box."""
    message = rename_style.__wrapped__(studio, old, new)
    return {page.styles_message: message, page.picker: _pick(studio, (new or "").strip()), page.new_name: ""}


def _pick(studio: Studio, name: str | None):
    return gr.update(choices=studio.library.names(), value=name)


def _neighbour(names: list[str], before: list[str] | None, picked: str | None) -> str | None:
    """The style to pick after the library changed: the one picked, if still there; after a delete, the next one
    that was listed (else the one before it), not the first in the alphabet; nothing when none is left."""
    if picked in names:
        return picked
    if not before or picked not in before:
        return names[0] if names and not picked else None
    index = before.index(picked)
    after = [name for name in before[index + 1:] if name in names]
    earlier = [name for name in reversed(before[:index]) if name in names]
    return (after or earlier or [None])[0]


def styles_table(infos) -> pd.DataFrame:
    """The Styles tab's table: one row per style; its steps are those its weights come from, with their score."""
    rows = []
    for info in infos:
        row = info.summary()
        score = row["validation_score"]
        row["validation_score"] = "" if score is None else f"{score:.3f}"
        rows.append(row)
    return pd.DataFrame(rows, columns=STYLE_COLUMNS)


def problems_note(problems) -> str:
    """The files in the styles folder that cannot be used, each with its reason (they never reach generation)."""
    if not problems:
        return ""
    return "**⚠ Cannot be used** (pick one and Delete it, or replace the file):\n" + "".join(
        f"\n- {problem.reason}" for problem in problems)


def refresh_styles(studio: Studio, page, current_blend, known_names, grid_styles=None, picked=None):
    """Re-read the library; update sliders, tables and pickers only when the set of styles changed."""
    names = studio.library.names()
    if known_names is not None and list(known_names) == names:
        return gr.skip()
    # Only readable styles get a slider; a damaged file is listed with its reason and can still be picked to delete.
    infos, problems = studio.library.scan()
    blend = {info.name: (current_blend or {}).get(info.name, 0.0) for info in infos}
    return {
        page.slider_values: blend,
        page.known_names: names,
        page.blend: blend,
        page.table: styles_table(infos),
        page.style_problems: problems_note(problems),
        # A style without a thumbnail (an import) gets a placeholder: it was missing from the gallery.
        page.thumbs: [(str(i.thumbnail or studio.placeholder_thumbnail()), f"{i.name} · trigger: {i.trigger}")
                      for i in infos],
        page.picker: gr.update(choices=names, value=_neighbour(names, known_names, picked)),
        page.grid_styles: gr.update(choices=list(blend), value=[name for name in grid_styles or [] if name in blend]),
    }
