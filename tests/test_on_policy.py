"""DPO pairs from the SFT model's own mistakes."""

import json

import pytest

from qod_lightning.data.on_policy import field_edit_pairs, field_edits, on_policy_pairs
from qod_lightning.data.prompts import dump_request

CHOSEN = {"device": {"phoneNumber": "+447700900123"}, "applicationServer": {"ipv4Address": "192.0.2.7"}}
CHOSEN = {**CHOSEN, "qosProfile": "QOS_E", "duration": 7200}
RECORD = {
    "prompt": "gaming on +44 7700 900123 to 192.0.2.7 for 2 hours",
    "chosen": json.dumps(CHOSEN),
    "rejected": json.dumps({**CHOSEN, "qosProfile": "QOS_HIGH"}),
    "_line": 1,
}


@pytest.mark.parametrize(
    ("answer", "rejected"),
    [
        # Wrong: the model's own answer is what DPO should push down.
        (json.dumps({**CHOSEN, "duration": 720}), json.dumps({**CHOSEN, "duration": 720})),
        ('  {"qosProfile": "QOS_E"}\n', '{"qosProfile": "QOS_E"}'),
        ("Sure! I cannot help", "Sure! I cannot help"),
        # Right (the same request, written another way), or nothing: the generated one stays.
        (json.dumps(CHOSEN, indent=2), RECORD["rejected"]),
        ("Here it is: " + json.dumps(dict(reversed(list(CHOSEN.items())))), RECORD["rejected"]),
        ("   ", RECORD["rejected"]),
    ],
)
def test_a_wrong_answer_becomes_the_rejected_one(answer, rejected):
    pairs, replaced = on_policy_pairs([RECORD], [answer])
    assert pairs == [{"prompt": RECORD["prompt"], "chosen": RECORD["chosen"], "rejected": rejected}]
    assert replaced == int(rejected != RECORD["rejected"])


def test_wrong_only_keeps_just_the_pairs_that_reject_the_models_answers():
    wrong = json.dumps({**CHOSEN, "duration": 720})
    answers = [wrong, json.dumps(CHOSEN), "   "]
    pairs, replaced = on_policy_pairs([RECORD] * 3, answers, wrong_only=True)
    assert [p["rejected"] for p in pairs] == [wrong] and replaced == 1
    pairs, edited = field_edit_pairs([RECORD] * 3, answers, wrong_only=True)
    assert [p["rejected"] for p in pairs] == [dump_request({**CHOSEN, "duration": 720})] and edited == 1


def test_a_pair_with_a_broken_chosen_answer_keeps_its_rejected_one():
    broken = {**RECORD, "chosen": "not json"}
    pairs, replaced = on_policy_pairs([broken], ['{"qosProfile": "QOS_E"}'])
    assert pairs[0]["rejected"] == RECORD["rejected"] and replaced == 0


def test_one_answer_per_pair_is_required():
    with pytest.raises(ValueError, match="1 answers for 2 preference pairs"):
        on_policy_pairs([RECORD, RECORD], ["{}"])


def test_field_edits_put_in_one_mistake_each_and_keep_the_expected_order():
    answer = {
        "device": {"phoneNumber": "+447700900123"},
        "port": 8443,  # added after the first expected key it follows
        "applicationServer": {"ipv4Address": "192.0.2.7"},
        "qosProfile": "QOS_M",  # wrong
        "bandwidth": "high",  # added after qosProfile
    }  # duration left out
    edits = field_edits(CHOSEN, answer)
    assert [list(e) for e in edits] == [
        ["device", "applicationServer", "qosProfile", "duration"],
        ["device", "applicationServer", "qosProfile"],
        ["device", "port", "applicationServer", "qosProfile", "duration"],
        ["device", "applicationServer", "qosProfile", "bandwidth", "duration"],
    ]
    assert edits[0] == {**CHOSEN, "qosProfile": "QOS_M"}
    assert edits[1] == {k: v for k, v in CHOSEN.items() if k != "duration"}
    assert edits[2]["port"] == 8443 and edits[3]["bandwidth"] == "high"


def test_field_edits_of_a_right_answer_are_none_and_types_count():
    assert field_edits(CHOSEN, dict(reversed(list(CHOSEN.items())))) == []
    assert field_edits(CHOSEN, {**CHOSEN, "duration": 7200.0}) == [{**CHOSEN, "duration": 7200.0}]
    added_first = field_edits(CHOSEN, {"sessionType": "x", **CHOSEN})
    assert list(added_first[0]) == ["sessionType", *CHOSEN]


def test_field_edit_pairs_share_the_chosen_text_up_to_the_edit():
    answer = json.dumps({**CHOSEN, "qosProfile": "QOS_M", "duration": 720}, indent=2)
    pairs, edited = field_edit_pairs([RECORD], [answer])
    chosen = dump_request(CHOSEN)
    assert edited == 2
    assert pairs == [
        {"prompt": RECORD["prompt"], "chosen": chosen, "rejected": dump_request({**CHOSEN, "qosProfile": "QOS_M"})},
        {"prompt": RECORD["prompt"], "chosen": chosen, "rejected": dump_request({**CHOSEN, "duration": 720})},
    ]
    assert pairs[1]["rejected"].startswith(chosen[: chosen.index("7200")])


@pytest.mark.parametrize(
    ("answer", "rejected"),
    [
        ("Sure! I cannot help", "Sure! I cannot help"),  # no JSON: rejected whole
        (json.dumps(CHOSEN), RECORD["rejected"]),  # right: the file's pair stays
        ("  ", RECORD["rejected"]),
    ],
)
def test_field_edit_pairs_fall_back_to_whole_answers_and_file_pairs(answer, rejected):
    pairs, edited = field_edit_pairs([RECORD], [answer])
    assert pairs == [{"prompt": RECORD["prompt"], "chosen": RECORD["chosen"], "rejected": rejected}]
    assert edited == 0


def test_field_edit_pairs_need_one_answer_per_pair_and_a_parsable_chosen():
    with pytest.raises(ValueError, match="1 answers for 2 preference pairs"):
        field_edit_pairs([RECORD, RECORD], ["{}"])
    broken = {**RECORD, "chosen": "not json"}
    assert field_edit_pairs([broken], ['{"qosProfile": "QOS_E"}'])[0][0]["rejected"] == RECORD["rejected"]


def test_field_edit_pairs_keep_the_chosen_note_with_each_edits_own_decisions():
    note = 'duration: "for 2 hours" = 7200; use: "gaming" = QOS_E'
    record = {**RECORD, "chosen": f"{note}\n{dump_request(CHOSEN)}"}
    answer = f"{note}\n" + json.dumps({**CHOSEN, "qosProfile": "QOS_M", "duration": 720})
    pairs, edited = field_edit_pairs([record], [answer])
    assert edited == 2
    assert [p["chosen"] for p in pairs] == [record["chosen"]] * 2
    assert [p["rejected"] for p in pairs] == [
        f'duration: "for 2 hours" = 7200; use: "gaming" = QOS_M\n{dump_request({**CHOSEN, "qosProfile": "QOS_M"})}',
        f'duration: "for 2 hours" = 720; use: "gaming" = QOS_E\n{dump_request({**CHOSEN, "duration": 720})}',
    ]
