"""Dropout on the adapter's input, cheaper on the CPU than `torch.nn.Dropout`.

PEFT applies dropout to the input of every LoRA adapter: 7 adapters a layer on a Llama, each
drawing a mask as large as its input. On the CPU `torch.bernoulli_` draws one random number an
element, and on a small model those masks took 19% of a LoRA training step (`aten::bernoulli_`
in a profile of `benchmarks/run.py`'s training shape). `FastDropout` reads four 16-bit lanes
out of each 64-bit word that `Tensor.random_` draws, so a mask costs a quarter of the draws,
and keeps the mask as booleans for the backward pass.

The drop rate is rounded to a multiple of 1/65536 (0.05 becomes 0.0500030518), and the kept
values are scaled by 1 / (1 - that rate), so in float32 the expectation is unchanged (in bf16
and fp16 the scale is rounded to the tensor's type, as `nn.Dropout`'s is). A rate that rounds to
0 or to 1 (below 1/131072 or above 1 - 1/131072) goes to `F.dropout` instead. A dropped element
is 0 even where the input was NaN or infinite (`nn.Dropout` gives NaN there). The draws come
from torch's default generator: `torch.manual_seed` and a checkpoint's saved RNG state give the
same masks again. On a GPU, where `bernoulli_` is cheap, it is plain `F.dropout`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_LEVELS = 1 << 16


def keep_mask(shape: torch.Size, p: float) -> tuple[torch.Tensor, float]:
    """A boolean mask of `shape` that keeps each element with probability 1 - p (p rounded to a
    multiple of 1/65536), and the scale 1 / (1 - rounded p) for the kept ones."""
    n = shape.numel()
    dropped = round(p * _LEVELS)
    # random_(-2**63, None) fills all 64 bits; without a range the sign bit stays 0.
    words = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), None)
    lanes = words.view(torch.int16)[:n].view(shape)
    return lanes >= dropped - _LEVELS // 2, _LEVELS / (_LEVELS - dropped)


class _MaskedScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        keep, scale = keep_mask(x.shape, p)
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return torch.where(keep, x, 0.0).mul_(scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return torch.where(keep, grad, 0.0).mul_(ctx.scale), None


class FastDropout(torch.nn.Module):
    """A drop-in for `torch.nn.Dropout(p)` (see the module docstring)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout rate {p} must be in [0, 1)")
        self.p = p
        self._lanes = 0 < round(p * _LEVELS) < _LEVELS  # the rate survives rounding to 1/65536

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu" or not self._lanes:
            return F.dropout(x, self.p, True)
        return _MaskedScale.apply(x, self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def use_fast_dropout(model: torch.nn.Module) -> int:
    """Replace the `nn.Dropout` on every LoRA adapter's input (PEFT's `lora_dropout`) with
    `FastDropout`; returns how many were replaced. The adapter's weights and saved files are
    unchanged: dropout has none."""
    replaced = 0
    for module in model.modules():
        drops = getattr(module, "lora_dropout", None)
        if not isinstance(drops, torch.nn.ModuleDict):
            continue
        for name, drop in list(drops.items()):
            if type(drop) is torch.nn.Dropout:
                drops[name] = FastDropout(drop.p)
                replaced += 1
    return replaced
