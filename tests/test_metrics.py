"""Tests for qod_lightning.metrics: hand-computed values, accumulation, DDP sync, the report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchmetrics import Metric

from qod_lightning.metrics import (
    ExactMatch,
    FieldAccuracy,
    HallucinationCount,
    HallucinationRate,
    JsonValidity,
    QoDMetrics,
    QosProfileAccuracy,
    SpecCompliance,
    judge_prediction,
    per_example_verdicts,
    score_predictions,
)

pytestmark = pytest.mark.numerics  # also run under the other instruction set's settings (.ci/run)

# A: valid and exact (keys in another order than expected).
EXP_A = {
    "device": {"phoneNumber": "+4915112345678"},
    "applicationServer": {"ipv4Address": "198.51.100.7"},
    "qosProfile": "QOS_E",
    "duration": 3600,
}
REQ_A = "Give my phone +4915112345678 the lowest latency to the game server at 198.51.100.7 for 1 hour."
PRED_A = json.dumps(
    {
        "duration": 3600,
        "qosProfile": "QOS_E",
        "applicationServer": {"ipv4Address": "198.51.100.7"},
        "device": {"phoneNumber": "+4915112345678"},
    }
)

# B: valid, wrong profile.
EXP_B = {
    "device": {"ipv4Address": {"publicAddress": "203.0.113.5", "privateAddress": "192.168.1.20"}},
    "applicationServer": {"ipv4Address": "198.51.100.0/24"},
    "applicationServerPorts": {"ports": [3478, 3479]},
    "qosProfile": "QOS_S",
    "webhook": {"notificationUrl": "https://callbacks.example.com/qod"},
    "duration": 1800,
}
REQ_B = (
    "Small-throughput boost for 30 minutes for the device with public IP 203.0.113.5 (private "
    "192.168.1.20) talking to 198.51.100.0/24 on ports 3478 and 3479; notify "
    "https://callbacks.example.com/qod"
)
PRED_B = json.dumps({**EXP_B, "qosProfile": "QOS_M"})

# C: an invented key below the top level.
EXP_C = {
    "device": {"phoneNumber": "+447700900123"},
    "applicationServer": {"ipv6Address": "2001:db8::10"},
    "devicePorts": {"ranges": [{"from": 5000, "to": 5010}]},
    "qosProfile": "QOS_M",
    "duration": 7200,
}
REQ_C = "Medium throughput for two hours: +447700900123, device ports 5000 to 5010, server 2001:db8::10"
PRED_C = json.dumps({**EXP_C, "device": {"phoneNumber": "+447700900123", "name": "Alice's phone"}})

# D: schema-valid, but the server address is not in the request.
EXP_D = {
    "device": {"networkAccessIdentifier": "alice@example.com"},
    "applicationServer": {"ipv4Address": "192.0.2.10"},
    "qosProfile": "QOS_L",
    "duration": 600,
}
REQ_D = "Large throughput for alice@example.com to 192.0.2.10, ten minutes."
PRED_D = json.dumps({**EXP_D, "applicationServer": {"ipv4Address": "10.0.0.1"}})

# E: prose only.
EXP_E = {
    "device": {"phoneNumber": "+33612345678"},
    "applicationServer": {"ipv4Address": "192.0.2.44"},
    "qosProfile": "QOS_E",
    "duration": 900,
    "webhook": {"notificationUrl": "https://hooks.example.org/qod"},
}
REQ_E = "Low latency for +33612345678 to 192.0.2.44 for 15 minutes, tell https://hooks.example.org/qod"
PRED_E = "Sorry, I can't help with that request."

# F: broken JSON (trailing comma inside, outer object never closed): nothing parses.
EXP_F = {
    "device": {"phoneNumber": "+33612345679"},
    "applicationServer": {"ipv4Address": "192.0.2.45"},
    "applicationServerPorts": {"ranges": [{"from": 8000, "to": 8080}]},
    "qosProfile": "QOS_L",
    "duration": 600,
}
REQ_F = "Large throughput for +33612345679 to 192.0.2.45 ports 8000-8080 for ten minutes"
PRED_F = '{"device": {"phoneNumber": "+33612345679",}, "qosProfile": "QOS_L", "duration": 600'

# G: exact, inside a code fence with prose before and after.
EXP_G = {
    "device": {"ipv6Address": "2001:db8:85a3::8a2e:370:7334"},
    "applicationServer": {"ipv4Address": "203.0.113.80"},
    "devicePorts": {"ports": [8443]},
    "qosProfile": "QOS_S",
    "webhook": {"notificationUrl": "https://example.net/events"},
    "duration": 3600,
}
REQ_G = (
    "Device 2001:db8:85a3::8a2e:370:7334 port 8443 to 203.0.113.80, small throughput, 1 hour, "
    "callbacks to https://example.net/events"
)
PRED_G = (
    "Here is the request:\n```json\n" + json.dumps(EXP_G, indent=2) + "\n```\nLet me know if you need anything else."
)

# H: parses, schema-invalid (bad profile, duration as a string), drops devicePorts; invents nothing.
EXP_H = {
    "device": {"phoneNumber": "+14155550100"},
    "applicationServer": {"ipv4Address": "192.0.2.99"},
    "devicePorts": {"ports": [9000]},
    "qosProfile": "QOS_M",
    "duration": 3600,
}
REQ_H = "Medium throughput for +14155550100 on port 9000 to 192.0.2.99 for an hour"
PRED_H = json.dumps(
    {
        "device": {"phoneNumber": "+14155550100"},
        "applicationServer": {"ipv4Address": "192.0.2.99"},
        "qosProfile": "qos_m",
        "duration": "3600",
    }
)

PREDICTIONS = [PRED_A, PRED_B, PRED_C, PRED_D, PRED_E, PRED_F, PRED_G, PRED_H]
REQUESTS = [REQ_A, REQ_B, REQ_C, REQ_D, REQ_E, REQ_F, REQ_G, REQ_H]
EXPECTED = [EXP_A, EXP_B, EXP_C, EXP_D, EXP_E, EXP_F, EXP_G, EXP_H]

# Worked out by hand from the comments above (8 outputs, 6 parse: all but E and F).
HAND_REPORT: dict[str, Any] = {
    "n": 8,
    "json_validity": 6 / 8,
    "spec_compliance": 4 / 8,  # A, B, D, G
    "hallucination_rate": 2 / 6,  # C, D among the 6 parsed
    "hallucination_count": 2,
    "qos_profile_accuracy": 4 / 8,  # A, C, D, G
    "field_accuracy": {
        "device": 5 / 8,  # wrong: C, E, F
        "applicationServer": 5 / 8,  # wrong: D, E, F
        "devicePorts": 2 / 3,  # expected in C, G, H; H drops it
        "applicationServerPorts": 1 / 2,  # expected in B, F
        "qosProfile": 4 / 8,  # wrong: B, E, F, H
        "webhook": 2 / 3,  # expected in B, E, G
        "duration": 5 / 8,  # wrong: E, F, H
    },
    "exact_match": 2 / 8,  # A, G
}

METRIC_CLASSES: dict[str, type[Metric]] = {
    "json_validity": JsonValidity,
    "spec_compliance": SpecCompliance,
    "hallucination_rate": HallucinationRate,
    "hallucination_count": HallucinationCount,
    "qos_profile_accuracy": QosProfileAccuracy,
    "field_accuracy": FieldAccuracy,
    "exact_match": ExactMatch,
    "all": QoDMetrics,
}


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _plain(v) for key, v in value.items()}
    return value.item()


def _compute_all(batches: list[slice]) -> dict[str, Any]:
    """Update a fresh instance of every metric class with each batch, then compute."""
    results = {}
    for name, cls in METRIC_CLASSES.items():
        metric = cls()
        for batch in batches:
            metric.update(PREDICTIONS[batch], REQUESTS[batch], EXPECTED[batch])
        results[name] = _plain(metric.compute())
    return results


def _hand_results() -> dict[str, Any]:
    return {
        **{name: HAND_REPORT[name] for name in METRIC_CLASSES if name != "all"},
        "all": HAND_REPORT,
    }


def test_per_example_verdicts_by_hand() -> None:
    rows = per_example_verdicts(PREDICTIONS, REQUESTS, EXPECTED)
    got = [(r["parses"], r["valid"], r["hallucinated"], r["exact"], r["wrong_fields"]) for r in rows]
    assert got == [
        (True, True, False, True, []),
        (True, True, False, False, ["qosProfile"]),
        (True, False, True, False, ["device"]),
        (True, True, True, False, ["applicationServer"]),
        (
            False,
            False,
            False,
            False,
            ["device", "applicationServer", "qosProfile", "webhook", "duration"],
        ),
        (
            False,
            False,
            False,
            False,
            ["device", "applicationServer", "applicationServerPorts", "qosProfile", "duration"],
        ),
        (True, True, False, True, []),
        (True, False, False, False, ["devicePorts", "qosProfile", "duration"]),
    ]
    assert rows[0]["errors"] == []
    assert any("$.device.name" in e for e in rows[2]["errors"])
    assert any("10.0.0.1" in e for e in rows[3]["errors"])
    assert rows[4]["errors"] == ["json_syntax: no JSON object found"]
    assert {e.split(":")[0] for e in rows[7]["errors"]} == {"qos_profile", "duration"}
    json.dumps(rows)


def test_every_metric_matches_hand_computed_values() -> None:
    # Float64 rates are the same IEEE divisions Python does, so equality is exact.
    assert _compute_all([slice(None)]) == _hand_results()


def test_metric_attributes_follow_torchmetrics_conventions() -> None:
    for cls in METRIC_CLASSES.values():
        assert cls.full_state_update is False
        assert cls.is_differentiable is False
    assert HallucinationRate.higher_is_better is False
    assert HallucinationCount.higher_is_better is False
    assert JsonValidity.higher_is_better is True
    states = QoDMetrics()
    assert states.field_correct.shape == states.field_expected.shape == (7,)
    assert all(state.dtype == torch.long for state in states.metric_state.values())


def test_accumulating_updates_equals_one_update() -> None:
    whole = _compute_all([slice(None)])
    assert _compute_all([slice(0, 3), slice(3, 4), slice(4, 4), slice(4, None)]) == whole


def test_forward_returns_batch_value_and_accumulates() -> None:
    metric = QoDMetrics()
    first = metric(PREDICTIONS[:4], REQUESTS[:4], EXPECTED[:4])
    assert _plain(first["json_validity"]) == 1.0
    assert _plain(first["hallucination_count"]) == 2
    metric(PREDICTIONS[4:], REQUESTS[4:], EXPECTED[4:])
    assert _plain(metric.compute()) == HAND_REPORT


def test_reset_and_empty_input() -> None:
    metric = QoDMetrics()
    metric.update(PREDICTIONS, REQUESTS, EXPECTED)
    metric.reset()
    metric.update([], [], [])
    assert _plain(metric.compute()) == {
        "n": 0,
        "json_validity": 0.0,
        "spec_compliance": 0.0,
        "hallucination_rate": 0.0,
        "hallucination_count": 0,
        "qos_profile_accuracy": 0.0,
        "field_accuracy": {},
        "exact_match": 0.0,
    }


def test_hallucination_rate_is_zero_when_nothing_parses() -> None:
    metric = HallucinationRate()
    metric.update([PRED_E, PRED_F], [REQ_E, REQ_F], [EXP_E, EXP_F])
    assert metric.compute().item() == 0.0


def test_json_equality_does_not_confuse_true_with_one() -> None:
    verdict = judge_prediction('{"duration": true}', "", {"duration": 1})
    assert verdict.fields_correct == (False,) * 7
    assert judge_prediction('{"duration": 1}', "", {"duration": 1}).exact


def test_json_equality_does_not_take_a_float_for_an_integer() -> None:
    verdict = judge_prediction('{"duration": 7200.0}', "", {"duration": 7200})
    assert not verdict.exact
    assert verdict.fields_correct == (False,) * 7


@pytest.mark.parametrize(
    ("requests", "expected"),
    [(REQUESTS[:-1], EXPECTED), (REQUESTS, EXPECTED[:3])],
)
def test_mismatched_lengths_raise(requests: list[str], expected: list[dict[str, Any]]) -> None:
    with pytest.raises(ValueError, match="same length"):
        QoDMetrics().update(PREDICTIONS, requests, expected)
    with pytest.raises(ValueError, match="same length"):
        score_predictions(PREDICTIONS, requests, expected)
    with pytest.raises(ValueError, match="same length"):
        per_example_verdicts(PREDICTIONS, requests, expected)


def test_a_single_string_is_rejected() -> None:
    with pytest.raises(TypeError, match="predictions"):
        ExactMatch().update(PRED_A, [REQ_A], [EXP_A])  # type: ignore[arg-type]


def test_score_predictions_is_json_ready_and_matches_the_metrics() -> None:
    report = score_predictions(PREDICTIONS, REQUESTS, EXPECTED)
    assert list(report) == list(HAND_REPORT)
    assert json.loads(json.dumps(report)) == report
    assert type(report["n"]) is int
    assert type(report["hallucination_count"]) is int
    counts_and_fields = ("n", "hallucination_count", "field_accuracy")
    assert all(type(v) is float for k, v in report.items() if k not in counts_and_fields)
    assert all(type(v) is float for v in report["field_accuracy"].values())
    assert report == HAND_REPORT
    single = _compute_all([slice(None)])
    assert report == single["all"]
    assert {k: report[k] for k in METRIC_CLASSES if k != "all"} == {k: v for k, v in single.items() if k != "all"}


def _ddp_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        # Uneven halves, the first in two updates: sync must sum counts, not average rates.
        batches = [slice(0, 2), slice(2, 5)] if rank == 0 else [slice(5, None)]
        results = _compute_all(batches)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_processes_match_single_process(tmp_path: Path) -> None:
    world_size = 2
    mp.spawn(
        _ddp_worker,
        args=(world_size, str(tmp_path / "init"), str(tmp_path)),
        nprocs=world_size,
        join=True,
    )
    single = _compute_all([slice(None)])
    for rank in range(world_size):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == single
