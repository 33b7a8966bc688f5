"""Dropout for LoRA inputs whose mask costs one random 64-bit word per eight elements.

On a CPU, ``torch.nn.Dropout`` draws one Mersenne-Twister number per element (``bernoulli_``).
PEFT applies it to the input of each of the 210 adapted projections of SmolLM2-135M, a large share
of a LoRA SFT step on a small CPU (profiled in ``docs/experiments.md``).
:class:`ByteDropout` reads each element's keep decision from one random byte instead: a word of
64 random bits decides eight elements. The drop probability is rounded to a multiple of 1/256
(0.05 becomes 13/256 = 0.0508), and the kept values are scaled by ``1 / (1 - p)`` of that rounded
``p``, so the output's expectation is still the input.
"""

from __future__ import annotations

import torch
from torch import nn

_INT64 = torch.iinfo(torch.int64)


def byte_threshold(p: float) -> int | None:
    """``k`` of ``p`` rounded to ``k / 256``, or ``None`` when that rounds to 0 or 1 (no byte mask)."""
    k = round(p * 256)
    return k if 0 < k < 256 else None


class ByteDropout(nn.Module):
    """Inverted dropout with a byte-valued random mask (identity in eval mode).

    Args:
        p: Drop probability, in (1/512, 1); it is rounded to ``k / 256``. Smaller values would
            round to 0: use :class:`torch.nn.Dropout` for them (:func:`use_byte_dropout` does).

    Attributes:
        threshold: ``k``: an element is dropped when its random byte is below it.
        p: The drop probability actually applied, ``k / 256``.

    """

    def __init__(self, p: float) -> None:
        super().__init__()
        threshold = byte_threshold(p)
        if threshold is None:
            raise ValueError(f"ByteDropout needs p in (1/512, 1 - 1/512), got {p}")
        self.threshold = threshold
        self.p = threshold / 256
        self.scale = 1.0 / (1.0 - self.p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Drop each element with probability ``p`` and scale the kept ones (training mode only)."""
        if not self.training:
            return x
        n = x.numel()
        # Full int64 range, so all 64 bits are random (random_() would leave the sign bit at 0).
        words = torch.randint(_INT64.min, _INT64.max, ((n + 7) // 8,), dtype=torch.int64, device=x.device)
        keep = words.view(torch.uint8)[:n].view(x.shape) >= self.threshold  # x's shape, P(True) = 1 - p
        # One float mask, saved for backward: fewer passes over memory than torch.where(keep, x * scale, 0).
        return x * keep.to(x.dtype).mul_(self.scale)

    def extra_repr(self) -> str:
        """``p`` as applied."""
        return f"p={self.p:.6g}"


def use_byte_dropout(model: nn.Module) -> int:
    """Swap every LoRA input dropout of a PEFT model for a :class:`ByteDropout` of the same ``p``.

    Only the modules change: the adapter's config (and so a saved adapter) keeps its
    ``lora_dropout``. Dropouts whose ``p`` would round to 0 or 1 are left as they are.

    Args:
        model: A PEFT model (its LoRA layers hold ``lora_dropout``, a ``ModuleDict`` per adapter).

    Returns:
        The number of dropouts swapped.

    """
    swapped = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, nn.ModuleDict):
            continue
        for name, dropout in dropouts.items():
            if isinstance(dropout, nn.Dropout) and byte_threshold(dropout.p) is not None:
                dropouts[name] = ByteDropout(dropout.p).train(dropout.training)
                swapped += 1
    return swapped
