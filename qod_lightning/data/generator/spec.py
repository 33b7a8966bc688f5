"""Structured request specs for the synthetic dataset, and their canonical ``CreateSession`` body.

A :class:`RequestSpec` holds what a user's request says (identifiers, addresses, ports, duration,
use case or explicit profile, webhook). :func:`sample_spec` draws one at random from realistic
documentation-range values; :func:`canonical_request` turns one into the single correct answer.
The text of the request is rendered separately (:mod:`qod_lightning.data.generator.phrasing`),
so the answer never depends on the wording.
"""

from __future__ import annotations

import ipaddress
import random
import re
import string
from dataclasses import dataclass
from typing import Any

from qod_lightning.schema import DEFAULT_DURATION, QOS_PROFILES

# RFC 5737 and RFC 3849 documentation ranges: realistic-looking values that belong to nobody.
IPV4_DOC_NETWORKS: tuple[str, ...] = ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24")
IPV6_DOC_NETWORK = "2001:db8::/32"
EXAMPLE_DOMAINS: tuple[str, ...] = ("example.com", "example.org", "example.net")


@dataclass(frozen=True)
class UseCase:
    """What the session is for, and the profile that use case needs.

    Attributes:
        profile: One of :data:`~qod_lightning.schema.QOS_PROFILES`.
        prose: A noun phrase that reads in a sentence ("a cloud gaming session").
        bare: A short label for terse and key=value requests ("cloud gaming").

    """

    profile: str
    prose: str
    bare: str


@dataclass(frozen=True)
class DeviceSpec:
    """The device identifiers a request gives (at least one is set).

    Attributes:
        ipv4: Public IPv4 address.
        private_ipv4: Private IPv4 address behind NAT.
        public_port: Public (NAT-observed) port.
        ipv6: IPv6 address.
        phone: Phone number as the request shows it (spaces, dashes, brackets allowed).
        nai: Network access identifier (``user@domain``).

    """

    ipv4: str | None = None
    private_ipv4: str | None = None
    public_port: int | None = None
    ipv6: str | None = None
    phone: str | None = None
    nai: str | None = None


@dataclass(frozen=True)
class PortSpec:
    """Single ports and inclusive ranges (at least one of the two is non-empty)."""

    ports: tuple[int, ...] = ()
    ranges: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class WebhookSpec:
    """A notification URL and an optional auth token."""

    url: str
    token: str | None = None


@dataclass(frozen=True)
class RequestSpec:
    """Everything a request states; ``None`` fields are not mentioned.

    Attributes:
        device: The device identifiers.
        server: Application server address, optionally ``address/mask``; IPv6 when it has a colon.
        use_case: What the session is for (``None`` only when an explicit profile is given).
        explicit_profile: A profile the user names; it wins over the use case.
        duration: Session length in seconds, or ``None`` when the request states none.
        device_ports: Device-side ports.
        server_ports: Application-server ports.
        webhook: Where to send notifications.

    """

    device: DeviceSpec
    server: str
    use_case: UseCase | None
    explicit_profile: str | None = None
    duration: int | None = None
    device_ports: PortSpec | None = None
    server_ports: PortSpec | None = None
    webhook: WebhookSpec | None = None

    @property
    def profile(self) -> str:
        """The profile the answer must carry: the named one, else the use case's."""
        if self.explicit_profile is not None:
            return self.explicit_profile
        if self.use_case is None:
            raise ValueError("a request needs a use case or an explicit profile")
        return self.use_case.profile


def phone_digits(shown: str) -> str:
    """Return the E.164 form (``+`` and digits) of a phone number written with separators.

    Args:
        shown: The number as the request writes it, e.g. ``"+44 7700 900123"``.

    Returns:
        e.g. ``"+447700900123"``.

    """
    return "+" + re.sub(r"\D", "", shown)


def _ports_body(spec: PortSpec) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if spec.ranges:
        body["ranges"] = [{"from": low, "to": high} for low, high in spec.ranges]
    if spec.ports:
        body["ports"] = list(spec.ports)
    return body


def _device_body(device: DeviceSpec) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if device.ipv4 is not None:
        ipv4: dict[str, Any] = {"publicAddress": device.ipv4}
        if device.private_ipv4 is not None:
            ipv4["privateAddress"] = device.private_ipv4
        elif device.public_port is None:
            # The spec needs privateAddress or publicPort; an address given alone means no NAT,
            # and then the spec says to repeat the public address as the private one.
            ipv4["privateAddress"] = device.ipv4
        if device.public_port is not None:
            ipv4["publicPort"] = device.public_port
        body["ipv4Address"] = ipv4
    if device.ipv6 is not None:
        body["ipv6Address"] = device.ipv6
    if device.phone is not None:
        body["phoneNumber"] = phone_digits(device.phone)
    if device.nai is not None:
        body["networkAccessIdentifier"] = device.nai
    return body


def canonical_request(spec: RequestSpec) -> dict[str, Any]:
    """Build the one correct ``CreateSession`` body for a request spec.

    Keys follow the schema's order; optional parts appear only when the request mentions them,
    and a request without a duration gets the spec's default (86400 s).

    Args:
        spec: The request.

    Returns:
        The canonical body, ready for :func:`~qod_lightning.data.prompts.dump_request`.

    """
    kind = "ipv6Address" if ":" in spec.server else "ipv4Address"
    body: dict[str, Any] = {
        "device": _device_body(spec.device),
        "applicationServer": {kind: spec.server},
    }
    if spec.device_ports is not None:
        body["devicePorts"] = _ports_body(spec.device_ports)
    if spec.server_ports is not None:
        body["applicationServerPorts"] = _ports_body(spec.server_ports)
    body["qosProfile"] = spec.profile
    if spec.webhook is not None:
        webhook = {"notificationUrl": spec.webhook.url}
        if spec.webhook.token is not None:
            webhook["notificationAuthToken"] = spec.webhook.token
        body["webhook"] = webhook
    body["duration"] = DEFAULT_DURATION if spec.duration is None else spec.duration
    return body


# --- sampling -------------------------------------------------------------------------------

_DEVICE_KINDS: tuple[tuple[str, float], ...] = (
    ("ipv4", 0.42),
    ("ipv4_port", 0.07),
    ("ipv4_private", 0.06),
    ("ipv4_port_private", 0.03),
    ("ipv6", 0.12),
    ("phone", 0.15),
    ("nai", 0.08),
    ("combo", 0.07),
)
_COMBOS: tuple[tuple[str, str], ...] = (
    ("ipv4", "phone"),
    ("ipv6", "phone"),
    ("ipv4", "nai"),
    ("phone", "nai"),
    ("ipv4", "ipv6"),
)
_WELL_KNOWN_PORTS: tuple[int, ...] = (80, 443, 1935, 3478, 5060, 5061, 8080, 8443, 9000, 27015)
_NAI_USERS: tuple[str, ...] = ("user", "alice", "bob", "sensor", "tracker", "fleet.car", "cam")
_WEBHOOK_HOSTS: tuple[str, ...] = (
    "hooks.example.com",
    "api.example.org",
    "notify.example.net",
    "callbacks.example.com",
    "events.example.org",
)
_WEBHOOK_PATHS: tuple[str, ...] = (
    "/qod/{id}",
    "/callbacks/qod",
    "/v1/notifications/{id}",
    "/webhooks/sessions/{id}",
    "/qod-events",
)
# Lowercase only: lowercase-styled requests lower the whole text, and every value must survive.
_TOKEN_ALPHABET = string.ascii_lowercase + string.digits


def _weighted(rng: random.Random, options: tuple[tuple[str, float], ...]) -> str:
    names = [name for name, _ in options]
    return rng.choices(names, weights=[weight for _, weight in options])[0]


def _ipv4_host(rng: random.Random, avoid: tuple[str, ...] = ()) -> str:
    while True:
        network = ipaddress.IPv4Network(rng.choice(IPV4_DOC_NETWORKS))
        address = str(network[rng.randint(1, 254)])
        if address not in avoid:
            return address


def _private_ipv4(rng: random.Random) -> str:
    if rng.random() < 0.6:
        return f"10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(2, 254)}"
    return f"192.168.{rng.randint(0, 31)}.{rng.randint(2, 254)}"


def _ipv6_host(rng: random.Random) -> str:
    # Some zero groups so the compressed "::" form shows up as it does in real configs.
    groups = [rng.choice((0, rng.randint(1, 0xFFFF))) for _ in range(6)]
    groups[-1] = groups[-1] or rng.randint(1, 0xFFF)
    prefix = ipaddress.IPv6Network(IPV6_DOC_NETWORK).network_address
    return str(prefix + int("".join(f"{g:04x}" for g in groups), 16))


def _server_address(rng: random.Random, device_ipv4: str | None) -> str:
    if rng.random() < 0.65:
        if rng.random() < 0.25:
            prefix = rng.choice((24, 24, 25, 26, 28))
            base = _ipv4_host(rng)
            return str(ipaddress.IPv4Network(f"{base}/{prefix}", strict=False))
        return _ipv4_host(rng, avoid=(device_ipv4,) if device_ipv4 else ())
    if rng.random() < 0.35:
        prefix = rng.choice((48, 56, 64, 64))
        return str(ipaddress.IPv6Network(f"{_ipv6_host(rng)}/{prefix}", strict=False))
    return _ipv6_host(rng)


def _phone(rng: random.Random) -> str:
    if rng.random() < 0.55:
        # Ofcom's drama range 07700 900000-900999.
        local = f"900{rng.randint(0, 999):03d}"
        shown = ("+44 7700 {0}", "+447700{0}", "+44-7700-{0}", "+44 7700{0}")
        return rng.choice(shown).format(local)
    # North American 555-0100..0199, reserved for fiction.
    area = rng.choice(("202", "212", "310", "415", "617"))
    line = f"01{rng.randint(0, 99):02d}"
    shown = ("+1 {a} 555 {n}", "+1 ({a}) 555-{n}", "+1-{a}-555-{n}", "+1{a}555{n}")
    return rng.choice(shown).format(a=area, n=line)


def _nai(rng: random.Random) -> str:
    user = rng.choice(_NAI_USERS) + str(rng.randint(1, 999))
    domain = rng.choice(EXAMPLE_DOMAINS)
    return f"{user}@{'iot.' if rng.random() < 0.2 else ''}{domain}"


def _device(rng: random.Random) -> DeviceSpec:
    kind = _weighted(rng, _DEVICE_KINDS)
    parts = rng.choice(_COMBOS) if kind == "combo" else (kind.split("_")[0],)
    ipv4 = _ipv4_host(rng) if "ipv4" in parts else None
    return DeviceSpec(
        ipv4=ipv4,
        private_ipv4=_private_ipv4(rng) if "private" in kind else None,
        public_port=rng.randint(1024, 65535) if "port" in kind else None,
        ipv6=_ipv6_host(rng) if "ipv6" in parts else None,
        phone=_phone(rng) if "phone" in parts else None,
        nai=_nai(rng) if "nai" in parts else None,
    )


def _ports(rng: random.Random) -> PortSpec:
    shape = rng.random()
    if shape < 0.5:
        count = rng.choice((1, 1, 2, 3))
        return PortSpec(ports=tuple(sorted(rng.sample(_WELL_KNOWN_PORTS, count))))
    low = rng.choice((5000, 10000, 20000, 30000, 49152, 50000)) + rng.randint(0, 99) * 10
    ranges = ((low, low + rng.choice((10, 20, 99, 100, 500))),)
    ports = (rng.choice(_WELL_KNOWN_PORTS),) if shape > 0.8 else ()
    return PortSpec(ports=ports, ranges=ranges)


def _webhook(rng: random.Random) -> WebhookSpec:
    ident = "".join(rng.choices(_TOKEN_ALPHABET, k=6))
    url = "https://" + rng.choice(_WEBHOOK_HOSTS) + rng.choice(_WEBHOOK_PATHS).format(id=ident)
    token = None
    if rng.random() < 0.6:
        token = "".join(rng.choices(_TOKEN_ALPHABET, k=rng.randint(24, 36)))
    return WebhookSpec(url=url, token=token)


def sample_duration(rng: random.Random) -> int | None:
    """Draw a session length in seconds, weighted towards the lengths people ask for.

    Args:
        rng: The random source.

    Returns:
        Seconds in 1..86400, or ``None`` (the request states no duration) about 15% of the time.

    """
    draw = rng.random()
    if draw < 0.15:
        return None
    if draw < 0.55:
        return 3600 * rng.choice((1, 1, 2, 2, 2, 3, 3, 4, 5, 6, 8, 10, 12))
    if draw < 0.8:
        return 60 * rng.choice((5, 10, 15, 20, 25, 30, 30, 40, 45, 50, 90, 135, 150, 210))
    if draw < 0.9:
        return DEFAULT_DURATION
    if draw < 0.96:
        return 3600 * rng.randint(13, 23)
    return rng.choice((90, 120, 300, 600, 900, 1200))


def sample_spec(rng: random.Random, use_cases: tuple[UseCase, ...]) -> RequestSpec:
    """Draw one request spec: mostly simple, with a fair share of ports, webhooks and non-IPv4 ids.

    Args:
        rng: The random source (the only one used, so a seed fixes the spec).
        use_cases: The use cases to draw from; each profile is equally likely.

    Returns:
        The spec.

    """
    device = _device(rng)
    profile = rng.choice(QOS_PROFILES)
    use_case: UseCase | None = rng.choice([u for u in use_cases if u.profile == profile])
    explicit = None
    if rng.random() < 0.15:
        explicit = rng.choice(QOS_PROFILES)
        if rng.random() < 0.3:
            use_case = None
    return RequestSpec(
        device=device,
        server=_server_address(rng, device.ipv4),
        use_case=use_case,
        explicit_profile=explicit,
        duration=sample_duration(rng),
        device_ports=_ports(rng) if rng.random() < 0.10 else None,
        server_ports=_ports(rng) if rng.random() < 0.18 else None,
        webhook=_webhook(rng) if rng.random() < 0.15 else None,
    )
