"""What one model's answers changed in another's, counted record by record."""

import json

import pytest

from qod_lightning.changes import answer_changes, changes_markdown

REQUEST = "Set a QoD session up for the subscriber +44-7700-900141 <-> server 2001:db8::6dc2. Use: HD dashcam upload."
EXPECTED = {
    "device": {"phoneNumber": "+447700900141"},
    "applicationServer": {"ipv6Address": "2001:db8::6dc2"},
    "qosProfile": "QOS_M",
    "duration": 86400,
}


def answer(**changes) -> str:
    return json.dumps({**EXPECTED, **changes})


def test_counts_each_way_a_record_moved():
    before = [answer(), answer(duration=3600), answer(), "not json"]
    after = [
        answer(),  # unchanged and right
        answer(),  # duration fixed
        answer(qosProfile="QOS_L", applicationServer={"ipv6Address": "2001:db8::1"}),  # two fields broken
        answer(),  # fixed from nothing
    ]
    changes = answer_changes(before, after, [REQUEST] * 4, [EXPECTED] * 4)
    assert changes["n"] == 4 and changes["changed"] == 3
    assert changes["exact"] == {"fixed": 2, "broken": 1}
    assert changes["valid"] == {"fixed": 1, "broken": 0}
    # 2001:db8::1 is in no request: an invented value.
    assert changes["hallucinated"] == {"fixed": 0, "introduced": 1}
    assert changes["fields"]["duration"] == {"fixed": 2, "broken": 0}
    assert changes["fields"]["qosProfile"] == {"fixed": 1, "broken": 1}
    assert changes["fields"]["applicationServer"] == {"fixed": 1, "broken": 1}
    # A field the reference does not have is neither fixed nor broken.
    assert changes["fields"]["webhook"] == {"fixed": 0, "broken": 0}
    table = changes_markdown(changes, "sft", "dpo")
    assert "3 of 4 answers changed" in table and "| exact match | 2 | 1 |" in table


def test_an_answer_that_stays_wrong_is_neither_fixed_nor_broken():
    wrong = [answer(duration=60)]
    changes = answer_changes(wrong, [answer(duration=120)], [REQUEST], [EXPECTED])
    assert changes["changed"] == 1
    assert changes["exact"] == {"fixed": 0, "broken": 0}
    assert changes["fields"]["duration"] == {"fixed": 0, "broken": 0}


def test_rejects_misaligned_answers():
    with pytest.raises(ValueError, match="differ in length"):
        answer_changes([answer()], [], [REQUEST], [EXPECTED])
