"""Turn plain-language requests into request JSON with a trained model: loading and decoding.

Decoding is batched with left padding, conditions on exactly the prompt ids training used
(:func:`~qod_lightning.data.tokenize.encode_prompt`), and stops each row at EOS or at the end of
its first complete JSON object. With ``constrained=True`` an xgrammar grammar compiled from
:data:`~qod_lightning.schema.REQUEST_SCHEMA` masks the logits, so every finished output parses
and passes the schema by construction.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import PeftConfig, PeftModel
from tqdm.auto import tqdm
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
)

from qod_lightning.data.tokenize import PromptFormat, encode_prompt
from qod_lightning.extraction import find_json_object
from qod_lightning.model import ModelSettings, QuantizationSettings, load_base_model, load_tokenizer
from qod_lightning.schema import IPV4_NETWORK_PATTERN, IPV4_PATTERN, NAI_PATTERN, REQUEST_SCHEMA

log = logging.getLogger(__name__)

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


@dataclass
class GrammarCache:
    """Compiled request grammars, one per tokenizer and vocabulary size.

    Compiling scans the vocabulary (about 9 s for SmolLM2's 49k tokens on two CPU cores), so it
    happens once per tokenizer, not per request or per batch.

    Attributes:
        grammars: ``(tokenizer name_or_path, len(tokenizer), model vocab size)`` -> grammar.
        hits: Look-ups served from the cache.
        misses: Look-ups that compiled.

    """

    grammars: dict[tuple[str, int, int], Any] = field(default_factory=dict)
    hits: int = 0
    misses: int = 0

    def get(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> Any:
        """Return the compiled request grammar for ``tokenizer``, compiling it on first use.

        Args:
            tokenizer: The model's tokenizer.
            vocab_size: The model's output size, which may exceed ``len(tokenizer)`` (padded
                embedding matrices); the logits mask must cover every id.

        Returns:
            An ``xgrammar.CompiledGrammar``.

        """
        key = (tokenizer.name_or_path, len(tokenizer), vocab_size)
        if key in self.grammars:
            self.hits += 1
            return self.grammars[key]
        import xgrammar as xgr

        self.misses += 1
        compiler = xgr.GrammarCompiler(_tokenizer_info(tokenizer, vocab_size), max_threads=min(8, os.cpu_count() or 1))
        # No free whitespace: an untrained model otherwise loops on spaces and newlines. The compact
        # separators are those of the training answers (dump_request).
        self.grammars[key] = compiler.compile_json_schema(
            json.dumps(grammar_schema()), any_whitespace=False, separators=(",", ":")
        )
        return self.grammars[key]


GRAMMAR_CACHE = GrammarCache()
"""The process-wide cache :func:`generate` uses."""


class GrammarLogitsProcessor(LogitsProcessor):
    """Mask each row's logits to the tokens the request grammar allows next.

    One matcher per row. Once a row's grammar has completed, only EOS is allowed, and the next
    token (EOS, or padding when a stopping criterion ended the row first) finishes it.

    Args:
        compiled_grammar: From :meth:`GrammarCache.get`.
        batch_size: Rows of the batch; a processor serves one ``generate`` call.

    """

    def __init__(self, compiled_grammar: Any, batch_size: int) -> None:
        import xgrammar as xgr

        self.matchers = [xgr.GrammarMatcher(compiled_grammar) for _ in range(batch_size)]
        self.finished = [False] * batch_size
        self.bitmask = xgr.allocate_token_bitmask(batch_size, compiled_grammar.tokenizer_info.vocab_size)
        self._started = False

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """Accept each row's last token, then mask ``scores`` (B, V) in place."""
        import xgrammar as xgr

        if self._started:
            self._accept(input_ids[:, -1].tolist())
        self._started = True
        xgr.reset_token_bitmask(self.bitmask)  # finished rows keep a full mask: their tokens are discarded
        for i, matcher in enumerate(self.matchers):
            if not self.finished[i]:
                matcher.fill_next_token_bitmask(self.bitmask, i)
        xgr.apply_token_bitmask_inplace(scores, self.bitmask.to(scores.device))
        return scores

    def _accept(self, tokens: list[int]) -> None:
        for i, token in enumerate(tokens):
            if self.finished[i]:
                continue
            if self.matchers[i].is_completed():
                self.finished[i] = True
            elif not self.matchers[i].accept_token(token):
                raise RuntimeError(f"row {i}: token {token} was sampled against the grammar mask")


def _open_braces(text: str) -> int:
    """Depth of ``{`` nesting still open at the end of ``text``, ignoring braces inside strings."""
    depth, in_string, escaped = 0, False, False
    for char in text[text.find("{") :] if "{" in text else "":
        if in_string:
            escaped = char == "\\" and not escaped
            in_string = escaped or char != '"'
        elif char == '"':
            in_string = True
        elif char == "{":
            depth += 1
        elif char == "}":
            depth = max(0, depth - 1)
    return depth


class JsonObjectStop(StoppingCriteria):
    """Per row: stop at EOS or once the new text holds a complete top-level JSON object.

    An object nested inside one still open (``{"a":{"b":1}``) parses on its own but does not
    count. ``kept[i]`` is how many new tokens row ``i`` produced before stopping (EOS excluded),
    ``None`` while it runs.

    Args:
        tokenizer: Decodes the new tokens.
        prompt_length: Columns of the (left-padded) prompt.
        batch_size: Rows of the batch.

    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_length: int, batch_size: int) -> None:
        self.tokenizer = tokenizer
        self.prompt_length = prompt_length
        self.kept: list[int | None] = [None] * batch_size

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        """Return (B,) booleans: which rows are done."""
        new = input_ids[:, self.prompt_length :]  # (B, generated so far)
        for i, row in enumerate(new.tolist()):
            if self.kept[i] is not None:
                continue
            if row[-1] == self.tokenizer.eos_token_id:
                self.kept[i] = len(row) - 1
            elif "}" in self.tokenizer.decode(row[-1:]) and self._complete(row):
                self.kept[i] = len(row)
        done = [kept is not None for kept in self.kept]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    def _complete(self, row: list[int]) -> bool:
        text = self.tokenizer.decode(row, skip_special_tokens=True)
        found = find_json_object(text)
        return found is not None and _open_braces(text[: found[1]]) == 0


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
    """Encode each request exactly as training did, keeping the last ``max_input_tokens`` ids."""
    encoded = [encode_prompt(tokenizer, r, prompt_format=prompt_format) for r in requests]
    too_long = sum(len(ids) > max_input_tokens for ids in encoded)
    if too_long:
        log.warning(
            "%d request(s) longer than max_input_tokens=%d were truncated to their last %d prompt tokens",
            too_long,
            max_input_tokens,
            max_input_tokens,
        )
    return [ids[-max_input_tokens:] for ids in encoded]


def _left_pad(prompts: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` (B, T), padded on the left so every row ends at T."""
    longest = max(len(ids) for ids in prompts)
    input_ids = torch.tensor([[pad_token_id] * (longest - len(ids)) + ids for ids in prompts])
    attention_mask = torch.tensor([[0] * (longest - len(ids)) + [1] * len(ids) for ids in prompts])
    return input_ids, attention_mask


def _generate_batch(
    model: PreTrainedModel | PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    config: GenerationConfig,
    grammar: Any | None,
) -> list[str]:
    input_ids, attention_mask = _left_pad(prompts, config.pad_token_id)
    stop = JsonObjectStop(tokenizer, input_ids.shape[1], len(prompts))
    processors = LogitsProcessorList([GrammarLogitsProcessor(grammar, len(prompts))] if grammar is not None else [])
    output = model.generate(
        input_ids=input_ids.to(model.device),
        attention_mask=attention_mask.to(model.device),
        generation_config=config,
        stopping_criteria=StoppingCriteriaList([stop]),
        logits_processor=processors,
    )
    new = output[:, input_ids.shape[1] :].tolist()  # (B, generated)
    return [
        tokenizer.decode(row if kept is None else row[:kept], skip_special_tokens=True)
        for row, kept in zip(new, stop.kept, strict=True)
    ]


@torch.no_grad()
def generate(
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
    max_input_tokens: int = 1024,
) -> list[str]:
    """Generate an answer for each request (greedy by default), in batches.

    Requests are grouped by prompt length, so little padding is spent, and returned in input
    order. Prompts longer than ``max_input_tokens`` keep their last tokens (one warning says how
    many). The caller sets the model's mode; :func:`load_for_inference` returns it in eval mode.

    Args:
        model: A causal LM (plain or PEFT).
        tokenizer: Its tokenizer (needs EOS; padding uses the pad token, else EOS).
        requests: The users' request texts.
        prompt_format: ``alpaca`` or ``chat``, as in training.
        max_new_tokens: Most tokens generated per request.
        batch_size: Requests per ``generate`` call.
        do_sample: Sample instead of greedy decoding.
        temperature: Sampling temperature (only with ``do_sample``).
        constrained: Mask the logits with the request grammar (needs ``xgrammar``).
        max_input_tokens: Longest prompt kept, in tokens.

    Returns:
        The generated texts (new tokens only, special tokens skipped), one per request.

    """
    if not requests:
        return []
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token, so generation could not stop")
    prompts = _prompt_ids(tokenizer, requests, prompt_format, max_input_tokens)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        pad_token_id=pad,
        eos_token_id=tokenizer.eos_token_id,
        **({"temperature": temperature} if do_sample else {}),
    )
    vocab_size = model.get_output_embeddings().weight.shape[0]
    grammar = GRAMMAR_CACHE.get(tokenizer, vocab_size) if constrained else None
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    outputs: list[str] = [""] * len(prompts)
    for start in tqdm(range(0, len(order), batch_size), desc="Generating", unit="batch", disable=None, leave=False):
        chunk = order[start : start + batch_size]
        texts = _generate_batch(model, tokenizer, [prompts[i] for i in chunk], config, grammar)
        for index, text in zip(chunk, texts, strict=True):
            outputs[index] = text
    return outputs
