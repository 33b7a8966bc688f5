"""Validate a model's answer against the request contract, check by check.

:func:`validate_request` returns a :class:`ValidationReport` with one verdict for each of the seven
checks (JSON syntax, required fields, field types, hallucinated fields, nesting, QoS profile,
duration) plus *value* hallucinations: addresses, phone numbers, ports, URLs or network access
identifiers in the answer that the user's request never mentioned (whole).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any

from jsonschema.exceptions import ValidationError

from qod_lightning.extraction import extract_json, find_json_object, split_note
from qod_lightning.schema import ALL_SPEC_KEYS, DEFINED_KEYS, VALIDATOR

CHECKS: tuple[str, ...] = (
    "json_syntax",
    "required_fields",
    "field_types",
    "no_hallucinated_fields",
    "nesting",
    "qos_profile",
    "duration",
)

PORT_KEYS = frozenset({"publicPort", "ports", "from", "to"})
"""The keys whose numbers are ports (a request states them; an answer copies them)."""
# A sentence-final period may follow an address or number ("server 192.0.2.1."); a dot
# followed by a digit may not, so "1.2.3.4.5" and "2.5 hours" are not read as addresses or ports.
_IPV4_RE = re.compile(r"(?<![\d.])\d{1,3}(?:\.\d{1,3}){3}(?:/\d{1,2})?(?!\.?\d)")
_IPV6_RE = re.compile(r"(?<![0-9A-Za-z:])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?:/\d{1,3})?")
_PHONE_RE = re.compile(r"\+?\d[\d\s().-]{3,}\d")
_URL_RE = re.compile(r"https?://[^\s\"'<>]+")
# The lookbehind starts a match only at the start of a name, which keeps the search linear.
_NAI_RE = re.compile(r"(?<![A-Za-z0-9._+-])[A-Za-z0-9._+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
_AROUND_VALUES = ".,;:!?)]}`*_~"  # sentence punctuation and Markdown, not part of a URL
_MAX_PHONE_DIGITS = 15  # E.164
_NUMBER_RE = re.compile(r"(?<![\d.])\d+(?!\.?\d)")


@dataclass(frozen=True)
class CheckResult:
    """The verdict of one check.

    Attributes:
        name: One of :data:`CHECKS`.
        passed: Whether the answer passed.
        errors: Human-readable reasons, each naming the JSON path.

    """

    name: str
    passed: bool
    errors: tuple[str, ...] = ()


@dataclass(frozen=True)
class ValidationReport:
    """Everything the validator found in one answer.

    Attributes:
        parsed: The extracted JSON object, or ``None`` when none parsed.
        checks: One :class:`CheckResult` per name in :data:`CHECKS`.
        hallucinated_keys: Paths of keys not defined by the spec at their position.
        hallucinated_values: Values (addresses, phones, ports, URLs, identifiers) absent from the request;
            empty when no request text was given.

    """

    parsed: dict[str, Any] | None
    checks: dict[str, CheckResult]
    hallucinated_keys: tuple[str, ...] = ()
    hallucinated_values: tuple[str, ...] = field(default=())

    @property
    def parses(self) -> bool:
        """Whether a JSON object could be extracted."""
        return self.parsed is not None

    @property
    def valid(self) -> bool:
        """Whether the answer passes all seven checks (and so the JSON Schema)."""
        return all(c.passed for c in self.checks.values())

    @property
    def hallucinated(self) -> bool:
        """Whether the answer invents a key or a value."""
        return bool(self.hallucinated_keys or self.hallucinated_values)

    @property
    def errors(self) -> list[str]:
        """All failure reasons, prefixed with their check's name."""
        return [f"{c.name}: {e}" for c in self.checks.values() for e in c.errors]

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready summary (for CLI errors and reports)."""
        return {
            "valid": self.valid,
            "checks": {n: {"passed": c.passed, "errors": list(c.errors)} for n, c in self.checks.items()},
            "hallucinated_keys": list(self.hallucinated_keys),
            "hallucinated_values": list(self.hallucinated_values),
        }


def _path(parts: Any) -> str:
    return "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts)


def _undefined_keys(obj: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Walk ``obj`` and list keys the spec does not define at their position.

    Returns:
        ``(hallucinated, misplaced)``: paths of every undefined key, and messages for the subset
        that the spec does define elsewhere (a nesting mistake rather than an invention).

    """
    hallucinated: list[str] = []
    misplaced: list[str] = []

    def walk(node: Any, schema_pos: tuple[str, ...] | None, path: tuple[Any, ...]) -> None:
        if isinstance(node, list):
            for i, item in enumerate(node):
                walk(item, schema_pos, (*path, i))
            return
        if not isinstance(node, dict):
            return
        allowed = DEFINED_KEYS.get(schema_pos, frozenset()) if schema_pos is not None else frozenset()
        for key, value in node.items():
            if key in allowed:
                walk(value, (*schema_pos, key), (*path, key))  # type: ignore[misc]
                continue
            hallucinated.append(_path((*path, key)))
            if key in ALL_SPEC_KEYS:
                misplaced.append(f"{_path((*path, key))}: key {key!r} is not defined at this position")
            # Keys below an undefined key are not counted again: the parent already is.

    walk(obj, (), ())
    return hallucinated, misplaced


def _classify(error: ValidationError) -> str | None:
    """Assign a jsonschema error to one of the seven checks (``None``: reported elsewhere)."""
    top = error.absolute_path[0] if error.absolute_path else None
    if error.validator == "additionalProperties":
        return None  # the key walk reports these with full paths
    if top == "qosProfile":
        return "qos_profile"
    if top == "duration":
        return "duration"
    if error.validator in ("required", "anyOf", "minProperties"):
        return "required_fields"
    if error.validator == "type":
        expected = error.validator_value
        expected = set(expected) if isinstance(expected, list) else {expected}
        container_expected = bool(expected & {"object", "array"})
        container_given = isinstance(error.instance, (dict, list))
        if container_expected != container_given:
            return "nesting"
    return "field_types"


def _schema_checks(obj: dict[str, Any]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {name: [] for name in CHECKS}
    for error in VALIDATOR.iter_errors(obj):
        check = _classify(error)
        if check is not None:
            found[check].append(f"{_path(error.absolute_path)}: {error.message}")
    return found


def _request_ips(text: str) -> dict[str, tuple[Any, int | None]]:
    """Each IP address of ``text`` as written (with its prefix length, if any) -> (address, prefix length)."""
    found: dict[str, tuple[Any, int | None]] = {}
    for match in [*_IPV4_RE.findall(text), *_IPV6_RE.findall(text)]:
        address, _, mask = match.partition("/")
        if address.endswith(":") and not address.endswith("::"):
            address = address[:-1]  # punctuation, as in "server 2001:db8::1: gaming"
        try:
            found[address + (f"/{mask}" if mask else "")] = (ipaddress.ip_address(address), int(mask) if mask else None)
        except ValueError:
            continue
    return found


def _address_occurs(value: str, addresses: set[tuple[Any, int | None]]) -> bool | None:
    """``None`` when ``value`` is no IP address; else whether the request mentions it."""
    address, _, mask = value.partition("/")
    try:
        ip = ipaddress.ip_address(address)
        mask_value = int(mask) if mask else None
    except ValueError:
        return None
    if mask_value is None:
        return any(ip == seen for seen, _ in addresses)
    return (ip, mask_value) in addresses


def _leaves(node: Any, key: str | None = None):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, k)
    elif isinstance(node, list):
        for item in node:
            yield from _leaves(item, key)
    else:
        yield key, node


def _phone_digit_runs(text: str) -> set[str]:
    """The digits of every run of whole digit groups in each phone-like span of ``text``.

    A span can run on into a following number ("+44 7700 900123 (2 hours)" gives 447700900123
    and 4477009001232) or start with a prefix the answer drops, so runs of whole groups are
    kept; a number cut inside a group (4477009001) is not among them. An international prefix
    written ``00`` counts as ``+`` (0044 7700 900123 gives 447700900123). Runs stop at
    15 digits, the most a phone number has, which also keeps long lists of numbers cheap.
    """
    runs: set[str] = set()
    for span in _PHONE_RE.findall(text):
        groups = re.findall(r"\d+", span)
        groups[0] = groups[0].removeprefix("00")  # the international prefix: 0044 is +44
        groups = [group for group in groups if group]
        for i in range(len(groups)):
            run = ""
            for group in groups[i:]:
                run += group
                if len(run) > _MAX_PHONE_DIGITS:
                    break
                runs.add(run)
    return runs


@dataclass(frozen=True)
class RequestValues:
    """The values a request states, which an answer may copy (and nothing else of their kinds).

    Attributes:
        ips: Each IP address as the request writes it, with its prefix length where it has one
            (``"198.51.100.0/24"``), mapped to ``(address, prefix length or None)``.
        numbers: Whole numbers of up to six digits outside addresses (ports, among others).
        phone_numbers: The digits of every run of whole digit groups in a phone-like span
            outside the IP addresses (:func:`_phone_digit_runs`): the phone numbers an answer copies.
        phones: Those, and the runs the IP addresses' own digits make, which the hallucination
            check also lets pass.
        urls: Whole URLs, trailing sentence punctuation and ``/`` dropped.
        identifiers: ``user@domain`` tokens (network access identifiers).
        words: Whitespace-separated words, surrounding punctuation dropped (opaque tokens).

    """

    ips: dict[str, tuple[Any, int | None]]
    numbers: frozenset[int]
    phone_numbers: frozenset[str]
    phones: frozenset[str]
    urls: frozenset[str]
    identifiers: frozenset[str]
    words: frozenset[str]

    @property
    def addresses(self) -> set[tuple[Any, int | None]]:
        """The IP addresses, compared as addresses (``2001:db8::1`` equals ``2001:0db8:0::1``)."""
        return set(self.ips.values())


def request_values(request: str) -> RequestValues:
    """Find the values ``request`` states: addresses, numbers, phone digits, URLs, identifiers, words.

    The hallucination check (:func:`value_hallucinations`) judges an answer's values against
    these, and constrained decoding lets an answer copy only these
    (:func:`~qod_lightning.constrained.grounded_schema`).

    Args:
        request: The user's request text.

    Returns:
        The values.

    """
    # IPv4 addresses become a letter, not a space, so "192.0.2.7:5000: gaming" keeps port 5000
    # instead of leaving " :5000:" to be read (and removed) as an IPv6 address.
    without_ips = _IPV6_RE.sub(" ", _IPV4_RE.sub("x", request))
    phone_numbers = _phone_digit_runs(without_ips)
    return RequestValues(
        ips=_request_ips(request),
        numbers=frozenset(int(n) for n in _NUMBER_RE.findall(without_ips) if len(n) <= 6),
        phone_numbers=frozenset(phone_numbers),
        phones=frozenset(phone_numbers | _phone_digit_runs(request)),
        urls=frozenset(url.rstrip(_AROUND_VALUES).rstrip("/") for url in _URL_RE.findall(request)),
        identifiers=frozenset(nai.strip(_AROUND_VALUES) for nai in _NAI_RE.findall(request)),
        words=frozenset(word.strip(_AROUND_VALUES + "([{\"'") for word in request.split()) - {""},
    )


def value_hallucinations(obj: dict[str, Any], request: str) -> list[str]:
    """List addresses, phone numbers, ports, URLs and identifiers in ``obj`` that ``request`` never mentions.

    Every value must appear whole, not as a part of one. IP addresses compare as addresses
    (``2001:db8::1`` equals ``2001:0db8:0::1``), phone numbers by their digits, as whole digit
    groups of a phone-like span (spaces, dashes, brackets and a leading ``+`` ignored), ports as
    whole numbers in the request that are not part of an address, URLs as whole URLs of the
    request (a trailing ``/`` or sentence punctuation ignored), network access identifiers as
    whole ``user@domain`` tokens.

    Args:
        obj: A parsed answer.
        request: The user's request text.

    Returns:
        One message per invented value, in document order.

    """
    values = request_values(request if isinstance(request, str) else "")
    addresses = values.addresses  # a set built from the IPs: once, not per value
    invented: list[str] = []
    for key, value in _leaves(obj):
        if isinstance(value, bool):
            continue
        if key in PORT_KEYS and isinstance(value, (int, float)):  # 443.0 is port 443 to a reader
            if value not in values.numbers:
                invented.append(f"port {value} ({key})")
        elif isinstance(value, str):
            occurs = _address_occurs(value.strip(), addresses)
            if occurs is False:
                invented.append(f"address {value} ({key})")
            elif occurs is None and key == "phoneNumber":
                if re.sub(r"\D", "", value) not in values.phones:
                    invented.append(f"phone number {value}")
            elif occurs is None and (key == "notificationUrl" or value.startswith(("http://", "https://"))):
                if value.rstrip("/") not in values.urls:
                    invented.append(f"URL {value} ({key})")
            elif occurs is None and key == "networkAccessIdentifier" and value not in values.identifiers:
                invented.append(f"network access identifier {value}")
    return invented


def validate_request(output: str | dict[str, Any], request: str | None = None) -> ValidationReport:
    """Run the seven contract checks (and value hallucination, given the request) on an answer.

    Never raises on any input: text with no JSON object yields a report whose ``json_syntax``
    check failed and whose other checks are marked as not run.

    Args:
        output: Raw model text (the first JSON object is extracted) or an already parsed object.
        request: The user's request text; enables the value-hallucination check.

    Returns:
        The report.

    """
    obj = output if isinstance(output, dict) else extract_json(output)
    if obj is None:
        skipped = ("not checked: no JSON object could be parsed",)
        checks = {name: CheckResult(name, False, skipped) for name in CHECKS}
        checks["json_syntax"] = CheckResult("json_syntax", False, ("no JSON object found",))
        return ValidationReport(parsed=None, checks=checks)
    found = _schema_checks(obj)
    hallucinated, misplaced = _undefined_keys(obj)
    found["no_hallucinated_fields"] = [f"{p}: key not defined by the spec here" for p in hallucinated]
    found["nesting"].extend(misplaced)
    checks = {name: CheckResult(name, not errs, tuple(errs)) for name, errs in found.items()}
    values = tuple(value_hallucinations(obj, request)) if request is not None else ()
    return ValidationReport(obj, checks, tuple(hallucinated), values)


def answer_problem(answer: str | dict[str, Any], request: str | None = None) -> str | None:
    """Say why a training or reference answer is not a bare, valid request (``None`` when it is).

    Stricter than :func:`validate_request`, which tolerates text around the object a model wrote:
    a dataset's answer must be the JSON object alone (after a scratchpad note line, if it has
    one), pass all seven checks and, given the request, invent no value.

    Args:
        answer: The answer text, or an already parsed object.
        request: The user's request text; enables the value-hallucination check.

    Returns:
        The first problem found, or ``None``.

    """
    if isinstance(answer, str):
        answer = split_note(answer)[1]  # a scratchpad note may open the answer
        found = find_json_object(answer)
        if found is None:
            return "no JSON object"
        if answer[: found[1]].strip() or answer[found[2] :].strip():
            return "text around the JSON object"
        answer = found[0]
    report = validate_request(answer, request)
    if not report.valid:
        return report.errors[0]
    if report.hallucinated_values:
        return f"hallucinated value: {report.hallucinated_values[0]}"
    return None
