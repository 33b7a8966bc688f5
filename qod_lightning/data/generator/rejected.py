"""Rejected answers for the preference dataset: the mistakes small models really make.

Each failure mode takes the canonical answer (and the request text, so invented values can be
made sure to be absent from it) and returns a wrong answer, or ``None`` when the mode does not
apply to this request (no IPv4 device to flatten, for instance). :func:`make_rejected` picks an
applicable mode at random.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import random
from collections.abc import Callable
from typing import Any

from qod_lightning.data.generator.phrasing import duration_wordings
from qod_lightning.data.generator.spec import IPV4_DOC_NETWORKS
from qod_lightning.data.prompts import dump_request
from qod_lightning.schema import QOS_PROFILES

Body = dict[str, Any]
FailureMode = Callable[[Body, str, random.Random], str | None]

_INVENTED_FIELDS: tuple[tuple[str, Any], ...] = (
    ("bandwidth", "100Mbps"),
    ("latency", "low"),
    ("priority", "high"),
    ("sessionType", "realtime"),
    ("maxBitrate", 50000),
    ("qosLevel", "premium"),
    ("jitter", "10ms"),
    ("description", "QoD session"),
)
_INVENTED_DEVICE_FIELDS: tuple[tuple[str, Any], ...] = (
    ("deviceType", "smartphone"),
    ("imei", "490154203237518"),
    ("ipAddress", "auto"),
)
# Keys models write instead of the spec's: snake_case, or older or made-up names.
_RENAMED_KEYS: dict[str, tuple[str, ...]] = {
    "qosProfile": ("qos_profile", "profile", "qosProfileName"),
    "applicationServer": ("application_server", "server", "appServer"),
    "duration": ("sessionDuration", "duration_seconds", "durationSeconds"),
    "webhook": ("callbackUrl", "notification"),
}
_INVENTED_PROFILES: tuple[str, ...] = (
    "QOS_HIGH",
    "QOS_LOW_LATENCY",
    "QOS_GAMING",
    "QOS_XL",
    "HIGH_THROUGHPUT",
    "qos_e",
    "E",
    "QOS_VIDEO",
)
_PROSE_INTROS: tuple[str, ...] = (
    "Sure! Here is the request:\n",
    "Here's the JSON for your QoD session:\n\n",
    "Certainly. ",
    "The CreateSession body is:\n```json\n",
)
_PROSE_OUTROS: tuple[str, ...] = (
    "\nLet me know if you need anything else!",
    "\n\nThis requests the profile that best fits your use case.",
    "",
)


def _with_key(body: Body, key: str, value: Any, rng: random.Random) -> Body:
    """Insert ``key`` at a random position, keeping the order of the other keys."""
    items = list(body.items())
    items.insert(rng.randint(0, len(items)), (key, value))
    return dict(items)


def invented_field(body: Body, request: str, rng: random.Random) -> str | None:
    """Add a field the spec does not define, or rename a spec field."""
    draw = rng.random()
    if draw < 0.5:
        key, value = rng.choice(_INVENTED_FIELDS)
        return dump_request(_with_key(body, key, value, rng))
    if draw < 0.7:
        key, value = rng.choice(_INVENTED_DEVICE_FIELDS)
        return dump_request({**body, "device": _with_key(body["device"], key, value, rng)})
    key = rng.choice([k for k in _RENAMED_KEYS if k in body])
    new_key = rng.choice(_RENAMED_KEYS[key])
    return dump_request({(new_key if k == key else k): v for k, v in body.items()})


def wrong_nesting(body: Body, request: str, rng: random.Random) -> str | None:
    """Flatten an object the spec nests, or wrap a value the spec keeps flat."""
    wrong = copy.deepcopy(body)
    device = wrong["device"]
    options = ["server"]
    if "ipv4Address" in device:
        options += ["device_ipv4", "device_ipv4"]
    if len(device) == 1 and "ipv4Address" not in device:
        options.append("device_string")
    options += [k for k in ("devicePorts", "applicationServerPorts", "webhook") if k in wrong]
    choice = rng.choice(options)
    if choice == "device_ipv4":
        device["ipv4Address"] = device["ipv4Address"]["publicAddress"]
    elif choice == "device_string":
        wrong["device"] = next(iter(device.values()))
    elif choice == "server":
        wrong["applicationServer"] = next(iter(wrong["applicationServer"].values()))
    elif choice == "webhook":
        wrong["webhook"] = wrong["webhook"]["notificationUrl"]
    else:
        ports = wrong[choice]
        wrong[choice] = ports.get("ports") or [r["from"] for r in ports["ranges"]]
    return dump_request(wrong)


def wrong_profile(body: Body, request: str, rng: random.Random) -> str | None:
    """Use an invented profile name, or a real one that does not fit the request."""
    if rng.random() < 0.6:
        profile = rng.choice(_INVENTED_PROFILES)
    else:
        profile = rng.choice([p for p in QOS_PROFILES if p != body["qosProfile"]])
    return dump_request({**body, "qosProfile": profile})


def duration_as_text(body: Body, request: str, rng: random.Random) -> str | None:
    """Write the duration as a string ("2 hours", "7200") instead of an integer."""
    seconds = body["duration"]
    wording = rng.choice((*duration_wordings(seconds).nouns, str(seconds)))
    return dump_request({**body, "duration": wording})


def duration_wrong_unit(body: Body, request: str, rng: random.Random) -> str | None:
    """Give the duration in minutes or hours rather than seconds."""
    seconds = body["duration"]
    units = [u for u in (60, 3600) if seconds % u == 0 and seconds // u >= 1]
    if not units:
        return None
    return dump_request({**body, "duration": seconds // rng.choice(units)})


def wrong_duration_value(body: Body, request: str, rng: random.Random) -> str | None:
    """Ignore the stated duration (use the default), or invent one the request never stated."""
    seconds = body["duration"]
    other = 86400 if seconds != 86400 else rng.choice((3600, 7200))
    return dump_request({**body, "duration": other})


def _absent_ipv4(request: str, rng: random.Random) -> str:
    while True:
        network = ipaddress.IPv4Network(rng.choice(IPV4_DOC_NETWORKS))
        address = str(network[rng.randint(1, 254)])
        if address not in request:
            return address


def invented_address(body: Body, request: str, rng: random.Random) -> str | None:
    """Replace an address with one the request never mentions."""
    wrong = copy.deepcopy(body)
    made_up = _absent_ipv4(request, rng)
    ipv4 = wrong["device"].get("ipv4Address")
    if ipv4 is not None and rng.random() < 0.5:
        ipv4["publicAddress"] = made_up
    else:
        wrong["applicationServer"] = {"ipv4Address": made_up}
    return dump_request(wrong)


def invented_ports(body: Body, request: str, rng: random.Random) -> str | None:
    """Add server ports the request never mentions (models love 443)."""
    if "applicationServerPorts" in body:
        return None
    port = rng.choice([p for p in (443, 80, 8080, 5060, 3478) if str(p) not in request])
    return dump_request(_with_key(body, "applicationServerPorts", {"ports": [port]}, rng))


def missing_required(body: Body, request: str, rng: random.Random) -> str | None:
    """Leave out a required field (often the duration, relying on the server default)."""
    key = rng.choice(("duration", "duration", "qosProfile", "applicationServer", "device"))
    return dump_request({k: v for k, v in body.items() if k != key})


def ipv4_public_only(body: Body, request: str, rng: random.Random) -> str | None:
    """Give a device IPv4 address without the private address or port the spec requires."""
    ipv4 = body["device"].get("ipv4Address")
    if ipv4 is None or "publicPort" in ipv4:
        return None
    device = {**body["device"], "ipv4Address": {"publicAddress": ipv4["publicAddress"]}}
    return dump_request({**body, "device": device})


def truncated(body: Body, request: str, rng: random.Random) -> str | None:
    """Stop generating mid-object, as a model hitting its token limit does."""
    text = dump_request(body)
    return text[: rng.randint(len(text) // 3, len(text) - 2)]


def prose_around(body: Body, request: str, rng: random.Random) -> str | None:
    """Wrap the JSON in chat prose, against the instruction to answer with the object only."""
    intro = rng.choice(_PROSE_INTROS)
    outro = "\n```" if intro.endswith("```json\n") else rng.choice(_PROSE_OUTROS)
    return intro + dump_request(body) + outro


def pretty_near_miss(body: Body, request: str, rng: random.Random) -> str | None:
    """Pretty-print an answer with one subtle mistake in it."""
    mistakes = (wrong_profile, duration_wrong_unit, wrong_duration_value, ipv4_public_only)
    wrong = _first_applicable(mistakes, body, request, rng)
    return json.dumps(json.loads(wrong), indent=2, ensure_ascii=False)


def _first_applicable(modes: tuple[FailureMode, ...], body: Body, request: str, rng: random.Random) -> str:
    """Try the modes in random order and return the first mistake that applies."""
    # Lazy, so only the modes needed are run; each caller's modes include one that always applies.
    order = rng.sample(modes, len(modes))
    return next(wrong for mode in order if (wrong := mode(body, request, rng)) is not None)


FAILURE_MODES: tuple[FailureMode, ...] = (
    invented_field,
    wrong_nesting,
    wrong_profile,
    duration_as_text,
    duration_wrong_unit,
    wrong_duration_value,
    invented_address,
    invented_ports,
    missing_required,
    ipv4_public_only,
    truncated,
    prose_around,
    pretty_near_miss,
)


def make_rejected(body: Body, request: str, rng: random.Random) -> str:
    """Write a wrong answer to a request, in a failure mode picked at random among those that apply.

    Args:
        body: The canonical answer.
        request: The request text.
        rng: The random source.

    Returns:
        The rejected answer text; it fails validation or differs from ``dump_request(body)``.

    """
    return _first_applicable(FAILURE_MODES, body, request, rng)
