"""The actions behind the UI and the API, as plain Python: train, generate, list, export, rename, delete.

Handlers raise ValueError with a message meant for the user; the UI layer turns it into gr.Error.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from core.files import staged_folder, write_bytes_atomic
from core.names import brief, check_style_name, safe_style_name
from core.threads import ALONE, BESIDE_TRAINING, torch_threads
from embedded.examples import EXAMPLES
from models.base import load_base
from models.captions import auto_captions
from models.threads import use_threads
from styles import formats, generation
from styles.blend import Blender, save_png
from styles.generation import Ticket
from styles.grid import DEFAULT_SCALES, DEFAULT_SEEDS, draw_grid, numbers
from styles.library import StyleInfo, StyleLibrary
from trainer.config import DEFAULT_PRESET, make_config, read_settings, write_settings
from trainer.data import (
    ImageSet,
    UploadLimits,
    bucket_of,
    bucket_sizes,
    bucket_step,
    ingest,
    size_multiple,
)
from trainer.jobs import JobManager, JobRecord, Progress

EXPORT_LAYOUTS = ("kohya", "diffusers")  # the first is the default download
PREVIEW_SIDE = 128  # px: the caption editor's thumbnails
PREVIEW_KEEP_S = 24 * 3600  # thumbnails older than this are deleted when new ones are written


@dataclass
class Generated:
    paths: list[Path]
    active: dict[str, float]
    warnings: list[str]
    prompt: str = ""  # the prompt actually used: trigger words included
    seed: int = 0  # the seed used (a random one when -1 was asked for)


@dataclass
class Grid:
    path: Path
    recipe: dict  # the PNG's "style_studio" record (styles.grid.draw_grid)
    warnings: list[str]


@dataclass
class Caption:
    """One uploaded image's caption as the caption editor shows it, before training."""

    name: str  # the image's name in the upload (the key Studio.submit's `captions` uses)
    caption: str  # its content, without the trigger word (a template row shows the template itself)
    source: str  # ".txt", "captioner" or "template"
    thumbnail: str = ""  # a small PNG of it in the workspace
    bucket: str = ""  # the size it trains at: "96x48" (its aspect-ratio bucket), or the square without bucketing


class Studio:
    """One workspace, one base model, one blender; training runs in child processes."""

    def __init__(self, workspace: str | Path, model: str | None = None, limits: UploadLimits | None = None,
                 model_config: str | None = None, threads: int | None = None, allow_large: bool = False):
        self.workspace = Path(workspace).resolve()
        self.model = model
        self.limits = limits or UploadLimits()  # caps on each upload (files, bytes, pixels)
        self.library = StyleLibrary(self.workspace)
        self.outputs = self.workspace / "outputs"
        self.exports = self.workspace / "exports"
        self.presets = self.workspace / "presets"
        for folder in (self.outputs, self.exports):
            folder.mkdir(parents=True, exist_ok=True)
        self.base = load_base(model, model_config=model_config)
        # allow_large: pictures up to 2048 px on any base (else twice its native side): the server's opt-in
        self.blender = Blender(self.base, self.library, allow_large=allow_large)
        # one training job at a time, in a child process
        self.threads = threads  # CPU threads for training and generation; None: sized by core/threads.py
        self.jobs = JobManager(self.workspace, model, model_config, threads).start()

    def close(self) -> None:
        """Stop the job queue (a running job stops with a checkpoint, to resume)."""
        self.jobs.close()

    # -- train ---------------------------------------------------------------------------
    def submit(self, sources: list[str], preset: str, captions: dict[str, str] | None = None, **settings) -> str:
        """Validate and ingest, then queue a training job; returns its id (see queue)."""
        return self.queue(sources, preset, captions, **settings)[0]

    def queue(self, sources: list[str], preset: str, captions: dict[str, str] | None = None, **settings
              ) -> tuple[str, ImageSet]:
        """Validate and ingest, then queue a training job; returns its id (jobs run one at a time) and the images
        as ingested (what was accepted, captioned and skipped: the Train tab says so at once).

        `captions` ({image name: caption}, as caption_images names them) replace the uploaded ones: the
        caption editor's text. `{trigger}` in one becomes the trigger word; an empty one falls back to the
        captioner or the template. Training adds the trigger word to every caption that lacks it.
        """
        settings = {key: value for key, value in settings.items() if value not in (None, "")}
        cfg = make_config(preset, self.base.defaults_family, **settings).validate()
        # The job manager checks this too; checking here refuses before any image is read.
        self.library.ensure_free(cfg.style_name)
        if not sources:
            raise ValueError("No images were uploaded: add image files or a zip of images.")
        images = ingest(sources, cfg.resolution or self.base.resolution, limits=self.limits)
        unknown = sorted(set(captions or {}) - set(images.names))
        if unknown:
            raise ValueError(f"Captions were given for images that are not in the upload: {', '.join(unknown)}. "
                             f"The upload has: {', '.join(images.names)}.")
        for index, name in enumerate(images.names):
            if name in (captions or {}):
                text = str(captions[name] or "").replace("{trigger}", cfg.trigger_word).strip()
                images.captions[index] = text or None
        return self.jobs.submit(cfg, images), images

    def caption_images(self, sources: list[str], caption_template: str, auto_caption: bool = True,
                       bucketing: bool = True) -> tuple[list[Caption], str]:
        """Each uploaded image's caption as training would start from it, its bucket, and a note on how they were made.

        An image's .txt comes first; then the base model's captioner (models/captions.py) when `auto_caption`
        is on; then `caption_template`, shown as it is ({trigger} is filled in at training). The bucket is the
        size the picture trains at (trainer.data.bucket_of): its aspect-ratio bucket, or the square without bucketing.
        """
        images = ingest(sources, self.base.resolution, limits=self.limits)
        self._prune_previews()
        missing = [i for i, text in enumerate(images.captions) if not (text and text.strip())]
        found, note = [], ""
        if missing and auto_caption:
            self._size_threads()
            found, note = auto_captions([images.images[i] for i in missing], self.base.model_id, self.base.family)
        elif missing:
            note = "Automatic captions are off (Advanced: Auto caption): images without a .txt use the template."
        by_index = dict(zip(missing, found))
        rows = []
        for index, (name, text) in enumerate(zip(images.names, images.captions)):
            if text and text.strip():
                rows.append(Caption(name, text.strip(), ".txt"))
            elif by_index.get(index):
                rows.append(Caption(name, by_index[index], "captioner"))
            else:
                rows.append(Caption(name, caption_template, "template"))
            rows[-1].thumbnail = str(self._preview(images.images[index]))
            rows[-1].bucket = "{}x{}".format(*self._bucket(images.original_size(index), bucketing))
        if images.skipped:
            note += f" Skipped {len(images.skipped)}: " + "; ".join(images.skipped_lines())
        return rows, note.strip()

    def _bucket(self, size: tuple[int, int], bucketing: bool) -> tuple[int, int]:
        """(width, height) a picture of `size` trains at on this base, as training picks it."""
        side = self.base.resolution
        if not bucketing:
            return side, side
        return bucket_of(size, bucket_sizes(side, bucket_step(side, size_multiple(self.base.pipe))))

    def _preview(self, image) -> Path:
        """A small PNG of an ingested image, named by its content (the same picture is written once)."""
        folder = self.workspace / "previews"
        folder.mkdir(exist_ok=True)
        thumb = image.copy()
        thumb.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
        data = io.BytesIO()
        thumb.save(data, format="PNG")
        path = folder / f"{hashlib.sha256(data.getvalue()).hexdigest()[:20]}.png"
        if not path.exists():
            write_bytes_atomic(path, data.getvalue())
        return path

    def _prune_previews(self) -> None:
        """Previews only serve the form being filled in: those older than a day go."""
        for old in (self.workspace / "previews").glob("*.png"):
            if time.time() - old.stat().st_mtime > PREVIEW_KEEP_S:
                old.unlink(missing_ok=True)

    # -- saved presets (TOML, the same files `python -m trainer --config` reads) ---------------
    def save_preset(self, name: str, preset: str, **settings) -> Path:
        """Save a preset plus the settings given (empty ones are left to the preset) as presets/<name>.toml."""
        check_style_name(name)  # the same safe-name rule as styles: it becomes a file name
        settings = {key: value for key, value in settings.items() if value not in (None, "", [])}
        make_config(preset, **settings)  # refuse unknown fields now, not when the preset is loaded
        self.presets.mkdir(exist_ok=True)
        return write_settings(self.presets / f"{name}.toml", {"preset": preset, **settings})

    def load_preset(self, name: str) -> tuple[str, dict]:
        """(built-in preset, settings) of a saved preset."""
        path = self.presets / f"{check_style_name(name)}.toml"
        if not path.is_file():
            raise ValueError(f"No saved preset named {name!r}. Saved: {', '.join(self.preset_names()) or 'none yet'}.")
        values = read_settings(path)
        preset = values.pop("preset", DEFAULT_PRESET)
        make_config(preset, **values)  # a hand-edited file with a typo gets a message naming the field
        return preset, values

    def preset_names(self) -> list[str]:
        return sorted(p.stem for p in self.presets.glob("*.toml") if not p.name.startswith("."))

    def example(self, name: str) -> tuple[list[Path], str]:
        """The files of an example style (written once into the workspace) and a free style name for it."""
        if name not in EXAMPLES:
            raise ValueError(f"Unknown example {name!r}; choose one of {', '.join(EXAMPLES)}.")
        folder = self.workspace / "examples" / name
        if not folder.is_dir():
            try:
                with staged_folder(folder) as staging:  # a half-written example folder is never seen
                    EXAMPLES[name].write(staging)
            except FileExistsError:  # another session wrote it first
                pass
        style_name = next(
            candidate
            for candidate in [name] + [f"{name}-{i}" for i in range(2, 1000)]
            if not self.library.exists(candidate) and not self.jobs.holder(candidate)  # nor a queued job's
        )
        return sorted(folder.iterdir()), style_name

    # -- generate ------------------------------------------------------------------------
    def generate(self, prompt: str, styles: dict[str, float] | None = None, owner: str = "", image: str | None = None,
                 **options) -> Generated:
        """Draw and save; `options` are Blender.generate's (blocks, bands, mode, strength too), checked there.
        `image`: a start picture's path, to restyle it; it passes the training uploads' checks (trainer.data).
        Generations take turns: `owner` (the page's or API client's session) can ask its place
        (generation_queue) or cancel it (cancel_generation)."""
        prompt = _prompt(prompt)
        warnings_before = len(self.blender.warnings)
        start = self._start_image(image) if image else None
        self._size_threads()
        images = self.blender.generate(prompt, styles=styles, ticket=Ticket(owner), image=start, **options)
        recipe = json.loads(images[0].info["style_studio"])  # the blender's own record of what it applied
        stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{recipe['seed']}"
        paths = [
            save_png(image, self.outputs / f"{stamp}-{index}-{time.monotonic_ns() % 10**6}.png")
            for index, image in enumerate(images)
        ]
        return Generated(paths, recipe["styles"], self.blender.warnings[warnings_before:], recipe["prompt"],
                         recipe["seed"])

    def grid(self, prompt: str, rows: str = "styles", styles: list[str] | None = None, scales=DEFAULT_SCALES,
             seeds=DEFAULT_SEEDS, owner: str = "", add_triggers: bool = True, **options) -> Grid:
        """A scale grid (styles/grid.py) saved into outputs/; `styles` empty: every style in the library.

        `scales` and `seeds` are lists or comma-separated text; `options` are generate's, all checked before the
        first picture (seed -1: one random seed for the grid). Cancelling `owner`'s generations stops the grid.
        """
        prompt = _prompt(prompt)
        checked = self.blender.check_options(prompt, **options)
        options = {key: checked[key] for key in ("negative_prompt", "seed", "steps", "guidance", "width", "height")}
        scales = numbers(scales, float, "Scales")
        seeds = numbers(seeds, int, "Seeds") if rows == "seeds" else []  # a style grid has one seed: options'
        for seed in seeds:
            generation.whole(seed, "Seeds", 0, generation.MAX_SEED)
        if styles is not None and not isinstance(styles, list | tuple):
            raise ValueError(f"Styles is {brief(styles)}: send a list of style names, e.g. [\"ink\", \"polka\"].")
        warnings_before = len(self.blender.warnings)
        self._size_threads()
        picture = draw_grid(self.blender, prompt, rows, list(styles or self._usable_styles()), scales, seeds,
                            add_triggers=add_triggers, ticket=Ticket(owner), **options)
        stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{time.monotonic_ns() % 10**6}"
        path = save_png(picture, self.outputs / f"grid-{stamp}.png")
        warnings = list(dict.fromkeys(self.blender.warnings[warnings_before:]))  # once each, not once per cell
        return Grid(path, json.loads(picture.info["style_studio"]), warnings)

    def save_blend(self, name: str, styles: dict[str, float], blocks=None, mode=None, rank=0) -> tuple[str, dict]:
        """Save a blend as a style of its own (issue 20): exact (rank 0), or re-ranked by SVD with its error.
        Returns (name, report: rank, error, per-layer errors). The style records its sources and scales."""
        if not isinstance(name, str) or not name.strip():
            raise ValueError("Name the blend to save it as a style.")
        name = name.strip()
        self.library.ensure_free(name)
        self.jobs.check_name_free(name)
        patch, report = self.blender.blend_as_adapter(styles, blocks, mode, rank)
        active = report["styles"]  # the scales as the blender checked them
        triggers = [trigger for trigger in (self.library.get(n).trigger for n in active) if trigger]
        info = {"trigger": ", ".join(dict.fromkeys(triggers)), "base_model": self.base.model_id,
                "unet_hash": self.base.unet_hash, "created": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
                "blend_of": json.dumps({"styles": active, "blocks": blocks or {}, "mode": mode or "sum",
                                        "rank": report["rank"], "error": report["error"]}, sort_keys=True)}
        style = formats.patch_style(patch, info, self.base.family, self.base.layout)
        self.library.save(name, style.to_bytes())
        return name, report

    def save_mix(self, name: str, mix: dict) -> Path:
        """Keep a named blend (styles, scales, blocks, bands, mode) in workspace/blends/<name>.json, checked first."""
        check_style_name(name)
        if not isinstance(mix, dict):
            raise ValueError(f"A blend is {brief(mix)}: send {{styles, blocks, bands, mode}}.")
        self.blender.check_mix(mix.get("styles"), mix.get("blocks"), mix.get("bands"), mix.get("mode"))
        kept = {key: mix[key] for key in ("styles", "blocks", "bands", "mode") if mix.get(key)}
        path = self.workspace / "blends" / f"{name}.json"
        path.parent.mkdir(exist_ok=True)
        return write_bytes_atomic(path, json.dumps(kept, indent=1, sort_keys=True).encode())

    def mixes(self) -> list[str]:
        folder = self.workspace / "blends"
        return sorted(path.stem for path in folder.glob("*.json")) if folder.is_dir() else []

    def load_mix(self, name: str) -> dict:
        """A named blend as saved, its styles checked against the library (a deleted style is named)."""
        path = self.workspace / "blends" / f"{name}.json"
        if not isinstance(name, str) or name not in self.mixes():
            raise ValueError(f"No saved blend {brief(name)}. Saved blends: {', '.join(self.mixes()) or 'none yet'}.")
        try:
            mix = json.loads(path.read_text())
        except ValueError:
            raise ValueError(f"The saved blend {name!r} ({path}) is not JSON; save it again.") from None
        self.blender.check_mix(mix.get("styles"), mix.get("blocks"), mix.get("bands"), mix.get("mode"))
        return mix

    def _start_image(self, path: str) -> Image.Image:
        """A start picture for restyling, read by the training uploads' own ingest (caps, formats, decoding),
        kept up to the largest side a generation draws."""
        try:
            return ingest([path], generation.MAX_SIDE, limits=self.limits).images[0]
        except ValueError as error:
            raise ValueError(f"Start image: {error}") from None

    def generation_queue(self, owner: str = "") -> dict:
        """Where `owner`'s generation stands: {"position": 0 running, n behind n others, None without one;
        "waiting": how many wait in all; "step", "steps": the running generation's progress}."""
        running = self.blender.line.running()
        return {"position": self.blender.line.position(owner), "waiting": self.blender.line.waiting(),
                "step": running.step if running else 0, "steps": running.steps if running else 0}

    def cancel_generation(self, owner: str = "") -> str:
        """Cancel `owner`'s generations: a waiting one leaves the line, a running one stops at its next step."""
        count = self.blender.line.cancel(owner)
        if not count:
            return "No generation of yours is running or waiting."
        return f"Cancelled {count} generation{'s' if count > 1 else ''}: a running one stops at its next step."

    def _size_threads(self) -> None:
        """Torch's threads for work in this process: every core, or one while a job trains beside it."""
        use_threads(torch_threads(BESIDE_TRAINING if self.jobs.training else ALONE, self.threads))

    # -- library -------------------------------------------------------------------------
    def _usable_styles(self) -> list[str]:
        """The styles a grid of "every style" draws: the readable ones (a damaged file is listed, not drawn)."""
        return [info.name for info in self.library.list()]

    def list_styles(self) -> list[dict]:
        """Every style file, by name: a readable one's summary with "unreadable": None; a damaged or foreign one
        with its other fields None and "unreadable" the reason (it can only be deleted), never a silent gap."""
        styles, problems = self.library.scan()
        blank = dict.fromkeys(StyleInfo("", Path(), None).summary())
        rows = [{**info.summary(), "unreadable": None} for info in styles]
        rows += [{**blank, "name": problem.name, "unreadable": problem.reason} for problem in problems]
        return sorted(rows, key=lambda row: row["name"])

    def export(self, name: str, layout: str = "kohya") -> Path:
        """A download copy of a style: the kohya layout (A1111, ComfyUI and diffusers load it) or diffusers'.

        Each layout has its own folder, so one layout's export never overwrites the other's. The kohya file
        keeps the style's name (A1111 calls a LoRA by its file name); the diffusers one is <name>_diffusers, so
        the two downloads are told apart in a downloads folder (issue 18).
        """
        if layout not in EXPORT_LAYOUTS:
            raise ValueError(f"Unknown export layout {layout!r}; choose one of {', '.join(EXPORT_LAYOUTS)}.")
        source = self.library.get(name).path
        suffix = "" if layout == "kohya" else "_diffusers"
        target = self.exports / layout / f"{name}{suffix}.safetensors"
        target.parent.mkdir(exist_ok=True)
        if layout == "kohya":
            tensors, metadata = formats.to_kohya(source, self.base.layout.layers_per_block)
            formats.write_atomic(target, tensors, metadata)
        else:
            write_bytes_atomic(target, formats.to_diffusers(source, self.base.layout))
        return target

    def import_style(self, path: str | Path, name: str = "") -> tuple[str, list[str]]:
        """Import an adapter made elsewhere (any layout and kind formats.read_adapter reads) as a style.

        Returns (style name, notes on what it holds and what was assumed). The name defaults to the file's stem,
        made safe; an existing style is never replaced.
        """
        path = Path(path)
        if name is not None and not isinstance(name, str):
            raise ValueError(f"Name is {brief(name)}: send the style's name as text, or nothing for the file's name.")
        name = name.strip() if name and name.strip() else safe_style_name(path.stem)
        self.library.ensure_free(name)  # checks the name too: refused before the file is read
        self.jobs.check_name_free(name)  # nor the name a queued or running job will save under
        adapter, notes = formats.import_style(path, self.base.layout, self.base.family)
        self.library.save(name, adapter.to_bytes())
        return name, notes

    def placeholder_thumbnail(self) -> Path:
        """The picture the Styles gallery shows for a style without a thumbnail (an import): drawn once."""
        path = self.workspace / "thumbnails" / "placeholder.png"
        if not path.is_file():
            path.parent.mkdir(exist_ok=True)
            picture = Image.new("RGB", (64, 64), (228, 228, 231))
            draw = ImageDraw.Draw(picture)
            draw.rectangle((4, 4, 59, 59), outline=(161, 161, 170))
            draw.text((32, 32), "LoRA", fill=(82, 82, 91), anchor="mm")
            data = io.BytesIO()
            picture.save(data, format="PNG")
            write_bytes_atomic(path, data.getvalue())
        return path

    def rename(self, old: str, new: str) -> None:
        self.jobs.check_name_free(new)
        self.library.rename(old, new)

    def delete(self, name: str) -> None:
        self.library.delete(name)


def _prompt(prompt) -> str:
    """The prompt, checked: text of at most MAX_PROMPT_CHARS, not blank."""
    prompt = generation.text(prompt, "Prompt")
    if not prompt.strip():
        raise ValueError("Write a prompt first.")
    return prompt


def describe(record: JobRecord, progress: Progress, position: int = 0) -> str:
    """One line of Markdown for a job's state."""
    head = f"Job {record.id} · **{record.style_name}** · {record.state}"
    if record.state == "queued":
        return f"{head} (position {position} in the queue). {record.message}"
    if record.state == "running" and record.step:
        return (
            f"{head} · step {record.step} of {record.total_steps} · "
            f"loss {progress.losses[-1] if progress.losses else float('nan'):.4f} · "
            f"{progress.it_per_s:.1f} it/s · {_duration(progress.eta_s)} left"
        )
    skipped = f" Skipped {len(record.skipped)}: " + "; ".join(record.skipped) if record.skipped else ""
    return f"{head}. {record.message}{skipped}"


def best_validation(validation: list[dict]) -> dict | None:
    """The validation with the best score so far (the earliest of equals, as training keeps it), or None."""
    return max(validation, key=lambda entry: entry["score"]) if validation else None


def validation_line(record: JobRecord, progress: Progress) -> str:
    """Which checkpoint the job's style comes from, by its validation scores (issue 17); '' before the first."""
    best = best_validation(progress.validation)
    if best is None:
        return ""
    if record.config.get("keep") == "last":
        last = progress.validation[-1]
        return (f"Latest validation: step {last['step']}, score {last['score']:.3f}; the style is the last step's "
                f"adapter (keep = last). Best so far: step {best['step']}, score {best['score']:.3f}.")
    at = f"step {best['step']}, score {best['score']:.3f}"
    if record.state in ("queued", "running"):
        return f"The style will come from the best checkpoint so far: {at}."
    if record.state == "finished":
        return f"Best validation: {at}."
    return (f"Best validation so far: {at}. Resume to finish with the best checkpoint as the style; "
            "Keep checkpoint saves the newest one.")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60} min {seconds % 60} s" if seconds >= 60 else f"{seconds} s"
