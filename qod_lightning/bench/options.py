"""What a benchmark runs: the command's options and the settings of each timed training run."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

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
