import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qod_lightning.extraction import MAX_ATTEMPTS, extract_json, find_json_object

BODY = {"qosProfile": "QOS_E", "duration": 7200}
COMPACT = json.dumps(BODY, separators=(",", ":"))


@pytest.mark.parametrize(
    "text",
    [
        COMPACT,
        json.dumps(BODY, indent=2),
        f"```json\n{COMPACT}\n```",
        f"```\n{json.dumps(BODY, indent=2)}\n```",
        f"Sure! Here is the request:\n{COMPACT}",
        f"{COMPACT}\nLet me know if you need anything else!",
        f"{COMPACT} trailing {{ brace and }} text",
        f'Here: {COMPACT}. And a second one: {{"qosProfile": "QOS_L"}}',
    ],
)
def test_extracts_the_object_from_fences_and_prose(text):
    assert extract_json(text) == BODY


def test_a_broken_first_object_is_skipped_for_a_good_one():
    assert extract_json('{"qosProfile": "QOS_E",, } then ' + COMPACT) == BODY
    assert extract_json('{"note": "}", oops} then ' + COMPACT) == BODY  # a brace in a string does not close it


def test_an_object_inside_a_broken_one_is_not_the_answer():
    # The broken object is skipped whole, to its closing brace: what it holds is not top-level.
    assert extract_json('{"x": ' + COMPACT + " oops} and nothing else") is None
    assert extract_json('{"x": ' + COMPACT + ' oops} then {"qosProfile": "QOS_L"}') == {"qosProfile": "QOS_L"}


def test_a_truncated_answer_holds_no_object():
    full = json.dumps({"device": {"ipv4Address": {"publicAddress": "192.0.2.1", "publicPort": 80}}, **BODY})
    cut = full[: full.index('"qosProfile"') + 8]  # ...}},"qosProf
    assert extract_json(full) is not None
    assert extract_json(cut) is None  # not its complete inner {"publicAddress": ...}
    assert extract_json('{"note": "' + COMPACT) is None  # a candidate that never closes encloses the rest


@pytest.mark.parametrize("prose", ["Sure :-{ here: ", "Use { to open an object: ", "{x} and {'a': 1} then "])
def test_a_brace_that_cannot_start_an_object_does_not_hide_the_answer(prose):
    assert extract_json(prose + COMPACT) == BODY


def test_an_object_that_repeats_a_key_does_not_parse():
    # Which of the two values a server keeps depends on its parser.
    assert extract_json('{"qosProfile": "QOS_HIGH", "qosProfile": "QOS_E"}') is None
    assert extract_json('{"device": {"phoneNumber": "+1", "phoneNumber": "+2"}} then ' + COMPACT) == BODY


def test_braces_inside_strings_do_not_confuse_it():
    body = {"note": "use {curly} braces } and {", "nested": {"x": "}"}}
    assert extract_json("prefix " + json.dumps(body) + " suffix") == body


def test_an_object_inside_a_list_is_found():
    assert extract_json(f"[1, 2, {COMPACT}]") == BODY


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_non_standard_constants_are_rejected(constant):
    assert extract_json(f'{{"duration": {constant}}}') is None
    assert extract_json(f'{{"duration": {constant}}} {COMPACT}') == BODY


@pytest.mark.parametrize("text", ["", "no json", "[1, 2, 3]", '"a string"', "42", "{'single': 'quotes'}", "{", "}{"])
def test_no_object_gives_none(text):
    assert extract_json(text) is None
    assert find_json_object(text) is None


@pytest.mark.parametrize("value", [None, 42, b'{"a": 1}', {"a": 1}])
def test_non_text_input_gives_none(value):
    assert extract_json(value) is None


def test_find_json_object_reports_the_source_span():
    text = f"Answer: {COMPACT} -- done"
    obj, start, end = find_json_object(text)
    assert obj == BODY
    assert text[start:end] == COMPACT


def test_hostile_text_stays_cheap():
    assert extract_json("{" * 100_000) is None
    assert extract_json('{"x"}' * 100_000) is None
    assert extract_json('{"' * 100_000) is None
    # Only the first MAX_ATTEMPTS candidate objects are tried.
    assert extract_json('{"x"}' * MAX_ATTEMPTS + COMPACT) is None
    assert extract_json('{"x"}' * (MAX_ATTEMPTS - 1) + COMPACT) == BODY


def test_deep_nesting_does_not_raise():
    # Beyond the decoder's recursion limit: no object, and no RecursionError either.
    assert extract_json('{"a":' * 100_000 + "1" + "}" * 100_000) is None
    assert extract_json('{"a":' * 100 + "1" + "}" * 100) is not None
    assert extract_json("[" * 100_000 + COMPACT) == BODY


JSON_OBJECTS = st.dictionaries(
    st.text(max_size=10),
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
        lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
        max_leaves=10,
    ),
    max_size=5,
)
NO_BRACES = st.text(alphabet=st.characters(blacklist_characters="{}"))


@settings(max_examples=200, deadline=None, database=None)
@given(st.text())
def test_extract_json_never_raises(text):
    found = extract_json(text)
    assert found is None or isinstance(found, dict)


@settings(max_examples=100, deadline=None, database=None)
@given(NO_BRACES, JSON_OBJECTS, st.text(), st.booleans())
def test_an_object_in_any_text_is_found(prefix, obj, suffix, pretty):
    source = json.dumps(obj, indent=2 if pretty else None, ensure_ascii=pretty)
    assert extract_json(prefix + source + suffix) == obj


@settings(max_examples=100, deadline=None, database=None)
@given(
    st.lists(
        st.sampled_from(["{", "}", "[", "]", '"', ":", ",", "NaN", COMPACT, COMPACT[:9]]) | st.text(max_size=5),
        max_size=12,
    )
)
def test_extract_json_never_raises_on_json_fragments(parts):
    found = extract_json("".join(parts))
    assert found is None or isinstance(found, dict)
