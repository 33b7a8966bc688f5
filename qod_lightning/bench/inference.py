"""Inference speed: batched greedy generation (requests/s) and the per-token cost of constrained decoding.

"Per token" means per decoding step of a batch (one forward of one new position per row), timed
from the forward hooks and excluding the prompt (prefill) pass, whatever each run's answers'
lengths; constrained and plain runs of the same requests are interleaved, so load from other
processes on a shared machine hits both alike. Grammar compilation is timed separately: it happens
once per tokenizer, not per request.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from qod_lightning.bench.memory import current_rss_mb, peak_rss_mb, process_peak_rss_mb, reset_peak_rss


@dataclass(frozen=True)
class GenerationSpec:
    """One generation benchmark.

    Attributes:
        model_path: Anything :func:`~qod_lightning.model.load_for_inference` loads.
        requests: The request texts (the first ``n`` inputs of the evaluation set).
        batch_size: Requests per ``generate`` call.
        max_new_tokens: Most new tokens per request.
        constrained_repeats: Interleaved constrained/plain repeats (0: skip constrained decoding).
        quant: ``none`` or ``4bit``.
        threads: torch intra-op threads.
    """

    model_path: str
    requests: tuple[str, ...]
    batch_size: int = 8
    max_new_tokens: int = 64
    constrained_repeats: int = 2
    quant: str = "none"
    threads: int = 1


class ForwardClock:
    """Time every forward call of a model during generation, telling the prompt pass from decoding steps.

    A forward whose ``input_ids`` has more than one column is a prompt (prefill) pass; one column is a
    decoding step. A decoding step's time runs from its forward's start to the next decoding step's
    start, so it includes the logits processors (the grammar) and the stopping criteria, but not the
    prompt pass or the set-up of the next batch.
    """

    def __init__(self) -> None:
        self.starts: list[tuple[float, bool]] = []  # (perf_counter, is decoding step)

    def hook(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        """Forward pre-hook: record when a forward starts and whether it decodes one token."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.starts.append((time.perf_counter(), ids is not None and ids.shape[-1] == 1))

    @property
    def passes(self) -> int:
        """Forward calls seen."""
        return len(self.starts)

    def decode_intervals(self) -> list[float]:
        """Seconds of every decoding step followed by another decoding step."""
        return [b[0] - a[0] for a, b in zip(self.starts, self.starts[1:], strict=False) if a[1] and b[1]]


@contextmanager
def forward_clock(model: torch.nn.Module) -> Iterator[ForwardClock]:
    """Attach a :class:`ForwardClock` to ``model`` (the causal LM under a PEFT wrapper) while the block runs."""
    clock = ForwardClock()
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    handle = causal_lm.register_forward_pre_hook(clock.hook, with_kwargs=True)
    try:
        yield clock
    finally:
        handle.remove()


def timed_generate(
    model: Any, tokenizer: Any, requests: list[str], *, constrained: bool, batch_size: int, max_new_tokens: int
) -> tuple[float, ForwardClock]:
    """Generate answers for ``requests``; returns the seconds taken and the forward clock."""
    from qod_lightning.generation import generate

    with forward_clock(model) as clock:
        start = time.perf_counter()
        generate(
            model,
            tokenizer,
            requests,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            constrained=constrained,
        )
        elapsed = time.perf_counter() - start
    return elapsed, clock


@contextmanager
def grammar_clock() -> Iterator[list[float]]:
    """Time the grammar's work while the block runs; yields ``[seconds, decoding steps]``.

    The grammar's own time per decoding step (filling and applying the token mask, then accepting
    the chosen tokens) is what constrained decoding adds to a step, measured without the
    run-to-run noise of comparing two separate generations.
    """
    from qod_lightning.constrained import GrammarMask

    totals = [0.0, 0.0]
    originals = {"apply": GrammarMask.apply, "accept": GrammarMask.accept}

    def timed(name: str) -> Any:
        def wrapper(self: Any, *args: Any) -> None:
            start = time.perf_counter()
            try:
                originals[name](self, *args)
            finally:
                totals[0] += time.perf_counter() - start
                totals[1] += name == "apply"  # one mask per decoding step

        return wrapper

    for name in originals:
        setattr(GrammarMask, name, timed(name))
    try:
        yield totals
    finally:
        for name, original in originals.items():
            setattr(GrammarMask, name, original)


def constrained_overhead(
    model: Any, tokenizer: Any, requests: list[str], *, repeats: int, batch_size: int, max_new_tokens: int
) -> dict[str, Any]:
    """Time per decoding step with and without the grammar, interleaved over ``repeats`` rounds.

    Returns:
        ``compile_ms`` (once per tokenizer); per mode the mean decoding-step time (prompt passes
        excluded, see :class:`ForwardClock`) and the end-to-end time per forward pass; ``ratio`` of
        the two modes' decoding-step times (a cross-check, noisy on a shared machine); and
        ``overhead``: the grammar's own time per step (:func:`grammar_clock`) over the
        plain decoding step.
    """
    from qod_lightning.constrained import GRAMMAR_CACHE

    start = time.perf_counter()
    GRAMMAR_CACHE.get(tokenizer, model.get_output_embeddings().weight.shape[0])
    compile_ms = 1000 * (time.perf_counter() - start)
    kwargs = {"batch_size": batch_size, "max_new_tokens": max_new_tokens}
    timed_generate(model, tokenizer, requests[:1], constrained=True, **kwargs)  # warm-up of the constrained path
    steps: dict[bool, list[float]] = {False: [], True: []}
    totals = {False: [0.0, 0], True: [0.0, 0]}
    with grammar_clock() as grammar:
        for _ in range(repeats):
            for constrained in (False, True):
                seconds, clock = timed_generate(model, tokenizer, requests, constrained=constrained, **kwargs)
                steps[constrained] += clock.decode_intervals()
                totals[constrained][0] += seconds
                totals[constrained][1] += clock.passes
    ms = {mode: 1000 * sum(times) / max(1, len(times)) for mode, times in steps.items()}
    grammar_ms = 1000 * grammar[0] / max(1, grammar[1])
    return {
        "compile_ms": compile_ms,
        "requests": len(requests),
        "repeats": repeats,
        "unconstrained_ms_per_step": ms[False],
        "constrained_ms_per_step": ms[True],
        "unconstrained_steps": len(steps[False]),
        "constrained_steps": len(steps[True]),
        "unconstrained_ms_per_pass_end_to_end": 1000 * totals[False][0] / max(1, totals[False][1]),
        "constrained_ms_per_pass_end_to_end": 1000 * totals[True][0] / max(1, totals[True][1]),
        "ratio": ms[True] / ms[False],
        "grammar_ms_per_step": grammar_ms,
        "grammar_calls": int(grammar[1]),
        "overhead": grammar_ms / ms[False],
    }


def run_generation(spec: GenerationSpec) -> dict[str, Any]:
    """Load the model, warm up, then time batched greedy generation and constrained decoding.

    Args:
        spec: What to run.

    Returns:
        ``requests_per_s``, ``ms_per_step`` and the settings, plus ``constrained`` (see
        :func:`constrained_overhead`) when xgrammar is installed and ``constrained_repeats > 0``.
    """
    from qod_lightning.model import load_for_inference

    torch.set_num_threads(spec.threads)
    model, tokenizer = load_for_inference(spec.model_path, load_in_4bit=spec.quant == "4bit")
    requests = list(spec.requests)
    kwargs = {"batch_size": spec.batch_size, "max_new_tokens": spec.max_new_tokens}
    timed_generate(model, tokenizer, requests[: spec.batch_size], constrained=False, **kwargs)  # warm-up
    rss_at_start = current_rss_mb()
    reset_peak_rss()
    seconds, clock = timed_generate(model, tokenizer, requests, constrained=False, **kwargs)
    decode = clock.decode_intervals()
    result: dict[str, Any] = {
        "requests": len(requests),
        "batch_size": spec.batch_size,
        "max_new_tokens": spec.max_new_tokens,
        "seconds": seconds,
        "requests_per_s": len(requests) / seconds,
        "decoder_passes": clock.passes,
        "ms_per_pass_end_to_end": 1000 * seconds / max(1, clock.passes),
        "ms_per_step": 1000 * sum(decode) / max(1, len(decode)),
        "rss_at_start_mb": rss_at_start,
        "peak_rss_mb": peak_rss_mb(),
    }
    if spec.constrained_repeats > 0 and importlib.util.find_spec("xgrammar") is not None:
        result["constrained"] = constrained_overhead(
            model, tokenizer, requests[: spec.batch_size], repeats=spec.constrained_repeats, **kwargs
        )
    elif spec.constrained_repeats > 0:
        result["constrained"] = {"skipped": "xgrammar is not installed"}
    result["process_peak_rss_mb"] = process_peak_rss_mb()
    return result
