"""The actions behind the UI and the API, as plain Python: train, generate, list, export, rename, delete.

Handlers raise ValueError with a message meant for the user; the UI layer turns it into gr.Error.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from core.files import staged_folder, write_bytes_atomic
from core.names import check_style_name, safe_style_name
from embedded.examples import EXAMPLES
from models.base import load_base
from styles import formats
from styles.blend import Blender, save_png
from styles.library import StyleLibrary
from trainer.config import DEFAULT_PRESET, make_config, read_settings, write_settings
from trainer.data import UploadLimits, ingest
from trainer.jobs import JobManager, JobRecord, Progress

EXPORT_LAYOUTS = ("kohya", "diffusers")  # the first is the default download


@dataclass
class Generated:
    paths: list[Path]
    active: dict[str, float]
    warnings: list[str]


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
    def submit(self, sources: list[str], preset: str, **settings) -> str:
        """Validate and ingest, then queue a training job; returns its id (jobs run one at a time)."""
        settings = {key: value for key, value in settings.items() if value not in (None, "")}
        cfg = make_config(preset, **settings).validate()
        # The job manager checks this too; checking here refuses before any image is read.
        self.library.ensure_free(cfg.style_name)
        if not sources:
            raise ValueError("No images were uploaded: add image files or a zip of images.")
        images = ingest(sources, cfg.resolution or self.base.resolution, limits=self.limits)
        return self.jobs.submit(cfg, images)

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
        return Generated(paths, recipe["styles"], self.blender.warnings[warnings_before:])

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


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60} min {seconds % 60} s" if seconds >= 60 else f"{seconds} s"
