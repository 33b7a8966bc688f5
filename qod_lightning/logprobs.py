"""Log-probabilities of target tokens, summed per sequence.

Two entry points compute the same numbers: :func:`sequence_logps` from full logits (the reference
definition the tests use) and :func:`response_logps` from hidden states, which applies the LM head
only at response positions: prompt and padding logits are never needed, and on a 49k-token
vocabulary they are most of the work and memory of the head. :func:`packed_pair_logps` does the
same for preference pairs packed one row each (:mod:`qod_lightning.data.packing`).
"""

from __future__ import annotations

import torch
from torch import nn

from qod_lightning.data.packing import CHOSEN, PAD, REJECTED
from qod_lightning.data.tokenize import IGNORE_INDEX


def _shift(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets for positions ``0..T-2`` (token ``t+1`` is predicted at ``t``) and their mask."""
    targets = labels[:, 1:]  # (B, T-1)
    return targets, targets != IGNORE_INDEX


def _token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[target]`` as ``logit[target] - logsumexp(logits)``, at least in float32.

    This never materialises the full log-softmax tensor. Half-precision logits are upcast to
    float32; float64 ones stay float64 (the tests' reference precision).

    Args:
        logits: (N, V).
        targets: (N,) token ids.

    Returns:
        (N,) log-probabilities.

    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of target-token log-probs per sequence.

    Args:
        logits: (B, T, V) model outputs; position ``t`` predicts token ``t+1``.
        labels: (B, T) token ids with ``-100`` on positions that do not count (prompt, padding).

    Returns:
        ``(logps, counts)``: (B,) summed log-probs (0 for a sequence with no target token, never
        NaN) and (B,) numbers of target tokens.

    """
    targets, mask = _shift(labels)
    logits = logits[:, :-1]  # (B, T-1, V)
    safe = targets.masked_fill(~mask, 0)  # any valid id; masked out below
    per_token = _token_logps(logits.reshape(-1, logits.size(-1)), safe.reshape(-1))  # (B*(T-1),)
    per_token = per_token.view_as(targets) * mask  # (B, T-1)
    return per_token.sum(-1), mask.sum(-1)


def response_logps(hidden: torch.Tensor, lm_head: nn.Module, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sequence_logps` computed from hidden states, running ``lm_head`` only where needed.

    Args:
        hidden: (B, T, H) last hidden states (after the final norm).
        lm_head: The output projection (H -> V).
        labels: (B, T) as in :func:`sequence_logps`.

    Returns:
        ``(logps, counts)``, each (B,).

    """
    targets, mask = _shift(labels)
    selected = hidden[:, :-1][mask]  # (N, H): only response positions
    per_token = _token_logps(lm_head(selected), targets[mask])  # (N,)
    rows = mask.nonzero()[:, 0]  # (N,) sequence of each response token
    logps = torch.zeros(labels.size(0), dtype=per_token.dtype, device=per_token.device)
    return logps.index_add(0, rows, per_token), mask.sum(-1)


def pair_attention_mask(segments: torch.Tensor, float_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Attention mask for packed ``prompt | chosen | rejected`` rows (:mod:`~qod_lightning.data.packing`).

    Causal, except that rejected tokens do not see chosen tokens, and no real token sees padding.
    A padding query sees only itself, so no softmax row is empty (an empty row is NaN, and NaN
    times a zero gradient is still NaN).

    Args:
        segments: (B, L) segment ids (``PAD``, ``PROMPT``, ``CHOSEN``, ``REJECTED``).
        float_dtype: ``None`` for a boolean mask (True: may attend), as SDPA takes it; a float
            dtype for an additive mask (0 or the dtype's minimum), as eager attention takes it.

    Returns:
        (B, 1, L, L) mask.

    """
    length = segments.size(1)
    causal = torch.ones(length, length, dtype=torch.bool, device=segments.device).tril()  # (L, L)
    query, key = segments[:, :, None], segments[:, None, :]  # (B, L, 1), (B, 1, L)
    allowed = causal & (key != PAD) & ~((query == REJECTED) & (key == CHOSEN))  # (B, L, L)
    itself = torch.eye(length, dtype=torch.bool, device=segments.device)  # (L, L)
    allowed = torch.where(query == PAD, itself, allowed)[:, None]  # (B, 1, L, L)
    if float_dtype is None:
        return allowed
    return torch.zeros(allowed.shape, dtype=float_dtype, device=segments.device).masked_fill(
        ~allowed, torch.finfo(float_dtype).min
    )


def packed_pair_logps(hidden: torch.Tensor, lm_head: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed answer log-probs of packed pairs, from hidden states, in the two-row layout's order.

    Args:
        hidden: (B, L, H) last hidden states of the packed rows.
        lm_head: The output projection (H -> V).
        batch: ``packed_targets``, ``packed_sources`` and ``packed_segments``, each (B, L).

    Returns:
        (2B,) log-probs: the chosen answers' then the rejected answers', as :func:`sequence_logps`
        returns them for the two-row layout.

    """
    targets, segments = batch["packed_targets"], batch["packed_segments"]
    rows, cols = (targets != IGNORE_INDEX).nonzero(as_tuple=True)  # (N,), (N,): every answer token
    sources = batch["packed_sources"][rows, cols]  # (N,) the hidden state that predicts each
    per_token = _token_logps(lm_head(hidden[rows, sources]), targets[rows, cols])  # (N,)
    slots = rows + hidden.size(0) * (segments[rows, cols] == REJECTED)  # (N,) chosen: b, rejected: B + b
    logps = torch.zeros(2 * hidden.size(0), dtype=per_token.dtype, device=per_token.device)
    return logps.index_add(0, slots, per_token)
