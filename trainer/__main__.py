"""python -m trainer --config style.toml --images DIR: train a style without the UI.

Exit codes: 0 the style was saved; 1 training failed or was interrupted; 2 bad input (config, images, model).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_WORKSPACE = Path(__file__).resolve().parent.parent / "workspace"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer", description="Train a Style Studio style (LoRA).")
    parser.add_argument("--config", type=Path, help="TrainConfig as .toml or .json (any field; the rest from --preset)")
    parser.add_argument("--images", type=Path, nargs="+", help="image files, zips or folders")
    parser.add_argument("--preset", default=None, help="Quick, Balanced (default) or Best")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="override one field, e.g. --set steps=100 (value parsed as JSON when it can be)")
    parser.add_argument("--model", default=None, help="base model (default: the embedded tiny model)")
    parser.add_argument("--workspace", type=Path, default=DEFAULT_WORKSPACE)
    parser.add_argument("--print-config", action="store_true", help="print the effective config and exit")
    args = parser.parse_args(argv)

    from trainer.config import DEFAULT_PRESET, make_config, read_settings

    try:
        values = read_settings(args.config) if args.config else {}
        for item in args.overrides:
            key, _, raw = item.partition("=")
            try:
                values[key] = json.loads(raw)
            except json.JSONDecodeError:
                values[key] = raw
        preset = args.preset or values.pop("preset", DEFAULT_PRESET)
        cfg = make_config(preset, **values)
        if args.print_config:
            print(json.dumps(cfg.to_dict(), indent=2, sort_keys=True))
            return 0
        cfg.validate()
        if not args.images:
            raise ValueError("--images is required: give image files, zips or folders.")

        from styles.library import StyleLibrary
        from trainer.base import load_base
        from trainer.data import ingest

        base = load_base(args.model, cfg.precision)
        images = ingest(args.images, cfg.resolution or base.resolution)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    from tqdm import tqdm

    from trainer.events import Failed, Finished, Started, Step
    from trainer.train import train

    bar = None
    try:
        for event in train(cfg, images, base, StyleLibrary(args.workspace)):
            if isinstance(event, Started):
                for line in event.skipped:
                    print(f"skipped {line}", file=sys.stderr)
                bar = tqdm(total=event.total_steps, unit="step")
            elif isinstance(event, Step):
                bar.update(1)
                bar.set_postfix(loss=f"{event.loss:.4f}")
            elif isinstance(event, Finished):
                bar.close()
                print(f"saved {event.style_name}: {event.path}")
                return 0
            elif isinstance(event, Failed):
                if bar:
                    bar.close()
                print(f"error: {event.message}", file=sys.stderr)
                return 1
    except KeyboardInterrupt:
        print("error: interrupted; no style was saved", file=sys.stderr)
        return 1
    return 1


if __name__ == "__main__":
    sys.exit(main())
