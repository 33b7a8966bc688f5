"""What the inference commands share: argument handling, one-line errors, path checks."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qod_lightning.data.jsonl import DataError

USAGE_ERROR = 2
"""Exit status for bad arguments or inputs (argparse's own)."""


class CommandError(Exception):
    """An expected failure, reported as one line.

    Args:
        message: What went wrong and, where it helps, what to do.
        exit_code: The process exit status.

    """

    def __init__(self, message: str, exit_code: int = USAGE_ERROR) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def run(parser: argparse.ArgumentParser, body: Callable[[argparse.Namespace], int], argv: list[str] | None) -> int:
    """Parse ``argv`` and run ``body``, turning expected failures into an exit status.

    Args:
        parser: The command's parser.
        body: The command; returns its exit status.
        argv: Arguments after the command name (``sys.argv`` when ``None``).

    Returns:
        The exit status: ``body``'s, 2 for usage errors, or the :class:`CommandError`'s.

    """
    # Library warnings (a truncated request) reach the terminal as "WARNING: ..." lines; a no-op
    # when logging is already configured (tests, notebooks).
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse has printed its message
        return int(exit_.code or 0)
    try:
        return body(args)
    except CommandError as err:
        return _fail(str(err), err.exit_code)
    except DataError as err:
        return _fail(str(err), USAGE_ERROR)
    except ImportError as err:  # an optional extra: xgrammar (--constrained), matplotlib (compare)
        return _fail(f"{err}; see the optional dependencies in pyproject.toml", 1)
    except (OSError, ValueError) as err:
        return _fail(f"{type(err).__name__}: {err}", 1)


def _fail(message: str, exit_code: int) -> int:
    first_line = message.strip().splitlines()[0] if message.strip() else "failed"
    print(f"error: {first_line}", file=sys.stderr)
    return exit_code


def existing_file(path: str, what: str) -> Path:
    """Return ``path`` as a :class:`Path`, or raise :class:`CommandError` when it is no file."""
    if not Path(path).is_file():
        raise CommandError(f"{what} not found: {path}")
    return Path(path)


def check_model_path(path: str) -> str:
    """Reject a local-looking model path that does not exist, before any slow loading.

    ``embedded:NAME`` and hub ids (``org/name``, which have no local directory) pass through.
    """
    looks_local = path.startswith((".", "/", "~")) or path.count("/") != 1 or Path(path).parent.is_dir()
    if not path.startswith("embedded:") and looks_local and not Path(path).exists():
        raise CommandError(f"model not found: {path} (expected an adapter or model directory)")
    return path


def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the decoding options that ``translate``, ``evaluate`` and ``compare`` share."""
    parser.add_argument("--max-new-tokens", type=positive_int, default=512, help="tokens per answer (default 512)")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="requests per batch (default 8)")
    parser.add_argument(
        "--workers", type=positive_int, default=1, help="batches decoded at once in threads, on a CPU (default 1)"
    )
    parser.add_argument(
        "--prompt-format",
        choices=("alpaca", "chat"),
        help="as in training (default: the format saved with the adapter or model, else alpaca)",
    )
    parser.add_argument("--4bit", dest="four_bit", action="store_true", help="load the base weights in 4-bit NF4")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=positive_float, default=0.3, help="sampling temperature (default 0.3)")
    parser.add_argument("--max-input-tokens", type=positive_int, default=1024, help="longest prompt kept")


def generation_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The :func:`~qod_lightning.generation.generate` keywords the shared options set."""
    return {
        "prompt_format": args.prompt_format,
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "do_sample": args.do_sample,
        "temperature": args.temperature,
        "max_input_tokens": args.max_input_tokens,
    }


def positive_int(value: str) -> int:
    """Argparse type: an integer of at least 1."""
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {number}")
    return number


def positive_float(value: str) -> float:
    """Argparse type: a finite number above 0."""
    number = float(value)
    if not 0 < number < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {value}")
    return number
