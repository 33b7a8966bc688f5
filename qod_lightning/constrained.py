"""Constrained decoding: the request grammar (xgrammar), compiled once per tokenizer, that masks the logits.

The grammar is compiled from a narrowed copy of :data:`~qod_lightning.schema.REQUEST_SCHEMA`
(:func:`grammar_schema`), so every answer it lets a model finish parses and passes the schema.
xgrammar is optional (the ``constrained`` extra) and imported only where a grammar is compiled,
matched or applied, so importing this module does not need it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from qod_lightning.extraction import NOTE_REGEX
from qod_lightning.schema import IPV4_NETWORK_PATTERN, IPV4_PATTERN, NAI_PATTERN, REQUEST_SCHEMA

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
                notes writes one, :mod:`qod_lightning.data.generator.notes`). Off for other models: an
                untrained one would otherwise ramble in the note until its budget runs out.

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
"""The process-wide cache :func:`~qod_lightning.generation.generate_tokens` and
:func:`grammar_accepted_starts` use."""


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


def output_size(model: PreTrainedModel | PeftModel) -> int:
    """Rows of the LM head: the logits' width, which the grammar mask must cover."""
    return model.get_output_embeddings().weight.shape[0]


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
    :func:`~qod_lightning.generation.generate_tokens` with ``constrained=True`` (same prompts and
    settings, greedy), these starts give the constrained answers while decoding only from the
    first rejected token on; an answer the grammar accepts whole is not decoded again. The forced
    tokens run through the model in one pass rather than one per step, so the logits after them
    may differ from a from-scratch run in the last bits of float precision, as they do between
    batch sizes.

    Args:
        model: The model that wrote ``answers`` (its output size sizes the grammar's mask).
        tokenizer: Its tokenizer.
        answers: Greedy unconstrained answer tokens
            (:func:`~qod_lightning.generation.generate_tokens`).
        notes: The grammar allows a scratchpad note first (as
            :func:`~qod_lightning.generation.generate_tokens`).

    Returns:
        For each answer, its longest start the request grammar accepts.

    """
    grammar = GRAMMAR_CACHE.get(tokenizer, output_size(model), notes)
    return [ids[: grammar_prefix_length(grammar, ids)] for ids in answers]
