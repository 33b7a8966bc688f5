"""Timing a training run: the shared warm-up, the stage clock and the run's result record."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from qod_lightning.bench.data import response_tokens, sequence_tokens
from qod_lightning.bench.memory import (
    current_rss_mb,
    peak_rss_mb,
    process_peak_rss_mb,
    release_free_memory,
    reset_peak_rss,
)
from qod_lightning.bench.options import StageSpec
from qod_lightning.logprobs import batch_logps


def warm_up(model: Any, batches: list[dict[str, torch.Tensor]]) -> float:
    """Forward and backward passes of ``model`` on ``batches``, gradients discarded; no weight changes.

    The same function warms both frameworks before their clocks start (thread pools, oneDNN
    primitives, the allocator), through the decoder and a response-only LM head, so it never
    allocates more than either framework's own step.

    Returns:
        Seconds spent.
    """
    start = time.perf_counter()
    was_training = model.training
    model.train()
    device = next(model.parameters()).device
    for batch in batches:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logps, _ = batch_logps(model, {k: v.to(device) for k, v in batch.items()})
        (-logps.sum()).backward()
    for param in model.parameters():
        param.grad = None
    model.train(was_training)
    synchronize()
    return time.perf_counter() - start


def synchronize() -> None:
    """Wait for queued GPU work, so a host clock read after it covers that work (no-op on CPU)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


@contextmanager
def stage_clock(gpu: bool = False) -> Iterator[dict[str, float]]:
    """Time a block and record its peak RSS (and with ``gpu``, peak GPU memory); yields the numbers' dict.

    ``clock_start`` and ``clock_end`` are the ``perf_counter`` readings that bound ``stage_s``.
    """
    numbers: dict[str, float] = {}
    release_free_memory()
    if gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    numbers["rss_at_start_mb"] = current_rss_mb()
    numbers["peak_reset"] = float(reset_peak_rss())
    start = time.perf_counter()
    numbers["clock_start"] = start
    try:
        yield numbers
    finally:
        synchronize()
        numbers["clock_end"] = time.perf_counter()
        numbers["stage_s"] = numbers["clock_end"] - start
        numbers["peak_rss_mb"] = peak_rss_mb()
        numbers["process_peak_rss_mb"] = process_peak_rss_mb()
        if gpu:
            numbers["peak_gpu_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20


def summarize(
    spec: StageSpec,
    numbers: dict[str, float],
    step_ends: list[float],
    train_start: float,
    examples: list[dict[str, Any]],
    **extra: Any,
) -> dict[str, Any]:
    """Build a run's result record.

    Args:
        spec: The run.
        numbers: From :func:`stage_clock`.
        step_ends: ``perf_counter`` at the end of every optimizer step.
        train_start: ``perf_counter`` when the first step began (after any reference precomputation).
        examples: The examples trained on.
        **extra: More fields (losses, first-batch log-probs, precompute time, ...).

    Returns:
        JSON-ready numbers.
    """
    step_times = [b - a for a, b in zip([train_start, *step_ends[:-1]], step_ends, strict=True)]
    tokens = response_tokens(spec, examples)
    seq_tokens = sequence_tokens(spec, examples)
    stage_s = numbers["stage_s"]
    ordered = sorted(step_times) or [float("nan")]
    return {
        "framework": spec.framework,
        "label": spec.label,
        "stage": spec.stage,
        "steps": len(step_times),
        "examples": len(examples),
        "response_tokens": tokens,
        "stage_s": stage_s,
        "response_tokens_per_s": tokens / stage_s,
        "sequence_tokens": seq_tokens,
        "sequence_tokens_per_s": seq_tokens / stage_s,
        "examples_per_s": len(examples) / stage_s,
        "step_times_s": step_times,
        "median_step_s": ordered[len(ordered) // 2],
        "mean_step_s": sum(step_times) / max(1, len(step_times)),
        "first_step_s": step_times[0] if step_times else float("nan"),
        # where the stage's time outside its steps goes: trainer build, setup and any reference
        # pass before the first step; the end of the loop and teardown after the last
        "before_steps_s": train_start - numbers["clock_start"],
        "after_steps_s": numbers["clock_end"] - (step_ends[-1] if step_ends else train_start),
        **{k: v for k, v in numbers.items() if k not in ("stage_s", "clock_start", "clock_end")},
        "stage_rss_increase_mb": numbers["peak_rss_mb"] - numbers["rss_at_start_mb"],
        "load_average_1min_at_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        **extra,
    }


def training_step_times(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: list[dict[str, torch.Tensor]]
) -> list[float]:
    """Seconds of each full training step (forward, backward, optimizer step) over ``batches``.

    The loss is the token-weighted mean NLL of the answer tokens, as the SFT stage trains.
    """
    times = []
    for batch in batches:
        start = time.perf_counter()
        logps, counts = batch_logps(model, batch)
        (-logps.sum() / counts.sum()).backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    return times
