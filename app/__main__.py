"""python -m app [--model M] [--host H] [--port P] [--workspace DIR] [--auth USER:PASSWORD] [--share] [--insecure]
[--threads N] [--allow-large]: start Style Studio.

SIGTERM or Ctrl-C stops it; a running job stops with a checkpoint, to resume."""

from __future__ import annotations

import argparse
import ipaddress
import math
import os
import signal
import sys
import threading
from pathlib import Path

from trainer.data import MB, UploadLimits

DEFAULT_WORKSPACE = Path(__file__).resolve().parent.parent / "workspace"
AUTH_ENV = "STYLE_STUDIO_AUTH"  # USER:PASSWORD, read when --auth is not given: keeps the password out of `ps`


def main(argv=None) -> None:
    defaults = UploadLimits()
    parser = argparse.ArgumentParser(prog="python -m app", description="Style Studio: train and blend image styles.")
    parser.add_argument("--model", default=None,
                        help="hub id, diffusers folder or .safetensors checkpoint (default: the embedded tiny model)")
    parser.add_argument("--model-config", default=None,
                        help="for a single-file --model offline: a diffusers folder or cached hub id with its configs")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--workspace", type=Path, default=DEFAULT_WORKSPACE,
                        help="folder for styles, outputs and exports")
    parser.add_argument("--auth", default=None, metavar="USER:PASSWORD",
                        help=f"ask for this user name and password (default: ${AUTH_ENV}); "
                             "required with --share or a --host other than this machine")
    parser.add_argument("--share", action="store_true",
                        help="also publish the app through a public gradio.live link (needs --auth)")
    parser.add_argument("--insecure", action="store_true",
                        help="allow --share or another --host without --auth (anyone who reaches it can use it)")
    parser.add_argument("--max-file-mb", type=_positive, default=defaults.max_file_bytes / MB, metavar="MB",
                        help="largest image or caption file, loose or in a zip "
                             f"(default: {defaults.max_file_bytes // MB})")
    parser.add_argument("--max-upload-mb", type=_positive, default=defaults.max_total_bytes / MB, metavar="MB",
                        help="largest upload, zips counted unpacked; also the largest single file the server takes "
                             f"(default: {defaults.max_total_bytes // MB})")
    parser.add_argument("--allow-large", action="store_true",
                        help="let generation draw up to 2048 px on any base (default: at most twice its native side, "
                             "so one request cannot hold the pipeline for minutes)")
    parser.add_argument("--threads", type=_count, default=None, metavar="N",
                        help="CPU threads for training and for generation (default: the cores this process may use; "
                             "a training job leaves one of them to the app)")
    args = parser.parse_args(argv)

    # Refuse an open app before the model loads, so a wrong flag costs a second, not a minute.
    auth = args.auth if args.auth is not None else (os.environ.get(AUTH_ENV) or None)
    try:
        credentials, warning = check_access(args.host, args.share, auth, args.insecure)
    except ValueError as err:
        parser.exit(2, f"error: {err}\n")
    if warning:
        print(f"WARNING: {warning}", file=sys.stderr, flush=True)
    limits = UploadLimits(max_file_bytes=round(args.max_file_mb * MB), max_total_bytes=round(args.max_upload_mb * MB))

    from app.studio import Studio  # torch and the model load only once the flags are known to be good

    try:
        studio = Studio(args.workspace, args.model, limits=limits, model_config=args.model_config,
                        threads=args.threads, allow_large=args.allow_large)
    except ValueError as err:
        parser.exit(2, f"error: {err}\n")
    stop = stop_event_on_signals()  # from here on, a job may run: stop it in order
    demo = serve(studio, host=args.host, port=args.port, share=args.share, auth=credentials, block=False)
    while not stop.wait(timeout=1.0):  # a timed wait, so the signal handler gets its turn
        pass
    print("Stopping: a running training job saves a checkpoint first (Resume continues it)…", file=sys.stderr,
          flush=True)
    studio.close()  # bounded: a child that does not stop within its grace time is terminated
    demo.close()


def stop_event_on_signals() -> threading.Event:
    """An event that SIGTERM (a service stop) and SIGINT (Ctrl-C) set: the app then stops in order, rather
    than dying on the spot (SIGTERM's default) and leaving its training process to run on alone."""
    stop = threading.Event()
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, lambda *_: stop.set())
    return stop


def serve(studio, host: str = "127.0.0.1", port: int = 7860, share: bool = False, auth: tuple[str, str] | None = None,
          block: bool = True):
    """Serve the page and its API for `studio`; with block=False, return the running gr.Blocks at once (tests)."""
    from app.access import app_kwargs
    from app.layout import CSS, build_ui

    demo = build_ui(studio).demo
    demo.queue(default_concurrency_limit=1)
    demo.launch(
        server_name=host, server_port=port, share=share, auth=auth,
        allowed_paths=[str(studio.workspace)],  # files the page may fetch: the workspace, nothing else
        max_file_size=studio.limits.largest_upload_file,  # the server drops bigger uploads before they reach the disk
        css=CSS, prevent_thread_lock=not block,
        app_kwargs=app_kwargs(),  # the login page carries no API description (app/access.py)
    )
    return demo


def check_access(host: str, share: bool, auth: str | None, insecure: bool) -> tuple[tuple[str, str] | None, str | None]:
    """(user and password for demo.launch or None, warning to print or None) for the access flags.

    An app that other machines can reach (`share`, or a `host` that is not loopback) must ask for a
    password, unless `insecure` says to run it open; ValueError otherwise, naming the two fixes.

    >>> check_access("0.0.0.0", False, "ann:s3cret", False)
    (('ann', 's3cret'), None)
    """
    credentials = parse_auth(auth) if auth is not None else None
    reasons = []
    if not _is_loopback(host):
        reasons.append(f"--host {host or repr('')} lets other machines reach the app")
    if share:
        reasons.append("--share publishes the app at a public gradio.live address")
    exposed = " and ".join(reasons)
    if not exposed or credentials:
        return credentials, None
    if insecure:
        return None, (
            f"{exposed}, with no password (--insecure): "
            "anyone who reaches it can upload files, train, and delete styles."
        )
    raise ValueError(
        f"{exposed}, and nobody would need a password to use it. Add --auth USER:PASSWORD "
        f"(or set {AUTH_ENV}=USER:PASSWORD, which keeps the password off the command line), "
        "or add --insecure to run it open anyway."
    )


def parse_auth(text: str) -> tuple[str, str]:
    """'user:password' -> ('user', 'password'); ValueError, without echoing the password, otherwise."""
    user, _, password = text.partition(":")
    if text.count(":") != 1 or not user or not password:
        raise ValueError(
            f"--auth (or {AUTH_ENV}) must be USER:PASSWORD: a user name and a password, neither empty, "
            "joined by the only ':' (a password cannot contain ':')."
        )
    return user, password


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def _count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of threads, 1 or more, not {text}")
    return int(text)


def _positive(text: str) -> float:
    value = float(text)
    if not (0 < value < math.inf):
        raise argparse.ArgumentTypeError(f"must be a positive number of megabytes, not {text}")
    return value


if __name__ == "__main__":
    main()
