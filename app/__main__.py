"""python -m app [--model M] [--host H] [--port P] [--workspace DIR]: start Style Studio."""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_WORKSPACE = Path(__file__).resolve().parent.parent / "workspace"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m app", description="Style Studio: train and blend image styles.")
    parser.add_argument("--model", default=None, help="hub id, diffusers folder or .safetensors checkpoint (default: the embedded tiny model)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--workspace", type=Path, default=DEFAULT_WORKSPACE, help="folder for styles, outputs and exports")
    args = parser.parse_args(argv)

    from diffusers.utils import logging as diffusers_logging

    from app.studio import Studio
    from app.ui import CSS, build_ui

    diffusers_logging.set_verbosity_error()  # per-adapter "missing keys" notes are expected when several styles load
    try:
        studio = Studio(args.workspace, args.model)
    except ValueError as err:
        parser.exit(2, f"error: {err}\n")
    demo = build_ui(studio)
    demo.queue(default_concurrency_limit=1)
    demo.launch(server_name=args.host, server_port=args.port, allowed_paths=[str(studio.workspace)], css=CSS)


if __name__ == "__main__":
    main()
