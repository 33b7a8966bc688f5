"""Evaluation metrics for generated QoD requests, as torchmetrics ``Metric`` classes.

Every metric takes the same three inputs per ``update``: the raw model outputs, the user requests
and the expected canonical request dicts. Each output is checked once per update by
:func:`judge_prediction` (which runs :func:`~qod_lightning.validation.validate_request`) and only
integer counts are kept, all sum-reduced, so the metrics sync correctly under DDP.

Definitions (the same in every report):

* ``json_validity``: outputs from which a JSON object parses / all outputs.
* ``spec_compliance``: outputs that parse and pass the request schema / all outputs.
* ``hallucination_rate``: parsed outputs that invent a key anywhere or an address, phone number,
  port or URL absent from the request / parsed outputs (0.0 when nothing parsed).
* ``qos_profile_accuracy``: outputs whose ``qosProfile`` equals the expected one / all outputs.
* ``field_accuracy``: per top-level field, outputs whose value equals the expected value / outputs
  whose expected request has that field.
* ``exact_match``: outputs whose object equals the expected object / all outputs.

Values compare as JSON: deep, dict key order ignored, ``true`` never equal to ``1``, nor ``1.0`` to ``1``.

:class:`QoDMetrics` keeps every count in one metric, so a validation loop checks each output once
rather than once per metric; :func:`score_predictions` is its plain-Python one-shot form.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor
from torchmetrics import Metric

from qod_lightning.schema import TOP_LEVEL_KEYS
from qod_lightning.validation import validate_request

_FIELD_STATES = frozenset({"field_correct", "field_expected"})
_QOS_INDEX = TOP_LEVEL_KEYS.index("qosProfile")


@dataclass(frozen=True)
class PredictionVerdict:
    """How one output fares against its request and expected answer.

    Attributes:
        parses: A JSON object could be extracted.
        valid: It parses and passes the request schema.
        hallucinated: It parses and invents a key or a value.
        exact: The parsed object equals the expected request.
        fields_correct: Per key of :data:`~qod_lightning.schema.TOP_LEVEL_KEYS`, whether the
            expected request has that field and the output gives the same value.
        fields_expected: Per key of ``TOP_LEVEL_KEYS``, whether the expected request has it.
        errors: Validation failures and invented values, each prefixed with its check's name.

    """

    parses: bool
    valid: bool
    hallucinated: bool
    exact: bool
    fields_correct: tuple[bool, ...]
    fields_expected: tuple[bool, ...]
    errors: tuple[str, ...]

    @property
    def qos_profile_correct(self) -> bool:
        """Whether the output's ``qosProfile`` equals the expected one."""
        return self.fields_correct[_QOS_INDEX]

    def to_dict(self) -> dict[str, Any]:
        """Return a small JSON-ready row for sample tables."""
        return {
            "parses": self.parses,
            "valid": self.valid,
            "hallucinated": self.hallucinated,
            "exact": self.exact,
            "wrong_fields": [
                key
                for key, expected, correct in zip(
                    TOP_LEVEL_KEYS, self.fields_expected, self.fields_correct, strict=True
                )
                if expected and not correct
            ],
            "errors": list(self.errors),
        }


def json_equal(a: Any, b: Any) -> bool:
    """Deep JSON equality: key order ignored, and unlike Python's ``==``, ``true != 1 != 1.0``."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(a[key], b[key]) for key in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, (bool, int, float)) or isinstance(b, (bool, int, float)):
        return type(a) is type(b) and a == b  # 7200.0 is not the integer the contract asks for
    return a == b


def judge_prediction(prediction: str, request: str, expected: Mapping[str, Any]) -> PredictionVerdict:
    """Validate one output once and compare it with the expected request.

    Args:
        prediction: Raw model output text.
        request: The user's request text (for value-hallucination checks).
        expected: The expected canonical request.

    Returns:
        The verdict every metric in this module counts from.

    """
    report = validate_request(prediction, request)
    parsed = report.parsed
    fields_expected = tuple(key in expected for key in TOP_LEVEL_KEYS)
    fields_correct = tuple(
        parsed is not None and key in expected and key in parsed and json_equal(parsed[key], expected[key])
        for key in TOP_LEVEL_KEYS
    )
    if parsed is None:
        # The other six checks did not run; their "not checked" notes would only clutter a table.
        errors = tuple(f"json_syntax: {e}" for e in report.checks["json_syntax"].errors)
    else:
        errors = (*report.errors, *(f"hallucinated value: {v}" for v in report.hallucinated_values))
    return PredictionVerdict(
        parses=parsed is not None,
        valid=report.valid,
        hallucinated=report.hallucinated,
        exact=parsed is not None and json_equal(parsed, dict(expected)),
        fields_correct=fields_correct,
        fields_expected=fields_expected,
        errors=errors,
    )


def _check_inputs(predictions: Sequence[str], requests: Sequence[str], expected: Sequence[Mapping[str, Any]]) -> None:
    named = {"predictions": predictions, "requests": requests, "expected": expected}
    for name, value in named.items():
        # A bare string is a Sequence too, and would be scored one character at a time.
        if isinstance(value, str):
            raise TypeError(f"`{name}` must be a sequence of items, not a single string")
    if not len(predictions) == len(requests) == len(expected):
        raise ValueError(
            "predictions, requests and expected must have the same length, got "
            f"{len(predictions)}, {len(requests)} and {len(expected)}"
        )


def per_example_verdicts(
    predictions: Sequence[str], requests: Sequence[str], expected: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """Judge each output on its own, for sample tables.

    Args:
        predictions: Raw model output texts.
        requests: The user request texts, aligned with ``predictions``.
        expected: The expected canonical requests, aligned with ``predictions``.

    Returns:
        One :meth:`PredictionVerdict.to_dict` row per output, with keys ``parses``, ``valid``,
        ``hallucinated``, ``exact``, ``wrong_fields`` and ``errors``.

    Raises:
        ValueError: If the three sequences differ in length.
        TypeError: If one of them is a single string.

    """
    _check_inputs(predictions, requests, expected)
    return [judge_prediction(p, r, e).to_dict() for p, r, e in zip(predictions, requests, expected, strict=True)]


def _qod_counts_update(
    predictions: Sequence[str], requests: Sequence[str], expected: Sequence[Mapping[str, Any]]
) -> dict[str, Tensor]:
    """Judge a batch and count the outcomes every metric is built from.

    Args:
        predictions: Raw model output texts.
        requests: The user request texts, aligned with ``predictions``.
        expected: The expected canonical requests, aligned with ``predictions``.

    Returns:
        Long tensors: scalars ``total``, ``parsed``, ``valid``, ``hallucinated``, ``qos_correct``
        and ``exact``; ``field_correct`` and ``field_expected`` of length ``len(TOP_LEVEL_KEYS)``.

    """
    _check_inputs(predictions, requests, expected)
    verdicts = [judge_prediction(p, r, e) for p, r, e in zip(predictions, requests, expected, strict=True)]
    n_fields = len(TOP_LEVEL_KEYS)
    return {
        "total": torch.tensor(len(verdicts)),
        "parsed": torch.tensor(sum(v.parses for v in verdicts)),
        "valid": torch.tensor(sum(v.valid for v in verdicts)),
        "hallucinated": torch.tensor(sum(v.hallucinated for v in verdicts)),
        "qos_correct": torch.tensor(sum(v.qos_profile_correct for v in verdicts)),
        "exact": torch.tensor(sum(v.exact for v in verdicts)),
        "field_correct": torch.tensor(
            [sum(v.fields_correct[i] for v in verdicts) for i in range(n_fields)], dtype=torch.long
        ),
        "field_expected": torch.tensor(
            [sum(v.fields_expected[i] for v in verdicts) for i in range(n_fields)], dtype=torch.long
        ),
    }


def _ratio_compute(numerator: Tensor, denominator: Tensor) -> Tensor:
    """``numerator / denominator`` in float64, 0.0 where the denominator is 0.

    Float64 so a report's 1/3 is the same number Python's ``1 / 3`` gives. Every numerator here
    counts a subset of its denominator, so it is 0 wherever the denominator is, and clamping the
    denominator to 1 yields 0.0 there without a data-dependent branch.
    """
    return numerator.double() / denominator.clamp(min=1)


def _field_accuracy_compute(field_correct: Tensor, field_expected: Tensor) -> dict[str, Tensor]:
    """Per-field accuracy, only for the fields some expected request had."""
    accuracy = _ratio_compute(field_correct, field_expected)
    return {
        key: accuracy[i]
        for i, (key, count) in enumerate(zip(TOP_LEVEL_KEYS, field_expected.tolist(), strict=True))
        if count > 0
    }


class _QoDCountMetric(Metric):
    """Shared update for the QoD metrics: each subclass names the counts it keeps.

    ``update(predictions, requests, expected)`` takes raw output texts, request texts and expected
    request dicts, all of the same length.
    """

    is_differentiable = False
    full_state_update = False
    _count_states: ClassVar[tuple[str, ...]] = ()

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name in self._count_states:
            shape = (len(TOP_LEVEL_KEYS),) if name in _FIELD_STATES else ()
            self.add_state(name, default=torch.zeros(shape, dtype=torch.long), dist_reduce_fx="sum")

    def update(
        self,
        predictions: Sequence[str],
        requests: Sequence[str],
        expected: Sequence[Mapping[str, Any]],
    ) -> None:
        """Validate each output once and add this batch's counts."""
        counts = _qod_counts_update(predictions, requests, expected)
        for name in self._count_states:
            setattr(self, name, getattr(self, name) + counts[name].to(self.device))


class JsonValidity(_QoDCountMetric):
    """Share of outputs from which a JSON object can be extracted and parsed."""

    higher_is_better = True
    _count_states = ("parsed", "total")
    parsed: Tensor
    total: Tensor

    def compute(self) -> Tensor:
        """Return parsed outputs / all outputs."""
        return _ratio_compute(self.parsed, self.total)


class SpecCompliance(_QoDCountMetric):
    """Share of outputs that parse and pass the request schema."""

    higher_is_better = True
    _count_states = ("valid", "total")
    valid: Tensor
    total: Tensor

    def compute(self) -> Tensor:
        """Return schema-valid outputs / all outputs."""
        return _ratio_compute(self.valid, self.total)


class HallucinationRate(_QoDCountMetric):
    """Share of parsed outputs that invent a key or a value (see :class:`HallucinationCount`)."""

    higher_is_better = False
    _count_states = ("hallucinated", "parsed")
    hallucinated: Tensor
    parsed: Tensor

    def compute(self) -> Tensor:
        """Return hallucinating outputs / parsed outputs (0.0 when nothing parsed)."""
        return _ratio_compute(self.hallucinated, self.parsed)


class HallucinationCount(_QoDCountMetric):
    """Number of parsed outputs that invent a key or a value."""

    higher_is_better = False
    _count_states = ("hallucinated",)
    hallucinated: Tensor

    def compute(self) -> Tensor:
        """Return the count, a long tensor summed over all processes."""
        return self.hallucinated


class QosProfileAccuracy(_QoDCountMetric):
    """Share of outputs whose ``qosProfile`` equals the expected one."""

    higher_is_better = True
    _count_states = ("qos_correct", "total")
    qos_correct: Tensor
    total: Tensor

    def compute(self) -> Tensor:
        """Return outputs with the right profile / all outputs."""
        return _ratio_compute(self.qos_correct, self.total)


class FieldAccuracy(_QoDCountMetric):
    """Per top-level field, share of outputs that give the expected value exactly.

    The denominator of a field counts the outputs whose expected request has that field: all
    outputs for the required fields, fewer for ``devicePorts``, ``applicationServerPorts`` and
    ``webhook``. A field an output adds but the expected request lacks is not counted here
    (:class:`ExactMatch` catches it).
    """

    higher_is_better = True
    _count_states = ("field_correct", "field_expected")
    field_correct: Tensor
    field_expected: Tensor

    def compute(self) -> dict[str, Tensor]:
        """Map each field with a nonzero denominator to its accuracy."""
        return _field_accuracy_compute(self.field_correct, self.field_expected)


class ExactMatch(_QoDCountMetric):
    """Share of outputs whose parsed object equals the expected request."""

    higher_is_better = True
    _count_states = ("exact", "total")
    exact: Tensor
    total: Tensor

    def compute(self) -> Tensor:
        """Return exact outputs / all outputs."""
        return _ratio_compute(self.exact, self.total)


class QoDMetrics(_QoDCountMetric):
    """All the metrics above from one set of counts, so each output is validated once.

    ``compute`` returns a dict of tensors with the keys of :func:`score_predictions`:
    ``n``, ``json_validity``, ``spec_compliance``, ``hallucination_rate``,
    ``hallucination_count``, ``qos_profile_accuracy``, ``field_accuracy`` (a dict field ->
    accuracy) and ``exact_match``.
    """

    higher_is_better = None  # mixed: hallucination_rate is better lower, the rest higher
    _count_states = (
        "total",
        "parsed",
        "valid",
        "hallucinated",
        "qos_correct",
        "exact",
        "field_correct",
        "field_expected",
    )
    total: Tensor
    parsed: Tensor
    valid: Tensor
    hallucinated: Tensor
    qos_correct: Tensor
    exact: Tensor
    field_correct: Tensor
    field_expected: Tensor

    def compute(self) -> dict[str, Any]:
        """Compute every metric from the shared counts."""
        return {
            "n": self.total,
            "json_validity": _ratio_compute(self.parsed, self.total),
            "spec_compliance": _ratio_compute(self.valid, self.total),
            "hallucination_rate": _ratio_compute(self.hallucinated, self.parsed),
            "hallucination_count": self.hallucinated,
            "qos_profile_accuracy": _ratio_compute(self.qos_correct, self.total),
            "field_accuracy": _field_accuracy_compute(self.field_correct, self.field_expected),
            "exact_match": _ratio_compute(self.exact, self.total),
        }


def score_predictions(
    predictions: Sequence[str], requests: Sequence[str], expected: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """Score a set of outputs in one call, as a JSON-serialisable report.

    Args:
        predictions: Raw model output texts.
        requests: The user request texts, aligned with ``predictions``.
        expected: The expected canonical requests, aligned with ``predictions``.

    Returns:
        ``{"n": int, "json_validity": float, "spec_compliance": float,
        "hallucination_rate": float, "hallucination_count": int, "qos_profile_accuracy": float,
        "field_accuracy": {field: float}, "exact_match": float}``, the values of
        :class:`QoDMetrics`.

    Raises:
        ValueError: If the three sequences differ in length.
        TypeError: If one of them is a single string.

    Example:
        >>> answer = {"device": {"phoneNumber": "+4915112345678"},
        ...           "applicationServer": {"ipv4Address": "198.51.100.7"},
        ...           "qosProfile": "QOS_E", "duration": 3600}
        >>> request = "Low latency for +4915112345678 to 198.51.100.7 for an hour"
        >>> report = score_predictions(['{"qosProfile": "QOS_E"}', "no idea"], [request] * 2,
        ...                            [answer] * 2)
        >>> report["json_validity"], report["qos_profile_accuracy"], report["exact_match"]
        (0.5, 0.5, 0.0)

    """
    metric = QoDMetrics()
    metric.update(predictions, requests, expected)
    report: dict[str, Any] = {}
    for key, value in metric.compute().items():
        is_mapping = isinstance(value, dict)
        report[key] = {f: v.item() for f, v in value.items()} if is_mapping else value.item()
    return report
