"""One layer's weight update, of each adapter kind ComfyUI's and AUTOMATIC1111's LoRA loaders apply.

An adapter file holds, per layer, the parts of one kind (names as kohya and LyCORIS write them):
  LoRA / LoCon  lora_up.weight [out, r(, 1, 1)], lora_down.weight [r, in(, kh, kw)], optional lora_mid.weight
                [r, r, kh, kw] (LoCon's Tucker form)        delta = up @ down            * alpha / r
  LoHa          hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b (optional hada_t1, hada_t2: Tucker cores)
                                                            delta = (w1a @ w1b) * (w2a @ w2b) * alpha / r
  LoKr          lokr_w1 or lokr_w1_a @ lokr_w1_b, lokr_w2 or lokr_w2_a @ lokr_w2_b (optional lokr_t2)
                                                            delta = kron(w1, w2) * alpha / r (r of a factored
                                                            part; a file with neither factored: scale 1)
  full diff     diff (and diff_b for the bias)              delta = diff
  DoRA          dora_scale beside any of the above: the updated weight's column norms are set to it,
                delta = (W + d) * dora_scale / ||W + d|| - W (Liu et al. 2024, arXiv 2402.09353)
with alpha / r = 1 when the file has no alpha. The formulas follow ComfyUI's comfy/weight_adapter (lora.py,
loha.py, lokr.py, base.py weight_decompose) and LyCORIS, whose files these are; a slider's scale s
multiplies the delta, as ComfyUI's strength does, DoRA's too: W + s * ((W + d) * m / ||W + d|| - W).

An Update holds the parts on the CPU or the weight's device; `delta(original)` gives the change to add,
in fp32 and the weight's shape. Nothing here runs on a pipeline; styles/patches.py reads the files.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Every part a layer's entry may have, by the kind it belongs to.
KIND_PARTS = {
    "LoRA": ("lora_up.weight", "lora_down.weight", "lora_mid.weight"),
    "LoHa": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
    "LoKr": ("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
    "full diff": ("diff", "diff_b"),
}
SHARED_PARTS = ("alpha", "dora_scale")
PARTS = tuple(part for parts in KIND_PARTS.values() for part in parts) + SHARED_PARTS
REQUIRED = {
    "LoRA": ("lora_up.weight", "lora_down.weight"),
    "LoHa": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
    "LoKr": (),  # each side is whole or factored: checked in _lokr_sides
    "full diff": (),
}
SUPPORTED = "LoRA, LoCon, LoHa, LoKr, DoRA and full weight differences (diff, diff_b)"


@dataclass
class Update:
    """The parts one adapter file gives one layer, and the weight change they make."""

    layer: str  # "unet.<module path>", "text_encoder.<...>": for messages
    parts: dict[str, torch.Tensor]

    @property
    def kind(self) -> str:
        kinds = [kind for kind, names in KIND_PARTS.items() if any(name in self.parts for name in names)]
        if len(kinds) != 1:
            raise ValueError(f"{self.layer}: {'no weights' if not kinds else ' and '.join(kinds)} in one entry; "
                             f"an adapter gives each layer the parts of one kind ({SUPPORTED}).")
        return kinds[0] + (" with DoRA" if "dora_scale" in self.parts else "")

    @property
    def rank(self) -> int | None:
        """The rank the alpha is divided by: that of the factored part, None where there is none."""
        p = self.parts
        for name in ("lora_down.weight", "hada_w1_b", "lokr_w2_b", "lokr_w1_b"):
            if name in p:
                return p[name].shape[0]
        return None

    def scale(self) -> float:
        """alpha / rank, or 1 where the file gives no alpha or the kind has no rank (ComfyUI's rule)."""
        rank = self.rank
        if "alpha" not in self.parts or rank is None:
            return 1.0
        return float(self.parts["alpha"].float().item()) / rank

    def to(self, device: torch.device | str) -> Update:
        """The parts on `device` in fp32 (alpha stays on the CPU: it is read as a number)."""
        return Update(self.layer, {name: t if name == "alpha" else t.to(device, torch.float32)
                                   for name, t in self.parts.items()})

    def low_rank(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(B * alpha / r, A) with B @ A the delta flattened to [out, in * kh * kw], for a plain LoRA
        (no Tucker core, no DoRA), so that a blend stacks every style's factors into one matmul; else None."""
        p = self.parts
        if "lora_up.weight" not in p or "lora_mid.weight" in p or "dora_scale" in p:
            return None
        return p["lora_up.weight"].flatten(1) * self.scale(), p["lora_down.weight"].flatten(1)

    def delta(self, original: torch.Tensor) -> torch.Tensor:
        """What the adapter adds to `original` (the base weight) at scale 1, in fp32, shaped as the weight.

        Shapes that do not fit raise ValueError naming the layer. On the meta device this costs nothing,
        which is how imports check a file's shapes before anything is applied.
        """
        original = original.float()
        try:
            change = (self._change(original.shape) * self.scale()).reshape(original.shape)
        except RuntimeError as error:  # a product or reshape whose sizes do not fit this layer
            raise ValueError(
                f"{self.layer}: the {self.kind} parts ({self._shapes()}) do not fit this layer's weight "
                f"{list(original.shape)}; the adapter was made for another model."
            ) from error
        if "dora_scale" in self.parts:
            return _decompose(original, change, self.parts["dora_scale"], self.layer)
        return change

    def bias_delta(self) -> torch.Tensor | None:
        return self.parts["diff_b"].float() if "diff_b" in self.parts else None

    def _change(self, shape: torch.Size) -> torch.Tensor:
        p, kind = self.parts, self.kind.removesuffix(" with DoRA")
        missing = [name for name in REQUIRED[kind] if name not in p]
        if missing:
            raise ValueError(f"{self.layer}: the {kind} has no {', '.join(missing)}; the file is incomplete.")
        if kind == "LoRA":
            up, down = p["lora_up.weight"].flatten(1), p["lora_down.weight"]
            if "lora_mid.weight" in p:  # LoCon's Tucker form: mid holds the kernel (comfy tucker_weight_from_conv)
                return torch.einsum("m n ..., i m, n j -> i j ...", p["lora_mid.weight"], up, down.flatten(1))
            return up @ down.flatten(1)
        if kind == "LoHa":
            return _hada_side(p, "1") * _hada_side(p, "2")
        if kind == "LoKr":
            w1, w2 = _lokr_sides(p, self.layer)
            if w2.ndim == 4:  # a convolution: the kernel lives in w2
                w1 = w1[:, :, None, None]
            return torch.kron(w1, w2)
        if "diff" not in p:
            raise ValueError(f"{self.layer}: a diff_b without its diff; the file is incomplete.")
        return p["diff"].float()

    def _shapes(self) -> str:
        return ", ".join(f"{name} {list(t.shape)}" for name, t in self.parts.items() if t.ndim)


def _hada_side(p: dict[str, torch.Tensor], side: str) -> torch.Tensor:
    """One Hadamard factor of a LoHa: w_a @ w_b, or with a Tucker core t (LyCORIS: w_a is [r, out] then)."""
    a, b = p[f"hada_w{side}_a"], p[f"hada_w{side}_b"]
    if f"hada_t{side}" in p:
        return torch.einsum("i j k l, j r, i p -> p r k l", p[f"hada_t{side}"], b, a)
    return a @ b


def _lokr_sides(p: dict[str, torch.Tensor], layer: str) -> tuple[torch.Tensor, torch.Tensor]:
    """LoKr's two Kronecker factors, each stored whole (lokr_wN) or as a product (lokr_wN_a @ lokr_wN_b)."""
    sides = []
    for side in ("1", "2"):
        if f"lokr_w{side}" in p:
            sides.append(p[f"lokr_w{side}"])
        elif f"lokr_w{side}_a" in p and f"lokr_w{side}_b" in p:
            a, b = p[f"lokr_w{side}_a"], p[f"lokr_w{side}_b"]
            if side == "2" and "lokr_t2" in p:
                sides.append(torch.einsum("i j k l, j r, i p -> p r k l", p["lokr_t2"], b, a))
            else:
                sides.append(a @ b)
        else:
            raise ValueError(f"{layer}: the LoKr has no lokr_w{side} (nor lokr_w{side}_a and _b); "
                             "the file is incomplete.")
    return sides[0], sides[1]


def _decompose(original: torch.Tensor, change: torch.Tensor, magnitude: torch.Tensor, layer: str) -> torch.Tensor:
    """DoRA: the updated weight rescaled to the stored norms, minus the original.

    LyCORIS and kohya files store one norm per input column ([1, in(, 1, 1)]), as ComfyUI and A1111 read
    them; PEFT stores one per output row ([out]), as peft's DoRA layer computes them.
    """
    updated = original + change
    magnitude = magnitude.float()
    if magnitude.ndim == 1 or (magnitude.shape[0] == updated.shape[0] != 1 and magnitude.shape[1] == 1):
        norm = updated.flatten(1).norm(dim=1).reshape(-1, *[1] * (updated.ndim - 1))  # per output row
        magnitude = magnitude.reshape(norm.shape)
    else:
        norm = updated.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, -1, *[1] * (updated.ndim - 2))
    try:
        return updated * (magnitude / norm) - original
    except RuntimeError as error:
        raise ValueError(f"{layer}: its dora_scale {list(magnitude.shape)} does not fit the weight "
                         f"{list(original.shape)}.") from error
