"""The request grammar on the tiny Phi-3: its schema, its cache, and that constrained answers pass the schema."""

import json
import random
import re

import pytest
import torch

from qod_lightning.constrained import (
    GRAMMAR_CACHE,
    XGRAMMAR_MAX_REPEAT,
    GrammarCache,
    grammar_accepted_starts,
    grammar_schema,
    tokenizer_fingerprint,
)
from qod_lightning.generation import generate, generate_tokens
from qod_lightning.model import load_for_inference, load_tokenizer
from qod_lightning.schema import VALIDATOR
from qod_lightning.validation import validate_request
from tests.test_generation import REQUESTS

pytestmark = pytest.mark.numerics  # also run under the other instruction set's settings (.ci/run)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model, tokenizer = load_for_inference(str(tiny_model_dir))
    return model, tokenizer


def test_grammar_schema_replaces_what_xgrammar_cannot_compile_exactly():
    schema = grammar_schema()
    text = json.dumps(schema)
    assert '"format"' not in text and '"minLength"' not in text and '"maxLength"' not in text
    ipv4 = schema["properties"]["device"]["properties"]["ipv4Address"]
    assert [set(branch["required"]) for branch in ipv4["anyOf"]] == [
        {"publicAddress", "privateAddress"},
        {"publicAddress", "publicPort"},
    ]
    assert all(branch["type"] == "object" and not branch["additionalProperties"] for branch in ipv4["anyOf"])
    bounds = [int(b) for b in re.findall(r"\{\d+,?(\d+)\}", text)]
    assert max(bounds) <= XGRAMMAR_MAX_REPEAT


@pytest.mark.parametrize(
    ("address", "ok"),
    [
        *[("2001:db8::1", True), ("::", True), ("1:2:3:4:5:6:7:8", True), ("1:2:3:4:5:6:7::", True)],
        *[("1:2:3:4:5:6:7::8", False), ("1::2::3", False), (":::", False), ("12345::1", False)],
    ],
)
def test_grammar_ipv6_pattern_agrees_with_ipaddress(address, ok):
    pattern = grammar_schema()["properties"]["device"]["properties"]["ipv6Address"]["pattern"]
    assert bool(re.match(pattern, address)) is ok


def test_every_string_of_the_grammar_passes_the_schema(tiny):
    """Random walks through the grammar (uniform over allowed tokens): each ends valid, then EOS only."""
    import xgrammar as xgr

    _, tokenizer = tiny
    vocab_size = len(tokenizer) + 16  # a padded embedding matrix, as Phi-3's
    grammar = GrammarCache().get(tokenizer, vocab_size)
    special = set(tokenizer.all_special_ids)
    bitmask = xgr.allocate_token_bitmask(1, vocab_size)
    rng = random.Random(0)
    for _ in range(30):
        matcher, ids = xgr.GrammarMatcher(grammar), []
        while True:
            matcher.fill_next_token_bitmask(bitmask)
            scores = torch.zeros(1, vocab_size)
            xgr.apply_token_bitmask_inplace(scores, bitmask)
            allowed = torch.nonzero(scores[0] == 0).flatten().tolist()
            if matcher.is_completed():
                assert allowed == [tokenizer.eos_token_id]
                break
            assert not special & set(allowed) and max(allowed) < len(tokenizer)
            ids.append(rng.choice(allowed))
            assert matcher.accept_token(ids[-1])
        text = tokenizer.decode(ids)
        assert not list(VALIDATOR.iter_errors(json.loads(text))), text


def test_a_tokenizer_with_another_eos_gets_its_own_grammar(tiny, tmp_path):
    _, tokenizer = tiny
    tokenizer.save_pretrained(tmp_path)
    other = load_tokenizer(str(tmp_path))
    other.eos_token = other.convert_ids_to_tokens(5)
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(tokenizer)
    assert tokenizer_fingerprint(load_tokenizer(str(tmp_path))) == tokenizer_fingerprint(tokenizer)


def test_grammar_is_compiled_once_per_tokenizer(tiny, tmp_path):
    model, tokenizer = tiny
    generate(model, tokenizer, REQUESTS[:1], max_new_tokens=2, constrained=True)
    misses, hits = GRAMMAR_CACHE.misses, GRAMMAR_CACHE.hits
    generate(model, tokenizer, REQUESTS[:3], max_new_tokens=2, batch_size=1, constrained=True)  # 3 batches
    generate(model, tokenizer, REQUESTS[:2], max_new_tokens=2, constrained=True)
    tokenizer.save_pretrained(tmp_path)  # a copy elsewhere (as beside an adapter) is the same tokenizer
    generate(model, load_tokenizer(str(tmp_path)), REQUESTS[:1], max_new_tokens=2, constrained=True)
    assert GRAMMAR_CACHE.misses == misses
    assert GRAMMAR_CACHE.hits == hits + 3


def test_constrained_outputs_parse_and_pass_the_schema(tiny):
    model, tokenizer = tiny
    outputs = generate(model, tokenizer, REQUESTS, max_new_tokens=1000, constrained=True)
    for request, output in zip(REQUESTS, outputs, strict=True):
        obj = json.loads(output)  # the whole answer is the object: generation stopped at its end
        assert not list(VALIDATOR.iter_errors(obj))
        report = validate_request(output, request)
        assert report.valid and all(check.passed for check in report.checks.values()), report.errors


@pytest.mark.slow
def test_grammar_accepted_starts_end_where_the_grammar_rejects(tiny):
    model, tokenizer = tiny
    valid = generate_tokens(model, tokenizer, REQUESTS[:1], max_new_tokens=1000, constrained=True)[0]
    text = tokenizer.decode(valid)
    assert json.loads(text)  # a complete request: after it the grammar allows EOS only
    garbage = tokenizer("garbage", add_special_tokens=False)["input_ids"]
    brace = tokenizer("{", add_special_tokens=False)["input_ids"]
    answers = [valid, valid + garbage, valid[:5] + brace + valid[5:], garbage, []]
    starts = grammar_accepted_starts(model, tokenizer, answers)
    assert [len(ids) for ids in starts] == [len(valid), len(valid), 5, 0, 0]
