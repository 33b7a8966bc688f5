"""bitsandbytes' two CPU paths for a 4-bit model's inference forward, in one process.

    PYTHONPATH=. python benchmarks/cpu_4bit_kernels.py [--model embedded:smollm2-135m] [--rounds 5]

On a CPU with AVX512-BF16, bitsandbytes repacks each ``Linear4bit`` on its first no-grad eval
forward and multiplies in bfloat16 (its own C++ kernel; a faster one would come from the model
hub, which our machines cannot reach). :func:`qod_lightning.model.use_portable_4bit_kernels`
keeps every layer on the other path: dequantize to the compute dtype, then an ordinary matmul.
This script loads the model twice in 4-bit NF4 with fp32 compute, runs the same batch of
prompts through both in turns, and prints each path's median forward time, their ratio, and the
greatest logit difference. On a CPU without AVX512-BF16 both models take the portable path.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from bitsandbytes.functional import has_avx512bf16

from qod_lightning.data.jsonl import read_objects
from qod_lightning.data.tokenize import encode_prompt
from qod_lightning.model import ModelSettings, QuantizationSettings, load_base_model, load_tokenizer


def prompt_batch(model: str, n: int) -> torch.Tensor:
    """The first ``n`` prompts of ``data/eval.jsonl``, cut to the shortest one's length: ``(n, T)``."""
    tokenizer = load_tokenizer(model)
    ids = [encode_prompt(tokenizer, r["input"]) for _, r in read_objects("data/eval.jsonl")[:n]]
    length = min(map(len, ids))
    return torch.tensor([i[:length] for i in ids])  # (n, T)


def main() -> None:
    """Time both paths and print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded:smollm2-135m")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    settings = ModelSettings(args.model, quantization=QuantizationSettings(load_in_4bit=True, compute_dtype="float32"))
    portable = load_base_model(settings).eval()
    packed = load_base_model(settings).eval()
    own_choice = has_avx512bf16()
    for module in packed.modules():  # undo use_portable_4bit_kernels: bitsandbytes' own choice
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = own_choice
    ids = prompt_batch(args.model, args.batch)
    models = {"portable (fp32)": portable, "bitsandbytes' choice": packed}
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        logits = {name: model(input_ids=ids).logits for name, model in models.items()}  # warm-up (and repacking)
        for _ in range(args.rounds):
            for name, model in models.items():
                start = time.perf_counter()
                model(input_ids=ids)
                times[name].append(time.perf_counter() - start)
    base = statistics.median(times["portable (fp32)"])
    capability = torch.backends.cpu.get_cpu_capability()
    print(f"{args.model}, batch {tuple(ids.shape)}, {args.rounds} rounds, torch cpu capability {capability}")
    for name, values in times.items():
        print(f"{name:>22}: median {statistics.median(values):.3f} s, ratio {statistics.median(values) / base:.3f}")
    difference = (logits["portable (fp32)"] - logits["bitsandbytes' choice"]).abs().max().item()
    print(f"greatest logit difference: {difference:.3e}")


if __name__ == "__main__":
    main()
