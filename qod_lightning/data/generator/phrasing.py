"""Word banks and slot renderers: how each part of a request spec can be said.

Every renderer draws its wording from ``rng`` and returns text in which each value of the spec
(address, port, phone, URL, token) occurs literally, so the canonical answer never holds a value
the request does not show. Two registers exist for most slots: *prose* (a noun phrase that reads
inside a sentence, "my phone at 203.0.113.7") and *field* (the bare value for terse, bullet or
key=value requests, "203.0.113.7").
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from qod_lightning.data.generator.spec import DeviceSpec, PortSpec, RequestSpec, UseCase, WebhookSpec

USE_CASES: tuple[UseCase, ...] = (
    # QOS_E: latency-sensitive interaction.
    UseCase("QOS_E", "an online gaming session", "online gaming"),
    UseCase("QOS_E", "a cloud gaming session", "cloud gaming"),
    UseCase("QOS_E", "a competitive multiplayer match", "multiplayer gaming"),
    UseCase("QOS_E", "an esports tournament", "esports"),
    UseCase("QOS_E", "a mobile gaming session", "mobile gaming"),
    UseCase("QOS_E", "a video call", "video calls"),
    UseCase("QOS_E", "a video conference", "video conferencing"),
    UseCase("QOS_E", "a VoIP call", "VoIP"),
    UseCase("QOS_E", "a VR session", "VR"),
    UseCase("QOS_E", "an AR headset session", "AR"),
    UseCase("QOS_E", "remote control of a drone", "drone remote control"),
    UseCase("QOS_E", "remote driving of a vehicle", "remote driving"),
    UseCase("QOS_E", "teleoperation of a robot arm", "robot teleoperation"),
    UseCase("QOS_E", "a telehealth consultation", "telehealth"),
    UseCase("QOS_E", "a doctor's appointment over video", "video doctor visits"),
    # QOS_L: the largest throughput.
    UseCase("QOS_L", "4K video streaming", "4K streaming"),
    UseCase("QOS_L", "an 8K live stream", "8K streaming"),
    UseCase("QOS_L", "UHD video streaming", "UHD streaming"),
    UseCase("QOS_L", "a live broadcast uplink from the stadium", "live broadcast uplink"),
    UseCase("QOS_L", "a live TV uplink from an outside-broadcast van", "OB van uplink"),
    UseCase("QOS_L", "a large backup upload", "big backups"),
    UseCase("QOS_L", "an upload of 200 GB of raw footage", "raw footage upload"),
    UseCase("QOS_L", "a bulk upload of large files", "bulk uploads"),
    UseCase("QOS_L", "a 4K camera feed to the cloud", "4K camera feed"),
    UseCase("QOS_L", "a huge dataset transfer", "large file transfers"),
    # QOS_M: HD video.
    UseCase("QOS_M", "HD video streaming", "HD streaming"),
    UseCase("QOS_M", "an HD movie stream", "HD movies"),
    UseCase("QOS_M", "a 1080p video stream", "1080p video"),
    UseCase("QOS_M", "HD security camera uploads", "HD CCTV upload"),
    UseCase("QOS_M", "an HD dashcam upload", "HD dashcam upload"),
    UseCase("QOS_M", "a football match streamed in HD", "HD sports streaming"),
    UseCase("QOS_M", "HD video on demand", "HD VOD"),
    UseCase("QOS_M", "a Full HD camera feed", "Full HD camera feed"),
    # QOS_S: low throughput.
    UseCase("QOS_S", "music streaming", "music streaming"),
    UseCase("QOS_S", "a podcast stream", "podcasts"),
    UseCase("QOS_S", "internet radio", "internet radio"),
    UseCase("QOS_S", "audio streaming", "audio streaming"),
    UseCase("QOS_S", "IoT telemetry", "IoT telemetry"),
    UseCase("QOS_S", "a GPS tracker", "GPS tracking"),
    UseCase("QOS_S", "smart meter readings", "smart metering"),
    UseCase("QOS_S", "sensor data uploads", "sensor data"),
    UseCase("QOS_S", "an asset tracker", "asset tracking"),
    UseCase("QOS_S", "a weather station's reports", "weather station telemetry"),
)
"""Use cases by profile, each with a prose and a bare wording."""

_PROFILE_WORDS = {"QOS_S": "small", "QOS_M": "medium", "QOS_L": "large"}

_NUMBER_WORDS = {
    1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 8: "eight", 10: "ten",
    12: "twelve", 15: "fifteen", 20: "twenty", 30: "thirty", 45: "forty-five",
}  # fmt: skip


@dataclass(frozen=True)
class DurationWordings:
    """Ways to say one duration.

    Attributes:
        nouns: Noun phrases ("2 hours", "2h", "two hours") for field-style requests.
        adverbials: Phrases that follow a verb ("for 2 hours", "for the next 2 hours", "all day").
        seconds: The rarer noun phrases in seconds ("7200 seconds", "7200s").

    """

    nouns: tuple[str, ...]
    adverbials: tuple[str, ...]
    seconds: tuple[str, ...]


def _hour_nouns(hours: int) -> list[str]:
    if hours == 1:
        return ["1 hour", "an hour", "one hour", "60 minutes", "1h", "60 min"]
    nouns = [f"{hours} hours", f"{hours} hrs", f"{hours}h"]
    if hours in _NUMBER_WORDS:
        nouns.append(f"{_NUMBER_WORDS[hours]} hours")
    if hours <= 3:
        nouns.append(f"{hours * 60} minutes")
    return nouns


def _minute_nouns(minutes: int) -> list[str]:
    hours, rest = divmod(minutes, 60)
    nouns = [f"{minutes} minutes", f"{minutes} min", f"{minutes} mins"]
    if minutes in _NUMBER_WORDS:
        nouns.append(f"{_NUMBER_WORDS[minutes]} minutes")
    special = {15: "a quarter of an hour", 30: "half an hour", 45: "three quarters of an hour"}
    if minutes in special:
        nouns.append(special[minutes])
    if hours:
        hour_words = "1 hour" if hours == 1 else f"{hours} hours"
        nouns += [f"{hours}h{rest}", f"{hours}h {rest}m", f"{hour_words} {rest} minutes"]
        if rest == 30:
            half = "an hour and a half" if hours == 1 else f"{hours} and a half hours"
            nouns += [f"{hours}.5 hours", half]
    return nouns


def duration_wordings(seconds: int) -> DurationWordings:
    """List the wordings the generator may use for a duration.

    Each wording names its length unambiguously (no "a couple of hours", no "until tonight"), so
    the answer follows from the text alone.

    Args:
        seconds: Session length, 1..86400.

    Returns:
        The wordings.

    """
    by_seconds = (f"{seconds} seconds", f"{seconds} s", f"{seconds}s", f"{seconds} sec")
    if seconds == 86400:
        nouns = ["24 hours", "24h", "a day", "a full day", "one day", "24 hrs"]
        extra = ["all day", "for the whole day", "for the next 24 hours"]
    elif seconds % 3600 == 0:
        hours = seconds // 3600
        nouns = _hour_nouns(hours)
        unit = "hour" if hours == 1 else "hours"
        extra = [f"for the next {hours} {unit}", f"over the next {hours} {unit}"]
        if hours > 1:
            extra.append(f"for the next {hours} hrs")
    elif seconds % 60 == 0:
        nouns = _minute_nouns(seconds // 60)
        extra = [f"for the next {seconds // 60} minutes"]
    else:
        nouns = list(by_seconds[:1])
        extra = []
    adverbials = tuple([f"for {noun}" for noun in nouns] + extra)
    return DurationWordings(tuple(nouns), adverbials, by_seconds)


def render_duration(seconds: int | None, rng: random.Random) -> tuple[str, str]:
    """Pick a wording for a duration in both registers.

    Args:
        seconds: The length, or ``None`` when the request states none.
        rng: The random source.

    Returns:
        ``(adverbial, noun)``, both empty strings when ``seconds`` is ``None``.

    """
    if seconds is None:
        return "", ""
    wordings = duration_wordings(seconds)
    if rng.random() < 0.05:
        noun = rng.choice(wordings.seconds)
        return f"for {noun}", noun
    return rng.choice(wordings.adverbials), rng.choice(wordings.nouns)


# --- device --------------------------------------------------------------------------------

_DEVICE_NOUNS: tuple[str, ...] = (
    "my phone", "the phone", "the device", "my device", "the handset", "our tablet",
    "the laptop", "the UE", "the terminal", "my mobile", "the user's phone", "the customer's device",
)  # fmt: skip


def _short_ids(device: DeviceSpec, rng: random.Random) -> list[str]:
    """Label each identifier by kind ("IP 203.0.113.7"), for devices that give several."""
    ids = []
    if device.ipv4 is not None:
        ids.append(rng.choice(("IP {}", "IPv4 {}", "address {}")).format(device.ipv4))
    if device.ipv6 is not None:
        ids.append(rng.choice(("IPv6 {}", "v6 address {}")).format(device.ipv6))
    if device.phone is not None:
        ids.append(rng.choice(("number {}", "phone {}", "MSISDN {}")).format(device.phone))
    if device.nai is not None:
        ids.append(rng.choice(("NAI {}", "id {}", "network id {}")).format(device.nai))
    return ids


def _ipv4_prose(device: DeviceSpec, noun: str, rng: random.Random) -> str:
    x, q, p = device.ipv4, device.private_ipv4, device.public_port
    if q is None and p is None:
        forms = ("{n} at {x}", "{n} ({x})", "{n} with IP {x}", "{n} on {x}", "{n} {x}")
    elif q is None:
        forms = (
            "{n} at {x}:{p}",
            "{n} at {x} (public port {p})",
            "{n} seen as {x}, port {p} after NAT",
            "{n} with public address {x} and public port {p}",
        )
    elif p is None:
        forms = (
            "{n} at {x} (private address {q})",
            "{n} with public IP {x} and private IP {q}",
            "{n} behind NAT, public {x}, private {q}",
        )
    else:
        forms = (
            "{n} with public IP {x}, public port {p} and private IP {q}",
            "{n} at {x}:{p} (private {q})",
        )
    return rng.choice(forms).format(n=noun, x=x, p=p, q=q)


def device_prose(device: DeviceSpec, rng: random.Random) -> str:
    """Say which device, as a noun phrase ("my phone at 203.0.113.7").

    Args:
        device: The identifiers.
        rng: The random source.

    Returns:
        The phrase.

    """
    noun = rng.choice(_DEVICE_NOUNS)
    ids = _short_ids(device, rng)
    if len(ids) > 1:
        return rng.choice(("{n} ({a}, {b})", "{n} with {a} and {b}")).format(n=noun, a=ids[0], b=ids[1])
    if device.ipv4 is not None:
        return _ipv4_prose(device, noun, rng)
    if device.ipv6 is not None:
        forms = ("{n} at {v}", "{n} with IPv6 {v}", "{n} ({v})")
        return rng.choice(forms).format(n=noun, v=device.ipv6)
    if device.phone is not None:
        forms = ("{n} with number {v}", "the subscriber {v}", "{n} (MSISDN {v})", "the line {v}")
        return rng.choice(forms).format(n=noun, v=device.phone)
    forms = ("{n} identified as {v}", "the subscriber {v}", "{n} ({v})", "user {v}")
    return rng.choice(forms).format(n=noun, v=device.nai)


def device_field(device: DeviceSpec, rng: random.Random) -> str:
    """Say which device as a bare value ("203.0.113.7:40123", "+44 7700 900123").

    Args:
        device: The identifiers.
        rng: The random source.

    Returns:
        The value text.

    """
    ids = _short_ids(device, rng)
    if len(ids) > 1:
        return rng.choice(("{a} & {b}", "{a} / {b}", "{a} ({b})")).format(a=ids[0], b=ids[1])
    x, q, p = device.ipv4, device.private_ipv4, device.public_port
    if x is not None and q is None and p is None:
        return x
    if x is not None and q is None:
        return rng.choice(("{x}:{p}", "{x} (public port {p})")).format(x=x, p=p)
    if x is not None and p is None:
        return rng.choice(("{x} (private {q})", "public {x} private {q}")).format(x=x, q=q)
    if x is not None:
        return f"{x}:{p} (private {q})"
    if device.ipv6 is not None:
        return rng.choice(("{}", "IPv6 {}")).format(device.ipv6)
    if device.phone is not None:
        return rng.choice(("{}", "tel {}", "phone {}")).format(device.phone)
    return rng.choice(("{}", "NAI {}")).format(device.nai)


# --- server, purpose -----------------------------------------------------------------------


def server_prose(server: str, rng: random.Random) -> str:
    """Say which application server, as a noun phrase.

    Args:
        server: The address, optionally ``address/mask``.
        rng: The random source.

    Returns:
        The phrase.

    """
    if "/" in server:
        forms = ("the servers in {}", "the {} subnet", "server range {}", "our backend network {}")
    else:
        forms = ("the server at {}", "server {}", "our backend {}", "the app server {}", "host {}")
    return rng.choice(forms).format(server)


def profile_names(profile: str) -> tuple[str, str, str]:
    """``(code, letter, word)`` for a profile, e.g. ``("QOS_M", "M", "medium")``."""
    letter = profile.removeprefix("QOS_")
    return profile, letter, _PROFILE_WORDS.get(profile, profile)


def purpose_prose(spec: RequestSpec, rng: random.Random) -> str:
    """Say what the session is for, with any explicitly requested profile, as a noun phrase.

    Args:
        spec: The request.
        rng: The random source.

    Returns:
        e.g. ``"a cloud gaming session (use QOS_M)"``.

    """
    if spec.explicit_profile is None:
        return spec.use_case.prose  # type: ignore[union-attr]
    code, letter, word = profile_names(spec.explicit_profile)
    named = "{c}" if word == code else "the {w} profile"
    if spec.use_case is None:
        forms = ("a {c} session", "a session with profile {c}", f"a QoD session on {named}")
        return rng.choice(forms).format(c=code, w=word)
    forms = (" with profile {c}", " (use {c})", f" on {named}", " using {c}", " (profile {l})")
    return spec.use_case.prose + rng.choice(forms).format(c=code, l=letter, w=word)


def task_field(spec: RequestSpec, rng: random.Random) -> str:
    """Say what the session is for, with any explicit profile, tersely ("cloud gaming (QOS_M)").

    Args:
        spec: The request.
        rng: The random source.

    Returns:
        The text.

    """
    if spec.explicit_profile is None:
        return spec.use_case.bare  # type: ignore[union-attr]
    code, letter, word = profile_names(spec.explicit_profile)
    named = "{c} profile" if word == code else "{w} profile"
    if spec.use_case is None:
        return rng.choice(("{c}", "profile {c}", named, "profile {l}")).format(c=code, l=letter, w=word)
    forms = ("{u} ({c})", "{u}, profile {c}", "{u}, " + named, "{u} but use {c}")
    return rng.choice(forms).format(u=spec.use_case.bare, c=code, w=word)


def profile_field(profile: str | None, rng: random.Random) -> str:
    """Name an explicit profile as a field value ("QOS_M", "M", "medium"); empty when none.

    Args:
        profile: The explicit profile or ``None``.
        rng: The random source.

    Returns:
        The text.

    """
    if profile is None:
        return ""
    return rng.choice(tuple(dict.fromkeys(profile_names(profile))))


# --- extras: ports and webhook -------------------------------------------------------------


@dataclass(frozen=True)
class Extra:
    """One optional part of a request, ready to be labelled by a template's extras style.

    Attributes:
        kind: ``device_ports``, ``server_ports``, ``webhook`` or ``token``.
        value: The value text.
        plural: Whether a label should be plural ("ports" rather than "port").

    """

    kind: str
    value: str
    plural: bool = False


def ports_text(spec: PortSpec, rng: random.Random, prose: bool) -> str:
    """Say a set of ports and ranges ("5060 and 10000-10100" or "5060,10000-10100").

    Args:
        spec: The ports.
        rng: The random source.
        prose: Whether to join like a sentence rather than a list.

    Returns:
        The text.

    """
    dash = rng.choice(("{}-{}", "{} to {}")) if prose else "{}-{}"
    parts = [str(p) for p in spec.ports] + [dash.format(low, high) for low, high in spec.ranges]
    if len(parts) == 1:
        return parts[0]
    if prose:
        return ", ".join(parts[:-1]) + rng.choice((" and ", ", ")) + parts[-1]
    return rng.choice((",", ", ")).join(parts)


def _is_plural(spec: PortSpec) -> bool:
    return bool(spec.ranges) or len(spec.ports) > 1


def extras(spec: RequestSpec, rng: random.Random, prose: bool) -> list[Extra]:
    """List the optional parts of a request (ports, webhook URL, token) in a random order.

    Args:
        spec: The request.
        rng: The random source.
        prose: Whether port lists should read like a sentence.

    Returns:
        The parts; the token, when present, directly follows the webhook URL.

    """
    groups: list[list[Extra]] = []
    if spec.device_ports is not None:
        text = ports_text(spec.device_ports, rng, prose)
        groups.append([Extra("device_ports", text, _is_plural(spec.device_ports))])
    if spec.server_ports is not None:
        text = ports_text(spec.server_ports, rng, prose)
        groups.append([Extra("server_ports", text, _is_plural(spec.server_ports))])
    if spec.webhook is not None:
        groups.append(_webhook_extras(spec.webhook))
    rng.shuffle(groups)
    return [extra for group in groups for extra in group]


def _webhook_extras(webhook: WebhookSpec) -> list[Extra]:
    found = [Extra("webhook", webhook.url)]
    if webhook.token is not None:
        found.append(Extra("token", webhook.token))
    return found
