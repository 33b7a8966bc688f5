"""Scratchpad notes: phrases quoted from the request, read back by the answer format, generated on demand."""

import json
import re

import pytest

from qod_lightning.data.generator import generate as gen
from qod_lightning.data.generator.generate import sample_examples
from qod_lightning.data.generator.notes import make_note
from qod_lightning.data.generator.phrasing import USE_CASES
from qod_lightning.data.generator.spec import DeviceSpec, RequestSpec
from qod_lightning.data.generator.templates import EVAL_TEMPLATES, TRAIN_TEMPLATES
from qod_lightning.extraction import extract_json, split_note
from qod_lightning.validation import answer_problem

GAMING = next(u for u in USE_CASES if u.bare == "online gaming")
NOTE = re.compile(
    r'duration: (?:"(?P<said>[^"]*)"|none) = (?P<seconds>\d+); use: "(?P<use>[^"]*)" = (?P<profile>QOS_\w+)'
)


def spec(**overrides) -> RequestSpec:
    fields = {"device": DeviceSpec(ipv4="203.0.113.75"), "server": "192.0.2.200", "use_case": GAMING}
    return RequestSpec(**{**fields, **overrides})


def test_a_note_quotes_the_duration_and_the_use_case_as_the_request_writes_them():
    text = "Need an Online Gaming session, device 203.0.113.75, server 192.0.2.200, for 2 hours"
    note = make_note(spec(duration=7200), text)
    assert note == 'duration: "for 2 hours" = 7200; use: "an Online Gaming session" = QOS_E'  # the longest wording


def test_no_duration_is_said_as_none_with_the_default():
    note = make_note(spec(), "online gaming for 203.0.113.75 -> 192.0.2.200")
    assert note == 'duration: none = 86400; use: "online gaming" = QOS_E'


@pytest.mark.parametrize(
    ("text", "phrase"),
    [
        ("online gaming with profile QOS_M, 203.0.113.75 to 192.0.2.200", "profile QOS_M"),
        ("device=203.0.113.75 server=192.0.2.200 use=online gaming profile=M", "profile=M"),
        ("online gaming on the medium profile: 203.0.113.75 to 192.0.2.200", "medium profile"),
    ],
)
def test_a_named_profile_is_the_phrase_that_decides(text, phrase):
    assert make_note(spec(explicit_profile="QOS_M"), text) == f'duration: none = 86400; use: "{phrase}" = QOS_M'


def test_a_phrase_the_request_does_not_hold_gives_no_note():
    assert make_note(spec(duration=900), "online gaming, 203.0.113.75 to 192.0.2.200") is None  # no length
    assert make_note(spec(), "203.0.113.75 to 192.0.2.200 please") is None  # no use case


@pytest.mark.parametrize(("split", "templates"), [("sft", TRAIN_TEMPLATES), ("eval", EVAL_TEMPLATES)])
def test_notes_of_generated_requests_quote_them_and_agree_with_the_answer(split, templates):
    found = 0
    for request_spec, text in sample_examples(400, 5, split, templates):
        note = make_note(request_spec, text)
        if note is None:
            continue
        found += 1
        parts = NOTE.fullmatch(note)
        assert parts, note
        assert parts["use"] in text and (parts["said"] is None or parts["said"] in text)
        assert int(parts["seconds"]) == (request_spec.duration or 86400)
        assert parts["profile"] == request_spec.profile
    assert found >= 0.99 * 400  # only a bare profile letter in a terse template has no phrase


def test_the_answer_format_reads_a_note_back():
    body = (
        '{"device":{"phoneNumber":"+447700900840"},"applicationServer":{"ipv4Address":"192.0.2.1"},'
        '"qosProfile":"QOS_S","duration":86400}'
    )
    answer = 'duration: none = 86400; use: "a GPS tracker" = QOS_S\n' + body
    assert split_note(answer) == ('duration: none = 86400; use: "a GPS tracker" = QOS_S', body)
    assert split_note(body) == (None, body)
    assert extract_json(answer) == json.loads(body)
    assert answer_problem(answer, "+447700900840 to 192.0.2.1 for a GPS tracker") is None
    assert answer_problem("some words\n" + body, "+447700900840 to 192.0.2.1 for a GPS tracker") is not None


def test_sft_records_with_notes_keep_the_request_stream_and_the_answers():
    noted = gen.generate_sft(300, 2, notes=True)
    plain = {r["input"]: r["response"] for r in gen.generate_sft(400, 2)}  # the same stream, drawn further
    assert len(noted) == 300
    for record in noted:
        note, rest = split_note(record["response"])
        assert note is not None and rest == plain[record["input"]]
        assert answer_problem(record["response"], record["input"]) is None


def test_cli_writes_notes_on_request(tmp_path):
    assert gen.main(["--out-dir", str(tmp_path), "--num-sft", "8", "--notes", "--prefix", "n_"]) == 0
    records = [json.loads(line) for line in (tmp_path / "n_sft.jsonl").read_text().splitlines()]
    assert len(records) == 8 and all(split_note(r["response"])[0] for r in records)
