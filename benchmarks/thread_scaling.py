"""Full fine-tuning steps of the main job's SFT stage at several torch thread counts, in one process.

    PYTHONPATH=. python benchmarks/thread_scaling.py [--threads 1 2] [--steps 4] [--rounds 2]

Builds the model of ``configs/embedded_full_sft.yaml`` (every weight trained, float32, SDPA) and
runs full training steps (forward, backward, AdamW) on the first records of
``data/notes_sft.jsonl`` in batches of 2 records, the SFT stage's forward-pass size. The thread
counts take turns for ``--rounds`` rounds of ``--steps`` steps each, so a drift in the machine's
speed falls on all of them. Prints each count's median step time and its speed-up over the first.
The default counts are 1 up to the machine's cores (``os.cpu_count()``), doubling.
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch

from qod_lightning.bench.data import sft_batches
from qod_lightning.bench.timing import training_step_times
from qod_lightning.model import ModelSettings, build_model


def default_threads() -> list[int]:
    """1, 2, 4, ... up to the machine's cores, the cores themselves last."""
    cores = os.cpu_count() or 1
    counts = [1]
    while counts[-1] * 2 < cores:
        counts.append(counts[-1] * 2)
    return [*counts, cores] if cores > 1 else counts


def step_times(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, data: list[dict[str, torch.Tensor]], threads: int
) -> list[float]:
    """Seconds of each training step over ``data`` with ``threads`` intra-op threads."""
    torch.set_num_threads(threads)
    return training_step_times(model, optimizer, data)


def main() -> None:
    """Time the thread counts and print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded:smollm2-135m")
    parser.add_argument("--threads", type=int, nargs="+", default=default_threads())
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    data = sft_batches(args.model, "data/notes_sft.jsonl", args.steps)
    torch.manual_seed(0)
    settings = ModelSettings(args.model, finetune="full", dtype="float32", attn_implementation="sdpa")
    model = build_model(settings).train()
    # One model and optimizer for all counts: the step's work does not depend on the weights' values.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0)
    step_times(model, optimizer, data[:1], args.threads[-1])  # warm-up: allocations, Adam state
    times: dict[int, list[float]] = {count: [] for count in args.threads}
    for _ in range(args.rounds):
        for count in args.threads:
            times[count] += step_times(model, optimizer, data, count)
    reference = statistics.median(times[args.threads[0]])
    print(f"{os.cpu_count()} cores, {len(data)} batches of 2 records x {args.rounds} rounds")
    print(f"| torch threads | median step (s) | speed-up over {args.threads[0]} |")
    print("|---:|---:|---:|")
    for count in args.threads:
        median = statistics.median(times[count])
        print(f"| {count} | {median:.2f} | {reference / median:.2f} |")


if __name__ == "__main__":
    main()
