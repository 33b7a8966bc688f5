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
    grounded_schema,
    tokenizer_fingerprint,
)
from qod_lightning.generation import generate, generate_tokens
from qod_lightning.model import load_for_inference, load_tokenizer
from qod_lightning.schema import VALIDATOR
from qod_lightning.validation import validate_request, value_hallucinations
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


def _random_answers(grammar, tokenizer, vocab_size: int, count: int, seed: int = 0) -> list[str]:
    """Random walks through ``grammar`` (uniform over allowed tokens); each must end with EOS the only choice."""
    import xgrammar as xgr

    special = set(tokenizer.all_special_ids)
    bitmask = xgr.allocate_token_bitmask(1, vocab_size)
    rng = random.Random(seed)
    answers = []
    for _ in range(count):
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
        answers.append(tokenizer.decode(ids))
    return answers


def test_every_string_of_the_grammar_passes_the_schema(tiny):
    _, tokenizer = tiny
    vocab_size = len(tokenizer) + 16  # a padded embedding matrix, as Phi-3's
    for text in _random_answers(GrammarCache().get(tokenizer, vocab_size), tokenizer, vocab_size, 30):
        assert not list(VALIDATOR.iter_errors(json.loads(text))), text


GROUNDED_REQUESTS = [
    "Need gaming session, device 203.0.113.75, server 192.0.2.0/24, 2 hours, device ports 5000-5010",
    "video call from +44 7700 900123 (or tel 0044 7700 900124) to 2001:db8::1 for 90 minutes",
    "Streaming on 198.51.100.4:5060 to 192.0.2.9, ports 8443 and 9000, "
    "notify https://hooks.example.com/qod/7 token abcdefghij0123456789",
    "UE ue-17@iot.example.org / 2001:db8:5::/48 / profile QOS_L / callback http://cb.example.net/x",
]


@pytest.mark.parametrize("request_text", GROUNDED_REQUESTS)
def test_every_string_of_a_grounded_grammar_passes_the_schema_and_invents_no_value(tiny, request_text):
    """The grammar stands in for the hallucination check: it lets through only values the check accepts."""
    _, tokenizer = tiny
    grammar = GrammarCache().for_requests(tokenizer, len(tokenizer), [request_text])[0]
    for text in _random_answers(grammar, tokenizer, len(tokenizer), 20):
        obj = json.loads(text)
        assert not list(VALIDATOR.iter_errors(obj)), text
        assert value_hallucinations(obj, request_text) == [], text


def test_a_grounded_schema_lists_the_values_of_its_request_and_drops_keys_with_none():
    schema = grounded_schema(GROUNDED_REQUESTS[0])
    device, server = schema["properties"]["device"]["properties"], schema["properties"]["applicationServer"]
    branch = device["ipv4Address"]["anyOf"][0]["properties"]
    assert branch["publicAddress"]["enum"] == ["192.0.2.0", "203.0.113.75"]
    assert server["properties"]["ipv4Address"]["enum"] == ["192.0.2.0", "192.0.2.0/24", "203.0.113.75"]
    assert set(server["properties"]) == {"ipv4Address"}  # no IPv6 address to copy
    assert "ipv6Address" not in device and "networkAccessIdentifier" not in device
    plain = grounded_schema("device 203.0.113.75, server 192.0.2.9")["properties"]["device"]["properties"]
    assert set(plain) == {"ipv4Address"}  # no phone number either: the address's digits are not one
    ranges = schema["properties"]["devicePorts"]["properties"]["ranges"]["items"]["properties"]
    assert ranges["from"]["enum"] == ranges["to"]["enum"] == [2, 5000, 5010]
    assert "webhook" not in schema["properties"]  # no URL to notify
    assert schema["properties"]["duration"] == grammar_schema()["properties"]["duration"]  # converted, not copied
    phones = grounded_schema(GROUNDED_REQUESTS[1])["properties"]["device"]["properties"]["phoneNumber"]["enum"]
    assert {"+447700900123", "+447700900124"} <= set(phones)


def test_a_grounded_grammar_accepts_the_right_answer_written_as_training_writes_it(tiny):
    """Properties come in the schema's order (device first), as the training answers write them."""
    from qod_lightning.constrained import grammar_prefix_length
    from qod_lightning.data.prompts import dump_request

    _, tokenizer = tiny
    request = GROUNDED_REQUESTS[2]
    answer = {
        "device": {"ipv4Address": {"publicAddress": "198.51.100.4", "publicPort": 5060}},
        "applicationServer": {"ipv4Address": "192.0.2.9"},
        "applicationServerPorts": {"ports": [8443, 9000]},
        "qosProfile": "QOS_M",
        "webhook": {
            "notificationUrl": "https://hooks.example.com/qod/7",
            "notificationAuthToken": "abcdefghij0123456789",
        },
        "duration": 86400,
    }
    ids = tokenizer(dump_request(answer), add_special_tokens=False)["input_ids"]
    grammar = GrammarCache().for_requests(tokenizer, len(tokenizer), [request])[0]
    assert grammar_prefix_length(grammar, ids) == len(ids)


def test_a_required_field_with_nothing_to_copy_keeps_the_ungrounded_schema():
    schema = grounded_schema("a session for my phone to the game server, please")
    ungrounded = grammar_schema()
    assert schema["properties"]["device"] == ungrounded["properties"]["device"]
    assert schema["properties"]["applicationServer"] == ungrounded["properties"]["applicationServer"]
    assert set(schema["properties"]) == {"device", "applicationServer", "qosProfile", "duration"}


def test_a_tokenizer_with_another_eos_gets_its_own_grammar(tiny, tmp_path):
    _, tokenizer = tiny
    tokenizer.save_pretrained(tmp_path)
    other = load_tokenizer(str(tmp_path))
    other.eos_token = other.convert_ids_to_tokens(5)
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(tokenizer)
    assert tokenizer_fingerprint(load_tokenizer(str(tmp_path))) == tokenizer_fingerprint(tokenizer)


def test_a_requests_grammar_is_compiled_once_per_tokenizer(tiny, tmp_path):
    model, tokenizer = tiny
    generate(model, tokenizer, REQUESTS[:3], max_new_tokens=2, constrained=True)
    misses, hits = GRAMMAR_CACHE.misses, GRAMMAR_CACHE.hits
    generate(model, tokenizer, REQUESTS[:3], max_new_tokens=2, batch_size=1, constrained=True)  # 3 batches
    tokenizer.save_pretrained(tmp_path)  # a copy elsewhere (as beside an adapter) is the same tokenizer
    generate(model, load_tokenizer(str(tmp_path)), REQUESTS[:1], max_new_tokens=2, constrained=True)
    assert GRAMMAR_CACHE.misses == misses
    assert GRAMMAR_CACHE.hits == hits + 4


def test_the_cache_keeps_the_most_recently_used_grammars(tiny):
    _, tokenizer = tiny
    cache = GrammarCache(max_grammars=2)
    *_, third = (cache.for_requests(tokenizer, len(tokenizer), [r])[0] for r in REQUESTS[:3])
    assert cache.for_requests(tokenizer, len(tokenizer), [REQUESTS[2]]) == [third]
    assert (cache.misses, cache.hits, len(cache.grammars)) == (3, 1, 2)
    cache.for_requests(tokenizer, len(tokenizer), [REQUESTS[0]])  # evicted, so compiled again
    assert cache.misses == 4


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
    starts = grammar_accepted_starts(model, tokenizer, answers, REQUESTS[:1] * len(answers))
    assert [len(ids) for ids in starts] == [len(valid), len(valid), 5, 0, 0]
