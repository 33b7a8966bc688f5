"""Constrained decoding: the request grammar (xgrammar) that masks the logits.

The grammar is compiled from a narrowed copy of :data:`~qod_lightning.schema.REQUEST_SCHEMA`
(:func:`grammar_schema`), so every answer it lets a model finish parses and passes the schema.
For each request it is narrowed once more (:func:`grounded_schema`): an address, phone number,
identifier, URL, token or port can only be one the request states, so the grammar never makes a
model write a value it would not have copied. Which value goes where is still the model's choice.
xgrammar is optional (the ``constrained`` extra) and imported only where a grammar is compiled,
matched or applied, so importing this module does not need it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from qod_lightning.extraction import NOTE_REGEX
from qod_lightning.schema import IPV4_NETWORK_PATTERN, IPV4_PATTERN, NAI_PATTERN, REQUEST_SCHEMA
from qod_lightning.validation import PORT_KEYS, RequestValues, request_values

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


@functools.cache
def _request_grammar_schema() -> dict[str, Any]:
    """:func:`grammar_schema` of the request schema, made once (callers copy what they change)."""
    return grammar_schema()


def _copyable_strings(values: RequestValues) -> set[str]:
    """Every string an answer may copy from a request: its values as written, in each form an answer uses."""
    addresses = {text.partition("/")[0] for text in values.ips}  # "198.51.100.0/24" also names 198.51.100.0
    phones = {f"+{digits}" for digits in values.phone_numbers} | set(values.phone_numbers)
    return {*values.ips, *addresses, *phones, *values.urls, *values.identifiers, *values.words}


def _ground(node: dict[str, Any], key: str | None, strings: set[str], ports: list[int]) -> dict[str, Any] | None:
    """``node`` with each copied value narrowed to ``strings`` or ``ports``; ``None`` when nothing fits."""
    if "enum" in node:
        return node
    if "anyOf" in node:
        branches = [b for b in (_ground(branch, key, strings, ports) for branch in node["anyOf"]) if b is not None]
        return {**node, "anyOf": branches} if branches else None
    kind = node.get("type")
    if kind == "string" and "pattern" in node:
        choices = sorted(text for text in strings if re.search(node["pattern"], text))
        return {"type": "string", "enum": choices} if choices else None
    if kind == "integer" and key in PORT_KEYS:
        low, high = node.get("minimum", 0), node.get("maximum", 65535)
        choices = [number for number in ports if low <= number <= high]
        return {"type": "integer", "enum": choices} if choices else None
    if kind == "array":
        items = _ground(node["items"], key, strings, ports)  # "ports" names its items
        return {**node, "items": items} if items is not None else None
    if kind == "object" and "properties" in node:
        kept = {name: _ground(child, name, strings, ports) for name, child in node["properties"].items()}
        properties = {name: child for name, child in kept.items() if child is not None}
        if set(node.get("required", ())) - set(properties) or len(properties) < node.get("minProperties", 0):
            return None
        return {**node, "properties": properties}
    return node


def grounded_schema(request: str) -> dict[str, Any]:
    """The grammar schema (:func:`grammar_schema`) narrowed to the values ``request`` states.

    A pattern-checked string (an IP address, phone number, network access identifier, URL or
    auth token) becomes an ``enum`` of the request's values that the pattern accepts
    (:func:`~qod_lightning.validation.request_values`, the values the hallucination check
    accepts), and a port an ``enum`` of the request's numbers. A key with no such value goes,
    and so does a branch or an optional object that needs it: with no phone number in the
    request, ``phoneNumber`` is not allowed, so a model that would write a device in the wrong
    form must choose a form the request has. A required field with no value to copy (a request
    that names no server address) keeps the ungrounded schema, so an answer is still possible.
    The duration is converted, not copied, and stays as it is.

    Args:
        request: The user's request text.

    Returns:
        The narrowed schema (a new object; the cached grammar schema is not modified).

    """
    base = _request_grammar_schema()
    values = request_values(request)
    strings = _copyable_strings(values)
    ports = sorted(number for number in values.numbers if number <= 65535)
    properties = {}
    for name, child in base["properties"].items():
        narrowed = _ground(child, name, strings, ports)
        if narrowed is None and name in base["required"]:
            narrowed = child
        if narrowed is not None:
            properties[name] = narrowed
    return {**base, "properties": properties}


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
    """Compiled request grammars, by tokenizer, vocabulary size, notes and (grounded) schema.

    The first compile for a tokenizer scans its vocabulary (about 9 s for SmolLM2's 49k tokens on
    two CPU cores); its compiler then keeps what grammars share, so each request's grounded grammar
    (:func:`grounded_schema`) compiles in tens of milliseconds.

    Attributes:
        grammars: ``(tokenizer fingerprint, len(tokenizer), model vocab size, notes, schema
            digest)`` -> grammar, the least recently used first. The fingerprint
            (:func:`tokenizer_fingerprint`) is the tokenizer's content, not its path, so the
            copies saved beside a base model and its adapters share grammars.
        compilers: One xgrammar compiler per tokenizer key.
        max_grammars: The most grammars kept; the least recently used go first.
        hits: Look-ups served from the cache.
        misses: Look-ups that compiled.

    """

    grammars: OrderedDict[tuple[str, int, int, bool, str], Any] = field(default_factory=OrderedDict)
    compilers: dict[tuple[str, int, int], Any] = field(default_factory=dict)
    max_grammars: int = 4096
    hits: int = 0
    misses: int = 0

    def get(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, notes: bool = False) -> Any:
        """Return the request grammar for ``tokenizer`` (any values, not grounded in a request).

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
        return self._grammars(tokenizer, vocab_size, notes, [_request_grammar_schema()])[0]

    def for_requests(
        self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, requests: list[str], notes: bool = False
    ) -> list[Any]:
        """Return each request's grounded grammar (:func:`grounded_schema`), as :meth:`get` does."""
        return self._grammars(tokenizer, vocab_size, notes, [grounded_schema(r) for r in requests])

    def _grammars(
        self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, notes: bool, schemas: list[dict[str, Any]]
    ) -> list[Any]:
        base = (tokenizer_fingerprint(tokenizer), len(tokenizer), vocab_size)  # hashed once for all schemas
        out = []
        for schema in schemas:
            text = json.dumps(schema)  # key order kept: xgrammar writes properties in the schema's order
            key = (*base, notes, hashlib.sha256(text.encode()).hexdigest())
            if key in self.grammars:
                self.hits += 1
                self.grammars.move_to_end(key)
            else:
                self.misses += 1
                self.grammars[key] = self._compile(base, tokenizer, text, notes)
                if len(self.grammars) > self.max_grammars:
                    self.grammars.popitem(last=False)
            out.append(self.grammars[key])
        return out

    def _compile(self, base: tuple[str, int, int], tokenizer: PreTrainedTokenizerBase, schema: str, notes: bool) -> Any:
        import xgrammar as xgr

        if base not in self.compilers:
            info = _tokenizer_info(tokenizer, base[2])
            self.compilers[base] = xgr.GrammarCompiler(info, max_threads=min(8, os.cpu_count() or 1))
        # No free whitespace: an untrained model otherwise loops on spaces and newlines. The compact
        # separators are those of the training answers (dump_request).
        request = xgr.Grammar.from_json_schema(schema, any_whitespace=False, separators=(",", ":"))
        if notes:
            noted = xgr.Grammar.concat(xgr.Grammar.from_regex(NOTE_REGEX), request)
            request = xgr.Grammar.union(noted, request)
        return self.compilers[base].compile_grammar(request)


GRAMMAR_CACHE = GrammarCache()
"""The process-wide cache :func:`~qod_lightning.generation.generate_tokens` and
:func:`grammar_accepted_starts` use."""


class GrammarMask:
    """Per-row xgrammar matchers that mask logits to the tokens each row's grammar allows next.

    Rows are named by their index in the batch as it started, so the mask follows rows that stay
    while finished ones leave the batch. Once a row's grammar is complete only EOS is allowed.

    Args:
        grammars: One compiled grammar per row of the batch as it started
            (:meth:`GrammarCache.for_requests`, or :meth:`GrammarCache.get` for every row), all
            for one tokenizer.

    """

    def __init__(self, grammars: list[Any]) -> None:
        import xgrammar as xgr

        self.matchers = [xgr.GrammarMatcher(grammar) for grammar in grammars]
        self.bitmask = xgr.allocate_token_bitmask(len(grammars), grammars[0].tokenizer_info.vocab_size)

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
    requests: list[str],
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
        requests: The request each answer answers (its grammar is grounded in it).
        notes: The grammar allows a scratchpad note first (as
            :func:`~qod_lightning.generation.generate_tokens`).

    Returns:
        For each answer, its longest start the request grammar accepts.

    """
    if len(requests) != len(answers):
        raise ValueError(f"{len(answers)} answers for {len(requests)} requests")
    grammars = GRAMMAR_CACHE.for_requests(tokenizer, output_size(model), requests, notes)
    return [ids[: grammar_prefix_length(grammar, ids)] for grammar, ids in zip(grammars, answers, strict=True)]
