"""Machine description, comparisons (ratios, agreement, targets) and the printed tables."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import math
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

PACKAGES = ("torch", "transformers", "trl", "peft", "lightning", "accelerate", "datasets", "bitsandbytes", "xgrammar")
"""Packages whose versions a result records."""

LOGPS_TOLERANCE = 1e-4
"""Largest allowed |ours - TRL| of the first batch's mean chosen/rejected sequence log-probs ..."""

LOGPS_RELATIVE_TOLERANCE = 1e-6
"""... or this relative difference, for sums so large that fp32 cannot resolve 1e-4 (the tiny random
model's sequence log-probs are about -640, where adjacent fp32 values are 6e-5 apart)."""

LOSS_TOLERANCE = 1e-4
"""Largest allowed |ours - TRL| of the first step's loss."""


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024**2
    except OSError:
        pass
    return None


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _commit() -> str | None:
    """The commit of the checkout the harness runs from, ``-dirty`` when tracked files are edited."""
    repo = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()

    try:
        return git("rev-parse", "HEAD") + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def machine_info(threads: int) -> dict[str, Any]:
    """CPU model, cores, memory, load, package versions, the code's commit and the date (UTC)."""
    return {
        "commit": _commit(),
        "cpu_model": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "torch_threads": threads,
        "cuda": torch.cuda.is_available(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {name: _version(name) for name in PACKAGES},
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


# -- comparisons ----------------------------------------------------------------------------------


def ratios(runs: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Our speed and memory as ratios of each TRL run of the same stage.

    ``response_tokens_per_s`` is taken on whole-stage wall time (both runs trained the same tokens,
    so it equals TRL's stage time over ours); ``median_step`` compares steady-state steps only;
    ``peak_rss`` is ours over TRL's (below 1: we use less).
    """
    ours = runs.get("ours")
    if ours is None:
        return {}
    return {
        label: {
            "response_tokens_per_s": ours["response_tokens_per_s"] / other["response_tokens_per_s"],
            "median_step": other["median_step_s"] / ours["median_step_s"],
            "peak_rss": ours["peak_rss_mb"] / other["peak_rss_mb"],
        }
        for label, other in runs.items()
        if label != "ours"
    }


def _check(name: str, ours: float, theirs: float, tolerance: float, relative: float = 0.0) -> dict[str, Any]:
    diff = abs(ours - theirs)
    rel = diff / max(abs(ours), abs(theirs), 1e-30)
    return {
        "check": name,
        "ours": ours,
        "trl": theirs,
        "abs_diff": diff,
        "rel_diff": rel,
        "tolerance": tolerance,
        "relative_tolerance": relative,
        "ok": diff <= tolerance or rel <= relative,
    }


def agreement(stage: str, runs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Compare our first batch and first step with each TRL run's.

    DPO: the first batch's mean chosen and rejected policy sequence log-probs (within
    :data:`LOGPS_TOLERANCE`, or :data:`LOGPS_RELATIVE_TOLERANCE` relative) and the first-step loss;
    SFT: the first-step loss (within :data:`LOSS_TOLERANCE`). The largest loss difference over all
    steps is reported for information (SFT's later steps differ by dropout draws, which the
    frameworks take in different orders).
    """
    ours = runs.get("ours")
    result: dict[str, dict[str, Any]] = {}
    for label, other in runs.items():
        if label == "ours" or ours is None:
            continue
        checks = []
        if stage == "dpo" and ours.get("first_batch_logps") and other.get("first_batch_logps"):
            for side in ("chosen", "rejected"):
                checks.append(
                    _check(
                        f"first batch mean logp {side}",
                        ours["first_batch_logps"][side],
                        other["first_batch_logps"][side],
                        LOGPS_TOLERANCE,
                        LOGPS_RELATIVE_TOLERANCE,
                    )
                )
        if ours["losses"] and other["losses"]:
            checks.append(_check("first-step loss", ours["losses"][0], other["losses"][0], LOSS_TOLERANCE))
        pairs = list(zip(ours["losses"], other["losses"], strict=False))
        result[label] = {
            "checks": checks,
            "ok": bool(checks) and all(c["ok"] for c in checks),
            "max_loss_diff_all_steps": max((abs(a - b) for a, b in pairs), default=None),
        }
    return result


def _target(name: str, target: str, measured: float | None, met: bool | None) -> dict[str, Any]:
    return {"name": name, "target": target, "measured": measured, "met": met}


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured value and whether it is met (``None``: not measured)."""
    stages, rows = result.get("stages", {}), []
    dpo_ratio = result.get("ratios", {}).get("dpo", {}).get("trl")
    sft_ratio = result.get("ratios", {}).get("sft", {}).get("trl")
    rows.append(
        _target(
            "dpo_speed_vs_trl",
            "our DPO response tokens/s >= 1.5x TRL's (whole stage, reference pass included)",
            dpo_ratio and dpo_ratio["response_tokens_per_s"],
            dpo_ratio and dpo_ratio["response_tokens_per_s"] >= 1.5,
        )
    )
    rows.append(
        _target(
            "dpo_rss_vs_trl",
            "our DPO peak RSS <= TRL's (ratio ours/TRL)",
            dpo_ratio and dpo_ratio["peak_rss"],
            dpo_ratio and dpo_ratio["peak_rss"] <= 1.0,
        )
    )
    rows.append(
        _target(
            "sft_speed_vs_trl",
            "our SFT response tokens/s >= 1.2x TRL's",
            sft_ratio and sft_ratio["response_tokens_per_s"],
            sft_ratio and sft_ratio["response_tokens_per_s"] >= 1.2,
        )
    )
    ours_dpo, ours_sft = stages.get("dpo", {}).get("ours"), stages.get("sft", {}).get("ours")
    rss = ours_dpo["peak_rss_mb"] / ours_sft["peak_rss_mb"] if ours_dpo and ours_sft else None
    rows.append(_target("dpo_rss_vs_sft", "our DPO peak RSS <= 1.10x our SFT's", rss, rss and rss <= 1.10))
    constrained = result.get("generation", {}).get("constrained", {})
    overhead = constrained.get("overhead")
    rows.append(
        _target(
            "constrained_overhead",
            "constrained decoding per-token overhead <= 10%",
            overhead,
            None if overhead is None else overhead <= 0.10,
        )
    )
    scaling = result.get("scaling", {}).get("ratio")
    rows.append(
        _target(
            "linear_scaling",
            "time per 1,000 pairs at 10x the pairs within 10% (ratio large/small)",
            scaling,
            None if scaling is None else abs(scaling - 1.0) <= 0.10,
        )
    )
    for row in rows:  # `x and y` leaves None (not measured) or a number; keep booleans boolean
        row["met"] = None if row["measured"] is None else bool(row["met"])
    return rows


# -- tables -----------------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.{digits}g}" if abs(value) < 1e-2 or abs(value) >= 1e5 else f"{value:,.{digits}f}"
    return str(value)


def table(header: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table of ``rows`` (numbers formatted to three decimals)."""
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(header)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += ["| " + " | ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in cells]
    return "\n".join(lines)


def training_table(result: dict[str, Any]) -> str:
    """One row per run: stage time, reference pass, steps, throughput, memory and ratio to TRL."""
    rows = []
    for stage, runs in result.get("stages", {}).items():
        stage_ratios = result.get("ratios", {}).get(stage, {})
        for label, run in runs.items():
            tok = " / ".join(f"{r['response_tokens_per_s']:.2f}x vs {k}" for k, r in stage_ratios.items())
            step = " / ".join(f"{r['median_step']:.2f}x" for r in stage_ratios.values())
            rows.append(
                [
                    stage,
                    label,
                    run["stage_s"],
                    run["precompute_s"] if stage == "dpo" else None,
                    run["median_step_s"],
                    run["first_step_s"],
                    run["response_tokens_per_s"],
                    run["examples_per_s"] if stage == "dpo" else None,
                    run["peak_rss_mb"],
                    run["stage_rss_increase_mb"],
                    run["process_peak_rss_mb"],
                    tok if label == "ours" and tok else None,
                    step if label == "ours" and step else None,
                ]
            )
    header = [
        "stage",
        "run",
        "stage s",
        "ref pass s",
        "median step s",
        "first step s",
        "resp tok/s",
        "pairs/s",
        "peak RSS MiB",
        "+ in stage MiB",
        "process peak MiB",
        "ours/TRL tok/s (stage)",
        "ours/TRL median step",
    ]
    return table(header, rows)


def agreement_table(result: dict[str, Any]) -> str:
    """Each agreement check of each stage against each TRL run."""
    rows = []
    for stage, by_label in result.get("agreement", {}).items():
        for label, found in by_label.items():
            for c in found["checks"]:
                rows.append([stage, label, c["check"], c["ours"], c["trl"], c["abs_diff"], c["rel_diff"], c["ok"]])
            rows.append(
                [stage, label, "max |loss diff|, all steps", None, None, found["max_loss_diff_all_steps"], None, None]
            )
    return table(["stage", "vs", "check", "ours", "TRL", "|diff|", "rel diff", "ok"], rows)


def generation_table(generation: dict[str, Any]) -> str:
    """Requests/s of plain greedy generation and the constrained per-step overhead."""
    rows = [
        [
            "greedy, unconstrained",
            generation["requests"],
            generation["batch_size"],
            generation["max_new_tokens"],
            generation["requests_per_s"],
            generation["ms_per_step"],
            generation["ms_per_pass_end_to_end"],
            generation["peak_rss_mb"],
        ]
    ]
    constrained = generation.get("constrained", {})
    if "ratio" in constrained:
        rows.append(
            [
                f"constrained (plain: {constrained['unconstrained_ms_per_step']:.2f} ms/step)",
                constrained["requests"],
                generation["batch_size"],
                generation["max_new_tokens"],
                None,
                constrained["constrained_ms_per_step"],
                constrained["constrained_ms_per_pass_end_to_end"],
                None,
            ]
        )
    header = [
        "decoding",
        "requests",
        "batch",
        "max new",
        "requests/s",
        "ms/decode step",
        "ms/forward incl. prompt",
        "peak RSS MiB",
    ]
    text = table(header, rows)
    if "ratio" in constrained:
        text += (
            f"\ngrammar processor: {constrained['grammar_ms_per_step']:.2f} ms per decoding step = "
            f"{100 * constrained['overhead']:.1f}% of a plain step (constrained/plain step time, separate runs: "
            f"{constrained['ratio']:.3f}x); grammar compile once: {constrained['compile_ms']:.0f} ms"
        )
    elif constrained:
        text += f"\nconstrained decoding: {constrained.get('skipped')}"
    return text


def gpu_table(result: dict[str, Any]) -> str:
    """Training tokens/s and model FLOPs utilisation of every SFT run on the GPU."""
    gpu = result["gpu"]
    runs = result.get("stages", {}).get("sft", {})
    rows = [
        [
            label,
            runs[label]["sequence_tokens"],
            runs[label]["stage_s"],
            runs[label].get("before_steps_s", float("nan")),  # results before 2026-11-26 lack the split
            runs[label].get("after_steps_s", float("nan")),
            found["tokens_per_s"],
            100 * found["mfu"],
            found["median_step_tokens_per_s"],
            100 * found["median_step_mfu"],
        ]
        for label, found in gpu["mfu"].get("sft", {}).items()
    ]
    header = [
        "SFT run",
        "tokens",
        "stage s",
        "s before steps",
        "s after steps",
        "tokens/s",
        "MFU %",
        "median-step tokens/s",
        "median-step MFU %",
    ]
    text = table(header, rows)
    return text + (
        f"\n{gpu['name']}: measured bf16 peak {gpu['peak_bf16_tflops']:.0f} TFLOP/s; "
        f"MFU = 4 x {gpu['parameters']:,} parameters x tokens/s / peak"
    )


def targets_table(rows: list[dict[str, Any]]) -> str:
    """The issue's targets with measured values."""
    return table(["target", "measured", "met"], [[r["target"], r["measured"], r["met"]] for r in rows])


def render(result: dict[str, Any]) -> str:
    """Everything a run prints: settings line, training, agreement, generation, scaling, targets."""
    s = result["settings"]
    batch = f"batch {s['batch_size']}" + (f" (DPO {s['dpo_batch_size']})" if s.get("dpo_batch_size") else "")
    parts = [
        f"model {result['model']} ({s['quant']}), LoRA r{s['lora_r']} alpha{s['lora_alpha']}, {batch}, "
        f"max_length {s['max_length']}, {s['steps']} steps after {s['warmup_steps']} warm-up passes, "
        f"{s['threads']} thread(s), device {s.get('device', 'cpu')}; "
        f"{result['machine']['cpu_model']}, {result['machine']['cpu_cores']} cores",
        f"memory: {result['rss_method']}",
    ]
    if result.get("stages"):
        parts += [
            "",
            "Training (stage s = trainer construction + fit, reference pass included)",
            training_table(result),
        ]
    if result.get("agreement"):
        parts += ["", "Agreement with TRL", agreement_table(result)]
    if result.get("gpu"):
        parts += ["", "GPU (tokens: all non-padding positions trained)", gpu_table(result)]
    if result.get("generation"):
        parts += ["", "Inference", generation_table(result["generation"])]
    if result.get("scaling"):
        sc = result["scaling"]
        rows = [[r["pairs"], r["stage_s"], r["s_per_1000_pairs"], r["peak_rss_mb"]] for r in sc["runs"]]
        parts += [
            "",
            f"Scaling (our DPO, {sc['model']})",
            table(["pairs", "stage s", "s / 1000 pairs", "peak MiB"], rows),
        ]
        parts.append(
            f"ratio (10x / 1x) of s per 1000 pairs: {sc['ratio']:.3f}; "
            f"of the median step: {sc['median_step_ratio']:.3f}"
        )
    parts += ["", "Targets", targets_table(result.get("targets", []))]
    return "\n".join(parts)
