"""The request contract: our JSON Schema for CAMARA QoD ``CreateSession`` (API v0.10.1).

Written from the facts of the official OpenAPI definition (``qod-api-v0.10.1.yaml``,
``components.schemas.CreateSession``), restricted the way the product needs:

* only the seven ``CreateSession`` keys, ``additionalProperties: false`` at every depth, so an
  invented key anywhere is a schema violation;
* ``duration`` is required (the spec makes it optional with default 86400; our canonical
  answers always state it, so the model never relies on a server default);
* ``qosProfile`` is one of the four predefined profiles the v0.10.x releases name.

The official schema accepts everything ours accepts; ``tests/test_schema.py`` checks that on every
canonical record against ``../shared/camara`` when it is present.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any
from urllib.parse import urlsplit

from jsonschema import Draft202012Validator, FormatChecker, validators

QOS_PROFILES: tuple[str, ...] = ("QOS_E", "QOS_S", "QOS_M", "QOS_L")
"""Predefined profile names: E lowest latency, S/M/L small/medium/large throughput."""

TOP_LEVEL_KEYS: tuple[str, ...] = (
    "device",
    "applicationServer",
    "devicePorts",
    "applicationServerPorts",
    "qosProfile",
    "webhook",
    "duration",
)
REQUIRED_KEYS: tuple[str, ...] = ("device", "applicationServer", "qosProfile", "duration")
DEFAULT_DURATION = 86400
"""The spec's default and maximum session duration in seconds (24 hours)."""
MAX_DURATION = 86400
MAX_PORT = 65535

# Patterns keep the schema usable by grammar engines (constrained decoding), which know regexes
# but not every JSON Schema format; the format checkers below add the exact numeric checks.
_IPV4 = r"(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])(\.(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])){3}"
IPV4_PATTERN = f"^{_IPV4}$"
IPV4_NETWORK_PATTERN = f"^{_IPV4}(/(3[0-2]|[12]?[0-9]))?$"
IPV6_PATTERN = r"^[0-9a-fA-F:.]{2,45}$"
IPV6_NETWORK_PATTERN = r"^[0-9a-fA-F:.]{2,45}(/(12[0-8]|1[01][0-9]|[1-9]?[0-9]))?$"
PHONE_PATTERN = r"^\+?[0-9]{5,15}$"
NAI_PATTERN = r"^[A-Za-z0-9._+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}$"

_PORT: dict[str, Any] = {"type": "integer", "minimum": 0, "maximum": MAX_PORT}

_PORTS_SPEC: dict[str, Any] = {
    "type": "object",
    "minProperties": 1,
    "additionalProperties": False,
    "properties": {
        "ranges": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["from", "to"],
                "properties": {"from": _PORT, "to": _PORT},
            },
        },
        "ports": {"type": "array", "minItems": 1, "items": _PORT},
    },
}

REQUEST_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "CAMARA QoD CreateSession (v0.10.1), qod_lightning profile",
    "type": "object",
    "additionalProperties": False,
    "required": list(REQUIRED_KEYS),
    "properties": {
        "device": {
            "type": "object",
            "minProperties": 1,
            "additionalProperties": False,
            "properties": {
                "ipv4Address": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["publicAddress"],
                    # The spec: publicAddress plus privateAddress and/or publicPort.
                    "anyOf": [
                        {"required": ["publicAddress", "privateAddress"]},
                        {"required": ["publicAddress", "publicPort"]},
                    ],
                    "properties": {
                        "publicAddress": {
                            "type": "string",
                            "pattern": IPV4_PATTERN,
                            "format": "ipv4",
                        },
                        "privateAddress": {
                            "type": "string",
                            "pattern": IPV4_PATTERN,
                            "format": "ipv4",
                        },
                        "publicPort": _PORT,
                    },
                },
                "ipv6Address": {"type": "string", "pattern": IPV6_PATTERN, "format": "ipv6"},
                "phoneNumber": {"type": "string", "pattern": PHONE_PATTERN},
                "networkAccessIdentifier": {"type": "string", "pattern": NAI_PATTERN},
            },
        },
        "applicationServer": {
            "type": "object",
            "minProperties": 1,
            "additionalProperties": False,
            "properties": {
                "ipv4Address": {
                    "type": "string",
                    "pattern": IPV4_NETWORK_PATTERN,
                    "format": "ipv4-network",
                },
                "ipv6Address": {
                    "type": "string",
                    "pattern": IPV6_NETWORK_PATTERN,
                    "format": "ipv6-network",
                },
            },
        },
        "devicePorts": _PORTS_SPEC,
        "applicationServerPorts": _PORTS_SPEC,
        "qosProfile": {"type": "string", "enum": list(QOS_PROFILES)},
        "webhook": {
            "type": "object",
            "additionalProperties": False,
            "required": ["notificationUrl"],
            "properties": {
                "notificationUrl": {
                    "type": "string",
                    "pattern": r"^https?://[^\s]+$",
                    "format": "uri",
                },
                "notificationAuthToken": {"type": "string", "minLength": 20, "maxLength": 256},
            },
        },
        "duration": {"type": "integer", "minimum": 1, "maximum": MAX_DURATION},
    },
}

FORMAT_CHECKER = FormatChecker(formats=())
"""Our own format checks: jsonschema's built-in ``uri`` check silently passes without an
optional dependency, so every format the schema uses is checked here explicitly."""


def _is_ip(value: object, version: int, network: bool) -> bool:
    if not isinstance(value, str):
        return True  # type errors are the "type" keyword's job
    try:
        parsed = ipaddress.ip_network(value, strict=False) if network else ipaddress.ip_address(value)
    except ValueError:
        return False
    return parsed.version == version


@FORMAT_CHECKER.checks("ipv4")
def _ipv4(value: object) -> bool:
    return _is_ip(value, 4, network=False)


@FORMAT_CHECKER.checks("ipv6")
def _ipv6(value: object) -> bool:
    return _is_ip(value, 6, network=False)


@FORMAT_CHECKER.checks("ipv4-network")
def _ipv4_network(value: object) -> bool:
    return _is_ip(value, 4, network=True)


@FORMAT_CHECKER.checks("ipv6-network")
def _ipv6_network(value: object) -> bool:
    return _is_ip(value, 6, network=True)


@FORMAT_CHECKER.checks("uri")
def _uri(value: object) -> bool:
    if not isinstance(value, str):
        return True
    try:
        parts = urlsplit(value)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.netloc) and not re.search(r"\s", value)


# JSON Schema counts any number with a zero fraction as an integer, so 7200.0 would pass as a
# duration and 443.0 as a port. The contract asks for integer literals, as the canonical answers
# write them; Python's json reads "7200.0" as a float, which this checker refuses (bool as before).
_INTEGER_LITERALS = Draft202012Validator.TYPE_CHECKER.redefine("integer", lambda _checker, value: type(value) is int)
_RequestValidator = validators.extend(Draft202012Validator, type_checker=_INTEGER_LITERALS)

VALIDATOR = _RequestValidator(REQUEST_SCHEMA, format_checker=FORMAT_CHECKER)
"""The one compiled validator every caller shares: Draft 2020-12, integers written as integers."""


def defined_keys() -> dict[tuple[str, ...], frozenset[str]]:
    """Map each object position in the schema to the keys the spec defines there.

    Positions are key paths with list indices dropped, e.g. ``("device", "ipv4Address")`` or
    ``("devicePorts", "ranges")`` for the objects inside the ``ranges`` array.

    Returns:
        ``{path: keys}`` for every object-typed node of :data:`REQUEST_SCHEMA`.

    """
    positions: dict[tuple[str, ...], frozenset[str]] = {}

    def walk(node: dict[str, Any], path: tuple[str, ...]) -> None:
        if node.get("type") == "object":
            props = node.get("properties", {})
            positions[path] = frozenset(props)
            for key, child in props.items():
                walk(child, (*path, key))
        elif node.get("type") == "array":
            walk(node["items"], path)

    walk(REQUEST_SCHEMA, ())
    return positions


DEFINED_KEYS = defined_keys()
ALL_SPEC_KEYS: frozenset[str] = frozenset().union(*DEFINED_KEYS.values())
