"""Greedy decoding of the evaluation set: transformers' growing cache vs ours, one thread vs two workers.

    python benchmarks/decode_workers.py [--model embedded:smollm2-135m] [--max-new-tokens 96]
        [--ways ours:2:30,ours:2:60]

Decodes every request of ``data/eval.jsonl`` four ways with ``generate_tokens``, in one process:
batches of 64 one at a time on all torch threads (the pipeline's setting before
``eval_workers``), then batches of 30 in two worker threads (``eval_workers: 2``), each with
transformers' ``DynamicCache`` (a copy of the whole cache every step) and with our
:class:`~qod_lightning.kv_cache.ReservedCache`. Prints seconds, the ratio to the first row, and
whether every answer is token for token the first row's. ``--ways`` times other
``cache:workers:batch`` combinations instead, the first being the reference.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers.cache_utils import DynamicCache

import qod_lightning.generation as generation
from qod_lightning.model import load_for_inference

WAYS = (("transformers", 1, 64), ("ours", 1, 64), ("transformers", 2, 30), ("ours", 2, 30))
"""(cache, workers, batch size) of each run, the first being the reference."""


@contextmanager
def cache_of(kind: str) -> Iterator[None]:
    """Make :func:`generation.prefill` start from transformers' cache or ours."""
    ours = generation.ReservedCache
    if kind == "transformers":
        generation.ReservedCache = lambda reserve: DynamicCache()
    try:
        yield
    finally:
        generation.ReservedCache = ours


def parse_ways(text: str) -> tuple[tuple[str, int, int], ...]:
    """``"ours:2:30,transformers:1:64"`` -> ``(("ours", 2, 30), ("transformers", 1, 64))``."""
    ways = []
    for item in text.split(","):
        kind, workers, batch_size = item.split(":")
        if kind not in ("ours", "transformers"):
            raise argparse.ArgumentTypeError(f"unknown cache {kind!r} in {item!r}: ours or transformers")
        ways.append((kind, int(workers), int(batch_size)))
    return tuple(ways)


def main() -> None:
    """Time each way and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded:smollm2-135m")
    parser.add_argument("--data", default="data/eval.jsonl")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--ways", type=parse_ways, default=WAYS, help="cache:workers:batch,... (first: reference)")
    args = parser.parse_args()
    model, tokenizer = load_for_inference(args.model)
    requests = [json.loads(line)["input"] for line in Path(args.data).read_text(encoding="utf-8").splitlines()]
    generation.generate_tokens(model, tokenizer, requests[:4], max_new_tokens=4, batch_size=4)  # warm-up
    print(
        f"{len(requests)} requests, {args.max_new_tokens} new tokens at most, {torch.get_num_threads()} torch threads"
    )
    print("| cache | workers | batch | seconds | vs first | same answers |\n|---|---:|---:|---:|---:|---|")
    reference, first = None, None
    for kind, workers, batch_size in args.ways:
        with cache_of(kind):
            start = time.perf_counter()
            answers = generation.generate_tokens(
                model, tokenizer, requests, max_new_tokens=args.max_new_tokens, batch_size=batch_size, workers=workers
            )
            seconds = time.perf_counter() - start
        reference, first = reference or answers, first or seconds
        print(f"| {kind} | {workers} | {batch_size} | {seconds:.1f} | {seconds / first:.3f} | {answers == reference} |")


if __name__ == "__main__":
    main()
