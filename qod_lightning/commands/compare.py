"""``compare``: score several models (base, SFT, DPO...) on one set and tabulate and plot them."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from qod_lightning.artifacts import atomic_write_text
from qod_lightning.commands.common import (
    CommandError,
    add_generation_arguments,
    existing_file,
    generation_kwargs,
    positive_int,
    run,
)
from qod_lightning.commands.evaluate import evaluate_model, evaluate_model_both

CHART_METRICS: dict[str, str] = {
    "json_validity": "JSON validity",
    "spec_compliance": "Spec compliance",
    "hallucination_rate": "Hallucination rate",
    "qos_profile_accuracy": "QoS profile accuracy",
    "exact_match": "Exact match",
}
"""Report keys in the table and the chart, with their labels."""


def build_parser() -> argparse.ArgumentParser:
    """Build the command-line parser.

    Returns:
        The parser.

    """
    parser = argparse.ArgumentParser(
        prog="qod_lightning compare",
        description="Compare models on an evaluation set: comparison.md, comparison.json, comparison.png.",
    )
    parser.add_argument("--models", nargs="+", default=[], metavar="NAME=PATH", help="models to evaluate")
    parser.add_argument("--reports", nargs="+", default=[], metavar="NAME=REPORT", help="existing report JSONs")
    parser.add_argument("--constrained-too", action="store_true", help="also evaluate each model constrained")
    parser.add_argument("--data", default="data/eval.jsonl", help='JSONL of {"input", "expected"} records')
    parser.add_argument("--out-dir", required=True, help="directory for the comparison files")
    parser.add_argument("--max-samples", type=positive_int, help="evaluate only the first N records")
    add_generation_arguments(parser)
    return parser


def parse_named(items: list[str], option: str) -> dict[str, str]:
    """Turn ``["base=PATH", ...]`` into ``{"base": "PATH"}``, rejecting malformed or repeated names."""
    named: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise CommandError(f"{option} expects NAME=PATH, got {item!r}")
        if name in named:
            raise CommandError(f"{option}: name {name!r} given twice")
        named[name] = value
    return named


def markdown_table(reports: dict[str, dict[str, Any]]) -> str:
    """One row per model: sample count, decoding, and the chart metrics as percentages."""
    header = ["model", "n", "constrained", *CHART_METRICS.values()]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * len(CHART_METRICS)) + "|"]
    for name, report in reports.items():
        constrained = {True: "yes", False: "no"}.get(report.get("constrained"), "")
        cells = [name, str(report["n"]), constrained, *(f"{100 * report[key]:.1f}%" for key in CHART_METRICS)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(reports: dict[str, dict[str, Any]], path: Path) -> None:
    """Grouped bar chart: one group per metric, one bar per model."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers
    import matplotlib.pyplot as plt

    width = 0.8 / len(reports)
    figure, axes = plt.subplots(figsize=(10, 4.5))
    for i, (name, report) in enumerate(reports.items()):
        positions = [m + (i - (len(reports) - 1) / 2) * width for m in range(len(CHART_METRICS))]
        axes.bar(positions, [report[key] for key in CHART_METRICS], width, label=name)
    axes.set_xticks(range(len(CHART_METRICS)), list(CHART_METRICS.values()))
    axes.set_ylim(0, 1.05)
    axes.set_ylabel("share of outputs (hallucination: of parsed outputs)")
    axes.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))  # outside: bars reach the top
    figure.tight_layout()
    partial = path.with_name(f".{path.name}.tmp")  # renamed into place: never a half-written PNG
    figure.savefig(partial, format="png", dpi=120)
    plt.close(figure)
    os.replace(partial, path)


def _load_report(name: str, path: str) -> dict[str, Any]:
    try:
        report = json.loads(existing_file(path, f"report for {name!r}").read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CommandError(f"{path}: not a JSON report ({err.msg})") from err
    missing = [key for key in ("n", *CHART_METRICS) if key not in report]
    if missing:
        raise CommandError(f"{path}: report lacks {missing}; write it with `evaluate`")
    return report


def write_comparison(reports: dict[str, dict[str, Any]], out_dir: str | Path) -> str:
    """Write ``comparison.md``, ``comparison.json`` and ``comparison.png`` into ``out_dir``.

    Args:
        reports: Model name -> evaluation report (as :func:`evaluate_model` returns).
        out_dir: The directory (created if needed).

    Returns:
        The markdown table.

    """
    out_dir = Path(out_dir)
    table = markdown_table(reports)
    atomic_write_text(out_dir / "comparison.md", table)
    atomic_write_text(out_dir / "comparison.json", json.dumps(reports, indent=2, ensure_ascii=False) + "\n")
    plot(reports, out_dir / "comparison.png")
    return table


def _compare(args: argparse.Namespace) -> int:
    models, report_files = parse_named(args.models, "--models"), parse_named(args.reports, "--reports")
    if not models and not report_files:
        raise CommandError("give --models NAME=PATH ... and/or --reports NAME=REPORT ...")
    if set(models) & set(report_files):
        raise CommandError(f"names used by both --models and --reports: {sorted(set(models) & set(report_files))}")
    reports = {name: _load_report(name, path) for name, path in report_files.items()}
    out_dir = Path(args.out_dir)
    options = {"max_samples": args.max_samples, "load_in_4bit": args.four_bit, "dtype": args.dtype}
    for name, path in models.items():
        output = out_dir / "reports" / f"{name}.json"
        if args.constrained_too:
            print(f"evaluating {name} and {name}+constrained ({path})")
            both = evaluate_model_both(
                path,
                args.data,
                output,
                output.with_name(f"{name}+constrained.json"),
                **options,
                **generation_kwargs(args),
            )
            reports[name], reports[f"{name}+constrained"] = both
        else:
            print(f"evaluating {name} ({path})")
            reports[name] = evaluate_model(path, args.data, output, **options, **generation_kwargs(args))
    print(write_comparison(reports, out_dir), end="")
    print(f"wrote {out_dir / 'comparison.md'}, comparison.json and comparison.png (reports in {out_dir / 'reports'})")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run ``compare``.

    Args:
        argv: Arguments after the command name.

    Returns:
        The exit status.

    """
    return run(build_parser(), _compare, argv)
