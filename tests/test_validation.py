import json
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qod_lightning.validation import CHECKS, validate_request, value_hallucinations

REQUEST = "Need gaming session, device 203.0.113.75, server 192.0.2.200, 2 hours"
GOOD = {
    "device": {"ipv4Address": {"publicAddress": "203.0.113.75", "privateAddress": "203.0.113.75"}},
    "applicationServer": {"ipv4Address": "192.0.2.200"},
    "qosProfile": "QOS_E",
    "duration": 7200,
}


def failed(output, request=None) -> set[str]:
    report = validate_request(output, request)
    return {name for name, check in report.checks.items() if not check.passed}


def with_(**changes):
    return {**GOOD, **changes}


def without(key):
    return {k: v for k, v in GOOD.items() if k != key}


# --- a good answer -------------------------------------------------------------------------


def test_a_good_answer_passes_all_seven_checks():
    report = validate_request(json.dumps(GOOD), REQUEST)
    assert tuple(report.checks) == CHECKS
    assert report.valid and report.parses and not report.hallucinated
    assert report.parsed == GOOD
    assert report.errors == []
    assert json.loads(json.dumps(report.to_dict()))["valid"] is True


def test_a_parsed_dict_is_accepted_as_is():
    assert validate_request(GOOD, REQUEST).valid


def test_a_full_answer_with_every_optional_part_passes():
    body = {
        "device": {
            "ipv4Address": {"publicAddress": "203.0.113.75", "privateAddress": "10.0.0.7", "publicPort": 40123},
            "ipv6Address": "2001:db8::7",
            "phoneNumber": "+447700900123",
            "networkAccessIdentifier": "user1@example.com",
        },
        "applicationServer": {"ipv6Address": "2001:db8:5::/64"},
        "devicePorts": {"ports": [5060]},
        "applicationServerPorts": {"ranges": [{"from": 10000, "to": 10100}], "ports": [443]},
        "qosProfile": "QOS_L",
        "webhook": {
            "notificationUrl": "https://hooks.example.com/qod/abc123",
            "notificationAuthToken": "c8974e592c2fa383d4a3960714",
        },
        "duration": 86400,
    }
    request = (
        "Device 203.0.113.75:40123 (private 10.0.0.7), IPv6 2001:db8::7, phone +44 7700 900123, NAI user1@example.com; "
        "servers 2001:db8:5::/64; device port 5060; server ports 10000-10100 and 443; 4K; all day; "
        "webhook https://hooks.example.com/qod/abc123 token c8974e592c2fa383d4a3960714"
    )
    report = validate_request(body, request)
    assert report.valid, report.errors
    assert not report.hallucinated, report.hallucinated_values


# --- the seven checks ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["", "no JSON here", "Sure! Here you go.", '{"device": {', "{'device': 1}", '["a", "list"]', '{"duration": NaN}'],
)
def test_json_syntax(text):
    report = validate_request(text, REQUEST)
    assert not report.parses and report.parsed is None
    assert not report.valid
    assert report.checks["json_syntax"].errors == ("no JSON object found",)
    # The other checks are marked as not run rather than passed.
    assert not any(check.passed for check in report.checks.values())
    assert report.hallucinated_values == ()


@pytest.mark.parametrize(
    "body",
    [
        without("qosProfile"),
        without("duration"),
        without("device"),
        without("applicationServer"),
        with_(device={}),
        with_(applicationServer={}),
        with_(device={"ipv4Address": {"publicAddress": "203.0.113.75"}}),
        with_(devicePorts={}),
        with_(devicePorts={"ranges": [{"from": 5000}]}),
        with_(webhook={"notificationAuthToken": "c8974e592c2fa383d4a3960714"}),
    ],
)
def test_required_fields(body):
    assert failed(body) == {"required_fields"}


@pytest.mark.parametrize(
    "body",
    [
        with_(device={"ipv4Address": {"publicAddress": "203.0.113.75", "publicPort": "40123"}}),
        with_(device={"ipv4Address": {"publicAddress": "203.0.113.75", "privateAddress": "10.0.0.256"}}),
        with_(device={"phoneNumber": "+44 7700 900123"}),
        with_(device={"networkAccessIdentifier": "not an identifier"}),
        with_(device={"ipv6Address": "2001:db8::zz"}),
        with_(applicationServer={"ipv4Address": "999.1.1.1"}),
        with_(applicationServer={"ipv4Address": "192.0.2.0/33"}),
        with_(applicationServer={"ipv6Address": "192.0.2.1"}),
        with_(devicePorts={"ports": [70000]}),
        with_(devicePorts={"ports": ["5060"]}),
        with_(devicePorts={"ports": [5060.0]}),  # an integer field wants an integer literal
        with_(device={"ipv4Address": {"publicAddress": "203.0.113.75", "publicPort": 40123.0}}),
        with_(webhook={"notificationUrl": "ftp://hooks.example.com/x"}),
        with_(webhook={"notificationUrl": "https://hooks.example.com/x", "notificationAuthToken": "short"}),
    ],
)
def test_field_types(body):
    assert failed(body) == {"field_types"}


@pytest.mark.parametrize(
    ("body", "path"),
    [
        (with_(bandwidth="100Mbps"), "$.bandwidth"),
        (with_(priority="high"), "$.priority"),
        (with_(device={**GOOD["device"], "imei": "490154203237518"}), "$.device.imei"),
        (with_(devicePorts={"ports": [5060], "protocol": "UDP"}), "$.devicePorts.protocol"),
        (with_(devicePorts={"ranges": [{"from": 1, "to": 2, "step": 1}]}), "$.devicePorts.ranges[0].step"),
    ],
)
def test_no_hallucinated_fields(body, path):
    report = validate_request(body)
    assert failed(body) == {"no_hallucinated_fields"}
    assert report.hallucinated_keys == (path,)
    assert report.hallucinated


def test_a_renamed_field_is_both_invented_and_missing():
    body = {("qos_profile" if k == "qosProfile" else k): v for k, v in GOOD.items()}
    assert failed(body) == {"no_hallucinated_fields", "required_fields"}


@pytest.mark.parametrize(
    "body",
    [
        with_(device={"ipv4Address": "203.0.113.75"}),
        with_(device="203.0.113.75"),
        with_(applicationServer="192.0.2.200"),
        with_(webhook="https://hooks.example.com/qod/abc123"),
    ],
)
def test_nesting_flattened_objects(body):
    assert failed(body) == {"nesting"}


def test_nesting_a_spec_key_at_the_wrong_place():
    body = with_(device={**GOOD["device"], "qosProfile": "QOS_E"})
    report = validate_request(body)
    assert failed(body) == {"nesting", "no_hallucinated_fields"}
    assert "'qosProfile' is not defined at this position" in report.checks["nesting"].errors[0]


@pytest.mark.parametrize("profile", ["QOS_HIGH", "QOS_LOW_LATENCY", "qos_e", "E", "", 5, None])
def test_qos_profile(profile):
    assert failed(with_(qosProfile=profile)) == {"qos_profile"}


@pytest.mark.parametrize("duration", [0, -1, 86401, "7200", "2 hours", 7200.5, 7200.0, True, None])
def test_duration(duration):
    assert failed(with_(duration=duration)) == {"duration"}


@pytest.mark.parametrize("duration", [1, 86400])
def test_duration_bounds_are_inclusive(duration):
    assert failed(with_(duration=duration)) == set()


def test_errors_name_their_check_and_path():
    report = validate_request(with_(duration="2 hours", qosProfile="QOS_HIGH"))
    assert any(e.startswith("duration: $.duration:") for e in report.errors)
    assert any(e.startswith("qos_profile: $.qosProfile:") for e in report.errors)


# --- value hallucination ---------------------------------------------------------------------


def test_an_invented_address_is_reported():
    body = with_(applicationServer={"ipv4Address": "198.51.100.7"})
    report = validate_request(body, REQUEST)
    assert report.valid and report.hallucinated
    assert report.hallucinated_values == ("address 198.51.100.7 (ipv4Address)",)
    assert not report.hallucinated_keys


def test_without_a_request_values_are_not_checked():
    assert validate_request(with_(applicationServer={"ipv4Address": "198.51.100.7"})).hallucinated_values == ()


@pytest.mark.parametrize(
    ("request_text", "answer"),
    [
        ("device 2001:0db8:0000::0001", "2001:db8::1"),
        ("device 2001:DB8::1", "2001:db8::1"),
        ("device 2001:db8::1", "2001:0db8:0:0:0:0:0:1"),
    ],
)
def test_ipv6_written_differently_is_the_same_address(request_text, answer):
    assert value_hallucinations({"device": {"ipv6Address": answer}}, request_text) == []


def test_a_network_must_match_address_and_mask():
    request = "servers in 2001:db8:5::/64 and 198.51.100.0/24"
    assert value_hallucinations({"applicationServer": {"ipv6Address": "2001:db8:5::/64"}}, request) == []
    assert value_hallucinations({"applicationServer": {"ipv4Address": "198.51.100.0/24"}}, request) == []
    assert value_hallucinations({"applicationServer": {"ipv6Address": "2001:db8:5::/48"}}, request)
    assert value_hallucinations({"applicationServer": {"ipv4Address": "198.51.100.0/25"}}, request)


@pytest.mark.parametrize(
    "request_text",
    [
        "call +44 7700 900123 now",
        "call +44-7700-900123 now",
        "call +447700900123 now",
        "phone +44 7700 900123 (2 hours)",  # the phone-like span runs on into the duration
        "call 0044 7700 900123 now",  # 00 for +
    ],
)
def test_a_phone_number_may_be_written_with_separators(request_text):
    assert value_hallucinations({"device": {"phoneNumber": "+447700900123"}}, request_text) == []


def test_an_invented_phone_number_is_reported():
    found = value_hallucinations({"device": {"phoneNumber": "+447700900999"}}, "call +44 7700 900123")
    assert found == ["phone number +447700900999"]


@pytest.mark.parametrize("answer", ["+4477009001", "+44770090012", "+77009001"])
def test_a_phone_number_cut_inside_a_digit_group_is_not_the_requested_one(answer):
    request = "phone +44 7700 900123 (2 hours)"
    assert value_hallucinations({"device": {"phoneNumber": answer}}, request) == [f"phone number {answer}"]


@pytest.mark.parametrize(
    ("request_text", "body", "found"),
    [
        # A shortened URL or identifier is not the one the user gave.
        (
            "notify url https://api.example.org/v1/notifications/kpff8x, auth token abc",
            {"webhook": {"notificationUrl": "https://api.example.org"}},
            ["URL https://api.example.org (notificationUrl)"],
        ),
        (
            "notify url https://api.example.org/v1/notifications/kpff8x, auth token abc",
            {"webhook": {"notificationUrl": "https://api.example.org/v1/notifications/kpff8x"}},
            [],
        ),
        (
            "Callback: https://notify.example.net/qod.",
            {"webhook": {"notificationUrl": "https://notify.example.net/qod"}},
            [],
        ),
        (
            "user bob739@example.org, please",
            {"device": {"networkAccessIdentifier": "ob739@example.org"}},
            ["network access identifier ob739@example.org"],
        ),
        ("user bob739@example.org.", {"device": {"networkAccessIdentifier": "bob739@example.org"}}, []),
    ],
)
def test_urls_and_identifiers_must_occur_whole(request_text, body, found):
    assert value_hallucinations(body, request_text) == found


def test_markdown_around_a_url_or_identifier_is_not_part_of_it():
    body = {"webhook": {"notificationUrl": "https://ex.com/cb"}, "device": {"networkAccessIdentifier": "bob@ex.org"}}
    assert value_hallucinations(body, "notify `https://ex.com/cb`, user **bob@ex.org**") == []


def test_long_lists_of_numbers_stay_cheap():
    numbers = " ".join(str(1000 + i) for i in range(5000))
    start = time.perf_counter()
    found = value_hallucinations({"device": {"phoneNumber": "+10001001"}, "devicePorts": {"ports": [1001]}}, numbers)
    assert found == []  # 1000 1001 is a run of whole groups, as "+1 000 1001" would be
    assert time.perf_counter() - start < 5  # every run of every length was ~5 GB for 2,000 numbers


def test_ports_must_be_mentioned_outside_addresses():
    request = "server 192.0.2.200 port 443, device ports 5000-5010"
    body = {"applicationServerPorts": {"ports": [443]}, "devicePorts": {"ranges": [{"from": 5000, "to": 5010}]}}
    assert value_hallucinations(body, request) == []
    assert value_hallucinations({"applicationServerPorts": {"ports": [200]}}, request) == ["port 200 (ports)"]
    assert value_hallucinations({"devicePorts": {"ports": [5]}}, "for 2.5 hours") == ["port 5 (ports)"]
    # A port written as a float is still a port (the schema check reports its type).
    assert value_hallucinations({"devicePorts": {"ports": [9999.0]}}, request) == ["port 9999.0 (ports)"]
    assert value_hallucinations({"devicePorts": {"ports": [443.0]}}, request) == []


@pytest.mark.parametrize(
    ("request_text", "body"),
    [
        # Sentence-final periods used to hide addresses and ports from the check.
        ("The server is 192.0.2.200.", {"applicationServer": {"ipv4Address": "192.0.2.200"}}),
        ("Servers in 198.51.100.0/24.", {"applicationServer": {"ipv4Address": "198.51.100.0/24"}}),
        ("Server port 443.", {"applicationServerPorts": {"ports": [443]}}),
        # A colon after an IPv6 address is punctuation.
        ("device 2001:db8::7: gaming", {"device": {"ipv6Address": "2001:db8::7"}}),
        # "IPv4:port:" must not read as an IPv6 address swallowing the port.
        ("device 203.0.113.7:40123: gaming", {"device": {"ipv4Address": {"publicPort": 40123}}}),
    ],
)
def test_values_next_to_punctuation_are_found(request_text, body):
    assert value_hallucinations(body, request_text) == []


def test_urls_and_identifiers_must_occur_in_the_request():
    request = "notify https://hooks.example.com/qod/abc123, device user1@example.com"
    good = {
        "webhook": {"notificationUrl": "https://hooks.example.com/qod/abc123/"},
        "device": {"networkAccessIdentifier": "user1@example.com"},
    }
    assert value_hallucinations(good, request) == []
    bad = {
        "webhook": {"notificationUrl": "https://application-server.com"},
        "device": {"networkAccessIdentifier": "user2@example.com"},
    }
    assert value_hallucinations(bad, request) == [
        "URL https://application-server.com (notificationUrl)",
        "network access identifier user2@example.com",
    ]


# --- robustness --------------------------------------------------------------------------------

FRAGMENTS = [
    "{",
    "}",
    '{"device":',
    json.dumps(GOOD),
    json.dumps(GOOD)[:40],
    '{"duration": NaN}',
    '{"a": [1, {"b": "}"}]}',
    "```json\n",
    "[" * 50,
    '{"device": {"ipv4Address": "' + "9" * 40 + '"}}',
    '"\\ud800"',
]
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=10,
)


@settings(max_examples=200, deadline=None, database=None)
@given(st.text(), st.text())
def test_validate_request_never_raises_on_text(output, request_text):
    report = validate_request(output, request_text)
    assert tuple(report.checks) == CHECKS


@settings(max_examples=100, deadline=None, database=None)
@given(st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=20), max_size=8), st.text())
def test_validate_request_never_raises_around_json_fragments(parts, request_text):
    validate_request("".join(parts), request_text)


@settings(max_examples=60, deadline=None, database=None)
@given(st.dictionaries(st.sampled_from([*GOOD, "webhook", "devicePorts", "x"]), JSON_VALUES), st.text())
def test_validate_request_never_raises_on_odd_objects(body, request_text):
    report = validate_request(body, request_text)
    assert report.parsed == body


def test_deep_nesting_does_not_raise():
    for depth in (500, 5000):
        validate_request('{"device":' * depth + "1" + "}" * depth, REQUEST)
        validate_request('{"device": {"phoneNumber": ' + "[" * depth + "1" + "]" * depth + "}}", REQUEST)
