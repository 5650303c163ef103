"""The layering, checked: imports run one way (app -> trainer, styles -> models -> core), the torch-free modules
load no torch, and the UI's functions stay short enough to read at once."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("core", "embedded", "models", "styles", "trainer", "app")
# What each package may import of the project (its own modules aside).
ALLOWED = {
    "core": set(),
    "embedded": set(),
    "models": {"core", "embedded"},
    "styles": {"core", "models"},
    "trainer": {"core", "models", "styles"},
    "app": {"core", "embedded", "models", "styles", "trainer"},
}
# The training loop and what it is made of hand their adapter back: of styles/ they may use the file format only.
HANDS_BACK = ("trainer/train.py", "trainer/checkpoints.py", "trainer/config.py", "trainer/data.py", "trainer/events.py",
              "trainer/graphs.py")
TORCH_FREE = ("core.names", "core.files", "core.threads", "embedded", "embedded.examples", "styles.metadata",
              "styles.library", "trainer.config", "trainer.events", "trainer.pace")


def _project_imports(path: Path) -> set[str]:
    """The project modules a file imports, anywhere in it (a function's own imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name.split(".")[0] in PACKAGES}


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_run_one_way(package):
    wrong = {
        f"{path.relative_to(ROOT)} imports {name}"
        for path in sorted((ROOT / package).rglob("*.py"))
        for name in _project_imports(path)
        if name.split(".")[0] not in ALLOWED[package] | {package}
    }
    assert not wrong, sorted(wrong)


def test_the_training_loop_uses_only_the_file_format_of_styles():
    wrong = [f"{path} imports {name}" for path in HANDS_BACK for name in _project_imports(ROOT / path)
             if name.startswith("styles.") and not name.startswith("styles.formats")]
    assert not wrong


def _loads_torch(code: str) -> bool:
    result = subprocess.run([sys.executable, "-c", code + "\nimport sys; print('torch' in sys.modules)"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1] == "True"


def test_the_torch_free_modules_load_no_torch():
    assert not _loads_torch("\n".join(f"import {module}" for module in TORCH_FREE))
    assert _loads_torch("import styles.formats")  # the check can fail: this module does need torch


def test_the_cli_answers_help_without_loading_torch():
    code = "import sys, contextlib, io\nsys.argv = ['python -m trainer', '--help']\nimport trainer.__main__ as cli\n" \
           "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n    cli.main()"
    assert not _loads_torch(code)


def test_no_function_in_the_app_is_longer_than_80_lines():
    long = [
        f"{path.name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path in sorted((ROOT / "app").glob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80
    ]
    assert not long
