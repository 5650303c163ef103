"""Names every layer agrees on: what a style may be called, and which UNet layers a style adapts."""

from __future__ import annotations

import re

STYLE_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
# The UNet attention projections a style adapts by default (TrainConfig.target_modules), and the
# only modules an imported adapter keeps.
ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


def brief(value, limit: int = 40, quote: bool = True) -> str:
    """`value` as repr() shows it (text unquoted with quote=False), cut to its first `limit` characters plus "…":
    how a message names what a client sent (a 3 MB "name" is echoed as 40 characters, not 3 MB, issue 18).

    >>> brief("ink"), brief("x" * 100, 5), brief("ink", quote=False), brief(float("nan"))
    ("'ink'", "'xxxxx'…", 'ink', 'nan')
    """
    text = value if isinstance(value, str) else repr(value)
    shown = repr(text[:limit]) if isinstance(value, str) and quote else text[:limit]
    return shown + ("…" if len(text) > limit else "")


def check_style_name(name: str) -> str:
    """Return the name if it is safe as a file name and adapter name, else raise ValueError.

    >>> check_style_name("ink-2")
    'ink-2'
    """
    if not isinstance(name, str) or not STYLE_NAME_PATTERN.match(name):
        raise ValueError(
            f"Style name {brief(name)} is not allowed: use 1-64 letters, digits, '-' or '_', "
            "starting with a letter or digit."
        )
    return name


def safe_style_name(text: str) -> str:
    """A valid style name made from free text (e.g. a file name): unsafe characters become '-'.

    >>> safe_style_name("My Pixel Art (v2)")
    'My-Pixel-Art-v2'
    """
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-_")[:64]
    return name or "imported"


def with_trigger(text: str, trigger: str) -> str:
    """`text` with `trigger` appended after a comma, unless `text` already holds it (as whole words).

    Training captions and generation prompts both go through this (issue 17), so a style is called
    up at generation by the same words it was trained with.

    >>> with_trigger("a red star", "ink"), with_trigger("Ink, a red star", "ink"), with_trigger("a red star", "")
    ('a red star, ink', 'Ink, a red star', 'a red star')
    """
    trigger = " ".join(trigger.split())
    if not trigger or re.search(rf"(?<![\w-]){re.escape(trigger)}(?![\w-])", text, re.IGNORECASE):
        return text
    return f"{text.rstrip().rstrip(',')}, {trigger}" if text.strip() else trigger
