"""Request templates: sentence frames, in training and held-out evaluation sets.

A frame is text with slots (``{device}``, ``{server_addr}``, ...) and optional sections in square
brackets, dropped when a slot inside them is empty (``"[ {duration}]"`` vanishes when the request
states no duration). The ports and webhook parts follow the frame, written in the frame's
*extras style* (sentences, ``, label value``, ``key=value``, bullets, ...).

Slots: ``device``/``device_id`` (prose/field), ``server``/``server_addr``, ``purpose``/``task``
(use case plus any explicit profile), ``use`` and ``profile`` (separately, both optional),
``duration``/``length`` (adverbial/noun, optional).

The evaluation frames never occur in training, so the evaluation measures generalisation to new
phrasings rather than recall of seen ones.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from qod_lightning.data.generator import phrasing
from qod_lightning.data.generator.spec import RequestSpec


@dataclass(frozen=True)
class Template:
    """One phrasing of a request.

    Attributes:
        name: Unique identifier.
        frame: Text with ``{slot}`` fields and ``[optional]`` sections.
        extras: Key of :data:`EXTRAS_STYLES`, or ``"prose"`` for whole sentences.
        lower: Lowercase the whole request (casual typing); every value is lowercase already.

    """

    name: str
    frame: str
    extras: str = "prose"
    lower: bool = False


@dataclass(frozen=True)
class ExtrasStyle:
    """How a template writes the optional parts after its frame.

    Attributes:
        prefix: Text before each part.
        sep: Text between label and value.
        suffix: Text after each part.
        keys: Use snake_case keys ("device_ports") rather than words ("device ports").
        capital: Capitalise the label.

    """

    prefix: str
    sep: str
    suffix: str = ""
    keys: bool = False
    capital: bool = False


EXTRAS_STYLES: dict[str, ExtrasStyle] = {
    "terse": ExtrasStyle(", ", " "),
    "pipe": ExtrasStyle(" | ", " "),
    "kv": ExtrasStyle(" ", "=", keys=True),
    "kv_comma": ExtrasStyle(", ", "=", keys=True),
    "colon_semi": ExtrasStyle(" ", ": ", suffix=";"),
    "semi": ExtrasStyle("; ", " "),
    "bullet": ExtrasStyle("\n- ", ": "),
    "star": ExtrasStyle("\n* ", " "),
    "lines": ExtrasStyle("\n", ": ", capital=True),
    "arrow": ExtrasStyle("\n", " -> "),
    "slash": ExtrasStyle(" / ", " "),
    "dash": ExtrasStyle(" -- ", " "),
    "comma_colon": ExtrasStyle(", ", ": "),
}

_WORD_LABELS: dict[str, tuple[str, ...]] = {
    "device_ports": ("device port{s}", "client port{s}", "source port{s}", "UE port{s}"),
    "server_ports": ("server port{s}", "app server port{s}", "destination port{s}", "dst port{s}"),
    "webhook": ("webhook", "callback", "notify url", "notification URL"),
    "token": ("token", "auth token", "webhook token", "bearer"),
}
_KEY_LABELS: dict[str, tuple[str, ...]] = {
    "device_ports": ("device_ports", "dev_ports", "ue_ports"),
    "server_ports": ("server_ports", "as_ports", "dst_ports"),
    "webhook": ("webhook", "callback", "notify_url"),
    "token": ("token", "auth_token", "webhook_token"),
}
_SENTENCES: dict[str, tuple[str, ...]] = {
    "device_ports": (
        "Device port{s}: {v}.",
        "Only traffic on device port{s} {v}.",
        "On the device side it uses port{s} {v}.",
        "Source port{s} on the device: {v}.",
    ),
    "server_ports": (
        "Server port{s}: {v}.",
        "The server listens on port{s} {v}.",
        "Destination port{s} {v}.",
        "Application server port{s} {v}.",
    ),
    "webhook": (
        "Send notifications to {v}{t}.",
        "Callback URL: {v}{t}.",
        "Notify {v} about status changes{t}.",
        "Webhook is {v}{t}.",
    ),
}
_TOKEN_CLAUSES: tuple[str, ...] = (
    ", auth token {}",
    " (token {})",
    " with bearer token {}",
    ", use token {} for auth",
)


def _sentences(items: list[phrasing.Extra], rng: random.Random) -> str:
    tokens = [item.value for item in items if item.kind == "token"]
    token = rng.choice(_TOKEN_CLAUSES).format(tokens[0]) if tokens else ""
    out = []
    for item in items:
        if item.kind == "token":
            continue
        form = rng.choice(_SENTENCES[item.kind])
        out.append(" " + form.format(s="s" if item.plural else "", v=item.value, t=token))
    return "".join(out)


def render_extras(items: list[phrasing.Extra], style_name: str, rng: random.Random) -> str:
    """Write the optional parts of a request in a template's extras style.

    Args:
        items: The parts, from :func:`~qod_lightning.data.generator.phrasing.extras`.
        style_name: ``"prose"`` or a key of :data:`EXTRAS_STYLES`.
        rng: The random source.

    Returns:
        Text to append to the frame (empty when there are no parts).

    """
    if style_name == "prose":
        return _sentences(items, rng)
    style = EXTRAS_STYLES[style_name]
    out = []
    for item in items:
        label = rng.choice((_KEY_LABELS if style.keys else _WORD_LABELS)[item.kind])
        label = label.format(s="s" if item.plural else "")
        if style.capital:
            label = label[:1].upper() + label[1:]
        out.append(f"{style.prefix}{label}{style.sep}{item.value}{style.suffix}")
    return "".join(out)


def _t(name: str, frame: str, extras: str = "prose", lower: bool = False) -> Template:
    return Template(name, frame, extras, lower)


TRAIN_TEMPLATES: tuple[Template, ...] = (
    # terse
    _t("need_terse", "Need {task} session, device {device_id}, server {server_addr}[, {length}]", "terse"),
    _t("pipe", "{task} | {device_id} -> {server_addr}[ | {length}]", "pipe"),
    _t("qod_request", "QoD request: {device_id} to {server_addr}, {task}[, {length}]", "terse"),
    _t("arrow_colon", "{device_id} → {server_addr}: {task}[, {length}]", "terse"),
    _t("qos_for", "qos for {device_id} -> {server_addr}, {task}[, {length}]", "terse", lower=True),
    _t("server_first", "Server {server_addr}, device {device_id}: {task}[, {length}]", "terse"),
    _t("length_of", "[{length} of ]{task} for {device_id} against {server_addr}", "terse"),
    _t("needs_qod", "{device_id} needs QoD for {task} with {server_addr}[ for {length}]", "terse"),
    _t("json_please", "JSON please: device {device_id}, app server {server_addr}, {task}[, {length}]", "terse"),
    # key=value and fields
    _t(
        "kv",
        "device={device_id} server={server_addr}[ use={use}][ profile={profile}][ duration={length}]",
        "kv",
    ),
    _t(
        "colon_semi",
        "UE: {device_id}; app server: {server_addr};[ use case: {use};][ profile: {profile};][ duration: {length};]",
        "colon_semi",
    ),
    _t("ultra_terse", "dev {device_id} srv {server_addr}[ {use}][ {profile}][ {length}]", "slash", lower=True),
    _t(
        "purpose_fields",
        "Requesting QoD. Purpose: {task}. Device: {device_id}. Server: {server_addr}.[ Duration: {length}.]",
    ),
    # bullets and lines
    _t(
        "bullets",
        "Create a QoD session:\n- device: {device_id}\n- server: {server_addr}[\n- use case: {use}]"
        "[\n- profile: {profile}][\n- duration: {length}]",
        "bullet",
    ),
    _t(
        "lines",
        "Device: {device_id}\nServer: {server_addr}[\nUse case: {use}][\nProfile: {profile}][\nDuration: {length}]",
        "lines",
    ),
    _t("stars", "QoD please\n* {device_id}\n* server {server_addr}\n* {task}[\n* {length}]", "star"),
    # chatty
    _t(
        "hi_about_to",
        "Hi! I'm about to start {purpose} on {device}, and the other end is {server}. "
        "Can you boost the connection[ {duration}]?",
    ),
    _t("hey_could_you", "Hey, could you set up {purpose} between {device} and {server}[ {duration}]? Thanks!"),
    _t(
        "stable_connection",
        "I need a stable connection for {purpose}. It runs on {device} and talks to {server}.[ Keep it up {duration}.]",
    ),
    _t(
        "running_from", "We're running {purpose} from {device} to {server}[ {duration}], please prioritise the traffic."
    ),
    _t(
        "good_morning",
        "Good morning, we have {purpose} coming up on {device}. The traffic goes to {server}.[ We need it {duration}.]",
    ),
    _t(
        "make_it_smooth",
        "We have {purpose} planned on {device}, connecting to {server}[, {duration}]. Can you make it smooth?",
    ),
    _t(
        "field_engineers",
        "Our field team uses {device} to reach {server}. Please prioritise it for {purpose}[ {duration}].",
    ),
    _t("traffic_is", "Traffic from {device} to {server} is {purpose}. Please apply QoD[ {duration}]."),
    # imperative
    _t(
        "create_for",
        "Please create a quality-on-demand session for {purpose} between {device} and {server}[ {duration}].",
    ),
    _t("create_qod", "Create a QoD session for {purpose} between {device} and {server}[ {duration}]."),
    _t("set_up_from", "Set up {purpose} from {device} to {server}[ {duration}]."),
    _t("prioritise_between", "Prioritise traffic between {device} and {server} for {purpose}[ {duration}]."),
    _t("boost_towards", "Boost {device} towards {server}[ {duration}]; it's for {purpose}."),
    _t("reserve", "Reserve network quality for {purpose}: {device} ↔ {server}[, {duration}]."),
    _t("start_peer", "Start a QoD session on {device} (peer {server}) for {purpose}[ {duration}]."),
    _t("give_priority", "Give {device} priority to {server}[ {duration}] for {purpose}."),
    _t("open_session", "Open a session: {purpose}, {device}, {server}[, {duration}]."),
    _t("from_server", "From {server} to {device}: {purpose}[ {duration}]."),
    _t("purpose_first", "{purpose}[ {duration}] — {device} and {server}."),
    _t("for_purpose", "For {purpose}[ {duration}], please prioritise {device} when it talks to {server}."),
    # questions
    _t("can_i_get", "Can I get {purpose} prioritised for {device} talking to {server}[ {duration}]?"),
    _t(
        "better_connection",
        "Could you give {device} a better connection to {server}[ {duration}]? We're doing {purpose}.",
    ),
    _t(
        "is_it_possible",
        "Is it possible to guarantee quality for {purpose} between {device} and {server}[ {duration}]?",
    ),
    _t("what_would", "What would the QoD request be for {purpose} on {device} with {server}[ {duration}]?"),
    _t("any_chance", "Any chance of a QoS boost for {device}? It's {purpose} against {server}[, {duration}]."),
    # lowercase, typos
    _t("pls_setup", "pls setup {purpose} for {device} to {server}[ {duration}] thx.", lower=True),
    _t("need_asap", "need qod asap: {task}, {device_id} -> {server_addr}[, {length}]", "terse", lower=True),
    _t("can_u", "hi can u priortise {device} to {server}[ {duration}]? its for {purpose}.", lower=True),
    _t("plz", "{purpose} on {device} w/ {server}[ {duration}] plz!", lower=True),
    _t("sesion", "setup qos sesion {device_id} and {server_addr} for {task}[ for {length}]", "terse", lower=True),
    _t("yo", "yo, {task} on {device_id}, server {server_addr}[, {length}]", "terse", lower=True),
)
"""Frames the model trains on (SFT and preference prompts)."""

EVAL_TEMPLATES: tuple[Template, ...] = (
    _t("ev_priority_semi", "Requesting priority: {task}; device {device_id}; server {server_addr}[; {length}]", "semi"),
    _t(
        "ev_hello_team",
        "Hello team, {device} will be used for {purpose} with {server}[ {duration}]. Please arrange QoD.",
    ),
    _t(
        "ev_kindly",
        "Kindly enable enhanced quality for {purpose} on {device}, destination {server_addr}[, {duration}].",
    ),
    _t("ev_reverse_pipe", "{server_addr} <- {device_id} | {task}[ | {length}]", "pipe"),
    _t("ev_slashes", "Device {device_id} / peer {server_addr} / {task}[ / {length}]", "slash"),
    _t(
        "ev_lock_in",
        "Would it be possible to lock in good quality for {purpose}[ {duration}]? "
        "The device is {device_id} and the server is {server_addr}.",
    ),
    _t(
        "ev_arrow_lines",
        "session request\ndevice -> {device_id}\nserver -> {server_addr}[\nuse -> {use}]"
        "[\nprofile -> {profile}][\ntime -> {length}]",
        "arrow",
    ),
    _t("ev_smoothly", "I'd like {purpose} to run smoothly between {device} and {server}[ {duration}]."),
    _t("ev_quick_one", "Quick one: {device} ⇄ {server}, {purpose}[, {duration}]."),
    _t("ev_our_app", "Our app does {purpose}. Please give {device} QoD towards {server}[ {duration}]."),
    _t(
        "ev_better_network",
        "can we get better network for {purpose}? {device} -> {server}[ {duration}]",
        "terse",
        lower=True,
    ),
    _t(
        "ev_colon_commas",
        "device: {device_id}, server: {server_addr}[, use: {use}][, profile: {profile}][, duration: {length}]",
        "comma_colon",
    ),
    _t(
        "ev_remote_end",
        "Apply QoD to {device}. Remote end: {server_addr}. Reason: {task}.[ Length: {length}.]",
    ),
    _t("ev_wanted", "{task} session wanted[ for {length}] — {device_id} with {server_addr}", "terse"),
    _t(
        "ev_ensure",
        "Please ensure {device} has reliable connectivity to {server} while doing {purpose}[ {duration}].",
    ),
    _t("ev_boost_paren", "pls boost {device_id} ({task}) to {server_addr}[ for {length}]", "terse", lower=True),
    _t(
        "ev_target_source",
        "Target {server_addr}, source {device_id}, activity: {task}[, lasting {length}]",
        "comma_colon",
    ),
    _t("ev_far_end", "We'll be doing {purpose}[ {duration}] from {device}; the far end is {server}."),
    _t("ev_make_sure", "Make sure {purpose} works well for {device} (talking to {server})[ {duration}]."),
    _t("ev_set_up", "Set a QoD session up for {device} <-> {server}. Use: {task}.[ Time: {length}.]"),
    _t("ev_hoping", "Hoping you can prioritise {device} for {purpose} with {server}[ {duration}], cheers."),
    _t(
        "ev_config",
        "Config: dev={device_id}, as={server_addr}[, use={use}][, profile={profile}][, t={length}]",
        "kv_comma",
    ),
    _t("ev_happening", "There's {purpose} happening on {device}, please give it priority to {server}[ {duration}]."),
    _t(
        "ev_double_dash", "priority request -- {task} -- {device_id} to {server_addr}[ -- {length}]", "dash", lower=True
    ),
)
"""Held-out frames, used only for ``eval.jsonl``."""

_OPTIONAL = re.compile(r"\[([^\[\]]*)\]")
_SLOT = re.compile(r"\{(\w+)\}")
_CAPITALISED_OPENINGS = ("{purpose}", "{task}", "[{length}")


def fill_frame(frame: str, slots: dict[str, str]) -> str:
    """Fill a frame: drop each ``[...]`` section with an empty slot, then substitute the slots.

    Args:
        frame: The template text.
        slots: Slot name to text; an empty string marks a slot the request leaves out.

    Returns:
        The filled text.

    """

    def keep_or_drop(section: re.Match[str]) -> str:
        names = _SLOT.findall(section.group(1))
        return section.group(1) if all(slots[name] for name in names) else ""

    kept = _OPTIONAL.sub(keep_or_drop, frame)
    return _SLOT.sub(lambda slot: slots[slot.group(1)], kept)


def render_request(spec: RequestSpec, template: Template, rng: random.Random) -> str:
    """Write a request spec as user text in one template's phrasing.

    Args:
        spec: The request.
        template: The phrasing.
        rng: The random source for the word choices.

    Returns:
        The request text.

    """
    duration, length = phrasing.render_duration(spec.duration, rng)
    items = phrasing.extras(spec, rng, prose=template.extras == "prose")
    slots = {
        "device": phrasing.device_prose(spec.device, rng),
        "device_id": phrasing.device_field(spec.device, rng),
        "server": phrasing.server_prose(spec.server, rng),
        "server_addr": spec.server,
        "purpose": phrasing.purpose_prose(spec, rng),
        "task": phrasing.task_field(spec, rng),
        "use": spec.use_case.bare if spec.use_case is not None else "",
        "profile": phrasing.profile_field(spec.explicit_profile, rng),
        "duration": duration,
        "length": length,
    }
    text = fill_frame(template.frame, slots) + render_extras(items, template.extras, rng)
    if template.lower:
        return text.lower()  # values are lowercase by construction, so none changes
    if template.frame.startswith(_CAPITALISED_OPENINGS):
        return text[:1].upper() + text[1:]
    return text  # frames open with their own wording, or with a value that must stay as it is
