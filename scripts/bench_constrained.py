"""Per-token cost of grammar-constrained decoding versus plain decoding, in one run.

    HF_HUB_OFFLINE=1 python scripts/bench_constrained.py                 # tiny random Phi-3, CPU
    HF_HUB_OFFLINE=1 python scripts/bench_constrained.py --model artifacts/sft/final

Tokens are counted as decoder forward passes (one per generated position of a batch), so the
number is time per decoding step whatever each run's answers' lengths. Grammar compilation is
timed separately: it happens once per tokenizer, not per request.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

REQUESTS = [
    "Need gaming session, device 203.0.113.75, server 192.0.2.200, 2 hours",
    "video call from +44 7700 900123 to 2001:db8::1 for 90 minutes",
    "Streaming 4k from 198.51.100.4 to 192.0.2.9:8443, notify https://hooks.example.com/qod/7",
    "Low latency for +4915112345678 to 198.51.100.7 for an hour",
]


def timed_run(model, tokenizer, requests, constrained: bool, args) -> tuple[float, int]:
    from qod_lightning.generation import generate

    steps = 0

    def count(*_):
        nonlocal steps
        steps += 1

    handle = model.register_forward_hook(count)
    start = time.perf_counter()
    generate(
        model,
        tokenizer,
        requests,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        constrained=constrained,
    )
    elapsed = time.perf_counter() - start
    handle.remove()
    return elapsed, steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="adapter or model directory (default: a tiny random Phi-3)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from qod_lightning.generation import GRAMMAR_CACHE, load_for_inference

    with tempfile.TemporaryDirectory() as tmp:
        path = args.model
        if path is None:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
            from tests.tiny import build_tiny_phi3

            path = str(build_tiny_phi3(Path(tmp) / "tiny"))
        model, tokenizer = load_for_inference(path)

    start = time.perf_counter()
    GRAMMAR_CACHE.get(tokenizer, model.get_output_embeddings().weight.shape[0])
    compile_ms = 1000 * (time.perf_counter() - start)

    for constrained in (False, True):  # warm-up
        timed_run(model, tokenizer, REQUESTS[:1], constrained, args)
    # Interleaved, so load from other processes on a shared machine hits both modes alike.
    totals = {False: [0.0, 0], True: [0.0, 0]}
    for _ in range(args.repeats):
        for constrained in (False, True):
            elapsed, steps = timed_run(model, tokenizer, REQUESTS, constrained, args)
            totals[constrained][0] += elapsed
            totals[constrained][1] += steps
    per_token = {mode: 1000 * seconds / steps for mode, (seconds, steps) in totals.items()}
    for mode, name in ((False, "unconstrained"), (True, "constrained")):
        print(
            f"{name:>13}: {per_token[mode]:.3f} ms/token "
            f"({totals[mode][1]} steps, batch {args.batch_size}, {args.repeats} repeats)"
        )
    print(f"{'ratio':>13}: {per_token[True] / per_token[False]:.2f}x  (grammar compile, once: {compile_ms:.0f} ms)")
    print(f"device: {'cuda' if next(model.parameters()).is_cuda else 'cpu'}, torch threads: {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
