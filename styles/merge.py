"""A blend written as one adapter (issue 20): the parts one layer gets in the saved style.

Exact by default: the styles' LoRA factors concatenated along the rank, each B multiplied by its scale,
block factor and alpha / rank, with alpha = the new rank, so B' @ A' is the blend's update itself (as
sd-scripts' merge_lora.py concatenates when merging LoRA into LoRA). A layer the blend changes by other
kinds (LoHa, LoKr, DoRA, full differences) or by a non-sum mode gets its update as a full difference
(`diff`), also exact. Optionally re-ranked: the update's truncated SVD at a target rank (sd-scripts'
svd_merge_lora.py), with the relative error it costs.
"""

from __future__ import annotations

import torch

from styles.updates import Update


def concatenated(contributions: list[tuple[float, Update]]) -> dict[str, torch.Tensor] | None:
    """LoRA parts whose update is the sum of `contributions` (scale, plain LoRA update), exactly; None when one of
    them is not a plain LoRA. Convolution factors keep their kernel on the down side, as kohya stores them."""
    factors = [(scale, u) for scale, u in contributions if u.low_rank() is not None]
    if len(factors) != len(contributions):
        return None
    ups = [u.parts["lora_up.weight"].float().flatten(1) * (scale * u.scale()) for scale, u in factors]
    downs = [u.parts["lora_down.weight"].float() for _, u in factors]
    down_shape = max((d.shape for d in downs), key=len)[1:]
    down = torch.cat([d.reshape(d.shape[0], *down_shape) for d in downs])
    up = torch.cat(ups, dim=1)
    if len(down_shape) == 3:  # a convolution: up is [out, rank, 1, 1]
        up = up[:, :, None, None]
    return {"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(float(down.shape[0]))}


def difference(delta: torch.Tensor) -> dict[str, torch.Tensor]:
    """A layer's update kept whole: the `diff` part ComfyUI and LyCORIS read."""
    return {"diff": delta.float()}


def low_rank(delta: torch.Tensor, rank: int) -> tuple[dict[str, torch.Tensor], float, float]:
    """The update's best rank-`rank` approximation (truncated SVD, Eckart-Young) as LoRA parts with alpha = rank,
    its squared error and the update's squared norm (the relative error is their ratio's root)."""
    flat = delta.float().flatten(1)
    u, s, vh = torch.linalg.svd(flat, full_matrices=False)
    k = min(rank, s.numel())
    up, down = u[:, :k] * s[:k], vh[:k]
    error = float((s[k:] ** 2).sum())
    if delta.ndim == 4:
        up, down = up[:, :, None, None], down.reshape(k, *delta.shape[1:])
    return {"lora_up.weight": up.contiguous(), "lora_down.weight": down.contiguous(),
            "alpha": torch.tensor(float(k))}, error, float((s**2).sum())
