"""The UNet's training forward as a function of tensors, and its capture as CUDA graphs.

Why graphs: a LoRA training step of an SD UNet launches thousands of small kernels (SD 1.5 at
512 px, batch 1: about 7,900 per step, forward and backward), and on a GPU the Python and launch
work behind them takes longer than the kernels themselves: the GPU sits idle most of the step.
torch.cuda.make_graphed_callables records the forward's and the backward's kernels once and
replays each as one launch (measured on an H100: 31 ms a step instead of 134; `bench/step_variants`).
Shapes must stay the same from step to step, which they do here: fixed batch size and resolution.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


class UNetForward(torch.nn.Module):
    """The UNet's prediction from tensors alone: (noisy latents, timesteps, text embeddings[, pooled, time ids]).

    Positional tensors are the form a CUDA graph can take; SDXL's added conditioning travels as the
    last two.
    """

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, noisy, timesteps, text, pooled=None, time_ids=None) -> torch.Tensor:
        added = {} if pooled is None else {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}
        return self.unet(noisy, timesteps, encoder_hidden_states=text, return_dict=False, **added)[0]


class GraphedForward:
    """A UNetForward captured as CUDA graphs at its first call (its arguments give the shapes), replayed after.

    If the capture fails (an operation that graphs cannot hold, or too little memory for the graph's
    own pool), the run goes on eagerly: slower steps, same results. `failure` then says why.
    """

    def __init__(self, forward: UNetForward):
        self.forward = forward
        self.graphed = None
        self.failure: str | None = None

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        if self.graphed is None and self.failure is None:
            try:
                self.graphed = torch.cuda.make_graphed_callables(self.forward, args)
            except Exception as err:  # noqa: BLE001 - any capture failure falls back to the eager UNet
                self.failure = f"{type(err).__name__}: {err}"
                log.warning("CUDA graph capture failed, training without graphs (slower steps): %s", self.failure)
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                    torch.cuda.empty_cache()  # the half-built graph's memory pool
        return (self.graphed or self.forward)(*args)
