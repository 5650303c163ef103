"""python -m trainer --config style.toml --images DIR: train a style without the UI.

Checkpoints go to <workspace>/runs/<style>/checkpoints every `checkpoint_every` steps; Ctrl-C stops
at the next step with a checkpoint, and the same command with --resume continues from it.
`accelerate launch [--multi_gpu] --num_processes N -m trainer ...` spreads the run over N processes.

Exit codes: 0 the style was saved; 1 training failed or was interrupted; 2 bad input (config, images, model).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path

from trainer.config import DEFAULT_PRESET, PRESETS, make_config, parse_overrides, read_settings

DEFAULT_WORKSPACE = Path(__file__).resolve().parent.parent / "workspace"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer", description="Train a Style Studio style (LoRA).")
    parser.add_argument("--config", type=Path, help="TrainConfig as .toml or .json (any field; the rest from --preset)")
    parser.add_argument("--images", type=Path, nargs="+", help="image files, zips or folders")
    parser.add_argument("--preset", default=None, help=f"one of {', '.join(PRESETS)} (default {DEFAULT_PRESET})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="override one field, e.g. --set steps=100 (value parsed as JSON when it can be)")
    parser.add_argument("--model", default=None, help="base model (default: the embedded tiny model)")
    parser.add_argument("--model-config", default=None,
                        help="for a single-file --model offline: a diffusers folder or cached hub id with its configs")
    parser.add_argument("--workspace", type=Path, default=DEFAULT_WORKSPACE)
    parser.add_argument("--resume", action="store_true",
                        help="continue this style's interrupted run from its newest checkpoint")
    parser.add_argument("--print-config", action="store_true", help="print the effective config and exit")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="CPU threads for training (default: torch's, OMP_NUM_THREADS or every core)")
    args = parser.parse_args(argv)

    try:
        values = read_settings(args.config) if args.config else {}
        values |= parse_overrides(args.overrides)
        preset = args.preset or values.pop("preset", DEFAULT_PRESET)
        cfg = make_config(preset, **values)
        if args.print_config:
            print(json.dumps(cfg.to_dict(), indent=2, sort_keys=True))
            return 0
        cfg.validate()
        if args.threads is not None and args.threads < 1:
            raise ValueError(f"--threads must be 1 or more, not {args.threads}.")
        if not args.images:
            raise ValueError("--images is required: give image files, zips or folders.")

        from models.base import load_base
        from models.threads import use_threads
        from styles.library import StyleLibrary
        from trainer.checkpoints import CheckpointDir
        from trainer.data import ingest

        if args.threads:
            use_threads(args.threads)
        library = StyleLibrary(args.workspace)
        library.ensure_free(cfg.style_name)
        run_dir = Path(args.workspace) / "runs" / cfg.style_name
        checkpoints = CheckpointDir(run_dir / "checkpoints", cfg.keep_checkpoints)
        if checkpoints.paths() and not args.resume:
            raise ValueError(
                f"An earlier run of {cfg.style_name!r} left checkpoints in {checkpoints.folder}: "
                "add --resume to continue it, or delete that folder to start over."
            )
        base = load_base(args.model, cfg.precision, args.model_config)
        cfg = make_config(preset, base.defaults_family, **values).validate()  # the base's family's defaults under all
        images = ingest(args.images, cfg.resolution or base.resolution)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    from accelerate import PartialState
    from tqdm import tqdm

    from trainer.events import Cancelled, Failed, Finished, Started, Step
    from trainer.train import train

    main_process = PartialState(cpu=base.device.type == "cpu").is_main_process  # under accelerate launch, one reports
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())  # Ctrl-C: stop at the next step, with a checkpoint
    bar, last = None, None
    for last in train(cfg, images, base, stop, checkpoints=checkpoints, resume=args.resume, log_dir=run_dir / "logs"):
        if not main_process:
            continue
        if isinstance(last, Started):
            for line in last.skipped + last.notes:
                print(f"note: {line}", file=sys.stderr)
            if last.resumed_from:
                print(f"resuming at step {last.resumed_from}", file=sys.stderr)
            bar = tqdm(total=last.total_steps, initial=last.resumed_from, unit="step")
        elif isinstance(last, Step):
            bar.update(1)
            bar.set_postfix(loss=f"{last.loss:.4f}")
        elif isinstance(last, (Finished, Failed, Cancelled)) and bar:
            bar.close()
    if isinstance(last, Finished):  # train() hands the style back; the library stores it
        try:
            path = library.save(last.style_name, last.adapter.to_bytes(), thumbnail=last.thumbnail)
        except FileExistsError as err:  # the name was taken while this run trained
            print(f"error: {err} The checkpoints in {checkpoints.folder} are kept.", file=sys.stderr)
            return 1
        print(f"saved {last.style_name}: {path}")
        return 0
    if isinstance(last, Cancelled):
        print(f"error: interrupted at step {last.step}; run the same command with --resume to continue",
              file=sys.stderr)
        return 1
    if isinstance(last, Failed):
        print(f"error: {last.message}", file=sys.stderr)
        return 1
    return 0 if not main_process else 1  # the other processes of a distributed run end without an event


if __name__ == "__main__":
    sys.exit(main())
