"""The benchmark harness on the tiny Phi-3: runs, writes its JSON, and agrees with TRL (when installed)."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

from qod_lightning.bench import report
from qod_lightning.bench.common import BenchOptions, write_cycled_jsonl
from qod_lightning.commands.bench import main

RUN_KEYS = {
    "stage_s",
    "response_tokens",
    "response_tokens_per_s",
    "examples_per_s",
    "median_step_s",
    "step_times_s",
    "peak_rss_mb",
    "process_peak_rss_mb",
    "losses",
    "precompute_s",
}


@pytest.fixture
def one_thread():
    """The harness sets torch's thread count; give the rest of the session its own back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_cycled_jsonl_has_exactly_the_requested_records(tmp_path, small_data):
    out = write_cycled_jsonl(small_data["sft"], 30, tmp_path / "x.jsonl")
    lines = out.read_text().splitlines()
    source = small_data["sft"].read_text().splitlines()
    assert len(lines) == 30 and lines[:12] == source and lines[12:24] == source


def test_agreement_tolerances():
    ours = {"losses": [0.6931], "first_batch_logps": {"chosen": -640.0, "rejected": -50.0}}
    close = {"losses": [0.69312], "first_batch_logps": {"chosen": -640.0 + 6.1e-5, "rejected": -50.00005}}
    far = {"losses": [0.70], "first_batch_logps": {"chosen": -640.01, "rejected": -50.001}}
    found = report.agreement("dpo", {"ours": ours, "trl": close, "other": far})
    assert found["trl"]["ok"]  # 6e-5 at |640| is one fp32 spacing: within the relative bound
    assert not found["other"]["ok"]
    assert [c["ok"] for c in found["other"]["checks"]] == [False, False, False]


def test_bench_command_runs_ours_and_writes_json(tmp_path, tiny_model_dir, small_data, one_thread, capsys):
    out = tmp_path / "result.json"
    argv = [
        "--compare", "none", "--model", str(tiny_model_dir), "--stages", "sft,dpo,generate",
        "--steps", "2", "--warmup-steps", "1", "--no-isolate", "--workdir", str(tmp_path / "work"),
        "--sft-data", str(small_data["sft"]), "--dpo-data", str(small_data["preferences"]),
        "--gen-samples", "2", "--gen-batch-size", "2", "--gen-max-new-tokens", "4", "--constrained-repeats", "1",
        "--out", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "Training" in printed and "Targets" in printed and str(out) in printed

    result = json.loads(out.read_text())
    assert {
        "model",
        "machine",
        "settings",
        "rss_method",
        "stages",
        "ratios",
        "agreement",
        "generation",
        "targets",
    } <= set(result)
    assert {"cpu_model", "cpu_cores", "versions", "date"} <= set(result["machine"])
    assert {"torch", "transformers", "trl"} <= set(result["machine"]["versions"])
    for stage in ("sft", "dpo"):
        run = result["stages"][stage]["ours"]
        assert set(run) >= RUN_KEYS
        assert run["steps"] == 2 and len(run["losses"]) == 2 and run["examples"] == 4
        assert run["response_tokens_per_s"] > 0 and run["peak_rss_mb"] > 0
    assert result["stages"]["dpo"]["ours"]["precompute_s"] > 0  # the reference pass is inside the stage
    assert math.isclose(result["stages"]["dpo"]["ours"]["losses"][0], math.log(2), rel_tol=1e-5)
    generation = result["generation"]
    assert generation["requests"] == 2 and generation["requests_per_s"] > 0
    if importlib.util.find_spec("xgrammar") is not None:
        assert generation["constrained"]["constrained_steps"] > 0
    names = {t["name"] for t in result["targets"]}
    assert {"dpo_speed_vs_trl", "sft_speed_vs_trl", "dpo_rss_vs_sft", "constrained_overhead"} <= names
    by_name = {t["name"]: t for t in result["targets"]}
    assert by_name["dpo_speed_vs_trl"]["met"] is None  # not compared: no fabricated number
    assert by_name["dpo_rss_vs_sft"]["measured"] > 0


def test_bench_agrees_with_trl(tmp_path, tiny_model_dir, small_data, one_thread):
    pytest.importorskip("trl", reason="TRL is not installed (pip install -e '.[bench]'): no comparison to run")
    from qod_lightning.bench.runner import run_benchmark

    options = BenchOptions(
        model=str(tiny_model_dir),
        compare="trl",
        stages=("sft", "dpo"),
        steps=2,
        warmup_steps=1,
        trl_dpo_variants=("default", "precompute"),
        sft_data=str(small_data["sft"]),
        dpo_data=str(small_data["preferences"]),
        isolate=False,
        workdir=str(tmp_path / "work"),
    )
    result = run_benchmark(options, log=lambda _: None)
    assert set(result["stages"]["dpo"]) == {"ours", "trl", "trl+precompute"}
    for stage in ("sft", "dpo"):
        for label, found in result["agreement"][stage].items():
            assert found["ok"], (stage, label, found["checks"])
            assert {c["check"] for c in found["checks"]} >= {"first-step loss"}
        assert result["stages"][stage]["trl"]["response_tokens"] == result["stages"][stage]["ours"]["response_tokens"]
        assert result["ratios"][stage]["trl"]["response_tokens_per_s"] > 0
    dpo_checks = {c["check"] for c in result["agreement"]["dpo"]["trl"]["checks"]}
    assert dpo_checks == {"first batch mean logp chosen", "first batch mean logp rejected", "first-step loss"}
    # one optimizer step later both frameworks still agree: same gradients, same AdamW update
    assert result["agreement"]["dpo"]["trl"]["max_loss_diff_all_steps"] < 1e-4
    assert result["stages"]["dpo"]["trl+precompute"]["precompute_s"] > 0
