"""``bench``: time our SFT/DPO against TRL's on the same model and data, and inference speed.

    python -m qod_lightning bench --compare trl --model tiny
    python -m qod_lightning bench --compare trl --model embedded --steps 8 --warmup-steps 2 --threads 2

Prints the tables and writes ``benchmarks/results/<model>_<quant>.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import re
from pathlib import Path
from typing import Any

from qod_lightning.artifacts import atomic_write_text
from qod_lightning.commands.common import CommandError, existing_file, positive_int, run

STAGE_CHOICES = ("sft", "dpo", "generate")


def _stages(value: str) -> tuple[str, ...]:
    stages = tuple(s.strip() for s in value.split(",") if s.strip())
    unknown = [s for s in stages if s not in STAGE_CHOICES]
    if not stages or unknown:
        raise argparse.ArgumentTypeError(f"stages must be a comma list of {', '.join(STAGE_CHOICES)}; got {value!r}")
    return stages


def _variants(value: str) -> tuple[str, ...]:
    variants = tuple(v.strip() for v in value.split(",") if v.strip())
    if not variants or any(v not in ("default", "precompute") for v in variants):
        raise argparse.ArgumentTypeError(f"TRL DPO variants are 'default' and/or 'precompute'; got {value!r}")
    return variants


def build_parser() -> argparse.ArgumentParser:
    """Build the command-line parser.

    Returns:
        The parser.

    """
    parser = argparse.ArgumentParser(
        prog="qod_lightning bench",
        description="Benchmark our SFT/DPO training against TRL's, and generation speed.",
    )
    parser.add_argument("--compare", choices=("trl", "none"), default="trl", help="run TRL's trainers too (default)")
    parser.add_argument(
        "--model",
        default="tiny",
        help="tiny (random Phi-3), phi3-mini (its real shape, random weights), embedded (SmolLM2-135M) or a model dir",
    )
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu", help="cpu (fp32) or cuda (bf16 autocast, MFU reported)"
    )
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations (both sides)")
    parser.add_argument(
        "--pad-to-multiple-of", type=positive_int, default=1, help="round batch lengths up (both sides; default 1)"
    )
    parser.add_argument(
        "--prompt-repeat",
        type=positive_int,
        default=1,
        help="repeat each request N times so prompts, cut from the left, fill --max-length (default 1)",
    )
    parser.add_argument("--quant", choices=("none", "4bit"), default="none", help="fp32 LoRA or 4-bit NF4 QLoRA")
    parser.add_argument("--steps", type=positive_int, default=8, help="optimizer steps per run (default 8)")
    parser.add_argument("--warmup-steps", type=int, default=2, help="warm-up passes before the clock (default 2)")
    parser.add_argument("--batch-size", type=positive_int, default=2, help="examples or pairs per step (default 2)")
    parser.add_argument("--dpo-batch-size", type=positive_int, help="pairs per DPO step (default: --batch-size)")
    parser.add_argument("--max-length", type=positive_int, default=512, help="longest sequence (default 512)")
    parser.add_argument("--stages", type=_stages, default=STAGE_CHOICES, help="comma list of sft,dpo,generate")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch threads (default 1)")
    parser.add_argument("--lora-r", type=positive_int, default=16)
    parser.add_argument("--lora-alpha", type=positive_int, default=16)
    parser.add_argument("--lora-dropout", type=float, default=0.05, help="SFT adapter dropout (DPO uses 0)")
    parser.add_argument(
        "--trl-dpo",
        type=_variants,
        default=("default", "precompute"),
        help="TRL DPO runs: default (reference forward per step) and/or precompute (precompute_ref_log_probs)",
    )
    parser.add_argument(
        "--trl-bf16-lora",
        action="store_true",
        help="with --quant 4bit keep TRL's bf16 cast of the LoRA weights (default: fp32, like ours)",
    )
    parser.add_argument("--sft-data", default="data/sft.jsonl", help="SFT records (cycled to steps x batch)")
    parser.add_argument("--dpo-data", default="data/preferences.jsonl", help="preference records (cycled)")
    parser.add_argument("--eval-data", default="data/eval.jsonl", help="requests for the generation benchmark")
    parser.add_argument("--gen-samples", type=positive_int, default=16, help="requests generated (default 16)")
    parser.add_argument("--gen-batch-size", type=positive_int, default=8, help="requests per batch (default 8)")
    parser.add_argument("--gen-max-new-tokens", type=positive_int, default=64, help="tokens per answer (default 64)")
    parser.add_argument("--constrained-repeats", type=int, default=2, help="constrained/plain rounds (0: skip)")
    parser.add_argument("--scaling", action="store_true", help="also time our DPO at N and 10N pairs (tiny model)")
    parser.add_argument("--scaling-pairs", type=positive_int, default=64, help="N of --scaling (default 64)")
    parser.add_argument("--no-isolate", action="store_true", help="run stages in this process (RSS not per stage)")
    parser.add_argument("--workdir", help="scratch directory (default: a temporary one)")
    parser.add_argument("--out", help="result JSON (default benchmarks/results/<model>_<quant>.json)")
    return parser


def options_from_args(args: argparse.Namespace) -> Any:
    """Turn parsed arguments into :class:`~qod_lightning.bench.options.BenchOptions` (files checked)."""
    from qod_lightning.bench.options import BenchOptions

    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise CommandError("--device cuda: torch sees no CUDA GPU", 1)
        if "generate" in args.stages or args.scaling:
            raise CommandError("--device cuda times training only: use --stages sft,dpo and no --scaling", 2)
    if args.compare == "trl" and importlib.util.find_spec("trl") is None:
        raise CommandError("--compare trl needs TRL: pip install -e '.[bench]' (or use --compare none)", 1)
    if "sft" in args.stages:
        existing_file(args.sft_data, "SFT data")
    if "dpo" in args.stages or args.scaling:
        existing_file(args.dpo_data, "preference data")
    if "generate" in args.stages:
        existing_file(args.eval_data, "evaluation data")
    return BenchOptions(
        model=args.model,
        quant=args.quant,
        compare=args.compare,
        stages=args.stages,
        steps=args.steps,
        warmup_steps=max(0, args.warmup_steps),
        batch_size=args.batch_size,
        dpo_batch_size=args.dpo_batch_size,
        max_length=args.max_length,
        threads=args.threads,
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        trl_dpo_variants=args.trl_dpo,
        trl_fp32_lora=not args.trl_bf16_lora,
        sft_data=args.sft_data,
        dpo_data=args.dpo_data,
        eval_data=args.eval_data,
        gen_samples=args.gen_samples,
        gen_batch_size=args.gen_batch_size,
        gen_max_new_tokens=args.gen_max_new_tokens,
        constrained_repeats=max(0, args.constrained_repeats),
        scaling=args.scaling,
        scaling_pairs=args.scaling_pairs,
        isolate=not args.no_isolate,
        out=args.out,
        workdir=args.workdir,
        device=args.device,
        gradient_checkpointing=args.gradient_checkpointing,
        prompt_repeat=args.prompt_repeat,
        pad_to_multiple_of=args.pad_to_multiple_of,
    )


def _finite(obj: Any) -> Any:
    """``obj`` with NaN/inf floats replaced by ``None`` (strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def write_result(result: dict[str, Any], out: str | None) -> Path:
    """Write ``result`` as JSON to ``out`` or ``benchmarks/results/<model>_<quant>[_<gpu>].json``."""
    name = f"{result['model']}_{result['settings']['quant']}"
    if result.get("gpu"):
        name += "_" + re.sub(r"[^a-z0-9]+", "-", result["gpu"]["name"].lower()).strip("-")
    path = Path(out or f"benchmarks/results/{name}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(_finite(result), indent=2) + "\n")
    return path


def _main(args: argparse.Namespace) -> int:
    from qod_lightning.bench.report import render
    from qod_lightning.bench.runner import run_benchmark

    options = options_from_args(args)
    result = run_benchmark(options)
    print(render(result))
    path = write_result(result, options.out)
    print(f"\nwrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command.

    Args:
        argv: Arguments after ``bench`` (default: ``sys.argv``).

    Returns:
        The exit status.

    """
    return run(build_parser(), _main, argv)
