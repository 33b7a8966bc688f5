"""The GPU point: a Phi-3-mini-shaped model with random weights, the card's measured bf16 peak, and MFU.

Model FLOPs utilisation counts ``4 * N`` FLOPs per trained token for a model of ``N`` parameters
trained with LoRA: the forward pass (``2 * N``) and the backward pass through the activations
(``2 * N``); the frozen base weights get no weight gradients, and the LoRA matrices and attention
scores are left out, as is the forward that gradient checkpointing repeats. The peak is measured
on the card (a large bf16 matrix product), not read off a datasheet.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

import torch

from qod_lightning.artifacts import atomic_directory

PHI3_MINI = {
    "vocab_size": 32064,
    "hidden_size": 3072,
    "intermediate_size": 8192,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 4096,
    "sliding_window": 2047,
    "tie_word_embeddings": False,
}
"""The shape of ``microsoft/Phi-3-mini-4k-instruct`` (its ``config.json``): 3,821,079,552 parameters."""

FLOPS_PER_TOKEN_PER_PARAMETER = 4
"""LoRA training: forward ``2N`` + backward through the activations ``2N`` (no base weight gradients)."""


def build_random_phi3(directory: str | Path, tokenizer: Any, overrides: dict[str, Any] | None = None) -> Path:
    """Save a Phi-3 with random weights (bf16) and ``tokenizer`` into ``directory``, once.

    Built on the GPU when there is one (seconds instead of minutes for 3.8B parameters).

    Args:
        directory: Target directory; reused when it already holds a ``config.json``.
        tokenizer: Saved beside the weights; its ids must be below the vocabulary size.
        overrides: Config fields that replace :data:`PHI3_MINI`'s (smaller shapes for tests).

    Returns:
        ``directory``.
    """
    from transformers import Phi3Config, Phi3ForCausalLM

    directory = Path(directory)
    if (directory / "config.json").is_file():
        return directory
    config = Phi3Config(
        **{**PHI3_MINI, **(overrides or {})},
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if len(tokenizer) > config.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens, more than the vocabulary of {config.vocab_size}")
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Phi3ForCausalLM(config).to(torch.bfloat16)
    with atomic_directory(directory) as tmp:  # an interrupted 7.6 GB write is never taken for a model
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the benchmarked runs are other processes on the same card
    return directory


def parameter_count(model_dir: str | Path) -> int:
    """Parameters of the model saved in ``model_dir``, read from its safetensors headers."""
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors file")
    total = 0
    for file in files:
        with safe_open(str(file), framework="pt") as weights:
            total += sum(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys())  # noqa: SIM118
    return total


def bf16_matmul_tflops(size: int = 8192, repeats: int = 10, warmup: int = 3) -> float:
    """The card's bf16 matrix-product rate: median of ``repeats`` ``size``-cubed products, random data.

    Returns:
        TFLOP/s (``2 * size**3`` FLOPs per product, timed with CUDA events).
    """
    generator = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16, generator=generator)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16, generator=generator)
    for _ in range(warmup):
        a @ b
    seconds = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        seconds.append(start.elapsed_time(end) / 1e3)
    del a, b
    torch.cuda.empty_cache()
    return 2 * size**3 / statistics.median(seconds) / 1e12


def describe_gpu() -> dict[str, Any]:
    """Name, memory, compute capability and CUDA version of GPU 0, with its measured bf16 peak."""
    props = torch.cuda.get_device_properties(0)
    return {
        "name": props.name,
        "memory_gib": props.total_memory / 2**30,
        "capability": f"{props.major}.{props.minor}",
        "multiprocessors": props.multi_processor_count,
        "cuda": torch.version.cuda,
        "peak_bf16_tflops": bf16_matmul_tflops(),
        "peak_method": "median of 10 bf16 8192x8192x8192 torch matmuls on random data, CUDA events, after 3 warm-ups",
    }


def mfu(stages: dict[str, dict[str, Any]], parameters: int, peak_tflops: float) -> dict[str, dict[str, Any]]:
    """Model FLOPs utilisation of every SFT run: ``4 * parameters * tokens/s / peak``.

    Tokens are all non-padding tokens of the trained rows (prompt and response: every position goes
    through the forward and the backward pass). ``mfu`` is over the whole stage's wall time (trainer
    set-up and teardown included); ``median_step_mfu`` over the median step, with the mean tokens
    of a step (exact when every row has the same length). DPO runs are left out: a reference
    forward and a shared prompt do not fit the ``4N`` count.

    Returns:
        ``{"sft": {label: {"tokens_per_s", "mfu", "median_step_tokens_per_s", "median_step_mfu"}}}``.
    """
    flops_per_token = FLOPS_PER_TOKEN_PER_PARAMETER * parameters / (peak_tflops * 1e12)
    found = {}
    for label, run in stages.get("sft", {}).items():
        step_rate = run["sequence_tokens"] / run["steps"] / run["median_step_s"] if run["steps"] else float("nan")
        found[label] = {
            "tokens_per_s": run["sequence_tokens_per_s"],
            "mfu": flops_per_token * run["sequence_tokens_per_s"],
            "median_step_tokens_per_s": step_rate,
            "median_step_mfu": flops_per_token * step_rate,
        }
    return {"sft": found}
