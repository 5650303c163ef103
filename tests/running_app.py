"""The app, served for a test: `python -m app` as a real subprocess (start_app), or its own serve() in this
process (serving), which skips a new interpreter and a second model load."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_app(workspace: Path, extra_args: list[str] | None = None, auth: tuple[str, str] | None = None):
    """(process, gradio_client.Client, url) of an app on the embedded model; its output goes to workspace/app.log.

    `extra_args` go on `python -m app`'s command line; `auth` is what the client logs in with.
    """
    from gradio_client import Client

    port = free_port()
    log_path = Path(workspace) / "app.log"
    with open(log_path, "a") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "app", "--workspace", str(workspace), "--port", str(port), *(extra_args or [])],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"},
        )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError("app did not start:\n" + log_path.read_text()[-3000:])
        try:
            return process, Client(url, verbose=False, auth=auth), url
        except Exception:
            time.sleep(1)


def stop_app(process: subprocess.Popen) -> None:
    """SIGTERM, as a service stop: the app stops a running job with a checkpoint first (seconds, at most ~30 s)."""
    process.terminate()
    process.wait(timeout=60)


@contextlib.contextmanager
def serving(workspace: Path, limits=None, auth: tuple[str, str] | None = None):
    """(gradio_client.Client, url, Studio) of the app's own serve() in this process, on a free port; closed after."""
    from gradio_client import Client

    from app.__main__ import serve
    from app.studio import Studio

    studio = Studio(workspace, limits=limits)
    port = free_port()
    demo = serve(studio, port=port, auth=auth, block=False)
    url = f"http://127.0.0.1:{port}/"
    try:
        yield Client(url, verbose=False, auth=auth), url, studio
    finally:
        demo.close()
        studio.close()
