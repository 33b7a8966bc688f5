"""Cross-check our request schema and our canonical data against the official CAMARA definition."""

import json
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from jsonschema import Draft4Validator, FormatChecker
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT4

from qod_lightning.data.generator import generate as gen
from qod_lightning.schema import DEFINED_KEYS, PHONE_PATTERN, QOS_PROFILES, REQUEST_SCHEMA, REQUIRED_KEYS, VALIDATOR

# CI checks the shared reference data out beside the repository.
CAMARA = Path(__file__).resolve().parents[2] / "shared" / "camara"
OFFICIAL = CAMARA / "qod-api-v0.10.1.yaml"
DATA = Path(__file__).resolve().parents[1] / "data"
URI = "urn:camara:qod-api-v0.10.1"

pytestmark = pytest.mark.skipif(
    not OFFICIAL.is_file(),
    reason=f"official CAMARA QoD definition not found at {OFFICIAL} (../shared/camara beside the repo)",
)

EXAMPLE = {
    "device": {"ipv4Address": {"publicAddress": "203.0.113.75", "privateAddress": "203.0.113.75"}},
    "applicationServer": {"ipv4Address": "192.0.2.200"},
    "qosProfile": "QOS_E",
    "duration": 7200,
}


@pytest.fixture(scope="module")
def openapi() -> dict[str, Any]:
    return yaml.safe_load(OFFICIAL.read_text(encoding="utf-8"))


def _is_http_uri(value: object) -> bool:
    # jsonschema's own "uri" check silently passes without the optional rfc3987 package.
    if not isinstance(value, str):
        return True
    parts = urlsplit(value)
    return bool(parts.scheme and parts.netloc)


@pytest.fixture(scope="module")
def official(openapi) -> Draft4Validator:
    """A validator for ``components.schemas.CreateSession`` with the document's refs resolved."""
    # OpenAPI 3.0 schemas are an extended subset of JSON Schema draft 4; the extensions
    # (example, nullable, format names like int32) are annotations a validator ignores.
    resource = Resource.from_contents(openapi, default_specification=DRAFT4)
    registry = Registry().with_resource(URI, resource)
    checker = FormatChecker()
    checker.checks("uri")(_is_http_uri)
    schema = {"$ref": f"{URI}#/components/schemas/CreateSession"}
    return Draft4Validator(schema, registry=registry, format_checker=checker)


def _resolve(openapi: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    """Follow ``$ref`` and single-item ``allOf`` wrappers to the schema they stand for."""
    while True:
        if "$ref" in node:
            target: Any = openapi
            for part in node["$ref"].removeprefix("#/").split("/"):
                target = target[part]
            node = target
        elif len(node.get("allOf", ())) == 1:
            node = node["allOf"][0]
        else:
            return node


def _properties(openapi: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    """Properties of a schema, merged over its ``allOf`` parts."""
    node = _resolve(openapi, node)
    props = dict(node.get("properties", {}))
    for part in node.get("allOf", ()):
        props.update(_properties(openapi, part))
    return props


def _read(name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (DATA / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()]


def _canonical_bodies() -> list[dict[str, Any]]:
    bodies = [json.loads(r["response"]) for r in _read("sft")]
    bodies += [json.loads(r["chosen"]) for r in _read("preferences")]
    bodies += [r["expected"] for r in _read("eval")]
    bodies += [json.loads(r["response"]) for r in gen.generate_sft(250, seed=21)]
    bodies += [r["expected"] for r in gen.generate_eval(250, seed=21)]
    return bodies


def test_the_official_validator_resolves_refs_and_checks_formats(official):
    assert official.is_valid(EXAMPLE)
    bad = [
        {**EXAMPLE, "duration": 0},
        {**EXAMPLE, "duration": 86401},
        {**EXAMPLE, "duration": "2 hours"},
        {k: v for k, v in EXAMPLE.items() if k != "qosProfile"},
        {**EXAMPLE, "device": {"ipv4Address": {"publicAddress": "203.0.113.75"}}},
        {**EXAMPLE, "device": {"ipv4Address": {"publicAddress": "999.0.113.75", "publicPort": 1}}},
        {**EXAMPLE, "device": {"ipv6Address": "2001:db8::zz"}},
        {**EXAMPLE, "device": {"phoneNumber": "+44 7700 900123"}},
        {**EXAMPLE, "applicationServer": {}},
        {**EXAMPLE, "devicePorts": {"ports": [70000]}},
        {**EXAMPLE, "webhook": {"notificationUrl": "not a url"}},
        {**EXAMPLE, "webhook": {"notificationUrl": "https://hooks.example.com/q", "notificationAuthToken": "short"}},
    ]
    for body in bad:
        assert not official.is_valid(body), body


def test_every_canonical_record_is_valid_for_the_official_schema(official):
    bodies = _canonical_bodies()
    assert len(bodies) == 50 + 30 + 120 + 500
    for body in bodies:
        errors = [e.message for e in official.iter_errors(body)]
        assert not errors, (body, errors)
        assert VALIDATOR.is_valid(body)


def test_our_property_names_equal_the_official_ones(openapi):
    schemas = openapi["components"]["schemas"]
    top = _properties(openapi, schemas["CreateSession"])
    assert set(top) == set(DEFINED_KEYS[()])
    assert set(_properties(openapi, schemas["BaseSessionInfo"])) | {"duration"} == set(top)
    nested = {
        ("device",): top["device"],
        ("device", "ipv4Address"): _properties(openapi, top["device"])["ipv4Address"],
        ("applicationServer",): top["applicationServer"],
        ("devicePorts",): top["devicePorts"],
        ("applicationServerPorts",): top["applicationServerPorts"],
        ("webhook",): top["webhook"],
    }
    for path, node in nested.items():
        assert set(_properties(openapi, node)) == set(DEFINED_KEYS[path]), path
    range_item = _resolve(openapi, schemas["PortsSpec"])["properties"]["ranges"]["items"]
    assert set(range_item["properties"]) == set(DEFINED_KEYS[("devicePorts", "ranges")])


def test_our_required_fields_include_the_official_ones(openapi):
    schemas = openapi["components"]["schemas"]
    assert set(schemas["BaseSessionInfo"]["required"]) <= set(REQUIRED_KEYS)
    assert set(REQUIRED_KEYS) - set(schemas["BaseSessionInfo"]["required"]) == {"duration"}
    ipv4 = _resolve(openapi, schemas["DeviceIpv4Addr"])
    ours = REQUEST_SCHEMA["properties"]["device"]["properties"]["ipv4Address"]
    assert ipv4["anyOf"] == ours["anyOf"]


def test_duration_and_port_bounds_match(openapi):
    create = _resolve(openapi, openapi["components"]["schemas"]["CreateSession"])
    duration = create["allOf"][1]["properties"]["duration"]
    ours = REQUEST_SCHEMA["properties"]["duration"]
    assert (duration["minimum"], duration["maximum"]) == (ours["minimum"], ours["maximum"]) == (1, 86400)
    assert duration["default"] == 86400
    port = openapi["components"]["schemas"]["Port"]
    our_port = REQUEST_SCHEMA["properties"]["devicePorts"]["properties"]["ports"]["items"]
    assert (port["minimum"], port["maximum"]) == (our_port["minimum"], our_port["maximum"])


def test_patterns_and_profiles_match(openapi):
    schemas = openapi["components"]["schemas"]
    assert schemas["PhoneNumber"]["pattern"] == PHONE_PATTERN
    token = _properties(openapi, schemas["BaseSessionInfo"])["webhook"]["properties"]["notificationAuthToken"]
    ours = REQUEST_SCHEMA["properties"]["webhook"]["properties"]["notificationAuthToken"]
    assert (token["minLength"], token["maxLength"]) == (ours["minLength"], ours["maxLength"])
    profile_name = schemas["QosProfileName"]
    profile_validator = Draft4Validator(profile_name)
    for profile in QOS_PROFILES:
        assert profile_validator.is_valid(profile)
        assert profile in profile_name["description"]
