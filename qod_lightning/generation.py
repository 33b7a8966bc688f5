"""Turn plain-language requests into request JSON with a trained model: batched decoding.

Decoding is batched with left padding and conditions on exactly the prompt ids training used
(:func:`~qod_lightning.data.tokenize.encode_prompt`). Each row stops at EOS or at the end of its
first complete JSON object, and then leaves the batch, so later steps skip it. With
``constrained=True`` the request grammar of :mod:`qod_lightning.constrained` masks the logits, so
every finished output parses and passes the schema by construction.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from peft import PeftModel
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from qod_lightning.constrained import GRAMMAR_CACHE, GrammarMask, grammar_prefix_length, output_size
from qod_lightning.data.tokenize import PromptFormat, encode_prompt, keep_last
from qod_lightning.extraction import find_json_object
from qod_lightning.kv_cache import ReservedCache

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


def finished_length(tokenizer: PreTrainedTokenizerBase, tokens: list[int], eos_token_id: int) -> int | None:
    """How many of a row's new tokens to keep if the row is done, else ``None``.

    A row is done at EOS (which is dropped) or once its text holds a complete top-level JSON
    object (:func:`~qod_lightning.extraction.find_json_object`). An object nested inside one still
    open (``{"a":{"b":1}``) parses on its own but does not count.

    Args:
        tokenizer: Decodes the tokens.
        tokens: The row's new tokens so far, the one just chosen last.
        eos_token_id: The token that ends a row.

    Returns:
        The number of tokens to keep, or ``None`` while the row should go on.

    """
    if tokens[-1] == eos_token_id:
        return len(tokens) - 1
    if "}" not in tokenizer.decode(tokens[-1:]):
        return None
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    return len(tokens) if find_json_object(text) is not None else None


@dataclass(frozen=True)
class DecodingOptions:
    """How :func:`decode_batch` picks tokens and when it stops.

    Attributes:
        max_new_tokens: Most new tokens per row, forced ones included.
        pad_token_id: Fills the left padding of shorter prompts.
        eos_token_id: Ends a row (and is not part of its answer).
        do_sample: Sample from the temperature-scaled softmax instead of taking the argmax.
        temperature: Sampling temperature (only with ``do_sample``).

    """

    max_new_tokens: int
    pad_token_id: int
    eos_token_id: int
    do_sample: bool = False
    temperature: float = 1.0

    def __post_init__(self) -> None:
        # Scores divided by a zero or negative temperature are NaN or reversed; sampling from them
        # fails deep inside torch.multinomial, or silently prefers the least likely tokens.
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")


def _kept_length(tokenizer: PreTrainedTokenizerBase, tokens: list[int], options: DecodingOptions) -> int | None:
    """How many of a row's new tokens to keep once it is done (finished or out of budget), else ``None``."""
    if tokens:
        kept = finished_length(tokenizer, tokens, options.eos_token_id)
        if kept is not None:
            return kept
    return len(tokens) if len(tokens) >= options.max_new_tokens else None


def _choose(scores: torch.Tensor, options: DecodingOptions) -> list[int]:
    """One token per row of ``scores`` (b, V): argmax, or a draw from ``softmax(scores / T)``."""
    if not options.do_sample:
        return scores.argmax(dim=-1).tolist()
    probs = torch.softmax(scores / options.temperature, dim=-1)  # (b, V); masked tokens get 0
    return torch.multinomial(probs, num_samples=1).squeeze(1).tolist()


def _shared_prefix_cache(model: PreTrainedModel | PeftModel, prompts: list[list[int]], reserve: int) -> tuple[Any, int]:
    """Run the tokens every prompt starts with once, as one row, and copy its cache to every row.

    Every prompt opens with the same instruction (a quarter of an evaluation prompt's tokens for
    SmolLM2), and its keys and values do not depend on what follows, so the batch need not
    compute them once per row. At least one token of each prompt is left for the batched pass,
    which must produce each row's first logits.

    Returns:
        ``(cache, P)``: a :class:`~qod_lightning.kv_cache.ReservedCache` (room for ``reserve``
        more positions) holding the shared ``P`` tokens for every row; it is empty, with
        ``P = 0``, when the prompts share no token or there is one prompt (nothing to share).

    """
    cache = ReservedCache(reserve)
    if len(prompts) < 2:
        return cache, 0
    shortest = min(prompts, key=len)
    shared = next((i for i, token in enumerate(shortest) if any(ids[i] != token for ids in prompts)), len(shortest))
    shared = min(shared, len(shortest) - 1)
    if shared <= 0:
        return cache, 0
    ids = torch.tensor([prompts[0][:shared]], device=model.device)  # (1, P)
    out = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
    out.cache.batch_repeat_interleave(len(prompts))  # (1, ...) -> (B, ...) in every layer
    return out.cache, shared


def prefill(
    model: PreTrainedModel | PeftModel, prompts: list[list[int]], pad_token_id: int, reserve: int = 0
) -> tuple[torch.Tensor, Any, torch.Tensor, torch.Tensor]:
    """Run a batch of prompts through the model, ready for the first decoding step.

    The tokens all prompts start with run once (:func:`_shared_prefix_cache`); the rest of each
    prompt is left-padded after them. Each row's positions count its real tokens only, as
    ``generate``'s do, so a row's logits do not depend on the padding it got.

    Args:
        model: A causal LM (plain or PEFT) in eval mode.
        prompts: Prompt ids, one list per row.
        pad_token_id: Fills the padding.
        reserve: Room in the cache for this many more positions (the tokens still to decode),
            so decoding steps write into it instead of growing it.

    Returns:
        ``(scores, cache, attention_mask, positions)``: the next-token logits (B, V) in float32,
        the KV cache, the attention mask (B, T) over the cached columns, and each row's last
        position (B, 1).

    """
    device = model.device
    cache, shared = _shared_prefix_cache(model, prompts, reserve)
    input_ids, suffix_mask = (t.to(device) for t in _left_pad([ids[shared:] for ids in prompts], pad_token_id))
    positions = shared + (suffix_mask.cumsum(dim=-1) - 1).clamp(min=0)  # (B, S); padding's positions are masked anyway
    attention_mask = torch.cat([suffix_mask.new_ones(len(prompts), shared), suffix_mask], dim=1)  # (B, P + S)
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=positions,
        cache=cache,
        use_cache=True,
        logits_to_keep=1,  # only the last position's logits are needed
    )
    return out.logits[:, -1, :].float(), out.cache, attention_mask, positions[:, -1:]


@torch.no_grad()
def decode_batch(
    model: PreTrainedModel | PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    options: DecodingOptions,
    grammars: list[Any] | None = None,
    forced: list[list[int]] | None = None,
) -> list[list[int]]:
    """Decode one batch of prompts with a KV cache, dropping each row from the batch once it is done.

    Hugging Face ``generate`` keeps a finished row in the batch, computing tokens that are thrown
    away, until the longest row ends; here a finished row leaves the batch and the cache
    (``DynamicCache.batch_select_indices``), so a step costs only the rows still running. The
    prompts, each followed by its forced tokens, go in through :func:`prefill`.

    Args:
        model: A causal LM (plain or PEFT) in eval mode.
        tokenizer: Its tokenizer (finds where answers end).
        prompts: Prompt ids, one list per row.
        options: Token choice and limits.
        grammars: Each row's compiled request grammar, which masks its logits at every step, or ``None``.
        forced: Tokens each row's answer starts with, taken as given and counted against
            ``max_new_tokens`` (``None``: none). A row they already finish is not decoded.

    Returns:
        The new tokens each row keeps (its forced ones included; EOS dropped), in the order of
        ``prompts``.

    """
    device = model.device
    new_tokens = [list(ids) for ids in forced] if forced is not None else [[] for _ in prompts]
    kept = [_kept_length(tokenizer, ids, options) for ids in new_tokens]
    running = [row for row, n in enumerate(kept) if n is None]  # the starting index of each row still in the batch
    mask = GrammarMask(grammars) if grammars is not None else None
    if running:
        if mask is not None:
            for row in running:
                mask.advance(row, new_tokens[row])
        scores, cache, attention_mask, positions = prefill(
            model,
            [prompts[row] + new_tokens[row] for row in running],
            options.pad_token_id,
            reserve=options.max_new_tokens - min(len(new_tokens[row]) for row in running),
        )
    while running:
        if mask is not None:
            mask.apply(scores, running)
        tokens = _choose(scores, options)
        if mask is not None:
            mask.accept(running, tokens)
        stay = []
        for j, (row, token) in enumerate(zip(running, tokens, strict=True)):
            new_tokens[row].append(token)
            kept[row] = _kept_length(tokenizer, new_tokens[row], options)
            if kept[row] is None:
                stay.append(j)
        if not stay:
            break
        if len(stay) < len(running):
            index = torch.tensor(stay, device=device)
            cache.batch_select_indices(index)
            attention_mask, positions = attention_mask[index], positions[index]  # (b, T), (b, 1)
            running, tokens = [running[j] for j in stay], [tokens[j] for j in stay]
        positions = positions + 1  # (b, 1)
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(running), 1)], dim=1)  # (b, T + 1)
        out = model(
            input_ids=torch.tensor(tokens, device=device).unsqueeze(1),  # (b, 1)
            attention_mask=attention_mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
        )
        cache, scores = out.cache, out.logits[:, -1, :].float()  # (b, V)
    return [row[:n] for row, n in zip(new_tokens, kept, strict=True)]


def _prompt_ids(
    tokenizer: PreTrainedTokenizerBase, requests: list[str], prompt_format: PromptFormat, max_input_tokens: int
) -> list[list[int]]:
    """Encode each request exactly as training did, keeping the last ``max_input_tokens`` ids (and BOS)."""
    encoded = [encode_prompt(tokenizer, r, prompt_format=prompt_format) for r in requests]
    too_long = sum(len(ids) > max_input_tokens for ids in encoded)
    if too_long:
        log.warning(
            "%d request(s) longer than max_input_tokens=%d were truncated to their last %d prompt tokens",
            too_long,
            max_input_tokens,
            max_input_tokens,
        )
    return [keep_last(ids, max_input_tokens, tokenizer.bos_token_id) for ids in encoded]


def _left_pad(prompts: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` (B, T), padded on the left so every row ends at T."""
    longest = max(len(ids) for ids in prompts)
    input_ids = torch.tensor([[pad_token_id] * (longest - len(ids)) + ids for ids in prompts])
    attention_mask = torch.tensor([[0] * (longest - len(ids)) + [1] * len(ids) for ids in prompts])
    return input_ids, attention_mask


@torch.no_grad()
def generate_tokens(
    model: PreTrainedModel | PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    requests: list[str],
    *,
    prompt_format: PromptFormat = "alpaca",
    max_new_tokens: int = 512,
    batch_size: int = 8,
    do_sample: bool = False,
    temperature: float = 0.3,
    constrained: bool = False,
    notes: bool = False,
    max_input_tokens: int = 1024,
    forced: list[list[int]] | None = None,
    workers: int = 1,
) -> list[list[int]]:
    """Generate the answer tokens of each request (greedy by default), in batches.

    Requests are grouped by length, so little padding is spent, and returned in input order.
    On a CPU, ``workers`` threads decode batches side by side (:func:`map_in_threads`); each
    batch's answers are the same as in one thread.
    Prompts longer than ``max_input_tokens`` keep their last tokens (one warning says how many).
    The caller sets the model's mode; :func:`~qod_lightning.model.load_for_inference` returns it in
    eval mode.

    Args:
        model: A causal LM (plain or PEFT).
        tokenizer: Its tokenizer (needs EOS; padding uses the pad token, else EOS).
        requests: The users' request texts.
        prompt_format: ``alpaca`` or ``chat``, as in training.
        max_new_tokens: Most tokens generated per request.
        batch_size: Most requests per decoded batch (fewer when there are too few requests to
            give every worker a batch of this size).
        do_sample: Sample instead of greedy decoding.
        temperature: Sampling temperature (only with ``do_sample``).
        constrained: Mask the logits with each request's grammar (needs ``xgrammar``): the answer
            passes the schema and copies its addresses, numbers and identifiers from the request
            (:func:`~qod_lightning.constrained.grounded_schema`).
        notes: With ``constrained``, the grammar allows a scratchpad note line before the request
            (for a model trained on notes; :meth:`~qod_lightning.constrained.GrammarCache.get`).
        max_input_tokens: Longest prompt kept, in tokens.
        forced: Tokens each answer starts with (:func:`decode_batch`), such as
            :func:`~qod_lightning.constrained.grammar_accepted_starts`; answers they already
            finish are not decoded. Only their last token is checked for a stop, so an earlier
            one must not end the answer (a start of a decoded answer never does).
        workers: Batches decoded at once, in threads, on a CPU (greedy decoding only: sampling,
            and any other device, use one).

    Returns:
        The new tokens of each request's answer (EOS dropped).

    Raises:
        ValueError: When the tokenizer has no EOS, or ``forced`` is not one list per request, or
            one is longer than ``max_new_tokens`` or (``constrained``) against the grammar, or
            ``workers`` is below 1.

    """
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token, so generation could not stop")
    forced = forced if forced is not None else [[] for _ in requests]
    if len(forced) != len(requests):
        raise ValueError(f"forced has {len(forced)} entries for {len(requests)} requests")
    if any(len(ids) > max_new_tokens for ids in forced):
        raise ValueError(f"a forced start is longer than max_new_tokens={max_new_tokens}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if not requests:
        return []
    prompts = _prompt_ids(tokenizer, requests, prompt_format, max_input_tokens)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    options = DecodingOptions(max_new_tokens, pad, tokenizer.eos_token_id, do_sample, temperature)
    grammars = GRAMMAR_CACHE.for_requests(tokenizer, output_size(model), requests, notes) if constrained else None
    if grammars is not None and any(
        grammar_prefix_length(grammar, ids) < len(ids) for grammar, ids in zip(grammars, forced, strict=True)
    ):
        raise ValueError("a forced start is against the request grammar (see grammar_accepted_starts)")
    done = [_kept_length(tokenizer, ids, options) for ids in forced]
    answers = [ids[:n] if n is not None else [] for ids, n in zip(forced, done, strict=True)]
    pending = [i for i, n in enumerate(done) if n is None]
    order = sorted(pending, key=lambda i: len(prompts[i]) + len(forced[i]), reverse=True)
    # Seeded sampling draws from the one global generator, in an order threads would make random.
    workers = workers if model.device.type == "cpu" and not do_sample else 1
    # Fewer requests than workers x batch_size: smaller batches, so no worker waits for one.
    size = max(1, min(batch_size, -(-len(order) // workers)))
    chunks = [order[start : start + size] for start in range(0, len(order), size)]

    def decode(chunk: list[int]) -> list[list[int]]:
        rows = [grammars[i] for i in chunk] if grammars is not None else None
        return decode_batch(model, tokenizer, [prompts[i] for i in chunk], options, rows, [forced[i] for i in chunk])

    with tqdm(total=len(chunks), desc="Generating", unit="batch", disable=None, leave=False) as bar:
        for chunk, decoded in map_in_threads(decode, chunks, workers):
            for index, tokens in zip(chunk, decoded, strict=True):
                answers[index] = tokens
            bar.update()
    return answers


@contextmanager
def intra_op_threads(count: int) -> Iterator[None]:
    """Run the block with ``count`` torch intra-op threads, then restore the number there was."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def map_in_threads(fn: Callable[[T], R], items: list[T], workers: int) -> Iterator[tuple[T, R]]:
    """Yield ``(item, fn(item))`` for every item, computed by ``workers`` threads, in completion order.

    Each thread gets an equal share of torch's intra-op threads (at least one), so the CPU is
    not oversubscribed. Batched decoding on a CPU gains from this: a decoding step's matmuls have
    few rows, which MKL splits poorly over threads, and one worker's Python and small ops overlap
    the other's matmuls (measured in ``docs/experiments.md``). Torch ops release the GIL.

    Args:
        fn: Called once per item; it must be safe to run in several threads at once.
        items: The work.
        workers: Threads; 1 (or a single item) runs everything in the calling thread.

    Yields:
        ``(item, result)`` pairs; an exception in ``fn`` is raised here.

    """
    if workers <= 1 or len(items) <= 1:
        for item in items:
            yield item, fn(item)
        return
    share = max(1, torch.get_num_threads() // workers)

    def run(item: T) -> R:
        torch.set_num_threads(share)  # the worker thread's own pool (OpenMP settings are per thread)
        return fn(item)

    # The calling thread's setting is restored after the pool, as MKL's is process-wide.
    with intra_op_threads(share), ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(run, item): index for index, item in enumerate(items)}
        for future in as_completed(futures):
            yield items[futures[future]], future.result()


def generate(
    model: PreTrainedModel | PeftModel, tokenizer: PreTrainedTokenizerBase, requests: list[str], **options: Any
) -> list[str]:
    """Generate an answer for each request: :func:`generate_tokens`, decoded.

    Args:
        model: A causal LM (plain or PEFT).
        tokenizer: Its tokenizer.
        requests: The users' request texts.
        **options: Keywords of :func:`generate_tokens` (``max_new_tokens``, ``constrained``...).

    Returns:
        The generated texts (new tokens only, special tokens skipped), one per request.

    """
    return decode_answers(tokenizer, generate_tokens(model, tokenizer, requests, **options))


def decode_answers(tokenizer: PreTrainedTokenizerBase, answers: list[list[int]]) -> list[str]:
    """The text of each answer's tokens (:func:`generate_tokens`), special tokens skipped."""
    return [tokenizer.decode(ids, skip_special_tokens=True) for ids in answers]
