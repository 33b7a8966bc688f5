"""Scoring a batch: summed log-probs of answer tokens, in rows or in packed preference pairs.

The one home of how a batch is scored. :func:`sequence_logps` computes the numbers from full
logits (the reference definition the tests use) and :func:`response_logps` from hidden states,
applying the LM head only at response positions: prompt and padding logits are never needed, and
on a 49k-token vocabulary they are most of the work and memory of the head. :func:`batch_logps`
runs a model on a batch of rows. Preference pairs packed one row each
(:mod:`qod_lightning.data.packing` lays them out with this module's segment ids) are scored by
:func:`pair_logps` when :func:`can_pack` says the packed row gives the two-row numbers: it runs the
decoder under :func:`pair_attention_mask` and gathers with :func:`packed_pair_logps`.
:func:`pair_layout` chooses, once per model, which of the two layouts its batches are built in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft import PeftModel
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from qod_lightning.model import causal_lm

IGNORE_INDEX = -100
"""Label value that the loss and the log-prob functions skip (PyTorch's cross-entropy default)."""

PAD, PROMPT, CHOSEN, REJECTED = -1, 0, 1, 2
"""Segment ids of a packed ``prompt | chosen | rejected`` row."""

PACKABLE_ATTENTION = ("sdpa", "eager")
"""Attention implementations that take a custom 4D mask, as packed pairs need."""


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
        segments: (B, L) segment ids (:data:`PAD`, :data:`PROMPT`, :data:`CHOSEN`, :data:`REJECTED`).
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


def has_plain_lm_head(config: PretrainedConfig) -> bool:
    """Whether the causal-LM's logits are just ``lm_head(hidden)`` (no logit soft-capping)."""
    return not getattr(config, "final_logit_softcapping", None)


def batch_logps(
    model: PeftModel | PreTrainedModel, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed target-token log-probs of each row of ``batch``.

    Runs the decoder, then the LM head on response positions only (:func:`response_logps`).
    Models whose causal-LM forward does more than ``lm_head(hidden)`` (logit soft-capping) take
    the full-logits path instead.

    Args:
        model: The PEFT model (adapters active or disabled by the caller), or a plain causal LM.
        batch: ``input_ids``, ``attention_mask``, ``labels``, each (B, T).

    Returns:
        ``(logps, counts)``, each (B,).

    """
    lm = causal_lm(model)
    if not has_plain_lm_head(lm.config):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        return sequence_logps(logits, batch["labels"])
    decoder = lm.get_decoder()
    hidden = decoder(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).last_hidden_state  # (B, T, H)
    return response_logps(hidden, lm.get_output_embeddings(), batch["labels"])


@dataclass(frozen=True)
class PairLayout:
    """How preference batches are laid out, chosen once for a model (:func:`pair_layout`).

    Attributes:
        packed: One ``prompt | chosen | rejected`` row per pair, so each prompt is scored once;
            ``False``: two rows per pair (chosen rows, then rejected rows).
        window: The model's sliding-window attention span, if any: a batch whose packed rows reach
            past it is laid out in two rows instead (the packed mask has no window).
    """

    packed: bool = True
    window: int | None = None

    def fits(self, batch: dict[str, torch.Tensor]) -> bool:
        """Whether ``batch``'s packed rows keep every answer within the window of its prompt."""
        return self.window is None or int(batch["packed_positions"].max()) + 1 < self.window


def can_pack_model(model: PeftModel | PreTrainedModel) -> bool:
    """Whether ``model`` scores packed rows exactly as two rows, where they fit its window.

    Needs an attention that takes a custom mask and a plain ``lm_head(hidden)`` output (no logit
    soft-capping).
    """
    config = causal_lm(model).config
    return config._attn_implementation in PACKABLE_ATTENTION and has_plain_lm_head(config)


def pair_layout(model: PeftModel | PreTrainedModel, share_prompt: bool = True) -> PairLayout:
    """The layout of ``model``'s preference batches: packed where it can score them, else two rows."""
    window = getattr(causal_lm(model).config, "sliding_window", None)
    return PairLayout(packed=share_prompt and can_pack_model(model), window=window)


def can_pack(model: PeftModel | PreTrainedModel, batch: dict[str, torch.Tensor]) -> bool:
    """Whether ``model`` scores ``batch``'s packed rows exactly as it scores the two-row layout.

    The batch must hold packed rows, the model must be able to score them (:func:`can_pack_model`),
    and with sliding-window attention every answer must lie within the window of its prompt.
    """
    layout = pair_layout(model)
    return "packed_ids" in batch and layout.packed and layout.fits(batch)


def target_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens scored in ``batch``: answer tokens of its rows, or of its packed pairs."""
    if "packed_targets" in batch:
        return int((batch["packed_targets"] != IGNORE_INDEX).sum())
    return int(_shift(batch["labels"])[1].sum())


def pair_logps(
    model: PeftModel | PreTrainedModel, batch: dict[str, torch.Tensor], share_prompt: bool = True
) -> torch.Tensor:
    """Summed answer log-probs of a preference batch: (2B,), chosen answers then rejected ones.

    With ``share_prompt`` (and :func:`can_pack`), one packed row per pair runs each prompt
    through the model once (:mod:`qod_lightning.data.packing`); otherwise the chosen and the
    rejected answer each get their own row. Both give the same numbers (tests/test_packing.py).

    Args:
        model: The PEFT model.
        batch: A :class:`~qod_lightning.data.preference.PreferenceDataModule` batch.
        share_prompt: Use the packed rows when the model allows it.

    Returns:
        (2B,) log-probs.

    Raises:
        ValueError: The batch holds packed rows only and the model cannot score them.

    """
    if not (share_prompt and can_pack(model, batch)):
        if "input_ids" not in batch:
            raise ValueError(
                "this preference batch holds packed rows only, and the model cannot score them exactly; "
                "lay the batches out for this model (PreferenceDataModule.layout = pair_layout(model))"
            )
        return batch_logps(model, batch)[0]
    lm = causal_lm(model)
    sdpa = lm.config._attn_implementation == "sdpa"
    dtype = lm.get_input_embeddings().weight.dtype
    mask = pair_attention_mask(batch["packed_segments"], None if sdpa else dtype)  # (B, 1, L, L)
    hidden = lm.get_decoder()(
        input_ids=batch["packed_ids"], attention_mask=mask, position_ids=batch["packed_positions"], use_cache=False
    ).last_hidden_state  # (B, L, H)
    return packed_pair_logps(hidden, lm.get_output_embeddings(), batch)
