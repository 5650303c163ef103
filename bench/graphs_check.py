"""Does train() with CUDA graphs learn exactly what it learns without?  `python -m bench.graphs_check` (CUDA only)

Trains the ink example (12 images) on the embedded model for 300 Balanced steps three ways: CUDA
graphs (the default), eager (cuda_graphs=false), and graphs with gradient checkpointing. Prints
each run's time and losses, and how far the graphed runs' adapter weights and first losses are
from the eager run's (0 means bit for bit).
"""
import time

import torch

from embedded.examples import EXAMPLES
from models.base import load_base
from trainer.config import make_config
from trainer.data import ImageSet
from trainer.events import Finished, Started, Step
from trainer.train import train

if not torch.cuda.is_available():
    raise SystemExit("error: bench.graphs_check compares CUDA graphs with eager steps and needs a CUDA GPU; "
                     "this machine has none.")
base = load_base()
pairs = EXAMPLES["ink"].images(12)
images = ImageSet(images=[p[0] for p in pairs], captions=[p[1] for p in pairs], names=[str(i) for i in range(12)])
runs = {}
for label, opts in {"graphs": {}, "eager": {"cuda_graphs": False},
                    "graphs+ckpt": {"gradient_checkpointing": True}}.items():
    cfg = make_config("Balanced", style_name="check", steps=300, num_samples=0, sample_every=0, checkpoint_every=0,
                      **opts)
    t0, losses = time.perf_counter(), []
    for ev in train(cfg, images, base):
        if isinstance(ev, Step):
            losses.append(ev.loss)
        elif isinstance(ev, Finished):
            weights = ev.adapter.tensors  # what the style file would hold
        elif not isinstance(ev, Started):
            print(label, ev)
    runs[label] = (losses, weights)
    print(f"RESULT {label}: {time.perf_counter() - t0:.1f} s, mean loss first 50 {sum(losses[:50]) / 50:.4f} "
          f"last 50 {sum(losses[-50:]) / 50:.4f}")
for label in ("graphs", "graphs+ckpt"):
    a, b = runs[label][1], runs["eager"][1]
    rel = max((a[k].float() - b[k].float()).norm().item() / b[k].float().norm().item()
              for k in b if k.endswith("weight"))
    dl = max(abs(x - y) for x, y in zip(runs[label][0][:20], runs["eager"][0][:20]))
    print(f"RESULT {label} vs eager: max rel diff of a saved weight {rel:.2e}; max loss diff, first 20 steps {dl:.2e}")
print("peak", torch.cuda.max_memory_allocated() / 1e9)
