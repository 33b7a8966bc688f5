"""``evaluate``: generate answers for an evaluation set (or take existing ones) and score them."""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

from qod_lightning.artifacts import atomic_write_text
from qod_lightning.commands.common import (
    CommandError,
    add_generation_arguments,
    check_model_path,
    existing_file,
    generation_kwargs,
    positive_int,
    run,
)
from qod_lightning.data.jsonl import DataError, describe_duplicates, duplicate_lines, read_jsonl, read_objects
from qod_lightning.data.tokenize import PromptFormat
from qod_lightning.metrics import score_predictions
from qod_lightning.validation import validate_request

log = logging.getLogger(__name__)

EVAL_RECORD = {"input": str, "expected": dict}
"""An evaluation record: the request and its canonical answer."""
PREDICTION_KEYS = {"input": str, "expected": dict, "prediction": str}
"""A scored-prediction record (what :func:`write_predictions` writes)."""


def build_parser() -> argparse.ArgumentParser:
    """Build the command-line parser.

    Returns:
        The parser.

    """
    parser = argparse.ArgumentParser(
        prog="qod_lightning evaluate",
        description="Score a model on an evaluation set, or score existing predictions.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="adapter directory, merged model directory or hub id")
    source.add_argument("--predictions", help='JSONL of {"input", "expected", "prediction"} records to score')
    parser.add_argument("--data", default="data/eval.jsonl", help='JSONL of {"input", "expected"} records')
    parser.add_argument("--output", required=True, help="report JSON (predictions go beside it)")
    parser.add_argument("--constrained", action="store_true", help="grammar-constrained decoding (xgrammar)")
    parser.add_argument("--max-samples", type=positive_int, help="evaluate only the first N records")
    add_generation_arguments(parser)
    return parser


def load_eval_records(path: str, max_samples: int | None = None) -> list[dict[str, Any]]:
    """Read ``{"input", "expected"}`` records, the first ``max_samples`` of them when given.

    Repeated records are kept (and counted twice) but named in a warning.

    Raises:
        DataError: On what :func:`~qod_lightning.data.jsonl.read_jsonl` rejects, or an
            ``expected`` that is not a valid request (nothing could match it).
        ValueError: When ``max_samples`` is below 1.

    """
    records = read_jsonl(existing_file(path, "evaluation data"), EVAL_RECORD)
    for record in records:
        check_expected(path, record["_line"], record["expected"])
    repeats = duplicate_lines(records, EVAL_RECORD)
    if repeats:
        log.warning("%s: %d duplicate record(s): %s", path, len(repeats), describe_duplicates(repeats))
    if max_samples is None:
        return records
    if max_samples < 1:
        raise ValueError(f"max_samples must be >= 1 (or None for every record), got {max_samples}")
    return records[:max_samples]


def check_expected(path: str, line: int, expected: dict[str, Any]) -> None:
    """Raise :class:`~qod_lightning.data.jsonl.DataError` when a reference answer fails the schema."""
    report = validate_request(expected)
    if not report.valid:
        raise DataError(path, line, f"'expected' is not a valid CreateSession request ({report.errors[0]})")


def read_predictions(path: str) -> list[dict[str, Any]]:
    """Read scored-prediction records.

    Parsed as strictly as :func:`~qod_lightning.data.jsonl.read_objects` parses, but unlike
    :func:`~qod_lightning.data.jsonl.read_jsonl`, an empty ``prediction`` is accepted: a model
    that stops at once produced it, and it must count as a failure, not abort the scoring. Other
    keys are ignored.

    Raises:
        DataError: On what :func:`~qod_lightning.data.jsonl.read_objects` rejects, a missing or
            wrongly typed key, or an ``expected`` that is not a valid request.

    """
    records = []
    for number, record in read_objects(existing_file(path, "predictions file")):
        for key, kind in PREDICTION_KEYS.items():
            if not isinstance(record.get(key), kind):
                raise DataError(path, number, f"key {key!r} must be a {kind.__name__}")
        check_expected(path, number, record["expected"])
        records.append(record)
    return records


def score_report(records: list[dict[str, Any]], predictions: list[str], **details: Any) -> dict[str, Any]:
    """Score predictions and add the run's details.

    Args:
        records: ``{"input", "expected"}`` records.
        predictions: Raw answers, aligned with ``records``.
        **details: Added to the report as given (model, settings, wall time...).

    Returns:
        :func:`~qod_lightning.metrics.score_predictions`'s keys followed by ``details``.

    """
    scores = score_predictions(predictions, [r["input"] for r in records], [r["expected"] for r in records])
    return {**scores, **details}


def evaluate_model(
    model: str,
    data: str | Path,
    output: str | Path,
    *,
    constrained: bool = False,
    max_samples: int | None = None,
    max_new_tokens: int = 512,
    batch_size: int = 8,
    workers: int = 1,
    prompt_format: PromptFormat | None = None,
    do_sample: bool = False,
    temperature: float = 0.3,
    max_input_tokens: int = 1024,
    load_in_4bit: bool = False,
    dtype: str = "float32",
) -> dict[str, Any]:
    """Generate answers for an evaluation set with one model, score them, and write the report.

    The report goes to ``output`` and the predictions beside it (:func:`predictions_path`), both
    written atomically.

    Args:
        model: Adapter directory, merged model directory, hub id or ``embedded:NAME``.
        data: JSONL of ``{"input", "expected"}`` records.
        output: The report JSON.
        constrained: Grammar-constrained decoding.
        max_samples: Evaluate only the first N records.
        max_new_tokens: Tokens generated per answer.
        batch_size: Requests per generation batch.
        workers: Batches decoded at once in threads, on a CPU
            (:func:`~qod_lightning.generation.generate_tokens`).
        prompt_format: ``alpaca`` or ``chat``; ``None``: the one saved with the model, else ``alpaca``
            (:func:`~qod_lightning.model.resolve_prompt_format`).
        do_sample: Sample instead of greedy decoding.
        temperature: Sampling temperature.
        max_input_tokens: Longest prompt kept, in tokens.
        load_in_4bit: Load the base weights in 4-bit NF4.
        dtype: Dtype of the non-quantized weights.

    Returns:
        The report: :func:`~qod_lightning.metrics.score_predictions`'s keys, then ``model``,
        ``constrained``, ``max_new_tokens``, ``do_sample``, ``temperature``, ``prompt_format``,
        ``max_input_tokens``, ``batch_size``, ``data`` and ``wall_time_s`` (loading, generating
        and scoring).

    """
    from qod_lightning.generation import generate
    from qod_lightning.model import free_gpu_memory, resolve_prompt_format

    start = time.perf_counter()
    records, loaded, tokenizer = _load(model, data, max_samples, load_in_4bit, dtype)
    prompt_format = resolve_prompt_format(model, prompt_format)
    options = _generation_options(
        model, prompt_format, max_new_tokens, batch_size, workers, do_sample, temperature, max_input_tokens
    )
    predictions = generate(loaded, tokenizer, [r["input"] for r in records], constrained=constrained, **options)
    del loaded
    free_gpu_memory()
    return _write_report(records, predictions, output, start, _details(model, data, constrained, options))


def evaluate_model_both(
    model: str,
    data: str | Path,
    output: str | Path,
    constrained_output: str | Path,
    *,
    max_samples: int | None = None,
    max_new_tokens: int = 512,
    constrained_max_new_tokens: int | None = None,
    batch_size: int = 8,
    workers: int = 1,
    prompt_format: PromptFormat | None = None,
    do_sample: bool = False,
    temperature: float = 0.3,
    max_input_tokens: int = 1024,
    load_in_4bit: bool = False,
    dtype: str = "float32",
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Evaluate one model unconstrained, then constrained, loading it once.

    With greedy decoding the constrained run starts each answer from the part of the
    unconstrained one that the grammar accepts
    (:func:`~qod_lightning.constrained.grammar_accepted_starts`): the answers of constrained
    decoding from scratch, for the price of decoding only where the grammar changes them. With
    sampling the two runs are independent.

    Args:
        model: Adapter directory, merged model directory, hub id or ``embedded:NAME``.
        data: JSONL of ``{"input", "expected"}`` records.
        output: The unconstrained report JSON.
        constrained_output: The constrained report JSON.
        max_samples: Evaluate only the first N records.
        max_new_tokens: Tokens generated per answer.
        constrained_max_new_tokens: Tokens per constrained answer (``None``: ``max_new_tokens``);
            more room lets the grammar close an object that the unconstrained budget cut short.
        batch_size: Requests per generation batch.
        workers: Batches decoded at once in threads, on a CPU
            (:func:`~qod_lightning.generation.generate_tokens`).
        prompt_format: ``alpaca`` or ``chat``; ``None``: the one saved with the model, else ``alpaca``
            (:func:`~qod_lightning.model.resolve_prompt_format`).
        do_sample: Sample instead of greedy decoding.
        temperature: Sampling temperature.
        max_input_tokens: Longest prompt kept, in tokens.
        load_in_4bit: Load the base weights in 4-bit NF4.
        dtype: Dtype of the non-quantized weights.

    Returns:
        ``(unconstrained report, constrained report)``, each as :func:`evaluate_model` returns
        it; each ``wall_time_s`` covers its own generating and scoring (the load counts towards
        the first). The constrained report adds ``answers_accepted_whole``: how many unconstrained
        answers the grammar accepted whole (``None`` when sampling). Those that had ended (a
        closed object, or out of tokens) are taken as they are, with no decoding; one that
        stopped at EOS short of a complete object is decoded on, as the grammar rejects EOS.

    """
    from qod_lightning.constrained import grammar_accepted_starts
    from qod_lightning.generation import decode_answers, generate_tokens
    from qod_lightning.model import free_gpu_memory, resolve_prompt_format

    start = time.perf_counter()
    records, loaded, tokenizer = _load(model, data, max_samples, load_in_4bit, dtype)
    requests = [r["input"] for r in records]
    prompt_format = resolve_prompt_format(model, prompt_format)
    options = _generation_options(
        model, prompt_format, max_new_tokens, batch_size, workers, do_sample, temperature, max_input_tokens
    )
    free = generate_tokens(loaded, tokenizer, requests, **options)
    free_report = _write_report(
        records, decode_answers(tokenizer, free), output, start, _details(model, data, False, options)
    )
    start = time.perf_counter()
    forced, accepted_whole = None, None
    if not do_sample:
        forced = grammar_accepted_starts(loaded, tokenizer, free, requests, notes=options["notes"])
        accepted_whole = sum(len(start_ids) == len(ids) for start_ids, ids in zip(forced, free, strict=True))
    options["max_new_tokens"] = constrained_max_new_tokens or max_new_tokens
    bound = generate_tokens(loaded, tokenizer, requests, constrained=True, forced=forced, **options)
    del loaded
    free_gpu_memory()
    details = {**_details(model, data, True, options), "answers_accepted_whole": accepted_whole}
    bound_report = _write_report(records, decode_answers(tokenizer, bound), constrained_output, start, details)
    return free_report, bound_report


def _load(
    model: str, data: str | Path, max_samples: int | None, load_in_4bit: bool, dtype: str
) -> tuple[list[dict[str, Any]], Any, Any]:
    """``(records, model, tokenizer)``: the evaluation records, then the model for inference."""
    from qod_lightning.model import load_for_inference

    records = load_eval_records(str(data), max_samples)
    loaded, tokenizer = load_for_inference(check_model_path(model), load_in_4bit=load_in_4bit, dtype=dtype)
    return records, loaded, tokenizer


def _generation_options(
    model: str,
    prompt_format: PromptFormat,
    max_new_tokens: int,
    batch_size: int,
    workers: int,
    do_sample: bool,
    temperature: float,
    max_input_tokens: int,
) -> dict[str, Any]:
    """The keywords of :func:`~qod_lightning.generation.generate_tokens` an evaluation passes on.

    ``notes``: the model learned answers that open with a scratchpad note
    (:func:`~qod_lightning.model.saved_answer_notes`), which constrained decoding then allows.
    """
    from qod_lightning.model import saved_answer_notes

    return {
        "prompt_format": prompt_format,
        "notes": saved_answer_notes(model),
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "workers": workers,
        "do_sample": do_sample,
        "temperature": temperature,
        "max_input_tokens": max_input_tokens,
    }


def _details(model: str, data: str | Path, constrained: bool, options: dict[str, Any]) -> dict[str, Any]:
    """What a report says about how its predictions were made."""
    return {
        "model": model,
        "constrained": constrained,
        "max_new_tokens": options["max_new_tokens"],
        "do_sample": options["do_sample"],
        "temperature": options["temperature"],
        "prompt_format": options["prompt_format"],
        "max_input_tokens": options["max_input_tokens"],
        "batch_size": options["batch_size"],
        "data": str(data),
    }


def _write_report(
    records: list[dict[str, Any]], predictions: list[str], output: str | Path, start: float, details: dict[str, Any]
) -> dict[str, Any]:
    """Score ``predictions``, add ``details`` and the wall time since ``start``, and write both files atomically."""
    report = score_report(records, predictions, **details, wall_time_s=round(time.perf_counter() - start, 3))
    write_predictions(predictions_path(output), records, predictions)
    atomic_write_text(output, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return report


def predictions_path(report_path: str | Path) -> Path:
    """``report.json`` -> ``report.predictions.jsonl`` (beside it)."""
    return Path(report_path).with_suffix(".predictions.jsonl")


def write_predictions(path: str | Path, records: list[dict[str, Any]], predictions: list[str]) -> Path:
    """Write ``{"input", "expected", "prediction"}`` records atomically (what ``--predictions`` reads)."""
    lines = [
        json.dumps({"input": r["input"], "expected": r["expected"], "prediction": p}, ensure_ascii=False) + "\n"
        for r, p in zip(records, predictions, strict=True)
    ]
    return atomic_write_text(path, "".join(lines))


def format_table(report: dict[str, Any]) -> str:
    """The report as two aligned columns, field accuracies flattened to ``field_accuracy/<field>``."""
    rows: list[tuple[str, str]] = []
    for key, value in report.items():
        if isinstance(value, dict):
            rows += [(f"{key}/{field}", _cell(v)) for field, v in value.items()]
        else:
            rows.append((key, _cell(value)))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in rows)


def _cell(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _evaluate(args: argparse.Namespace) -> int:
    if args.predictions is None:
        report = evaluate_model(
            args.model,
            args.data,
            args.output,
            constrained=args.constrained,
            max_samples=args.max_samples,
            load_in_4bit=args.four_bit,
            dtype=args.dtype,
            **generation_kwargs(args),
        )
        print(f"wrote {predictions_path(args.output)}")
    else:
        if args.constrained or args.max_samples:
            raise CommandError("--constrained and --max-samples apply to --model, not --predictions")
        start = time.perf_counter()
        records = read_predictions(args.predictions)
        # The same keys as a generated report; how the predictions were made is unknown here.
        unknown = dict.fromkeys(
            (
                "model",
                "constrained",
                "max_new_tokens",
                "do_sample",
                "temperature",
                "prompt_format",
                "max_input_tokens",
                "batch_size",
            )
        )
        report = score_report(
            records,
            [r["prediction"] for r in records],
            **unknown,
            data=args.predictions,
            wall_time_s=round(time.perf_counter() - start, 3),
        )
        atomic_write_text(args.output, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print(format_table(report))
    print(f"wrote {args.output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run ``evaluate``.

    Args:
        argv: Arguments after the command name.

    Returns:
        The exit status.

    """
    return run(build_parser(), _evaluate, argv)
