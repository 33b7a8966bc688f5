import os
from pathlib import Path

import pytest

# Forced, not defaulted: an environment value of 0 must not turn the hub back on in tests, where a
# forgotten hub call has to fail at once instead of retrying a network that is not there.
os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from tests.tiny import build_tiny_phi3

    return build_tiny_phi3(tmp_path_factory.mktemp("tiny-phi3"))


def _canonical(i: int) -> tuple[str, str]:
    import json

    request = f"Need gaming session, device 203.0.113.{i}, server 192.0.2.{200 + i % 50}, {i % 5 + 1} hours"
    body = {
        "device": {"ipv4Address": {"publicAddress": f"203.0.113.{i}", "privateAddress": f"203.0.113.{i}"}},
        "applicationServer": {"ipv4Address": f"192.0.2.{200 + i % 50}"},
        "qosProfile": "QOS_E",
        "duration": 3600 * (i % 5 + 1),
    }
    return request, json.dumps(body, separators=(",", ":"))


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> dict[str, Path]:
    """Tiny SFT and preference files in the real formats (12 records each)."""
    import json

    from qod_lightning.data.prompts import SYSTEM_PROMPT

    root = tmp_path_factory.mktemp("data")
    pairs = [_canonical(i) for i in range(12)]
    sft = root / "sft.jsonl"
    sft.write_text(
        "".join(json.dumps({"instruction": SYSTEM_PROMPT, "input": q, "response": r}) + "\n" for q, r in pairs)
    )
    pref = root / "preferences.jsonl"
    pref.write_text(
        "".join(
            json.dumps({"prompt": q, "chosen": r, "rejected": r.replace("QOS_E", "QOS_HIGH")}) + "\n" for q, r in pairs
        )
    )
    return {"sft": sft, "preferences": pref}
