import json
import random
import re
from pathlib import Path

import pytest

from qod_lightning.data.generator import generate as gen
from qod_lightning.data.generator import rejected as rej
from qod_lightning.data.generator.phrasing import USE_CASES, duration_wordings
from qod_lightning.data.generator.spec import (
    DeviceSpec,
    PortSpec,
    RequestSpec,
    WebhookSpec,
    sample_duration,
    sample_spec,
)
from qod_lightning.data.generator.templates import EVAL_TEMPLATES, TRAIN_TEMPLATES, fill_frame, render_request
from qod_lightning.data.prompts import SYSTEM_PROMPT, dump_request
from qod_lightning.schema import DEFAULT_DURATION, QOS_PROFILES, TOP_LEVEL_KEYS
from qod_lightning.validation import validate_request

DATA = Path(__file__).resolve().parents[1] / "data"
FILES = {"sft": 50, "preferences": 30, "eval": 120}
GAMING = next(u for u in USE_CASES if u.bare == "online gaming")
DEVICE_KEYS = ("ipv4Address", "ipv6Address", "phoneNumber", "networkAccessIdentifier")
IPV4_KEYS = ("publicAddress", "privateAddress", "publicPort")


def _read(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def committed() -> dict[str, list[dict]]:
    return {name: _read(name) for name in FILES}


@pytest.fixture(scope="module")
def generated() -> dict[str, list[dict]]:
    return {
        "sft": gen.generate_sft(1000, seed=11),
        "preferences": gen.generate_preferences(500, seed=11),
        "eval": gen.generate_eval(500, seed=11),
    }


def _pairs(records: dict[str, list[dict]]) -> list[tuple[str, dict]]:
    """(request text, canonical body) for every record of every file."""
    return (
        [(r["input"], json.loads(r["response"])) for r in records["sft"]]
        + [(r["prompt"], json.loads(r["chosen"])) for r in records["preferences"]]
        + [(r["input"], r["expected"]) for r in records["eval"]]
    )


def _leaves(node, key=None):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, k)
    elif isinstance(node, list):
        for item in node:
            yield from _leaves(item, key)
    else:
        yield key, node


def _spec(**overrides) -> RequestSpec:
    fields = {"device": DeviceSpec(ipv4="203.0.113.75"), "server": "192.0.2.200", "use_case": GAMING}
    return RequestSpec(**{**fields, **overrides})


# --- the committed files ---------------------------------------------------------------------


def test_committed_files_have_the_default_sizes_and_exact_keys(committed):
    assert {name: len(records) for name, records in committed.items()} == FILES
    assert all(set(r) == {"instruction", "input", "response"} for r in committed["sft"])
    assert all(r["instruction"] == SYSTEM_PROMPT for r in committed["sft"])
    assert all(set(r) == {"prompt", "chosen", "rejected"} for r in committed["preferences"])
    assert all(set(r) == {"input", "expected"} for r in committed["eval"])


def test_committed_files_are_what_the_generator_writes_for_seed_0(tmp_path):
    assert gen.main(["--out-dir", str(tmp_path)]) == 0
    for name in FILES:
        assert (tmp_path / f"{name}.jsonl").read_bytes() == (DATA / f"{name}.jsonl").read_bytes()


# --- canonical answers -----------------------------------------------------------------------


@pytest.mark.parametrize("source", ["committed", "generated"])
def test_every_canonical_answer_is_valid_and_invents_nothing(source, request):
    for text, body in _pairs(request.getfixturevalue(source)):
        report = validate_request(body, text)
        assert report.valid, (text, report.errors)
        assert not report.hallucinated, (text, report.hallucinated_values)


@pytest.mark.parametrize("source", ["committed", "generated"])
def test_every_value_of_the_answer_occurs_literally_in_the_request(source, request):
    for text, body in _pairs(request.getfixturevalue(source)):
        squeezed = re.sub(r"[\s().-]", "", text)  # phone numbers may be written with separators
        for key, value in _leaves(body):
            if key in ("qosProfile", "duration"):
                continue
            shown = squeezed if key == "phoneNumber" else text
            assert str(value) in shown, (key, value, text)


def test_answers_are_compact_json_in_the_canonical_key_order(generated):
    for record in generated["sft"]:
        body = json.loads(record["response"])
        assert record["response"] == dump_request(body)
        assert list(body) == [k for k in TOP_LEVEL_KEYS if k in body]
        assert list(body["device"]) == [k for k in DEVICE_KEYS if k in body["device"]]
        ipv4 = body["device"].get("ipv4Address", {})
        assert list(ipv4) == [k for k in IPV4_KEYS if k in ipv4]


def test_phone_numbers_are_plus_and_digits_whatever_the_request_shows(generated):
    phones = [b["device"]["phoneNumber"] for _, b in _pairs(generated) if "phoneNumber" in b["device"]]
    assert phones
    assert all(re.fullmatch(r"\+\d{11,12}", p) for p in phones)


# --- translation rules -----------------------------------------------------------------------


def test_ipv4_alone_is_repeated_as_the_private_address():
    assert gen.canonical_request(_spec())["device"] == {
        "ipv4Address": {"publicAddress": "203.0.113.75", "privateAddress": "203.0.113.75"}
    }


@pytest.mark.parametrize(
    ("device", "expected"),
    [
        (DeviceSpec(ipv4="203.0.113.75", public_port=40123), {"publicAddress": "203.0.113.75", "publicPort": 40123}),
        (
            DeviceSpec(ipv4="203.0.113.75", private_ipv4="10.0.0.7"),
            {"publicAddress": "203.0.113.75", "privateAddress": "10.0.0.7"},
        ),
        (
            DeviceSpec(ipv4="203.0.113.75", private_ipv4="10.0.0.7", public_port=40123),
            {"publicAddress": "203.0.113.75", "privateAddress": "10.0.0.7", "publicPort": 40123},
        ),
    ],
)
def test_a_given_port_or_private_address_replaces_the_repeated_address(device, expected):
    body = gen.canonical_request(_spec(device=device))
    assert body["device"]["ipv4Address"] == expected
    assert list(body["device"]["ipv4Address"]) == list(expected)


def test_other_identifiers_and_optional_parts():
    spec = _spec(
        device=DeviceSpec(ipv6="2001:db8::7", phone="+44 7700 900123", nai="user1@example.com"),
        server="2001:db8:5::/64",
        device_ports=PortSpec(ports=(5060,)),
        server_ports=PortSpec(ports=(443,), ranges=((10000, 10100),)),
        webhook=WebhookSpec("https://hooks.example.com/qod/abc123", "c8974e592c2fa383d4a3960714"),
        duration=5400,
    )
    assert gen.canonical_request(spec) == {
        "device": {
            "ipv6Address": "2001:db8::7",
            "phoneNumber": "+447700900123",
            "networkAccessIdentifier": "user1@example.com",
        },
        "applicationServer": {"ipv6Address": "2001:db8:5::/64"},
        "devicePorts": {"ports": [5060]},
        "applicationServerPorts": {"ranges": [{"from": 10000, "to": 10100}], "ports": [443]},
        "qosProfile": "QOS_E",
        "webhook": {
            "notificationUrl": "https://hooks.example.com/qod/abc123",
            "notificationAuthToken": "c8974e592c2fa383d4a3960714",
        },
        "duration": 5400,
    }


@pytest.mark.parametrize("explicit", QOS_PROFILES)
def test_an_explicit_profile_beats_the_use_case(explicit):
    assert gen.canonical_request(_spec(explicit_profile=explicit))["qosProfile"] == explicit
    assert gen.canonical_request(_spec(use_case=None, explicit_profile=explicit))["qosProfile"] == explicit


def test_use_cases_cover_every_profile_with_many_wordings():
    for profile in QOS_PROFILES:
        assert sum(u.profile == profile for u in USE_CASES) >= 8
    assert len({u.prose for u in USE_CASES}) == len({u.bare for u in USE_CASES}) == len(USE_CASES)


def test_no_duration_means_the_default():
    assert gen.canonical_request(_spec())["duration"] == DEFAULT_DURATION == 86400


@pytest.mark.parametrize(
    ("wording", "seconds"),
    [
        ("2 hours", 7200),
        ("two hours", 7200),
        ("2h", 7200),
        ("120 minutes", 7200),
        ("90 min", 5400),
        ("1h30", 5400),
        ("1.5 hours", 5400),
        ("an hour and a half", 5400),
        ("half an hour", 1800),
        ("30 minutes", 1800),
        ("45 minutes", 2700),
        ("three quarters of an hour", 2700),
        ("a quarter of an hour", 900),
        ("an hour", 3600),
        ("for the next 3 hrs", 10800),
        ("over the next 4 hours", 14400),
        ("2h15", 8100),
        ("all day", 86400),
        ("a day", 86400),
        ("24 hours", 86400),
        ("7200 seconds", 7200),
        ("90 seconds", 90),
    ],
)
def test_duration_wordings(wording, seconds):
    wordings = duration_wordings(seconds)
    assert wording in wordings.nouns + wordings.adverbials + wordings.seconds


def test_each_duration_wording_names_one_length():
    rng = random.Random(0)
    lengths = {d for d in (sample_duration(rng) for _ in range(5000)) if d is not None}
    meaning: dict[str, int] = {}
    for seconds in sorted(lengths):
        assert 1 <= seconds <= 86400
        wordings = duration_wordings(seconds)
        for wording in wordings.nouns + wordings.adverbials + wordings.seconds:
            assert meaning.setdefault(wording, seconds) == seconds, wording


def test_the_request_text_states_the_duration_of_the_answer():
    for spec, text in gen.sample_examples(500, 5, "sft", TRAIN_TEMPLATES):
        if spec.duration is None:
            assert gen.canonical_request(spec)["duration"] == 86400
            continue
        wordings = duration_wordings(spec.duration)
        assert any(w.lower() in text.lower() for w in wordings.nouns + wordings.adverbials + wordings.seconds), text


def test_the_request_text_names_an_explicit_profile():
    words = {"QOS_S": "small", "QOS_M": "medium", "QOS_L": "large", "QOS_E": "qos_e"}
    seen = 0
    for spec, text in gen.sample_examples(1000, 6, "sft", TRAIN_TEMPLATES):
        if spec.explicit_profile is None:
            continue
        seen += 1
        letter = spec.explicit_profile[-1].lower()
        pattern = rf"qos_{letter}\b|profile\W+{letter}\b|{words[spec.explicit_profile]}"
        assert re.search(pattern, text.lower()), text
    assert seen > 50


# --- coverage --------------------------------------------------------------------------------


def _device_kinds(body: dict) -> set[str]:
    device = body["device"]
    kinds = {k for k in DEVICE_KEYS if k in device}
    ipv4 = device.get("ipv4Address")
    if ipv4 is not None:
        kinds.add("ipv4+port" if "publicPort" in ipv4 else "ipv4")
        if ipv4.get("privateAddress", ipv4["publicAddress"]) != ipv4["publicAddress"]:
            kinds.add("ipv4+private")
    if len(device) > 1:
        kinds.add("several identifiers")
    return kinds


def test_generated_data_covers_every_profile_device_kind_and_option(generated):
    bodies = [body for _, body in _pairs(generated)]
    assert {b["qosProfile"] for b in bodies} == set(QOS_PROFILES)
    kinds = set().union(*(_device_kinds(b) for b in bodies))
    assert kinds >= {*DEVICE_KEYS, "ipv4", "ipv4+port", "ipv4+private", "several identifiers"}
    servers = [next(iter(b["applicationServer"].items())) for b in bodies]
    for kind in ("ipv4Address", "ipv6Address"):
        assert any(k == kind and "/" in v for k, v in servers)
        assert any(k == kind and "/" not in v for k, v in servers)
    for key in ("devicePorts", "applicationServerPorts"):
        assert any("ports" in b.get(key, {}) for b in bodies)
        assert any("ranges" in b.get(key, {}) for b in bodies)
    webhooks = [b["webhook"] for b in bodies if "webhook" in b]
    assert any("notificationAuthToken" in w for w in webhooks)
    assert any("notificationAuthToken" not in w for w in webhooks)
    # Mostly simple requests, with a fair share of optional parts.
    optional = sum(any(k in b for k in ("devicePorts", "applicationServerPorts", "webhook")) for b in bodies)
    assert 0.2 < optional / len(bodies) < 0.55
    assert 0.1 < sum(b["duration"] == 86400 for b in bodies) / len(bodies) < 0.4


def test_committed_data_covers_every_profile(committed):
    assert {json.loads(r["response"])["qosProfile"] for r in committed["sft"]} == set(QOS_PROFILES)
    assert {r["expected"]["qosProfile"] for r in committed["eval"]} == set(QOS_PROFILES)


@pytest.mark.parametrize("template", TRAIN_TEMPLATES + EVAL_TEMPLATES, ids=lambda t: t.name)
def test_every_template_renders_requests_whose_answer_is_valid_and_literal(template):
    rng = random.Random(template.name)
    for _ in range(40):
        spec = sample_spec(rng, USE_CASES)
        text = render_request(spec, template, rng)
        report = validate_request(gen.canonical_request(spec), text)
        assert report.valid and not report.hallucinated, (text, report.hallucinated_values)


# --- templates -------------------------------------------------------------------------------


def test_template_counts_and_unique_names():
    assert len(TRAIN_TEMPLATES) >= 40
    assert len(EVAL_TEMPLATES) >= 20
    names = [t.name for t in TRAIN_TEMPLATES + EVAL_TEMPLATES]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("template", TRAIN_TEMPLATES + EVAL_TEMPLATES, ids=lambda t: t.name)
def test_every_template_states_device_server_purpose_and_optional_duration(template):
    frame = template.frame
    assert "{device}" in frame or "{device_id}" in frame
    assert "{server}" in frame or "{server_addr}" in frame
    # Either the combined use case and profile, or both separately in optional sections.
    separate = all(re.search(rf"\[[^\]]*\{{{slot}\}}[^\]]*\]", frame) for slot in ("use", "profile"))
    assert "{purpose}" in frame or "{task}" in frame or separate
    assert re.search(r"\[[^\]]*\{(duration|length)\}[^\]]*\]", frame), "the duration must be optional"
    # Sentence-style extras follow a finished sentence; list-style ones follow a bare value.
    empty = dict.fromkeys(("use", "profile", "duration", "length"), "")
    bare = fill_frame(frame, {**dict.fromkeys(re.findall(r"\{(\w+)\}", frame), "x"), **empty})
    assert bare.rstrip().endswith((".", "?", "!")) == (template.extras == "prose"), bare


def test_eval_templates_are_disjoint_from_training_ones():
    def skeleton(frame: str) -> str:
        return re.sub(r"\{\w+\}", "{}", frame).lower()

    train = {skeleton(t.frame) for t in TRAIN_TEMPLATES}
    assert not train & {skeleton(t.frame) for t in EVAL_TEMPLATES}
    assert not {t.name for t in TRAIN_TEMPLATES} & {t.name for t in EVAL_TEMPLATES}


def test_no_eval_input_occurs_in_training(committed, generated):
    training = {r["input"] for r in committed["sft"] + generated["sft"]}
    training |= {r["prompt"] for r in committed["preferences"] + generated["preferences"]}
    evaluation = {r["input"] for r in committed["eval"] + generated["eval"]}
    assert not training & evaluation


# --- rejected answers ------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["committed", "generated"])
def test_every_rejected_answer_fails_validation_or_differs(source, request):
    for record in request.getfixturevalue(source)["preferences"]:
        report = validate_request(record["rejected"], record["prompt"])
        fails = not report.valid or report.hallucinated
        wrapped = not record["rejected"].startswith("{")  # the object only was asked for
        assert record["rejected"] != record["chosen"]
        assert fails or report.parsed != json.loads(record["chosen"]) or wrapped, record["rejected"]


def _failing(mode, samples):
    """Yield (report, rejected text, canonical body) for each sample the mode applies to."""
    rng = random.Random(3)
    for spec, text in samples:
        body = gen.canonical_request(spec)
        wrong = mode(body, text, rng)
        if wrong is not None:
            yield validate_request(wrong, text), wrong, body


@pytest.fixture(scope="module")
def samples():
    return gen.sample_examples(300, 9, "preferences", TRAIN_TEMPLATES)


EXPECTED_FAILURE = {
    rej.invented_field: lambda r, w, b: not r.checks["no_hallucinated_fields"].passed,
    # A list where an object belongs counts as a field type error, a flattened object as nesting.
    rej.wrong_nesting: lambda r, w, b: not (r.checks["nesting"].passed and r.checks["field_types"].passed),
    rej.wrong_profile: lambda r, w, b: r.parsed["qosProfile"] != b["qosProfile"],
    rej.duration_as_text: lambda r, w, b: not r.checks["duration"].passed,
    rej.duration_wrong_unit: lambda r, w, b: r.valid and r.parsed["duration"] < b["duration"],
    rej.wrong_duration_value: lambda r, w, b: r.parsed["duration"] != b["duration"],
    rej.invented_address: lambda r, w, b: r.hallucinated_values,
    rej.invented_ports: lambda r, w, b: r.hallucinated_values,
    rej.missing_required: lambda r, w, b: not r.checks["required_fields"].passed,
    rej.ipv4_public_only: lambda r, w, b: not r.checks["required_fields"].passed,
    rej.truncated: lambda r, w, b: not r.valid,
    rej.prose_around: lambda r, w, b: r.parsed == b and not w.startswith("{"),
    rej.pretty_near_miss: lambda r, w, b: "\n  " in w and r.parsed != b,
}


@pytest.mark.parametrize("mode", rej.FAILURE_MODES, ids=lambda m: m.__name__)
def test_each_failure_mode_makes_its_mistake(mode, samples):
    results = list(_failing(mode, samples))
    assert len(results) > 20
    for report, wrong, body in results:
        assert EXPECTED_FAILURE[mode](report, wrong, body), wrong


def test_preferences_mix_the_failure_modes(generated):
    rejected = [r["rejected"] for r in generated["preferences"]]
    share = len(rejected) / 25  # each of the 13 modes is picked about len / 13 times
    assert sum(not r.startswith("{") for r in rejected) > share  # prose
    assert sum(r.startswith("{\n") for r in rejected) > share  # pretty-printed
    assert sum(json.loads(r["chosen"])["qosProfile"] not in r["rejected"] for r in generated["preferences"]) > share
    assert any('"ipv4Address":"' in r for r in rejected)  # flattened device address
    assert any('"bandwidth"' in r or '"latency"' in r or '"priority"' in r for r in rejected)


# --- determinism and the command line ------------------------------------------------------


def test_generation_is_deterministic_per_seed():
    assert gen.generate_sft(200, seed=4) == gen.generate_sft(200, seed=4)
    assert gen.generate_preferences(100, seed=4) == gen.generate_preferences(100, seed=4)
    assert gen.generate_eval(100, seed=4) == gen.generate_eval(100, seed=4)
    assert gen.generate_sft(50, seed=4) != gen.generate_sft(50, seed=5)


def test_the_splits_draw_different_requests():
    sft = {r["input"] for r in gen.generate_sft(300, seed=0)}
    preferences = {r["prompt"] for r in gen.generate_preferences(300, seed=0)}
    assert len(sft & preferences) < 5


def test_cli_writes_the_three_files(tmp_path):
    argv = ["--out-dir", str(tmp_path / "out"), "--num-sft", "7", "--num-preferences", "5", "--num-eval", "3"]
    assert gen.main([*argv, "--seed", "2", "--prefix", "small_"]) == 0
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["small_eval.jsonl", "small_preferences.jsonl", "small_sft.jsonl"]
    counts = {name: len((tmp_path / "out" / name).read_text(encoding="utf-8").splitlines()) for name in files}
    assert counts == {"small_eval.jsonl": 3, "small_preferences.jsonl": 5, "small_sft.jsonl": 7}
    lines = (tmp_path / "out" / "small_sft.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == gen.generate_sft(7, seed=2)


def test_cli_rejects_a_negative_count(tmp_path):
    with pytest.raises(SystemExit):
        gen.main(["--out-dir", str(tmp_path), "--num-sft", "-1"])


def test_write_jsonl_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "sft.jsonl"
    gen.write_jsonl(target, [{"a": "é"}])
    assert target.read_text(encoding="utf-8") == '{"a": "é"}\n'

    def broken():
        yield {"b": 1}
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        gen.write_jsonl(target, broken())
    assert target.read_text(encoding="utf-8") == '{"a": "é"}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["sft.jsonl"]


def test_use_case_is_needed_without_an_explicit_profile():
    with pytest.raises(ValueError, match="use case or an explicit profile"):
        gen.canonical_request(_spec(use_case=None))
