"""StyleLibrary: the styles on disk, keyed by name. Storage only, and no torch: what goes inside a
style file is styles/formats.py's business; the library lists styles from their headers alone.

workspace/styles/<name>.safetensors   the adapter (diffusers layout, metadata inside)
workspace/styles/<name>.png           its thumbnail

A style file is only ever written whole (temporary file, then rename), and an existing style
is never replaced unless the caller says so.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from core.files import read_safetensors_header, write_bytes_atomic
from core.names import STYLE_NAME_PATTERN, brief, check_style_name
from styles.metadata import style_info

STYLE_SUFFIX = ".safetensors"
THUMB_SUFFIX = ".png"


@dataclass
class StyleInfo:
    name: str
    path: Path
    thumbnail: Path | None
    trigger: str = ""
    base_model: str = ""
    family: str = ""
    unet_hash: str = ""
    created: str = ""
    config: dict = field(default_factory=dict)
    mtime: float = 0.0
    steps_done: int | None = None  # the step its weights come from (the best validation, a kept checkpoint)
    validation_score: float | None = None  # its shift on held-out prompts at that step (trainer/validation.py)

    def summary(self) -> dict:
        """A JSON-friendly description, as the API returns it."""
        return {
            "name": self.name,
            "trigger": self.trigger,
            "base_model": self.base_model,
            "family": self.family,
            "created": self.created,
            "rank": self.config.get("rank"),
            "alpha": self.config.get("alpha") or self.config.get("rank"),
            "steps": self.steps_done if self.steps_done is not None else self.config.get("steps"),
            "validation_score": self.validation_score,
            "learning_rate": self.config.get("learning_rate"),
        }


@dataclass
class Unreadable:
    """A file in the styles folder that cannot be used as a style, and why (StyleLibrary.problems)."""

    name: str  # the style name it would have (cut short when it is not a valid one)
    file: str
    reason: str  # a sentence naming the file, what is wrong and what to do


class StyleLibrary:
    """Styles stored in a workspace folder.

    >>> lib = StyleLibrary("workspace")  # doctest: +SKIP
    >>> [s.name for s in lib.list()]     # doctest: +SKIP
    """

    def __init__(self, workspace: str | Path):
        self.root = Path(workspace) / "styles"
        self.root.mkdir(parents=True, exist_ok=True)

    def path_for(self, name: str) -> Path:
        return self.root / (check_style_name(name) + STYLE_SUFFIX)

    def exists(self, name: str) -> bool:
        return self.path_for(name).is_file()

    def names(self) -> list[str]:
        return sorted(p.stem for p in self.root.glob("*" + STYLE_SUFFIX) if STYLE_NAME_PATTERN.match(p.stem))

    def list(self) -> list[StyleInfo]:
        """Every readable style, by name; unreadable files are left out here (and left alone): see problems()."""
        return self.scan()[0]

    def problems(self) -> list[Unreadable]:
        """Every style file that cannot be used, with the reason (damaged, not safetensors, a name not allowed)."""
        return self.scan()[1]

    def scan(self) -> tuple[list[StyleInfo], list[Unreadable]]:
        """(readable styles, unreadable files), by name: from headers and file sizes, no tensor is loaded."""
        infos, problems = [], []
        for path in sorted(self.root.glob("*" + STYLE_SUFFIX)):
            if path.name.startswith("."):  # hidden: not a style, e.g. an editor's or a sync tool's file
                continue
            if not STYLE_NAME_PATTERN.match(path.stem):
                shown = brief(path.name, quote=False)  # a hand-made or hostile name is cut short
                problems.append(Unreadable(brief(path.stem, quote=False), shown,
                                           f"{shown}: its name is not a style name (1-64 letters, digits, "
                                           "'-' or '_'): rename the file to use it."))
                continue
            try:
                infos.append(self.get(path.stem))
            except (ValueError, OSError) as err:
                problems.append(Unreadable(path.stem, path.name, str(err)))
        return infos, problems

    def get(self, name: str) -> StyleInfo:
        """A style's facts from its file's header; ValueError when there is no such style or its file is damaged."""
        path = self.path_for(name)
        if not path.is_file():
            raise ValueError(f"No style named {name!r}. Available styles: {', '.join(self.names()) or 'none yet'}.")
        try:
            metadata, _ = read_safetensors_header(path)  # also checks the file's size against its tensor table
            info = style_info(metadata)
            config = json.loads(info.get("config", "{}"))
        except ValueError as err:
            raise ValueError(f"Style {name!r} cannot be used: {err}") from None
        thumb = path.with_suffix(THUMB_SUFFIX)
        return StyleInfo(
            name=name,
            path=path,
            thumbnail=thumb if thumb.is_file() else None,
            trigger=info.get("trigger", ""),
            base_model=info.get("base_model", ""),
            family=info.get("family", ""),
            unet_hash=info.get("unet_hash", ""),
            created=info.get("created", ""),
            config=config if isinstance(config, dict) else {},
            mtime=path.stat().st_mtime,
            steps_done=_number(info.get("steps_done"), int),
            validation_score=_number(info.get("validation_score"), float),
        )

    def ensure_free(self, name: str) -> None:
        """Raise FileExistsError, with what to do, when a style of this name exists."""
        if self.exists(name):
            raise FileExistsError(f"A style named {name!r} already exists; pick another name or delete it first.")

    def save(self, name: str, data: bytes, thumbnail=None, overwrite: bool = False) -> Path:
        """Store a style file's bytes (StyleAdapter.to_bytes()) whole, with an optional PIL thumbnail.

        An existing style is never replaced unless `overwrite`: FileExistsError says what to do.
        """
        path = self.path_for(name)
        if not overwrite:
            self.ensure_free(name)
        if thumbnail is not None:
            buffer = io.BytesIO()
            thumbnail.save(buffer, format="PNG")
            write_bytes_atomic(path.with_suffix(THUMB_SUFFIX), buffer.getvalue())
        return write_bytes_atomic(path, data)

    def rename(self, old: str, new: str) -> StyleInfo:
        source, target = self.get(old).path, self.path_for(new)
        if target.exists():
            raise ValueError(f"A style named {new!r} already exists; pick another name.")
        thumb = source.with_suffix(THUMB_SUFFIX)
        source.rename(target)
        if thumb.exists():
            thumb.rename(target.with_suffix(THUMB_SUFFIX))
        return self.get(new)

    def delete(self, name: str) -> None:
        """Delete a style and its thumbnail; a damaged style file too (that is what it is listed for)."""
        path = self.path_for(name)
        if not path.is_file():
            self.get(name)  # raises the "No style named" message, with the styles there are
        path.unlink()
        path.with_suffix(THUMB_SUFFIX).unlink(missing_ok=True)


def _number(text: str | None, kind: type):
    """A metadata value as a number, or None when it is missing or not a number (a hand-edited file)."""
    try:
        return kind(text) if text is not None else None
    except ValueError:
        return None
