"""``translate``: one request (or a JSONL file of them) to a validated ``CreateSession`` body.

The model's text is never trusted: :func:`~qod_lightning.validation.validate_request` alone
decides whether an answer is valid, so an injected instruction ("add a field priority") can at
worst produce an invalid answer, reported as such, never one that passes while breaking the schema.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from qod_lightning.artifacts import atomic_write_text
from qod_lightning.commands.common import (
    CommandError,
    add_generation_arguments,
    check_model_path,
    existing_file,
    generation_kwargs,
    run,
)
from qod_lightning.data.jsonl import read_jsonl
from qod_lightning.validation import ValidationReport, validate_request

INVALID_ANSWER = 1
"""Exit status when the model's answer fails validation."""


def build_parser() -> argparse.ArgumentParser:
    """Build the command-line parser.

    Returns:
        The parser.

    """
    parser = argparse.ArgumentParser(
        prog="qod_lightning translate",
        description="Turn a plain-language request into a validated CAMARA QoD CreateSession body.",
    )
    parser.add_argument("request", nargs="?", help="the request text (or use --input)")
    parser.add_argument("--model", required=True, help="adapter directory, merged model directory or hub id")
    parser.add_argument("--constrained", action="store_true", help="grammar-constrained decoding (xgrammar)")
    parser.add_argument("--input", help='JSONL of {"input": ...} records to translate')
    parser.add_argument("--output", help="JSONL to write the results to (with --input)")
    add_generation_arguments(parser)
    return parser


def answer_record(request: str, raw_output: str) -> dict[str, Any]:
    """Judge one answer for the JSONL output.

    Returns:
        ``{"input", "output", "valid", "errors", "raw_output"}``: ``output`` is the parsed body
        only when it is valid (``null`` otherwise, so a consumer cannot use an invalid one);
        ``errors`` lists failed checks and, as in the metrics, values the request never mentions.

    """
    report = validate_request(raw_output, request)
    return {
        "input": request,
        "output": report.parsed if report.valid else None,
        "valid": report.valid,
        "errors": [*report.errors, *(f"hallucinated value: {v}" for v in report.hallucinated_values)],
        "raw_output": raw_output,
    }


def _requests(args: argparse.Namespace) -> list[str]:
    """The requests to translate, checked before any model is loaded."""
    if (args.request is None) == (args.input is None):
        raise CommandError("give either a REQUEST argument or --input FILE.jsonl")
    if args.input is not None:
        if args.output is None:
            raise CommandError("--input needs --output FILE.jsonl")
        return [record["input"] for record in read_jsonl(existing_file(args.input, "input file"), {"input": str})]
    if args.output is not None:
        raise CommandError("--output is only used with --input")
    if not args.request.strip():
        raise CommandError("the request is empty; describe the session, e.g. 'gaming, device 203.0.113.7, ...'")
    try:
        args.request.encode("utf-8")
    except UnicodeEncodeError as err:  # argv bytes that were not UTF-8 arrive as lone surrogates
        raise CommandError(f"the request is not UTF-8 text (undecodable byte at character {err.start + 1})") from err
    return [args.request]


def _print_single(request: str, raw_output: str) -> int:
    report: ValidationReport = validate_request(raw_output, request)
    if not report.valid:
        error = {"error": "the model's answer is not a valid CreateSession request", "checks": report.to_dict()}
        print(json.dumps({**error, "raw_output": raw_output}, ensure_ascii=False, indent=2), file=sys.stderr)
        return INVALID_ANSWER
    if report.hallucinated_values:
        print(f"WARNING: values not found in the request: {', '.join(report.hallucinated_values)}", file=sys.stderr)
    print(json.dumps(report.parsed, ensure_ascii=False, indent=2))
    return 0


def _translate(args: argparse.Namespace) -> int:
    from qod_lightning.generation import generate
    from qod_lightning.model import load_for_inference, resolve_prompt_format, saved_answer_notes

    requests = _requests(args)
    options = {
        **generation_kwargs(args),
        "prompt_format": resolve_prompt_format(args.model, args.prompt_format),
        "notes": saved_answer_notes(args.model),
    }
    model, tokenizer = load_for_inference(check_model_path(args.model), load_in_4bit=args.four_bit, dtype=args.dtype)
    outputs = generate(model, tokenizer, requests, constrained=args.constrained, **options)
    if args.input is None:
        return _print_single(requests[0], outputs[0])
    records = [answer_record(request, raw) for request, raw in zip(requests, outputs, strict=True)]
    atomic_write_text(args.output, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    valid = sum(r["valid"] for r in records)
    print(f"wrote {len(records)} answers to {args.output} ({valid} valid)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run ``translate``.

    Args:
        argv: Arguments after the command name.

    Returns:
        0 when the answer is valid (or the JSONL file was written), 1 when the single answer is
        invalid (the error JSON goes to stderr), 2 for bad arguments or inputs.

    """
    return run(build_parser(), _translate, argv)
