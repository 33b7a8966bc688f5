"""DPO pairs from the SFT model's own mistakes."""

import json

import pytest

from qod_lightning.data.on_policy import on_policy_pairs

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


def test_a_pair_with_a_broken_chosen_answer_keeps_its_rejected_one():
    broken = {**RECORD, "chosen": "not json"}
    pairs, replaced = on_policy_pairs([broken], ['{"qosProfile": "QOS_E"}'])
    assert pairs[0]["rejected"] == RECORD["rejected"] and replaced == 0


def test_one_answer_per_pair_is_required():
    with pytest.raises(ValueError, match="1 answers for 2 preference pairs"):
        on_policy_pairs([RECORD, RECORD], ["{}"])
