"""The benchmark harness on the tiny Phi-3: runs, writes its JSON, and agrees with TRL (when installed)."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

from qod_lightning.bench import report
from qod_lightning.bench.data import write_cycled_jsonl
from qod_lightning.bench.options import BenchOptions
from qod_lightning.commands.bench import main

RUN_KEYS = {
    "stage_s",
    "before_steps_s",
    "after_steps_s",
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


def test_prompt_repeat_makes_every_sft_example_fill_max_length(tmp_path, tiny_model_dir, small_data):
    from qod_lightning.bench.data import data_module, sequence_tokens
    from qod_lightning.bench.options import StageSpec

    out = write_cycled_jsonl(small_data["sft"], 6, tmp_path / "x.jsonl", prompt_repeat=20)
    first = json.loads(out.read_text().splitlines()[0])
    original = json.loads(small_data["sft"].read_text().splitlines()[0])
    assert first["input"] == "\n".join([original["input"]] * 20) and first["response"] == original["response"]
    spec = StageSpec("sft", "ours", str(tiny_model_dir), str(out), str(tmp_path), 3, 0, 2, 128, 1e-3)
    examples = data_module(spec).train_set.examples
    assert [len(e["input_ids"]) for e in examples] == [128] * 6
    assert sequence_tokens(spec, examples) == 6 * 128


def test_random_phi3_parameter_count_and_mfu(tmp_path):
    from qod_lightning.bench.gpu import PHI3_MINI, build_random_phi3, mfu, parameter_count
    from tests.tiny import build_tokenizer

    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    small["num_key_value_heads"] = 4
    path = build_random_phi3(tmp_path / "m", build_tokenizer(), small)
    vocab, h, i = PHI3_MINI["vocab_size"], 32, 64
    # embeddings + lm_head + per layer (qkv, o, gate_up, down, 2 norms) + final norm
    expected = 2 * vocab * h + 2 * (h * 3 * h + h * h + h * 2 * i + i * h + 2 * h) + h
    assert parameter_count(path) == expected
    config = json.loads((path / "config.json").read_text())
    assert config["vocab_size"] == 32064 and config["sliding_window"] == 2047
    sft = {"sequence_tokens": 8192, "steps": 2, "median_step_s": 0.5, "sequence_tokens_per_s": 1000.0}
    stages = {"sft": {"ours": sft}, "dpo": {"ours": {"sequence_tokens_per_s": 1.0}}}
    found = mfu(stages, 3_821_079_552, 800.0)
    assert list(found["sft"]) == ["ours"]  # DPO runs are not counted
    assert math.isclose(found["sft"]["ours"]["mfu"], 4 * 3_821_079_552 * 1000 / 800e12)
    assert math.isclose(found["sft"]["ours"]["median_step_mfu"], 4 * 3_821_079_552 * 8192 / 800e12)


def test_gpu_table_and_result_name(tmp_path, monkeypatch):
    from qod_lightning.commands.bench import write_result

    result = {
        "model": "phi3-mini-random",
        "settings": {"quant": "4bit"},
        "stages": {
            "sft": {"ours": {"sequence_tokens": 40960, "stage_s": 4.0, "before_steps_s": 0.25, "after_steps_s": 0.125}}
        },
        "gpu": {
            "name": "NVIDIA H200",
            "peak_bf16_tflops": 790.0,
            "parameters": 3_821_079_552,
            "mfu": {
                "sft": {
                    "ours": {
                        "tokens_per_s": 10240.0,
                        "mfu": 0.198,
                        "median_step_tokens_per_s": 11000.0,
                        "median_step_mfu": 0.213,
                    }
                }
            },
        },
    }
    text = report.gpu_table(result)
    assert "19.800" in text and "NVIDIA H200: measured bf16 peak 790 TFLOP/s" in text
    assert "0.250" in text and "0.125" in text
    monkeypatch.chdir(tmp_path)
    path = write_result(result, None)
    assert path.as_posix() == "benchmarks/results/phi3-mini-random_4bit_nvidia-h200.json"


def test_cuda_device_times_training_only(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert main(["--device", "cuda", "--compare", "none", "--stages", "sft,generate"]) == 2
    assert "training only" in capsys.readouterr().err


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
        # the stage's time is before the first step + the steps + after the last, nothing unaccounted
        parts = run["before_steps_s"] + sum(run["step_times_s"]) + run["after_steps_s"]
        assert math.isclose(parts, run["stage_s"], rel_tol=1e-9) and run["after_steps_s"] >= run["teardown_s"] >= 0
        assert run["model_to_cpu_s"] >= 0 and {"train_end", "fit_end"} <= set(run["rss_probes_mb"])
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


@pytest.mark.slow
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
