"""The whole method in one command: base -> SFT -> DPO -> merge -> evaluation of all three -> comparison.

``python -m qod_lightning pipeline --config configs/pipeline/embedded.yaml``. Every stage writes its
artifact atomically and is skipped on a re-run when that artifact is complete; ``--force`` redoes
everything. Each training stage is an ordinary LightningCLI run, also runnable alone with
``python -m qod_lightning fit --config <stage config>``. Here the stage configs' generation checks
are off: the pipeline evaluates each trained model on the whole set anyway, and writes those
figures and sample answers to the stage's TensorBoard run (``gen/`` and ``gen_constrained/``).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from qod_lightning.artifacts import COMPLETE_MARKER, is_complete

log = logging.getLogger(__name__)


@dataclass
class PipelineConfig:
    """What the pipeline runs (``configs/pipeline/*.yaml``).

    Attributes:
        model: Base model name or path (e.g. ``embedded:smollm2-135m``).
        sft_config: LightningCLI config of the SFT stage.
        dpo_config: LightningCLI config of the DPO stage.
        sft_train_file: SFT data replacing the stage config's (``None``: keep it).
        dpo_train_file: Preference data replacing the stage config's (``None``: keep it).
        eval_file: Held-out ``{"input", "expected"}`` records.
        work_dir: Where adapters, reports and the comparison go.
        constrained: Also evaluate every model with schema-constrained decoding.
        max_eval_samples: Evaluate on the first N eval records only (``None``: all).
        max_new_tokens: Generation budget per answer.
        eval_batch_size: Requests per generation batch.
        eval_workers: Batches decoded at once in threads, on a CPU.
        fit_args: Extra LightningCLI arguments for both training stages (e.g. ``--trainer.max_steps=2``).
    """

    model: str = "embedded:smollm2-135m"
    sft_config: str = "configs/embedded_sft.yaml"
    dpo_config: str = "configs/embedded_dpo.yaml"
    sft_train_file: str | None = None
    dpo_train_file: str | None = None
    eval_file: str = "data/eval.jsonl"
    work_dir: str = "artifacts/embedded"
    constrained: bool = True
    max_eval_samples: int | None = None
    max_new_tokens: int = 192
    eval_batch_size: int = 16
    eval_workers: int = 1
    fit_args: list[str] = field(default_factory=list)

    @classmethod
    def from_yaml(cls, path: str | Path) -> PipelineConfig:
        """Load a config with ``yaml.safe_load``; unknown keys are an error."""
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{path}: unknown pipeline setting(s) {sorted(unknown)}")
        return cls(**data)


@dataclass(frozen=True)
class TensorBoardRun:
    """Where a training stage logged, and its last step (the evaluation is logged at that step)."""

    log_dir: str
    step: int


def _stage_args(cfg: PipelineConfig, config: str, stage: str, adapter: Path | None, resume: bool) -> list[str]:
    work = Path(cfg.work_dir)
    args = [
        "fit",
        "--config",
        config,
        "--generation_checks=false",  # the evaluation after training covers the whole set
        f"--model.init_args.model.model_name_or_path={cfg.model}",
        f"--model.init_args.output_dir={work / stage}",
        # jsonargparse applies a list item's option to the last item: the stage configs' ModelCheckpoint.
        f"--trainer.callbacks.dirpath={work / stage / 'checkpoints'}",
    ]
    if resume:
        args.append("--ckpt_path=last")
    if adapter is not None:
        args.append(f"--model.init_args.model.adapter_path={adapter}")
    train_file = cfg.sft_train_file if stage == "sft" else cfg.dpo_train_file
    if train_file:
        args.append(f"--data.init_args.train_file={train_file}")
    return [*args, *cfg.fit_args]


def _report_incomplete(stage: str, output: Path) -> None:
    if output.exists() and not is_complete(output):
        print(
            f"[pipeline] {stage}: {output} is incomplete (no {COMPLETE_MARKER} marker: an interrupted write), "
            "redoing it"
        )


def run_training(cfg: PipelineConfig, force: bool) -> tuple[Path, Path, dict[str, TensorBoardRun]]:
    """Run SFT then DPO; return both adapters and the TensorBoard runs of the stages trained now.

    A stage whose final adapter is complete is skipped; one that was interrupted resumes from its
    last checkpoint (``--force`` starts both afresh).
    """
    from qod_lightning.cli import cli_main
    from qod_lightning.model import free_gpu_memory

    sft, dpo = Path(cfg.work_dir) / "sft" / "final", Path(cfg.work_dir) / "dpo" / "final"
    runs: dict[str, TensorBoardRun] = {}
    for stage, config, output, adapter in (("sft", cfg.sft_config, sft, None), ("dpo", cfg.dpo_config, dpo, sft)):
        if is_complete(output) and not force:
            print(f"[pipeline] {stage}: {output} is complete, skipping (use --force to redo)")
            continue
        _report_incomplete(stage, output)
        last = Path(cfg.work_dir) / stage / "checkpoints" / "last.ckpt"
        resume = last.is_file() and not force
        print(f"[pipeline] {stage}: fit --config {config}" + (f" (resuming from {last})" if resume else ""))
        start = time.perf_counter()
        run = _tensorboard_run(cli_main(_stage_args(cfg, config, stage, adapter, resume)))
        if run is not None:
            runs[stage] = run
        free_gpu_memory()  # the finished stage's model may still be on the GPU (KeepOnDeviceStrategy)
        print(f"[pipeline] {stage}: done in {time.perf_counter() - start:.0f} s")
    return sft, dpo, runs


def _tensorboard_run(cli: Any) -> TensorBoardRun | None:
    """The finished stage's TensorBoard run, or ``None`` when it had no TensorBoard logger."""
    from lightning.pytorch.loggers import TensorBoardLogger

    loggers = [lg for lg in cli.trainer.loggers if isinstance(lg, TensorBoardLogger)]
    return TensorBoardRun(loggers[0].log_dir, cli.trainer.global_step) if loggers else None


def log_evaluations(runs: dict[str, TensorBoardRun], reports_dir: Path, table_rows: int = 8) -> None:
    """Write each trained stage's evaluation to its TensorBoard run, at its last step.

    The tags are those of :class:`~qod_lightning.callbacks.GenerationEvaluation` (``gen/...``,
    ``gen/samples``), computed on the whole evaluation set, and ``gen_constrained/...`` for the
    constrained answers.

    Args:
        runs: Stage name (``sft``, ``dpo``) -> its run (:func:`run_training`).
        reports_dir: Where the evaluation wrote ``<stage>[+constrained].predictions.jsonl``.
        table_rows: Sample answers in each ``samples`` table.

    """
    from torch.utils.tensorboard import SummaryWriter

    from qod_lightning.callbacks import records_table, report_scalars
    from qod_lightning.commands.evaluate import predictions_path, read_predictions
    from qod_lightning.metrics import score_predictions

    for stage, run in runs.items():
        with SummaryWriter(run.log_dir) as writer:
            for label, prefix in ((stage, "gen"), (f"{stage}+constrained", "gen_constrained")):
                path = predictions_path(reports_dir / f"{label}.json")
                if not path.is_file():
                    continue
                records = read_predictions(str(path))
                predictions = [r["prediction"] for r in records]
                report = score_predictions(predictions, [r["input"] for r in records], [r["expected"] for r in records])
                for tag, value in report_scalars(report, prefix).items():
                    writer.add_scalar(tag, value, run.step)
                writer.add_text(f"{prefix}/samples", records_table(records[:table_rows], predictions), run.step)


def run_evaluations(cfg: PipelineConfig, models: dict[str, str], force: bool) -> dict[str, dict[str, Any]]:
    """Evaluate every model (and constrained, if configured); reuse reports that exist.

    A model evaluated both ways is loaded once, and its constrained answers start from the
    unconstrained ones (:func:`~qod_lightning.commands.evaluate.evaluate_model_both`).
    """
    from qod_lightning.commands.evaluate import evaluate_model, evaluate_model_both

    reports: dict[str, dict[str, Any]] = {}
    options = {
        "max_samples": cfg.max_eval_samples,
        "max_new_tokens": cfg.max_new_tokens,
        "batch_size": cfg.eval_batch_size,
        "workers": cfg.eval_workers,
    }
    order: list[str] = []  # the comparison's row order
    for name, path in models.items():
        labels = {False: name, True: f"{name}+constrained"} if cfg.constrained else {False: name}
        order += labels.values()
        outputs = {
            constrained: Path(cfg.work_dir) / "reports" / f"{label}.json" for constrained, label in labels.items()
        }
        todo = [constrained for constrained, out in outputs.items() if force or not out.is_file()]
        for constrained in [c for c in outputs if c not in todo]:
            print(f"[pipeline] evaluate {labels[constrained]}: {outputs[constrained]} exists, skipping")
            reports[labels[constrained]] = json.loads(outputs[constrained].read_text(encoding="utf-8"))
        if not todo:
            continue
        print(f"[pipeline] evaluate {' and '.join(labels[c] for c in todo)} on {cfg.eval_file}")
        if len(todo) == 2:
            both = evaluate_model_both(path, cfg.eval_file, outputs[False], outputs[True], **options)
            reports.update(zip(labels.values(), both, strict=True))
        else:
            reports[labels[todo[0]]] = evaluate_model(
                path, cfg.eval_file, outputs[todo[0]], constrained=todo[0], **options
            )
    return {label: reports[label] for label in order}


def run_merge(cfg: PipelineConfig, adapter: Path, force: bool) -> Path:
    """Merge the DPO adapter into a standalone model directory (skipped when complete)."""
    from qod_lightning.commands.merge import merge_adapter

    merged = Path(cfg.work_dir) / "merged"
    if is_complete(merged) and not force:
        print(f"[pipeline] merge: {merged} is complete, skipping")
        return merged
    _report_incomplete("merge", merged)
    print(f"[pipeline] merge: {adapter} -> {merged}")
    return merge_adapter(adapter, merged)


def run_pipeline(cfg: PipelineConfig, force: bool = False) -> Path:
    """Run every stage; return the comparison directory."""
    from qod_lightning.commands.compare import write_comparison
    from qod_lightning.model import resolve_model_path

    start = time.perf_counter()
    print(f"[pipeline] base model: {cfg.model}")
    base = resolve_model_path(cfg.model)
    sft, dpo, runs = run_training(cfg, force)
    run_merge(cfg, dpo, force)
    reports = run_evaluations(cfg, {"base": base, "sft": str(sft), "dpo": str(dpo)}, force)
    log_evaluations(runs, Path(cfg.work_dir) / "reports")
    out_dir = Path(cfg.work_dir) / "comparison"
    markdown = write_comparison(reports, out_dir)
    print(markdown)
    print(f"[pipeline] wrote {out_dir}/comparison.{{md,json,png}} in {time.perf_counter() - start:.0f} s total")
    return out_dir


def main(argv: list[str] | None = None) -> int:
    """``python -m qod_lightning pipeline --config FILE [--force]``."""
    parser = argparse.ArgumentParser(prog="qod_lightning pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/pipeline/embedded.yaml", help="pipeline YAML")
    parser.add_argument("--force", action="store_true", help="redo stages whose artifacts exist")
    parser.add_argument("--work-dir", help="override the config's work_dir")
    parser.add_argument("--model", help="override the config's base model")
    parser.add_argument("--max-eval-samples", type=int, help="evaluate on the first N records only")
    parser.add_argument("--no-constrained", action="store_true", help="skip constrained evaluation")
    parser.add_argument("--fit-arg", action="append", default=[], help="extra LightningCLI argument (repeatable)")
    args = parser.parse_args(argv)
    try:
        cfg = PipelineConfig.from_yaml(args.config)
    except (OSError, ValueError, TypeError) as err:
        parser.error(f"bad pipeline config: {err}")
    if args.work_dir:
        cfg.work_dir = args.work_dir
    if args.model:
        cfg.model = args.model
    if args.max_eval_samples is not None:
        cfg.max_eval_samples = args.max_eval_samples
    if args.no_constrained:
        cfg.constrained = False
    cfg.fit_args = [*cfg.fit_args, *args.fit_arg]
    run_pipeline(cfg, force=args.force)
    return 0
