"""SFT training steps with PEFT's LoRA dropout, with ByteDropout, and with none, in one process.

    PYTHONPATH=. python benchmarks/lora_dropout.py [--model embedded:smollm2-135m] [--steps 8] [--rounds 3]

Builds the LoRA model of ``configs/embedded_sft.yaml`` (r=16 on every projection, dropout 0.05)
and runs full training steps (forward, backward, AdamW) on the first records of
``data/large_sft.jsonl`` in batches of 2, as the SFT stage does. The three ways take turns for
``--rounds`` rounds of ``--steps`` steps each, so a drift in the machine's speed falls on all of
them. Prints each way's median step time and its ratio to ``torch.nn.Dropout``'s.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from qod_lightning.bench.data import sft_batches
from qod_lightning.bench.timing import training_step_times
from qod_lightning.dropout import use_byte_dropout
from qod_lightning.model import LoRASettings, ModelSettings, build_model

WAYS = ("torch.nn.Dropout", "ByteDropout", "no dropout")


def main() -> None:
    """Time the three ways and print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded:smollm2-135m")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    data = sft_batches(args.model, "data/large_sft.jsonl", args.steps)
    models = {}
    for way in WAYS:
        torch.manual_seed(0)
        lora = LoRASettings(dropout=0.0 if way == "no dropout" else 0.05)
        model = build_model(ModelSettings(model_name_or_path=args.model, lora=lora)).train()
        if way == "ByteDropout":
            use_byte_dropout(model)
        trainable = [p for p in model.parameters() if p.requires_grad]
        models[way] = (model, torch.optim.AdamW(trainable, lr=1e-4))
        training_step_times(*models[way], data[:1])  # warm-up
    times: dict[str, list[float]] = {way: [] for way in WAYS}
    for _ in range(args.rounds):
        for way in WAYS:
            times[way] += training_step_times(*models[way], data)
    reference = statistics.median(times[WAYS[0]])
    print(f"{torch.get_num_threads()} torch threads, {len(data)} batches of 2 x {args.rounds} rounds")
    print("| LoRA dropout | median step (s) | ratio |")
    print("|---|---:|---:|")
    for way in WAYS:
        median = statistics.median(times[way])
        print(f"| {way} | {median:.3f} | {median / reference:.3f} |")


if __name__ == "__main__":
    main()
