"""What every benchmarked stage shares: its settings, its data in a fixed order, warm-up, memory probes."""

from __future__ import annotations

import ctypes
import gc
import json
import os
import re
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

STAGES = ("sft", "dpo")
"""Training stages the harness times."""

LEARNING_RATES = {"sft": 1.0e-3, "dpo": 1.0e-4}
"""AdamW learning rates of ``configs/embedded_sft.yaml`` and ``configs/embedded_dpo.yaml``."""


@dataclass(frozen=True)
class StageSpec:
    """One timed training run: a framework running one stage on prepared data.

    Attributes:
        stage: ``sft`` or ``dpo``.
        framework: ``ours`` or ``trl``.
        model_path: Local Hugging Face directory of the base model.
        data_file: JSONL with exactly ``steps * batch_size`` records.
        workdir: Scratch directory for this run.
        steps: Optimizer steps (one micro-batch each: no gradient accumulation).
        warmup_steps: Forward/backward passes before the clock starts (see :func:`warm_up`).
        batch_size: Examples (SFT) or pairs (DPO) per step.
        max_length: Longest sequence in tokens.
        learning_rate: AdamW learning rate (constant, weight decay 0).
        quant: ``none`` (fp32) or ``4bit`` (bitsandbytes NF4, fp32 compute).
        lora_r: LoRA rank.
        lora_alpha: LoRA alpha.
        lora_dropout: LoRA dropout of a new adapter (SFT).
        adapter_path: Adapter that DPO starts from (policy and reference), ``None`` for SFT.
        beta: DPO beta.
        threads: torch intra-op threads.
        trl_precompute: TRL's ``precompute_ref_log_probs`` (TRL DPO only).
        trl_fp32_lora: With a 4-bit base, put back the fp32 LoRA weights that TRL casts to bf16
            (``dpo_trainer.py:729``, ``sft_trainer.py:911``), so both frameworks train at one precision.
        import_trl: Import TRL's trainers in our runs too, so both processes hold the same libraries
            and peak RSS compares the training, not the imports.
        seed: Seed of the data order, the adapter init and the frameworks.
        device: ``cpu`` (fp32 weights and compute) or ``cuda`` (bf16 weights, bf16 autocast, LoRA
            weights in fp32 as in ``configs/sft.yaml``).
        gradient_checkpointing: Recompute activations in backward (both frameworks).
        pad_to_multiple_of: Batch length rounded up to a multiple of this (both frameworks).
    """

    stage: str
    framework: str
    model_path: str
    data_file: str
    workdir: str
    steps: int
    warmup_steps: int
    batch_size: int
    max_length: int
    learning_rate: float
    quant: str = "none"
    lora_r: int = 16
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    adapter_path: str | None = None
    beta: float = 0.1
    threads: int = 1
    trl_precompute: bool = False
    trl_fp32_lora: bool = True
    import_trl: bool = False
    seed: int = 42
    device: str = "cpu"
    gradient_checkpointing: bool = False
    pad_to_multiple_of: int = 1

    @property
    def label(self) -> str:
        """Short name of the run: ``ours``, ``trl`` or ``trl+precompute``."""
        return "trl+precompute" if self.framework == "trl" and self.trl_precompute else self.framework


@dataclass
class BenchOptions:
    """Everything ``python -m qod_lightning bench`` was asked to do.

    Attributes:
        model: ``tiny``, ``embedded`` or a local model directory.
        quant: ``none`` or ``4bit``.
        compare: ``trl`` to run TRL's trainers beside ours, ``none`` for ours only.
        stages: Any of ``sft``, ``dpo``, ``generate``.
        steps: Optimizer steps per training run.
        warmup_steps: Warm-up passes per training run.
        batch_size: Examples or pairs per step.
        dpo_batch_size: Pairs per DPO step when it differs from ``batch_size`` (the embedded
            pipeline's DPO config uses 1).
        max_length: Longest sequence in tokens.
        threads: torch threads in every run.
        lora_r: LoRA rank.
        lora_alpha: LoRA alpha.
        lora_dropout: LoRA dropout of the SFT adapter.
        beta: DPO beta.
        trl_fp32_lora: See :attr:`StageSpec.trl_fp32_lora` (``False`` keeps TRL's bf16 cast).
        trl_dpo_variants: TRL DPO runs: ``default`` (reference forward every step, TRL's default) and/or
            ``precompute`` (``precompute_ref_log_probs=True``, like ours).
        sft_data: SFT source records (cycled to the needed count).
        dpo_data: Preference source records (cycled to the needed count).
        eval_data: Evaluation records whose inputs the generation benchmark decodes.
        gen_samples: Requests decoded in the generation benchmark.
        gen_batch_size: Requests per ``generate`` call.
        gen_max_new_tokens: Most new tokens per request.
        constrained_repeats: Interleaved repeats of the constrained/unconstrained timing.
        scaling: Also time our DPO at ``scaling_pairs`` and 10x as many pairs on the tiny model.
        scaling_pairs: The smaller dataset of the scaling check.
        isolate: Run every stage in a fresh spawned process (peak RSS per stage); ``False`` runs in
            this process (faster, for tests; RSS numbers then mix).
        out: Result JSON path.
        workdir: Scratch directory (a temporary one when ``None``).
        seed: Seed of data order and adapter init.
        device: ``cpu`` or ``cuda`` (see :attr:`StageSpec.device`).
        gradient_checkpointing: See :attr:`StageSpec.gradient_checkpointing`.
        prompt_repeat: Repeat every record's request this many times, so that prompts are cut from
            the left to fill ``max_length`` (the GPU point at sequence length 512).
        pad_to_multiple_of: See :attr:`StageSpec.pad_to_multiple_of`.
    """

    model: str = "tiny"
    quant: str = "none"
    compare: str = "trl"
    stages: tuple[str, ...] = ("sft", "dpo", "generate")
    steps: int = 8
    warmup_steps: int = 2
    batch_size: int = 2
    dpo_batch_size: int | None = None
    max_length: int = 512
    threads: int = 1
    lora_r: int = 16
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    beta: float = 0.1
    trl_fp32_lora: bool = True
    trl_dpo_variants: tuple[str, ...] = ("default", "precompute")
    sft_data: str = "data/sft.jsonl"
    dpo_data: str = "data/preferences.jsonl"
    eval_data: str = "data/eval.jsonl"
    gen_samples: int = 16
    gen_batch_size: int = 8
    gen_max_new_tokens: int = 64
    constrained_repeats: int = 2
    scaling: bool = False
    scaling_pairs: int = 64
    isolate: bool = True
    out: str | None = None
    workdir: str | None = None
    seed: int = 42
    device: str = "cpu"
    gradient_checkpointing: bool = False
    prompt_repeat: int = 1
    pad_to_multiple_of: int = 1

    def to_json(self) -> dict[str, Any]:
        """The options as JSON-ready values."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


# -- data -----------------------------------------------------------------------------------------


def write_cycled_jsonl(source: str | Path, count: int, target: str | Path, prompt_repeat: int = 1) -> Path:
    """Write ``count`` records to ``target``: those of ``source`` in order, cycled as often as needed.

    Args:
        source: A JSONL file.
        count: Records to write.
        target: Output path.
        prompt_repeat: Write each record's request (``input`` of an SFT record, ``prompt`` of a
            preference pair) this many times over, one copy per line; the data module then cuts
            the prompt from the left so every example fills ``max_length``.

    Returns:
        ``target``.

    Raises:
        ValueError: When ``source`` has no record.
    """
    lines = [line for line in Path(source).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{source}: no records")
    if prompt_repeat > 1:
        lines = [_repeat_request(line, prompt_repeat) for line in lines]
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    Path(target).write_text("\n".join(lines[i % len(lines)] for i in range(count)) + "\n", encoding="utf-8")
    return Path(target)


def _repeat_request(line: str, times: int) -> str:
    record = json.loads(line)
    key = "prompt" if "prompt" in record else "input"
    record[key] = "\n".join([record[key]] * times)
    return json.dumps(record, ensure_ascii=False)


def data_module(spec: StageSpec) -> Any:
    """Our data module for ``spec``: its file, no validation split, tokenized (``setup`` done)."""
    from qod_lightning.data.preference import PreferenceDataModule
    from qod_lightning.data.sft import SFTDataModule

    cls = SFTDataModule if spec.stage == "sft" else PreferenceDataModule
    dm = cls(
        model_name_or_path=spec.model_path,
        train_file=spec.data_file,
        val_fraction=0.0,
        max_length=spec.max_length,
        batch_size=spec.batch_size,
        pad_to_multiple_of=spec.pad_to_multiple_of,
        seed=spec.seed,
    )
    dm.setup("fit")
    return dm


def training_order(dm: Any) -> list[int]:
    """Example indices in the order our training loader yields them (epoch 0, one process)."""
    return [index for batch in dm.train_dataloader().batch_sampler for index, _weight in batch]


def response_tokens(spec: StageSpec, examples: list[dict[str, Any]]) -> int:
    """Target tokens of ``examples``: response + EOS (SFT), chosen + rejected responses (DPO)."""
    if spec.stage == "sft":
        return sum(sum(1 for label in e["labels"][1:] if label != -100) for e in examples)
    return sum(len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in examples)


def sequence_tokens(spec: StageSpec, examples: list[dict[str, Any]]) -> int:
    """Tokens that go through the model, padding excluded: SFT rows; DPO as two rows per pair.

    A DPO pair counts ``2 * prompt + chosen + rejected``, the tokens that two unpadded rows hold,
    whether or not a framework scores the shared prompt once.
    """
    if spec.stage == "sft":
        return sum(len(e["input_ids"]) for e in examples)
    return sum(2 * len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in examples)


def weight_dtype(device: str) -> str:
    """Dtype of the base weights and 4-bit compute: bf16 on a GPU, fp32 on the CPU (no bf16 units)."""
    return "bfloat16" if device == "cuda" else "float32"


def model_settings(spec: StageSpec) -> Any:
    """The :class:`~qod_lightning.model.ModelSettings` both frameworks load ``spec``'s model with."""
    from qod_lightning.model import LoRASettings, ModelSettings, QuantizationSettings

    dtype = weight_dtype(spec.device)
    return ModelSettings(
        model_name_or_path=spec.model_path,
        adapter_path=spec.adapter_path,
        dtype=dtype,
        attn_implementation="sdpa",
        gradient_checkpointing=spec.gradient_checkpointing,
        lora=LoRASettings(r=spec.lora_r, alpha=spec.lora_alpha, dropout=spec.lora_dropout),
        quantization=QuantizationSettings(load_in_4bit=spec.quant == "4bit", compute_dtype=dtype),
    )


def make_start_adapter(
    model_path: str,
    out_dir: str | Path,
    r: int = 16,
    alpha: int = 16,
    seed: int = 0,
    scale: float = 0.02,
    dtype: str = "float32",
) -> Path:
    """Save a stand-in for an SFT adapter: PEFT's ``A`` init and ``B ~ N(0, scale^2)``, dropout 0.

    DPO starts from an SFT adapter; a new adapter (``B = 0``) would make the policy equal the base
    model and the reference trivially so. A non-zero ``B`` makes the agreement check meaningful.
    Dropout is 0 because TRL's ``DPOConfig.disable_dropout`` (default ``True``) zeroes it and ours
    takes it from the adapter's config.

    Args:
        model_path: Base model directory.
        out_dir: Where the adapter goes.
        r: LoRA rank.
        alpha: LoRA alpha.
        seed: Seed of ``A`` and ``B``.
        scale: Standard deviation of ``B``.
        dtype: Dtype the base model is loaded in (``bfloat16`` halves the memory of a large model).

    Returns:
        ``out_dir``.
    """
    from qod_lightning.model import LoRASettings, ModelSettings, build_model

    torch.manual_seed(seed)
    model = build_model(ModelSettings(model_path, dtype=dtype, lora=LoRASettings(r=r, alpha=alpha, dropout=0.0)))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    model.save_pretrained(out_dir, safe_serialization=True, save_embedding_layers=False)
    return Path(out_dir)


# -- warm-up ------------------------------------------------------------------------------------------


def warm_up(model: Any, batches: list[dict[str, torch.Tensor]]) -> float:
    """Forward and backward passes of ``model`` on ``batches``, gradients discarded; no weight changes.

    The same function warms both frameworks before their clocks start (thread pools, oneDNN
    primitives, the allocator), through the decoder and a response-only LM head, so it never
    allocates more than either framework's own step.

    Returns:
        Seconds spent.
    """
    from qod_lightning.modules.common import batch_logps

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


def first_batches(dm: Any, count: int) -> list[dict[str, torch.Tensor]]:
    """The first ``count`` training batches of ``dm``, as its collate function builds them."""
    batches = []
    for batch in dm.train_dataloader():
        if len(batches) >= count:
            break
        batches.append({k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")})
    return batches


# -- memory -----------------------------------------------------------------------------------------

RSS_METHOD = (
    "peak_rss_mb: VmHWM of the stage's own process, reset through /proc/self/clear_refs when the stage clock "
    "starts, after malloc_trim(0) returned warm-up's freed heap to the OS (so it is the highest resident set "
    "while the stage ran: weights + training); process_peak_rss_mb: "
    "getrusage(RUSAGE_SELF).ru_maxrss of that process (includes imports, model loading and warm-up)"
)
"""How peak memory is measured, recorded in every result."""


def _status_kb(name: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    found = re.search(rf"^{name}:\s+(\d+) kB", text, re.MULTILINE)
    return int(found.group(1)) if found else None


def release_free_memory() -> None:
    """Hand memory that ``free`` kept in the C heap back to the OS (glibc ``malloc_trim``; no-op elsewhere).

    Without it the heap still holds what warm-up freed, and the RSS of the stage that follows starts
    at warm-up's peak whatever the stage itself needs.
    """
    gc.collect()
    with suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux); ``False`` when not possible."""
    release_free_memory()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_mb() -> float:
    """Highest resident set since the last :func:`reset_peak_rss` (or since start), in MiB."""
    kb = _status_kb("VmHWM")
    return kb / 1024 if kb is not None else process_peak_rss_mb()


def current_rss_mb() -> float:
    """Resident set now, in MiB."""
    kb = _status_kb("VmRSS")
    return kb / 1024 if kb is not None else float("nan")


def process_peak_rss_mb() -> float:
    """Highest resident set of this process over its whole life, in MiB (``ru_maxrss``)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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
