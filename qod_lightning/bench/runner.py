"""Orchestration: prepare model and data once, run every stage in its own process, compare, report.

What is timed, per training run: the stage clock starts after the model is loaded, the data is
tokenized and :func:`~qod_lightning.bench.timing.warm_up` has run, and stops when ``Trainer.fit``
(ours, Lightning's teardown included) or ``train()`` (TRL's) returns. It covers building the
framework's trainer and the whole fit, including the reference log-prob pass: ours in
``DPOModule.on_fit_start``, TRL's in ``DPOTrainer.__init__`` when ``precompute_ref_log_probs=True``,
or a reference forward in every step otherwise. Our final adapter save is skipped (TRL's runs save
nothing either).
"""

from __future__ import annotations

import logging
import sys
import tempfile
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any, TypeVar

from qod_lightning.bench import report
from qod_lightning.bench.data import write_cycled_jsonl
from qod_lightning.bench.gpu import describe_gpu, mfu, parameter_count
from qod_lightning.bench.inference import GenerationSpec, run_generation
from qod_lightning.bench.memory import RSS_METHOD
from qod_lightning.bench.model import make_start_adapter, weight_dtype
from qod_lightning.bench.options import LEARNING_RATES, STAGES, BenchOptions, StageSpec

T = TypeVar("T")
R = TypeVar("R")

REPO = Path(__file__).resolve().parents[2]


# -- processes ------------------------------------------------------------------------------------


def _quiet() -> None:
    """Silence progress bars and chatty loggers in a benchmark child process."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    for name in ("lightning", "lightning.pytorch", "qod_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def _child(fn: Callable[[T], R], arg: T) -> R:
    _quiet()
    return fn(arg)


def execute(fn: Callable[[T], R], arg: T, isolate: bool) -> R:
    """Run ``fn(arg)`` in a fresh spawned process (``isolate``) or in this one.

    A fresh process per stage keeps each stage's peak RSS its own and starts every framework from
    the same cold state.
    """
    if not isolate:
        return fn(arg)
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(_child, fn, arg).result()


def run_stage(spec: StageSpec) -> dict[str, Any]:
    """Run one training stage of one framework (dispatch to ours or TRL's runner)."""
    if spec.framework == "ours":
        from qod_lightning.bench.ours import run_ours

        return run_ours(spec)
    from qod_lightning.bench.trl_runner import run_trl

    return run_trl(spec)


# -- preparation ----------------------------------------------------------------------------------


def _tiny_module() -> Any:
    """``tests/tiny.py`` of the source checkout: the tiny random Phi-3 and its BPE tokenizer."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    try:
        import tests.tiny
    except ImportError as err:
        raise RuntimeError("--model tiny and phi3-mini need tests/tiny.py of a source checkout") from err
    return tests.tiny


def build_tiny_model(directory: Path) -> Path:
    """The tiny random Phi-3 of ``tests/tiny.py`` (built once per work directory)."""
    if (directory / "config.json").is_file():
        return directory
    return _tiny_module().build_tiny_phi3(directory)


def resolve_model(name: str, workdir: Path) -> tuple[str, str]:
    """Return ``(label, local directory)`` for ``tiny``, ``phi3-mini``, ``embedded[:NAME]`` or a path.

    ``phi3-mini`` is Phi-3-mini's shape with random weights and the tiny tokenizer (nothing
    downloaded): for timing only.
    """
    from qod_lightning.model import resolve_model_path

    if name == "tiny":
        return "tiny-phi3", str(build_tiny_model(workdir / "tiny-phi3"))
    if name == "phi3-mini":
        from qod_lightning.bench.gpu import build_random_phi3

        tokenizer = _tiny_module().build_tokenizer()
        return "phi3-mini-random", str(build_random_phi3(workdir / "phi3-mini-random", tokenizer))
    if name == "embedded":
        name = "embedded:smollm2-135m"
    path = resolve_model_path(name)
    return Path(path).name if not name.startswith("embedded:") else name.removeprefix("embedded:"), path


def stage_specs(options: BenchOptions, stage: str, model_path: str, workdir: Path) -> list[StageSpec]:
    """The runs of one stage: ours, then TRL (one per DPO variant) when comparing."""
    source = options.sft_data if stage == "sft" else options.dpo_data
    batch_size = options.dpo_batch_size if stage == "dpo" and options.dpo_batch_size else options.batch_size
    count = options.steps * batch_size
    data = write_cycled_jsonl(source, count, workdir / f"{stage}_{count}.jsonl", options.prompt_repeat)
    adapter = None
    if stage == "dpo":
        adapter = str(workdir / "start_adapter")
        if not (Path(adapter) / "adapter_config.json").is_file():
            make_start_adapter(
                model_path,
                adapter,
                r=options.lora_r,
                alpha=options.lora_alpha,
                seed=options.seed,
                dtype=weight_dtype(options.device),
            )
    base = StageSpec(
        stage=stage,
        framework="ours",
        model_path=model_path,
        data_file=str(data),
        workdir=str(workdir),
        steps=options.steps,
        warmup_steps=options.warmup_steps,
        batch_size=batch_size,
        max_length=options.max_length,
        learning_rate=LEARNING_RATES[stage],
        quant=options.quant,
        lora_r=options.lora_r,
        lora_alpha=options.lora_alpha,
        lora_dropout=options.lora_dropout if stage == "sft" else 0.0,
        adapter_path=adapter,
        beta=options.beta,
        threads=options.threads,
        trl_fp32_lora=options.trl_fp32_lora,
        import_trl=options.compare == "trl",
        seed=options.seed,
        device=options.device,
        gradient_checkpointing=options.gradient_checkpointing,
        pad_to_multiple_of=options.pad_to_multiple_of,
    )
    specs = [base]
    if options.compare == "trl":
        variants = options.trl_dpo_variants if stage == "dpo" else ("default",)
        specs += [replace(base, framework="trl", trl_precompute=v == "precompute") for v in variants]
    return specs


def eval_requests(path: str, count: int) -> tuple[str, ...]:
    """The first ``count`` request texts of an evaluation file."""
    from qod_lightning.commands.evaluate import load_eval_records

    return tuple(record["input"] for record in load_eval_records(path, count))


# -- the benchmark ----------------------------------------------------------------------------------


def run_training(options: BenchOptions, model_path: str, workdir: Path, log: Callable[[str], None]) -> dict:
    """Every requested training stage, each framework in turn; returns ``{stage: {label: result}}``."""
    results: dict[str, dict[str, Any]] = {}
    for stage in (s for s in STAGES if s in options.stages):
        results[stage] = {}
        for spec in stage_specs(options, stage, model_path, workdir):
            log(f"[bench] {stage}: {spec.label} ({spec.steps} steps) ...")
            results[stage][spec.label] = execute(run_stage, spec, options.isolate)
            log(f"[bench] {stage}: {spec.label} done in {results[stage][spec.label]['stage_s']:.2f} s")
    return results


def run_scaling(options: BenchOptions, workdir: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """Our DPO on the tiny model at ``scaling_pairs`` and 10x as many pairs: seconds per 1,000 pairs."""
    tiny = str(build_tiny_model(workdir / "tiny-phi3"))
    scaling_dir = workdir / "scaling"
    runs = []
    batch_size = options.dpo_batch_size or options.batch_size
    for pairs in (options.scaling_pairs, 10 * options.scaling_pairs):
        steps = max(1, pairs // batch_size)
        sub = replace(options, steps=steps, compare="none", stages=("dpo",), quant="none")
        (spec,) = stage_specs(sub, "dpo", tiny, scaling_dir)
        log(f"[bench] scaling: our DPO on {steps * batch_size} pairs ...")
        run = execute(run_stage, spec, options.isolate)
        runs.append(
            {
                "pairs": run["examples"],
                "stage_s": run["stage_s"],
                "s_per_1000_pairs": 1000 * run["stage_s"] / run["examples"],
                "median_step_s": run["median_step_s"],
                "peak_rss_mb": run["peak_rss_mb"],
            }
        )
    return {
        "model": "tiny-phi3",
        "runs": runs,
        "ratio": runs[1]["s_per_1000_pairs"] / runs[0]["s_per_1000_pairs"],
        "median_step_ratio": runs[1]["median_step_s"] / runs[0]["median_step_s"],
    }


def run_benchmark(options: BenchOptions, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run everything ``options`` asks for and return the result (see :func:`report.render`).

    Args:
        options: What to run.
        log: Progress lines go here.

    Returns:
        The JSON-ready result: ``machine``, ``settings``, ``stages``, ``ratios``, ``agreement``,
        ``gpu`` (on a GPU: the card, its measured bf16 peak and each SFT run's MFU), ``generation``,
        ``scaling`` and ``targets``.
    """
    with tempfile.TemporaryDirectory(prefix="qod-bench-") as tmp:
        workdir = Path(options.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        label, model_path = resolve_model(options.model, workdir)
        gpu_info = describe_gpu() if options.device == "cuda" else None
        result: dict[str, Any] = {
            "model": label,
            "model_path": model_path,
            "machine": report.machine_info(options.threads),
            "settings": options.to_json(),
            "rss_method": RSS_METHOD if options.isolate else "in-process run (not isolated): " + RSS_METHOD,
            "timing": __doc__.split("\n\n", 1)[1].replace("\n", " ").strip(),
        }
        stages = run_training(options, model_path, workdir, log)
        result["stages"] = stages
        result["ratios"] = {stage: report.ratios(runs) for stage, runs in stages.items()}
        result["agreement"] = {stage: report.agreement(stage, runs) for stage, runs in stages.items()}
        if gpu_info is not None:
            parameters = parameter_count(model_path)
            gpu_info.update(parameters=parameters, mfu=mfu(stages, parameters, gpu_info["peak_bf16_tflops"]))
            result["gpu"] = gpu_info
        if "generate" in options.stages:
            spec = GenerationSpec(
                model_path=model_path,
                requests=eval_requests(options.eval_data, options.gen_samples),
                batch_size=options.gen_batch_size,
                max_new_tokens=options.gen_max_new_tokens,
                constrained_repeats=options.constrained_repeats,
                quant=options.quant,
                threads=options.threads,
            )
            log(f"[bench] generate: {len(spec.requests)} requests ...")
            result["generation"] = execute(run_generation, spec, options.isolate)
        if options.scaling:
            result["scaling"] = run_scaling(options, workdir, log)
        result["targets"] = report.targets(result)
    return result
