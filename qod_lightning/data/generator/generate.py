"""Generate the synthetic datasets: SFT pairs, preference triples and the held-out evaluation set.

Each record samples a structured request
(:func:`~qod_lightning.data.generator.spec.sample_spec`), derives the canonical answer from it
(:func:`canonical_request`) and renders the request text from a phrasing template. Training
records (SFT, preferences) use :data:`TRAIN_TEMPLATES`; the evaluation set uses the disjoint
:data:`EVAL_TEMPLATES`. A seed fixes every file byte for byte.

Usage::

    python -m qod_lightning data generate --out-dir data
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from qod_lightning.data.generator.notes import make_note, note_for_answer
from qod_lightning.data.generator.phrasing import USE_CASES
from qod_lightning.data.generator.rejected import make_rejected
from qod_lightning.data.generator.spec import RequestSpec, canonical_request, sample_spec
from qod_lightning.data.generator.templates import EVAL_TEMPLATES, TRAIN_TEMPLATES, Template, render_request
from qod_lightning.data.prompts import SYSTEM_PROMPT, dump_request

__all__ = [
    "canonical_request",
    "generate_eval",
    "generate_preferences",
    "generate_sft",
    "main",
    "sample_examples",
    "write_jsonl",
]


def sample_examples(n: int, seed: int, split: str, templates: tuple[Template, ...]) -> list[tuple[RequestSpec, str]]:
    """Draw ``n`` request specs and render each with a random template.

    Args:
        n: Number of examples.
        seed: Random seed.
        split: Name mixed into the seed, so the splits draw different requests for one seed.
        templates: The phrasings to draw from.

    Returns:
        ``(spec, request_text)`` pairs.

    """
    # String seeds hash with SHA-512, the same on every platform and Python run.
    rng = random.Random(f"qod-{split}-{seed}")
    examples = []
    for _ in range(n):
        spec = sample_spec(rng, USE_CASES)
        examples.append((spec, render_request(spec, rng.choice(templates), rng)))
    return examples


def generate_sft(n: int, seed: int = 0, notes: bool = False) -> list[dict[str, str]]:
    """Make supervised fine-tuning records.

    Args:
        n: Number of records.
        seed: Random seed.
        notes: Start each response with a scratchpad note line
            (:mod:`qod_lightning.data.generator.notes`). The few requests whose phrases the note
            cannot quote (a bare profile letter in a terse template) are skipped, and later draws of
            the same stream take their place.

    Returns:
        ``{"instruction", "input", "response"}`` records; ``response`` is the compact canonical JSON,
        after the note and a newline with ``notes``.

    """
    if not notes:
        return [
            {"instruction": SYSTEM_PROMPT, "input": text, "response": dump_request(canonical_request(spec))}
            for spec, text in sample_examples(n, seed, "sft", TRAIN_TEMPLATES)
        ]
    draws = n
    while True:  # a longer draw of one seed starts with the shorter draw's examples
        records = []
        for spec, text in sample_examples(draws, seed, "sft", TRAIN_TEMPLATES):
            note = make_note(spec, text)
            if note is not None:
                response = f"{note}\n{dump_request(canonical_request(spec))}"
                records.append({"instruction": SYSTEM_PROMPT, "input": text, "response": response})
        if len(records) >= n:
            return records[:n]
        draws += n - len(records) + 16


def generate_preferences(n: int, seed: int = 0, notes: bool = False) -> list[dict[str, str]]:
    """Make preference records pairing the canonical answer with a typical wrong one.

    Args:
        n: Number of records.
        seed: Random seed.
        notes: Open both answers with a scratchpad note (:mod:`qod_lightning.data.generator.notes`):
            the chosen one's, and for the rejected one the same phrases with the duration and
            profile its JSON holds, so a wrong decision is wrong from the note on. Requests whose
            phrases the note cannot quote are skipped, as in :func:`generate_sft`.

    Returns:
        ``{"prompt", "chosen", "rejected"}`` records.

    """
    records: list[dict[str, str]] = []
    draws = n
    while len(records) < n:  # without notes, one pass; with them, later draws replace skipped ones
        records, rng = [], random.Random(f"qod-rejected-{seed}")
        for spec, text in sample_examples(draws, seed, "preferences", TRAIN_TEMPLATES):
            body = canonical_request(spec)
            chosen, rejected = dump_request(body), make_rejected(body, text, rng)
            if notes:
                note = make_note(spec, text)
                if note is None:
                    continue
                chosen, rejected = f"{note}\n{chosen}", f"{note_for_answer(note, rejected)}\n{rejected}"
            records.append({"prompt": text, "chosen": chosen, "rejected": rejected})
        draws += n - len(records) + 16
    return records[:n]


def generate_eval(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Make evaluation records phrased with the held-out templates only.

    Args:
        n: Number of records.
        seed: Random seed.

    Returns:
        ``{"input", "expected"}`` records; ``expected`` is the canonical body as a dict.

    """
    return [
        {"input": text, "expected": canonical_request(spec)}
        for spec, text in sample_examples(n, seed, "eval", EVAL_TEMPLATES)
    ]


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> None:
    """Write records as UTF-8 JSON lines, atomically: readers see the old file or the new one.

    Args:
        path: Target file; its directory is created when missing.
        records: The records.

    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The temporary file sits in the target's directory so os.replace never crosses filesystems.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _count(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {number}")
    return number


def build_parser() -> argparse.ArgumentParser:
    """Build the command-line parser.

    Returns:
        The parser.

    """
    parser = argparse.ArgumentParser(
        prog="qod_lightning data generate",
        description="Generate the synthetic SFT, preference and evaluation datasets (JSONL).",
    )
    parser.add_argument("--num-sft", type=_count, default=50, help="SFT records (default 50)")
    parser.add_argument("--num-preferences", type=_count, default=30, help="preference records (default 30)")
    parser.add_argument("--num-eval", type=_count, default=120, help="evaluation records (default 120)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--out-dir", default="data", help="output directory (default data)")
    parser.add_argument("--prefix", default="", help="file name prefix, e.g. 'big_' (default none)")
    parser.add_argument(
        "--notes",
        action="store_true",
        help="SFT and preference answers start with a scratchpad note line, then the JSON",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Generate ``{prefix}sft.jsonl``, ``{prefix}preferences.jsonl`` and ``{prefix}eval.jsonl``.

    Args:
        argv: Command-line arguments (``sys.argv[1:]`` when ``None``).

    Returns:
        The exit status.

    """
    args = build_parser().parse_args(argv)
    out_dir = Path(args.out_dir)
    outputs = {
        "sft": generate_sft(args.num_sft, args.seed, notes=args.notes),
        "preferences": generate_preferences(args.num_preferences, args.seed, notes=args.notes),
        "eval": generate_eval(args.num_eval, args.seed),
    }
    for name, records in outputs.items():
        path = out_dir / f"{args.prefix}{name}.jsonl"
        write_jsonl(path, records)
        print(f"wrote {len(records)} records to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
