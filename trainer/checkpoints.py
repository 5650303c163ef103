"""Training checkpoints: everything needed to continue a run exactly, one safetensors file each.

    <job folder>/checkpoints/step-000100.safetensors

A checkpoint holds the LoRA weights (and those of the best validation so far), AdamW's moments,
each process's sampling generator state and, in its metadata, the step, the loss and validation
histories and the optimizer's hyper-parameters. Only tensors and JSON: nothing is pickled, so
loading a checkpoint can never run code (unlike torch.save or accelerate's save_state). Each file
is written whole or not at all (temporary file, fsync, rename), so a kill at any moment leaves the
previous checkpoint intact; old ones are pruned.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import safetensors.torch
import torch
from safetensors import SafetensorError

from core.files import read_safetensors_header, write_bytes_atomic

NAME = re.compile(r"^step-(\d{6,})\.safetensors$")
ADAPTER = "adapter."
BEST = "best."  # the adapter of the best-scoring validation so far (trainer/validation.py)
MOMENT = "optimizer."
GENERATOR = "generator_state"  # process 0's; process i > 0 has "generator_state.i"


@dataclass
class TrainingState:
    """Where a run stands after `step` steps."""

    step: int
    adapter: dict[str, torch.Tensor]  # peft state dict of the UNet's LoRA layers (keys without 'unet.')
    optimizer: dict  # torch.optim state_dict()
    generators: list[torch.Tensor]  # torch.Generator.get_state() of each data-parallel process, in rank order
    losses: list[float] = field(default_factory=list)  # one per finished step
    info: dict[str, str] = field(default_factory=dict)  # what a style file made from it records (config, base model)
    scores: list[tuple[int, float]] = field(default_factory=list)  # (step, validation score) so far
    best_step: int = 0  # the step whose adapter scored best, kept in best_adapter
    best_adapter: dict[str, torch.Tensor] | None = None
    path: Path | None = None


class CheckpointDir:
    """The checkpoints of one job, newest last.

    >>> checkpoints = CheckpointDir("workspace/jobs/0007/checkpoints", keep=3)  # doctest: +SKIP
    >>> state, notes = checkpoints.load_latest()                               # doctest: +SKIP
    """

    def __init__(self, folder: str | Path, keep: int = 3):
        self.folder = Path(folder)
        self.keep = max(1, keep)

    def paths(self) -> list[Path]:
        """Checkpoint files, oldest first (temporary files of an interrupted write are ignored)."""
        if not self.folder.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.folder.iterdir() if (m := NAME.match(p.name))]
        return [p for _, p in sorted(found)]

    def save(self, state: TrainingState) -> Path:
        """Write the checkpoint atomically, then prune the oldest beyond `keep`."""
        self.folder.mkdir(parents=True, exist_ok=True)
        tensors = {ADAPTER + k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.adapter.items()}
        optimizer = state.optimizer
        for index, moments in optimizer["state"].items():
            for name, value in moments.items():
                tensors[f"{MOMENT}{index}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
        for k, v in (state.best_adapter or {}).items():
            tensors[BEST + k] = v.detach().to("cpu", torch.float32).contiguous()
        for rank, generator_state in enumerate(state.generators):
            tensors[GENERATOR + (f".{rank}" if rank else "")] = generator_state.clone()
        metadata = {
            "step": str(state.step),
            "losses": json.dumps(state.losses),
            "param_groups": json.dumps(optimizer["param_groups"]),
            "info": json.dumps(state.info),
            "scores": json.dumps(state.scores),
            "best_step": str(state.best_step),
        }
        path = write_bytes_atomic(
            self.folder / f"step-{state.step:06d}.safetensors", safetensors.torch.save(tensors, metadata)
        )
        for old in self.paths()[: -self.keep]:
            old.unlink(missing_ok=True)
        return path

    def load_latest(self) -> tuple[TrainingState | None, list[str]]:
        """The newest checkpoint that reads back whole, and a note for each newer one that did not."""
        problems = []
        for path in reversed(self.paths()):
            try:
                return load(path), problems
            except (ValueError, OSError, KeyError, RuntimeError, SafetensorError) as err:
                problems.append(f"{path.name} is unreadable ({err}); using the one before it")
        return None, problems

    def latest_progress(self) -> tuple[int, list[float]] | None:
        """(step, losses) of the newest checkpoint whose header reads, without loading its tensors."""
        for path in reversed(self.paths()):
            try:
                metadata, _ = read_safetensors_header(path)
                return int(metadata["step"]), json.loads(metadata["losses"])
            except (ValueError, OSError, KeyError):
                continue
        return None


def load(path: str | Path) -> TrainingState:
    """Read one checkpoint; raises ValueError (or OSError) when the file is damaged."""
    path = Path(path)
    metadata, _ = read_safetensors_header(path)  # refuses a truncated or foreign file before loading
    tensors = safetensors.torch.load_file(str(path))
    adapter = {k[len(ADAPTER):]: v for k, v in tensors.items() if k.startswith(ADAPTER)}
    best = {k[len(BEST):]: v for k, v in tensors.items() if k.startswith(BEST)}
    moments: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith(MOMENT):
            index, name = key[len(MOMENT):].split(".", 1)
            moments.setdefault(int(index), {})[name] = value
    if not adapter or GENERATOR not in tensors:
        raise ValueError("it holds no adapter weights")
    generators = [tensors[GENERATOR]]
    while f"{GENERATOR}.{len(generators)}" in tensors:
        generators.append(tensors[f"{GENERATOR}.{len(generators)}"])
    return TrainingState(
        step=int(metadata["step"]),
        adapter=adapter,
        optimizer={"state": moments, "param_groups": json.loads(metadata["param_groups"])},
        generators=generators,
        losses=json.loads(metadata["losses"]),
        info=json.loads(metadata.get("info", "{}")),
        scores=[tuple(pair) for pair in json.loads(metadata.get("scores", "[]"))],
        best_step=int(metadata.get("best_step", 0)),
        best_adapter=best or None,
        path=path,
    )
