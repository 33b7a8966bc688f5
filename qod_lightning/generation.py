"""Turn plain-language requests into request JSON with a trained model: loading and decoding.

Decoding is batched with left padding and conditions on exactly the prompt ids training used
(:func:`~qod_lightning.data.tokenize.encode_prompt`). Each row stops at EOS or at the end of its
first complete JSON object, and then leaves the batch, so later steps skip it. With
``constrained=True`` an xgrammar grammar compiled from :data:`~qod_lightning.schema.REQUEST_SCHEMA`
masks the logits, so every finished output parses and passes the schema by construction.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from peft import PeftConfig, PeftModel
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from qod_lightning.data.tokenize import PromptFormat, encode_prompt, keep_last
from qod_lightning.extraction import NOTE_REGEX, find_json_object
from qod_lightning.kv_cache import ReservedCache
from qod_lightning.model import ModelSettings, QuantizationSettings, load_base_model, load_tokenizer
from qod_lightning.schema import IPV4_NETWORK_PATTERN, IPV4_PATTERN, NAI_PATTERN, REQUEST_SCHEMA

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

_HEX = "[0-9a-fA-F]{1,4}"
IPV6_STRICT = "|".join(
    (
        f"({_HEX}:){{7}}{_HEX}",
        f"({_HEX}:){{1,7}}:",
        f"({_HEX}:){{1,6}}:{_HEX}",
        f"({_HEX}:){{1,5}}(:{_HEX}){{1,2}}",
        f"({_HEX}:){{1,4}}(:{_HEX}){{1,3}}",
        f"({_HEX}:){{1,3}}(:{_HEX}){{1,4}}",
        f"({_HEX}:){{1,2}}(:{_HEX}){{1,5}}",
        f"{_HEX}:(:{_HEX}){{1,6}}",
        f":((:{_HEX}){{1,7}}|:)",
    )
)
"""Every IPv6 text form with at most one ``::`` that stands for at least one group (no embedded
IPv4): the forms :mod:`ipaddress` accepts, unlike the schema's deliberately loose character class."""

HTTP_URL_PATTERN = (
    r"^https?://[A-Za-z0-9-]{1,63}(\.[A-Za-z0-9-]{1,63}){0,3}(:[0-9]{1,5})?(/[A-Za-z0-9._~%!$&'()*+,;=:@/?#-]{0,100})?$"
)
"""An http(s) URL whose host :func:`urllib.parse.urlsplit` always finds (at most 4 labels, and a
path of at most 101 characters, so the grammar stays finite)."""

GRAMMAR_FORMAT_PATTERNS: dict[str, str] = {
    "ipv4": IPV4_PATTERN,
    "ipv4-network": IPV4_NETWORK_PATTERN,
    "ipv6": f"^({IPV6_STRICT})$",
    "ipv6-network": f"^({IPV6_STRICT})(/(12[0-8]|1[01][0-9]|[1-9]?[0-9]))?$",
    "uri": HTTP_URL_PATTERN,
}
"""The regex that replaces each JSON Schema ``format`` in the grammar: whatever it matches passes
the format checker of :mod:`qod_lightning.schema`."""

GRAMMAR_PATTERN_OVERRIDES: dict[str, str] = {
    NAI_PATTERN: r"^[A-Za-z0-9._+-]{1,64}@[A-Za-z0-9.-]{1,63}\.[A-Za-z]{2,24}$",
}
"""Bounded versions of the schema's unbounded patterns (each matches a subset of the original)."""

BOUNDED_STRING_CHAR = r"[ !#-\[\]-~]"
r"""The characters of a length-bounded string in the grammar: printable ASCII but ``"`` and ``\``.

xgrammar 0.2.8's own length-bounded strings let raw control characters through (invalid JSON),
and a class of "any character" lets it emit byte sequences it counts as one character that
decoders turn into several replacement characters, overshooting ``maxLength``. ASCII has neither
problem and suits the only such field, an opaque auth token.
"""

XGRAMMAR_MAX_REPEAT = 128
"""Largest regex repetition bound xgrammar 0.2.8 compiles (``{20,129}`` fails a compiler check)."""

GRAMMAR_MAX_ITEMS = 8
"""Most items per array in the grammar (the schema sets no maximum)."""


def _repeat(atom: str, low: int, high: int) -> str:
    """Regex for ``atom{low,high}`` whose every bound is at most :data:`XGRAMMAR_MAX_REPEAT`.

    ``X{20,256}`` becomes ``X{20}(X{0,128}){0,1}X{0,108}``: the same lengths, in pieces xgrammar
    compiles.
    """
    cap = XGRAMMAR_MAX_REPEAT
    full, rest = divmod(low, cap)
    required = f"({atom}{{{cap}}}){{{full}}}{atom}{{{rest}}}" if full else f"{atom}{{{rest}}}"
    full, rest = divmod(high - low, cap)
    optional = f"({atom}{{0,{cap}}}){{0,{full}}}{atom}{{0,{rest}}}" if full else f"{atom}{{0,{rest}}}"
    return required + optional


def grammar_schema(schema: dict[str, Any] = REQUEST_SCHEMA) -> dict[str, Any]:
    """Derive the copy of ``schema`` that xgrammar compiles into an exact grammar.

    Three features of the request schema do not survive xgrammar 0.2.8 as written:

    * ``format`` takes precedence over ``pattern``, and its built-in ``uri`` accepts ``foo:bar``
      while unknown formats (``ipv4-network``) fall back to the schema's loose patterns, so each
      format is replaced by a regex from :data:`GRAMMAR_FORMAT_PATTERNS`;
    * an ``anyOf`` whose branches only list ``required`` keys compiles to "any JSON value", so it
      becomes an ``anyOf`` of complete object schemas, one per branch;
    * strings with a ``maxLength`` admit raw control characters, so they become a pattern of
      :data:`BOUNDED_STRING_CHAR` with the same bounds.

    The copy is also made finite (bounded patterns, at most :data:`GRAMMAR_MAX_ITEMS` array
    items): a model that never chooses to close a string or an array is then still forced to
    finish, so a large enough ``max_new_tokens`` always yields a complete answer. Every change
    narrows the language, so whatever the grammar produces still passes the original schema.

    Args:
        schema: A JSON Schema node.

    Returns:
        The grammar-friendly copy (``schema`` is not modified).

    Raises:
        ValueError: On a ``format`` with no pattern in :data:`GRAMMAR_FORMAT_PATTERNS`.

    """
    node = dict(schema)
    if "properties" in node:
        node["properties"] = {key: grammar_schema(child) for key, child in node["properties"].items()}
    if "items" in node:
        node["items"] = grammar_schema(node["items"])
    if "format" in node:
        fmt = node.pop("format")
        if fmt not in GRAMMAR_FORMAT_PATTERNS:
            raise ValueError(f"no grammar pattern for JSON Schema format {fmt!r}")
        node["pattern"] = GRAMMAR_FORMAT_PATTERNS[fmt]
    if "pattern" in node:
        node["pattern"] = GRAMMAR_PATTERN_OVERRIDES.get(node["pattern"], node["pattern"])
    elif node.get("type") == "string" and "maxLength" in node:
        node["pattern"] = f"^{_repeat(BOUNDED_STRING_CHAR, node.pop('minLength', 0), node.pop('maxLength'))}$"
    if node.get("type") == "array":
        node.setdefault("maxItems", GRAMMAR_MAX_ITEMS)
    branches = node.get("anyOf", [])
    if branches and all(set(branch) == {"required"} for branch in branches):
        rest = {key: value for key, value in node.items() if key != "anyOf"}
        return {"anyOf": [{**rest, "required": branch["required"]} for branch in branches]}
    return node


def _tokenizer_info(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> Any:
    """The xgrammar view of ``tokenizer``, with its special tokens marked as such.

    xgrammar 0.2.8 takes added tokens such as ``<s>`` or ``<|pad|>`` for their literal text and
    would let them spell out string contents, which decoding with ``skip_special_tokens`` then
    deletes (an auth token could lose characters and fall under ``minLength``). An empty entry is
    what xgrammar treats as special (never allowed inside the grammar).
    """
    import xgrammar as xgr

    eos = tokenizer.eos_token_id
    detected = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=[eos])
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    encoded = [""] * vocab_size  # ids past len(tokenizer) (padded embeddings) stay special
    for token, index in tokenizer.get_vocab().items():
        if index < vocab_size and index not in special:
            encoded[index] = token
    return xgr.TokenizerInfo(
        encoded,
        detected.vocab_type,
        vocab_size=vocab_size,
        stop_token_ids=[eos],
        add_prefix_space=detected.add_prefix_space,
    )


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A digest of what the grammar's token table is built from.

    That is the tokenizer's whole definition (vocabulary, merges, decoder, added tokens and
    which are special: ``backend_tokenizer.to_str()``, or the vocabulary of a tokenizer without
    a Rust backend) and its EOS and special ids. Hashing SmolLM2's 1.5 MB definition takes
    about 0.1 s, against seconds for a compile.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = json.dumps([tokenizer.eos_token_id, sorted(tokenizer.all_special_ids)])
    return hashlib.sha256(f"{definition}\n{extra}".encode()).hexdigest()


@dataclass
class GrammarCache:
    """Compiled request grammars, one per tokenizer and vocabulary size.

    Compiling scans the vocabulary (about 9 s for SmolLM2's 49k tokens on two CPU cores), so it
    happens once per tokenizer, not per request or per batch.

    Attributes:
        grammars: ``(tokenizer fingerprint, len(tokenizer), model vocab size, notes)`` -> grammar. The
            fingerprint (:func:`tokenizer_fingerprint`) is the tokenizer's content, not its
            path, so the copies saved beside a base model and its adapters share one grammar.
        hits: Look-ups served from the cache.
        misses: Look-ups that compiled.

    """

    grammars: dict[tuple[str, int, int, bool], Any] = field(default_factory=dict)
    hits: int = 0
    misses: int = 0

    def get(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, notes: bool = False) -> Any:
        """Return the compiled request grammar for ``tokenizer``, compiling it on first use.

        Args:
            tokenizer: The model's tokenizer.
            vocab_size: The model's output size, which may exceed ``len(tokenizer)`` (padded
                embedding matrices); the logits mask must cover every id.
            notes: Also allow a scratchpad note line before the request (a model trained on
                notes writes one, :mod:`qod_lightning.data.generator.notes`). Off for other
                models: an untrained one would otherwise ramble in the note until its budget runs
                out.

        Returns:
            An ``xgrammar.CompiledGrammar``.

        """
        key = (tokenizer_fingerprint(tokenizer), len(tokenizer), vocab_size, notes)
        if key in self.grammars:
            self.hits += 1
            return self.grammars[key]
        import xgrammar as xgr

        self.misses += 1
        compiler = xgr.GrammarCompiler(_tokenizer_info(tokenizer, vocab_size), max_threads=min(8, os.cpu_count() or 1))
        # No free whitespace: an untrained model otherwise loops on spaces and newlines. The compact
        # separators are those of the training answers (dump_request).
        schema = json.dumps(grammar_schema())
        request = xgr.Grammar.from_json_schema(schema, any_whitespace=False, separators=(",", ":"))
        if notes:
            noted = xgr.Grammar.concat(xgr.Grammar.from_regex(NOTE_REGEX), request)
            request = xgr.Grammar.union(noted, request)
        self.grammars[key] = compiler.compile_grammar(request)
        return self.grammars[key]


GRAMMAR_CACHE = GrammarCache()
"""The process-wide cache :func:`generate_tokens` and :func:`grammar_accepted_starts` use."""


class GrammarMask:
    """Per-row xgrammar matchers that mask logits to the tokens the request grammar allows next.

    Rows are named by their index in the batch as it started, so the mask follows rows that stay
    while finished ones leave the batch. Once a row's grammar is complete only EOS is allowed.

    Args:
        compiled_grammar: From :meth:`GrammarCache.get`.
        batch_size: Rows of the batch as it started.

    """

    def __init__(self, compiled_grammar: Any, batch_size: int) -> None:
        import xgrammar as xgr

        self.matchers = [xgr.GrammarMatcher(compiled_grammar) for _ in range(batch_size)]
        self.bitmask = xgr.allocate_token_bitmask(batch_size, compiled_grammar.tokenizer_info.vocab_size)

    def apply(self, scores: torch.Tensor, rows: list[int]) -> None:
        """Mask ``scores`` (b, V), whose row ``j`` belongs to batch row ``rows[j]``, in place."""
        import xgrammar as xgr

        for j, row in enumerate(rows):
            self.matchers[row].fill_next_token_bitmask(self.bitmask, j)
        xgr.apply_token_bitmask_inplace(scores, self.bitmask[: len(rows)].to(scores.device))

    def accept(self, rows: list[int], tokens: list[int]) -> None:
        """Advance each row's matcher by the token chosen for it.

        Raises:
            RuntimeError: When a token was chosen against the mask (the grammar rejects it).

        """
        for row, token in zip(rows, tokens, strict=True):
            self.advance(row, [token])

    def advance(self, row: int, tokens: list[int]) -> None:
        """Advance one row's matcher through ``tokens`` (a forced start of its answer).

        Raises:
            RuntimeError: When the grammar rejects one of them.

        """
        accepted = _accept_tokens(self.matchers[row], tokens)
        if accepted < len(tokens):
            raise RuntimeError(f"row {row}: token {tokens[accepted]} is against the grammar")


def _accept_tokens(matcher: Any, tokens: list[int]) -> int:
    """Feed ``tokens`` to an xgrammar matcher until it rejects one; return how many it accepted."""
    for index, token in enumerate(tokens):
        if not matcher.accept_token(token):
            return index
    return len(tokens)


def grammar_prefix_length(grammar: Any, tokens: list[int]) -> int:
    """How many leading ``tokens`` the request grammar accepts, one after another.

    Args:
        grammar: A compiled request grammar (:meth:`GrammarCache.get`).
        tokens: An answer's token ids.

    Returns:
        The length of the longest prefix of ``tokens`` that the grammar allows.

    """
    import xgrammar as xgr

    return _accept_tokens(xgr.GrammarMatcher(grammar), tokens)


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
    grammar: Any | None = None,
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
        grammar: A compiled request grammar that masks every step's logits, or ``None``.
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
    mask = GrammarMask(grammar, len(prompts)) if grammar is not None else None
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


def load_for_inference(
    path: str, load_in_4bit: bool = False, dtype: str = "float32"
) -> tuple[PreTrainedModel | PeftModel, PreTrainedTokenizerBase]:
    """Load a model for generation, in eval mode (on the GPU when there is one).

    An adapter over full-precision weights is merged into them in memory.

    Args:
        path: A PEFT adapter directory (``adapter_config.json``; its base is loaded from the
            config's ``base_model_name_or_path``, which may be ``embedded:NAME``; the tokenizer is
            the one saved beside the adapter), or a plain/merged Hugging Face model directory,
            hub id or ``embedded:NAME``.
        load_in_4bit: Load the base weights in 4-bit NF4, as QLoRA trained them.
        dtype: Dtype of the non-quantized weights (also the 4-bit compute dtype).

    Returns:
        ``(model, tokenizer)``.

    Raises:
        FileNotFoundError: When ``path`` is neither an adapter nor a loadable model.

    """
    quantization = QuantizationSettings(load_in_4bit=load_in_4bit, compute_dtype=dtype)
    adapter_dir = Path(path)
    if (adapter_dir / "adapter_config.json").is_file():
        base_name = PeftConfig.from_pretrained(path).base_model_name_or_path
        base = load_base_model(ModelSettings(base_name, dtype=dtype, quantization=quantization))
        model = PeftModel.from_pretrained(base, path, is_trainable=False)
        if not load_in_4bit:
            # Fold W + BA into W: the same logits without seven extra matmul pairs per layer
            # (faster greedy decoding, same tokens). 4-bit weights keep the adapter:
            # merging would dequantize them.
            model = model.merge_and_unload()
        has_tokenizer = (adapter_dir / "tokenizer_config.json").is_file()
        tokenizer = load_tokenizer(path if has_tokenizer else base_name)
    else:
        try:
            model = load_base_model(ModelSettings(path, dtype=dtype, quantization=quantization))
        except OSError as err:
            raise FileNotFoundError(f"{path}: not a PEFT adapter directory nor a loadable model ({err})") from err
        tokenizer = load_tokenizer(path)
    if torch.cuda.is_available() and not load_in_4bit:
        model.to("cuda")  # 4-bit weights are placed on the GPU by bitsandbytes when they load
    model.eval()
    return model, tokenizer


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


def _output_size(model: PreTrainedModel | PeftModel) -> int:
    """Rows of the LM head: the logits' width, which the grammar mask must cover."""
    return model.get_output_embeddings().weight.shape[0]


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
    The caller sets the model's mode; :func:`load_for_inference` returns it in eval mode.

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
        constrained: Mask the logits with the request grammar (needs ``xgrammar``).
        notes: With ``constrained``, the grammar allows a scratchpad note line before the request
            (for a model trained on notes; :meth:`GrammarCache.get`).
        max_input_tokens: Longest prompt kept, in tokens.
        forced: Tokens each answer starts with (:func:`decode_batch`), such as
            :func:`grammar_accepted_starts`; answers they already finish are not decoded. Only
            their last token is checked for a stop, so an earlier one must not end the answer
            (a start of a decoded answer never does).
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
    grammar = GRAMMAR_CACHE.get(tokenizer, _output_size(model), notes) if constrained else None
    if grammar is not None and any(grammar_prefix_length(grammar, ids) < len(ids) for ids in forced):
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
        return decode_batch(model, tokenizer, [prompts[i] for i in chunk], options, grammar, [forced[i] for i in chunk])

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


def grammar_accepted_starts(
    model: PreTrainedModel | PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    answers: list[list[int]],
    notes: bool = False,
) -> list[list[int]]:
    """The start of each greedy unconstrained answer that greedy constrained decoding shares.

    The grammar mask only removes candidates, so where the unconstrained argmax is allowed, the
    constrained argmax is that same token: from the same logits, the constrained answer equals the
    unconstrained one up to the first token the grammar rejects. Passed as ``forced`` to
    :func:`generate_tokens` with ``constrained=True`` (same prompts and settings, greedy), these
    starts give the constrained answers while decoding only from the first rejected token on; an
    answer the grammar accepts whole is not decoded again. The forced tokens run through the
    model in one pass rather than one per step, so the logits after them may differ from a
    from-scratch run in the last bits of float precision, as they do between batch sizes.

    Args:
        model: The model that wrote ``answers`` (its output size sizes the grammar's mask).
        tokenizer: Its tokenizer.
        answers: Greedy unconstrained answer tokens (:func:`generate_tokens`).
        notes: The grammar allows a scratchpad note first (as :func:`generate_tokens`).

    Returns:
        For each answer, its longest start the request grammar accepts.

    """
    grammar = GRAMMAR_CACHE.get(tokenizer, _output_size(model), notes)
    return [ids[: grammar_prefix_length(grammar, ids)] for ids in answers]
