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

from core.files import staged_folder, write_bytes_atomic
from core.names import check_style_name, safe_style_name
from embedded.examples import EXAMPLES
from models.base import load_base
from models.captions import auto_captions
from styles import formats
from styles.blend import Blender, save_png
from styles.grid import DEFAULT_SCALES, DEFAULT_SEEDS, draw_grid, numbers
from styles.library import StyleLibrary
from trainer.config import DEFAULT_PRESET, make_config, read_settings, write_settings
from trainer.data import UploadLimits, ingest
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


class Studio:
    """One workspace, one base model, one blender; training runs in child processes."""

    def __init__(self, workspace: str | Path, model: str | None = None, limits: UploadLimits | None = None,
                 model_config: str | None = None):
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
        self.blender = Blender(self.base, self.library)
        # one training job at a time, in a child process
        self.jobs = JobManager(self.workspace, model, model_config).start()

    def close(self) -> None:
        """Stop the job queue (a running job stops with a checkpoint, to resume)."""
        self.jobs.close()

    # -- train ---------------------------------------------------------------------------
    def submit(self, sources: list[str], preset: str, captions: dict[str, str] | None = None, **settings) -> str:
        """Validate and ingest, then queue a training job; returns its id (jobs run one at a time).

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
        return self.jobs.submit(cfg, images)

    def caption_images(self, sources: list[str], caption_template: str, auto_caption: bool = True
                       ) -> tuple[list[Caption], str]:
        """Each uploaded image's caption as training would start from it, and a note on how they were made.

        An image's .txt comes first; then the base model's captioner (models/captions.py) when `auto_caption`
        is on; then `caption_template`, shown as it is ({trigger} is filled in at training).
        """
        images = ingest(sources, self.base.resolution, limits=self.limits)
        self._prune_previews()
        missing = [i for i, text in enumerate(images.captions) if not (text and text.strip())]
        found, note = [], ""
        if missing and auto_caption:
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
        if images.skipped:
            note += f" Skipped {len(images.skipped)}: " + "; ".join(images.skipped_lines())
        return rows, note.strip()

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
            if not self.library.exists(candidate)
        )
        return sorted(folder.iterdir()), style_name

    # -- generate ------------------------------------------------------------------------
    def generate(self, prompt: str, styles: dict[str, float] | None = None, **options) -> Generated:
        if not prompt or not prompt.strip():
            raise ValueError("Write a prompt first.")
        warnings_before = len(self.blender.warnings)
        images = self.blender.generate(prompt, styles=styles, **options)
        recipe = json.loads(images[0].info["style_studio"])  # the blender's own record of what it applied
        stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{recipe['seed']}"
        paths = [
            save_png(image, self.outputs / f"{stamp}-{index}-{time.monotonic_ns() % 10**6}.png")
            for index, image in enumerate(images)
        ]
        return Generated(paths, recipe["styles"], self.blender.warnings[warnings_before:], recipe["prompt"])

    def grid(self, prompt: str, rows: str = "styles", styles: list[str] | None = None, scales=DEFAULT_SCALES,
             seeds=DEFAULT_SEEDS, **options) -> Grid:
        """A scale grid (styles/grid.py) saved into outputs/; `styles` empty: every style in the library.

        `scales` and `seeds` are lists or comma-separated text; `options` are generate's.
        """
        if not prompt or not prompt.strip():
            raise ValueError("Write a prompt first.")
        scales = numbers(scales, float, "Scales")
        seeds = numbers(seeds, int, "Seeds") if rows == "seeds" else []  # a style grid has one seed: options'
        warnings_before = len(self.blender.warnings)
        picture = draw_grid(self.blender, prompt, rows, list(styles or self.library.names()), scales, seeds, **options)
        stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{time.monotonic_ns() % 10**6}"
        path = save_png(picture, self.outputs / f"grid-{stamp}.png")
        warnings = list(dict.fromkeys(self.blender.warnings[warnings_before:]))  # once each, not once per cell
        return Grid(path, json.loads(picture.info["style_studio"]), warnings)

    # -- library -------------------------------------------------------------------------
    def list_styles(self) -> list[dict]:
        return [info.summary() for info in self.library.list()]

    def export(self, name: str, layout: str = "kohya") -> Path:
        """A download copy of a style: the kohya layout (A1111, ComfyUI and diffusers load it) or diffusers'.

        Each layout has its own folder, so the file keeps the style's name (A1111 calls a LoRA by
        its file name) and one layout's export never overwrites the other's.
        """
        if layout not in EXPORT_LAYOUTS:
            raise ValueError(f"Unknown export layout {layout!r}; choose one of {', '.join(EXPORT_LAYOUTS)}.")
        source = self.library.get(name).path
        target = self.exports / layout / f"{name}.safetensors"
        target.parent.mkdir(exist_ok=True)
        if layout == "kohya":
            tensors, metadata = formats.to_kohya(source, self.base.layout.layers_per_block)
            formats.write_atomic(target, tensors, metadata)
        else:
            write_bytes_atomic(target, source.read_bytes())
        return target

    def import_style(self, path: str | Path, name: str = "") -> tuple[str, list[str]]:
        """Import a LoRA made elsewhere (diffusers, PEFT or kohya .safetensors) as a style.

        Returns (style name, notes on what was left out). The name defaults to the file's stem,
        made safe; an existing style is never replaced.
        """
        path = Path(path)
        name = name.strip() if name and name.strip() else safe_style_name(path.stem)
        self.library.ensure_free(name)  # checks the name too: refused before the file is read
        adapter, notes = formats.import_style(path, self.base.layout, self.base.family)
        self.library.save(name, adapter.to_bytes())
        return name, notes

    def rename(self, old: str, new: str) -> None:
        self.library.rename(old, new)

    def delete(self, name: str) -> None:
        self.library.delete(name)


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
