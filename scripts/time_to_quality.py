"""Time-to-quality curve: evaluate the snapshots a training run saved, against records seen and minutes.

    python scripts/time_to_quality.py --snapshots artifacts/embedded_full/sft/snapshots \
        --out docs/figures/time_to_quality [--eval-file data/eval.jsonl] [--max-new-tokens 256]

Reads ``index.json`` of a run's :class:`~qod_lightning.callbacks.Snapshots`, evaluates each
snapshot on the evaluation set (greedy, unconstrained, as the pipeline's rows), and writes
``OUT.json`` (one row per snapshot: step, records seen, training minutes and the metrics) and
``OUT.png`` (exact match, hallucination and per-field accuracy against training minutes, with
records seen on a second axis). A snapshot already evaluated (its report beside it) is not redone.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from qod_lightning.artifacts import atomic_write_text
from qod_lightning.commands.evaluate import evaluate_model


def evaluate_snapshots(index: list[dict], eval_file: str, max_new_tokens: int, workers: int) -> list[dict]:
    """One row per snapshot: where it was taken, and its scores on ``eval_file``."""
    rows = []
    for entry in index:
        report_path = Path(entry["path"]) / "time_to_quality.report.json"
        if report_path.is_file():
            report = json.loads(report_path.read_text(encoding="utf-8"))
        else:
            print(f"evaluating step {entry['step']} ({entry['records']} records, {entry['train_seconds']:.0f} s)")
            report = evaluate_model(
                entry["path"], eval_file, report_path, max_new_tokens=max_new_tokens, batch_size=30, workers=workers
            )
        rows.append(
            {
                "step": entry["step"],
                "records": entry["records"],
                "train_minutes": round(entry["train_seconds"] / 60, 2),
                **{k: report[k] for k in ("exact_match", "json_validity", "spec_compliance", "hallucination_rate")},
                "field_accuracy": report["field_accuracy"],
            }
        )
    return rows


def plot(rows: list[dict], path: Path) -> None:
    """Exact match, hallucination and field accuracy against training minutes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = [r["train_minutes"] for r in rows]
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.plot(minutes, [100 * r["exact_match"] for r in rows], "k-o", lw=2.5, label="exact match")
    ax.plot(minutes, [100 * r["hallucination_rate"] for r in rows], "r--o", lw=2, label="hallucination rate")
    for field in rows[0]["field_accuracy"]:
        values = [r["field_accuracy"].get(field) for r in rows]
        if any(v is not None for v in values):
            ax.plot(minutes, [None if v is None else 100 * v for v in values], lw=1, alpha=0.7, label=field)
    ax.set_xlabel("training minutes")
    ax.set_ylabel("% of data/eval.jsonl")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    top = ax.secondary_xaxis("top")
    top.set_xticks(minutes, [str(r["records"]) for r in rows])
    top.set_xlabel("records seen")
    ax.legend(fontsize=8, loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    """Evaluate the snapshots and write the curve."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--snapshots", required=True, help="a run's snapshots directory (with index.json)")
    parser.add_argument("--out", required=True, help="output path without suffix: writes OUT.json and OUT.png")
    parser.add_argument("--eval-file", default="data/eval.jsonl")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2, help="batches decoded at once, one thread each")
    args = parser.parse_args()
    index = json.loads((Path(args.snapshots) / "index.json").read_text(encoding="utf-8"))
    rows = evaluate_snapshots(index, args.eval_file, args.max_new_tokens, args.workers)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.with_suffix(".json"), json.dumps(rows, indent=1) + "\n")
    plot(rows, out.with_suffix(".png"))
    for row in rows:
        print(
            f"step {row['step']:>4}  records {row['records']:>5}  {row['train_minutes']:6.1f} min  "
            f"exact {100 * row['exact_match']:5.1f}%  halluc. {100 * row['hallucination_rate']:5.1f}%"
        )
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
