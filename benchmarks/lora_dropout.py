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
import time

import torch

from qod_lightning.data.sft import SFTDataModule
from qod_lightning.dropout import use_byte_dropout
from qod_lightning.logprobs import batch_logps
from qod_lightning.model import LoRASettings, ModelSettings, build_model

WAYS = ("torch.nn.Dropout", "ByteDropout", "no dropout")


def batches(model: str, steps: int) -> list[dict[str, torch.Tensor]]:
    """``steps`` SFT batches of 2 records, encoded and collated by the SFT data module itself."""
    data = SFTDataModule(model, "data/large_sft.jsonl", batch_size=2)
    examples = [data.encode(record) for record in data.read(data.hparams.train_file)[: 2 * steps]]
    examples = [example for example in examples if example is not None]  # too long: the module drops them too
    return [data.collate(examples[i : i + 2]) for i in range(0, len(examples), 2)]


def step_times(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, data: list[dict[str, torch.Tensor]]
) -> list[float]:
    """Seconds of each training step over ``data``."""
    times = []
    for batch in data:
        start = time.perf_counter()
        logps, counts = batch_logps(model, batch)
        (-logps.sum() / counts.sum()).backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    """Time the three ways and print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded:smollm2-135m")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    data = batches(args.model, args.steps)
    models = {}
    for way in WAYS:
        torch.manual_seed(0)
        lora = LoRASettings(dropout=0.0 if way == "no dropout" else 0.05)
        model = build_model(ModelSettings(model_name_or_path=args.model, lora=lora)).train()
        if way == "ByteDropout":
            use_byte_dropout(model)
        trainable = [p for p in model.parameters() if p.requires_grad]
        models[way] = (model, torch.optim.AdamW(trainable, lr=1e-4))
        step_times(*models[way], data[:1])  # warm-up
    times: dict[str, list[float]] = {way: [] for way in WAYS}
    for _ in range(args.rounds):
        for way in WAYS:
            times[way] += step_times(*models[way], data)
    reference = statistics.median(times[WAYS[0]])
    print(f"{torch.get_num_threads()} torch threads, {len(data)} batches of 2 x {args.rounds} rounds")
    print("| LoRA dropout | median step (s) | ratio |")
    print("|---|---:|---:|")
    for way in WAYS:
        median = statistics.median(times[way])
        print(f"| {way} | {median:.3f} | {median / reference:.3f} |")


if __name__ == "__main__":
    main()
