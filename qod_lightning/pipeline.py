"""The whole method, stage by stage: base -> SFT -> DPO -> merge -> evaluation of all three -> comparison.

:class:`PipelineConfig` says what runs; :func:`run_pipeline` runs it, and the ``pipeline`` command
(:mod:`qod_lightning.commands.pipeline`) runs that:
``python -m qod_lightning pipeline --config configs/pipeline/embedded.yaml``. Every stage writes its
artifact atomically and is skipped on a re-run when that artifact is complete and its stamp
(:func:`~qod_lightning.artifacts.stamp_path`) matches its inputs; ``--force`` redoes everything.
Each training stage is an ordinary LightningCLI run, also runnable alone with
``python -m qod_lightning fit --config <stage config>``. Here the stage configs' generation checks
are off: the pipeline evaluates each trained model on the whole set anyway, and writes those
figures and sample answers to the stage's TensorBoard run (``gen/`` and ``gen_constrained/``).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from qod_lightning.artifacts import (
    COMPLETE_MARKER,
    atomic_write_text,
    file_digests,
    files_fingerprint,
    inputs_digest,
    is_complete,
    read_stamp,
    stamp_path,
)

if TYPE_CHECKING:
    from qod_lightning.callbacks import TensorBoardRun


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
        max_new_tokens: The most tokens generated per answer; each model gets the longest reference
            answer in its own form plus a margin, up to this (:func:`answer_budget`).
        eval_batch_size: Requests per generation batch.
        eval_workers: Batches decoded at once in threads, on a CPU.
        on_policy_pairs: Train DPO on pairs whose rejected answers are the SFT model's own wrong
            answers to their prompts (:func:`~qod_lightning.data.on_policy.build_on_policy_pairs`), written to
            ``work_dir/dpo/pairs.jsonl``; ``False``: the preference file as it is.
        on_policy_rejected: What a wrong answer rejects, with ``on_policy_pairs``: ``answer``,
            the whole answer (one pair per prompt), or ``fields``, one pair per wrong top-level
            field whose rejected answer is the chosen one with only that field as the model wrote
            it (:func:`~qod_lightning.data.on_policy.field_edit_pairs`).
        on_policy_wrong_only: With ``on_policy_pairs``, DPO trains only on the pairs that reject
            the SFT model's own mistakes; ``False`` also keeps the file's pairs for the prompts
            it answers right.
        fit_args: Extra LightningCLI arguments for both training stages (e.g. ``--trainer.max_steps=2``),
            not data files (the stages read different formats): ``sft_train_file``, ``dpo_train_file``.
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
    on_policy_pairs: bool = False
    on_policy_rejected: str = "answer"
    on_policy_wrong_only: bool = False
    fit_args: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.on_policy_rejected not in ("answer", "fields"):
            raise ValueError(f"on_policy_rejected must be 'answer' or 'fields', got {self.on_policy_rejected!r}")
        # fit_args go to both stages, whose data formats differ; on-policy pairs would also be replaced.
        data_files = [a for a in self.fit_args if a.split("=", 1)[0].endswith(("train_file", "val_file"))]
        if data_files:
            raise ValueError(
                f"fit_args name a data file for both stages ({', '.join(data_files)}): "
                "set sft_train_file or dpo_train_file in the pipeline config instead"
            )
        counts = {
            "max_eval_samples": self.max_eval_samples,
            "max_new_tokens": self.max_new_tokens,
            "eval_batch_size": self.eval_batch_size,
            "eval_workers": self.eval_workers,
        }
        for name, value in counts.items():
            if value is None and name == "max_eval_samples":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")

    @classmethod
    def from_yaml(cls, path: str | Path) -> PipelineConfig:
        """Load a config with ``yaml.safe_load``; unknown keys are an error."""
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{path}: unknown pipeline setting(s) {sorted(unknown)}")
        return cls(**data)


def _config_train_file(config: str) -> str:
    """``data.init_args.train_file`` of a stage config (not of ``fit_args`` overrides)."""
    try:
        return yaml.safe_load(Path(config).read_text(encoding="utf-8"))["data"]["init_args"]["train_file"]
    except (KeyError, TypeError) as err:
        raise ValueError(f"{config}: no data.init_args.train_file; set dpo_train_file in the pipeline config") from err


def _write_on_policy_pairs(cfg: PipelineConfig, sft_adapter: Path, output: Path) -> None:
    """Write the DPO pairs of the SFT adapter's own mistakes to ``output`` (``cfg.on_policy_pairs``).

    The adapter answers the prompts of the preference file (``dpo_train_file``, else the DPO
    config's ``data.init_args.train_file``) with the evaluation's settings
    (:func:`~qod_lightning.data.on_policy.build_on_policy_pairs`).
    """
    from qod_lightning.data.on_policy import build_on_policy_pairs

    source = cfg.dpo_train_file or _config_train_file(cfg.dpo_config)
    start = time.perf_counter()
    what = build_on_policy_pairs(
        sft_adapter,
        source,
        output,
        rejected=cfg.on_policy_rejected,
        max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.eval_batch_size,
        workers=cfg.eval_workers,
        wrong_only=cfg.on_policy_wrong_only,
    )
    kept = "only those" if cfg.on_policy_wrong_only else "the others keep the file's"
    print(f"[pipeline] dpo pairs: {what} of {source} ({kept}); {output} in {time.perf_counter() - start:.0f} s")


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
    if stage == "dpo" and cfg.on_policy_pairs:
        train_file = str(work / "dpo" / "pairs.jsonl")
    if train_file:
        args.append(f"--data.init_args.train_file={train_file}")
    return [*args, *cfg.fit_args]


def _report_incomplete(stage: str, output: Path) -> None:
    if output.exists() and not is_complete(output):
        print(
            f"[pipeline] {stage}: {output} is incomplete (no {COMPLETE_MARKER} marker: an interrupted write, "
            "or made from an earlier stage's output that was replaced), redoing it"
        )


def _make_stale(work: Path, stage: str) -> None:
    """Before ``stage`` trains, unmark what was made from its old output, so no run trusts it.

    Done before training, not after, so that a run that stops in between still redoes them:
    SFT invalidates the DPO adapter, DPO's checkpoint and the merged model; DPO the merged model.
    """
    later = [work / "dpo" / "final", work / "merged"] if stage == "sft" else [work / "merged"]
    stale = [path for path in later if is_complete(path)]
    for path in stale:
        (path / COMPLETE_MARKER).unlink()
    checkpoint = work / "dpo" / "checkpoints" / "last.ckpt"
    if stage == "sft" and checkpoint.is_file():
        checkpoint.unlink()  # a DPO run on the adapter being replaced must not be resumed
        stale.append(checkpoint)
    if stale:
        print(f"[pipeline] {stage}: training it makes {', '.join(map(str, stale))} stale; they will be redone")


def _clear_checkpoints(directory: Path) -> None:
    """Delete a stage's checkpoints before it trains afresh.

    Lightning does not overwrite a ``last.ckpt`` it finds there: it writes ``last-v1.ckpt``. The
    old file would stay, and a later resume of this run (``last.ckpt``) would load the old run.
    """
    old = sorted(directory.glob("*.ckpt"))
    for path in old:
        path.unlink()
    if old:
        print(f"[pipeline] removed {len(old)} checkpoint(s) of an earlier run from {directory}")


def _config_data_files(config: str) -> list[str]:
    """The string values of a stage config's ``data.init_args`` (its data files among them)."""
    try:
        init_args = yaml.safe_load(Path(config).read_text(encoding="utf-8"))["data"]["init_args"]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return []
    return [value for value in init_args.values() if isinstance(value, str)] if isinstance(init_args, dict) else []


def _training_stamp(cfg: PipelineConfig, stage: str, config: str, adapter: Path | None, args: list[str]) -> str:
    """A digest of what a training stage's adapter depends on.

    Its ``fit`` arguments (the pipeline's and ``fit_args``), the contents of every file they name
    (the stage config, data given on the command line) and of the config's data files, the
    starting adapter's files, and for DPO the on-policy settings. Code is not in it: after
    changing the code, ``--force``.
    """
    on_policy = stage == "dpo" and cfg.on_policy_pairs
    sources = [cfg.dpo_train_file] if on_policy and cfg.dpo_train_file else []  # what the pairs are made from
    what: dict[str, Any] = {
        "args": args,
        "files": file_digests([*args, *_config_data_files(config), *sources]),
        "adapter": files_fingerprint(adapter) if adapter else None,
        "on_policy": [cfg.on_policy_rejected, cfg.on_policy_wrong_only, cfg.max_new_tokens] if on_policy else None,
    }
    return inputs_digest(what)


def run_training(cfg: PipelineConfig, force: bool) -> tuple[Path, Path, dict[str, TensorBoardRun | None]]:
    """Run SFT then DPO; return both adapters and the stages trained now, with their TensorBoard runs.

    A stage whose final adapter is complete is skipped, unless its stamp (``final.inputs``,
    :func:`_training_stamp`) says it was trained from other inputs; one that was interrupted
    resumes from its last checkpoint if that run had the same inputs (``--force`` starts both
    afresh). What was made from a stage's output is
    unmarked before the stage trains (:func:`_make_stale`), so it is redone, in this run or the
    next one.
    """
    from qod_lightning.callbacks import tensorboard_run
    from qod_lightning.cli import cli_main
    from qod_lightning.model import free_gpu_memory

    work = Path(cfg.work_dir)
    sft, dpo = work / "sft" / "final", work / "dpo" / "final"
    trained: dict[str, TensorBoardRun | None] = {}
    for stage, config, output, adapter in (("sft", cfg.sft_config, sft, None), ("dpo", cfg.dpo_config, dpo, sft)):
        args = _stage_args(cfg, config, stage, adapter, resume=False)
        stamp, done_stamp = _training_stamp(cfg, stage, config, adapter, args), stamp_path(output)
        if is_complete(output) and not force:
            recorded = read_stamp(done_stamp)
            if recorded is None:
                print(
                    f"[pipeline] {stage}: {output} is complete, skipping (no record of its inputs; --force redoes it)"
                )
                continue
            if recorded == stamp:
                print(f"[pipeline] {stage}: {output} is complete, skipping (use --force to redo)")
                continue
            print(f"[pipeline] {stage}: {output} was trained from another config, data or settings, redoing it")
        _report_incomplete(stage, output)
        _make_stale(work, stage)
        last = work / stage / "checkpoints" / "last.ckpt"
        started = last.parent / "inputs"  # the stamp of the run the checkpoints belong to
        # Checkpoints with no stamp predate stamps: resumed, as before.
        same = read_stamp(started) in (None, stamp)
        if last.is_file() and not force and not same:
            print(f"[pipeline] {stage}: {last} is from a run with other inputs, starting afresh")
        resume = last.is_file() and not force and same
        if not resume:
            _clear_checkpoints(last.parent)
        pairs = work / "dpo" / "pairs.jsonl"
        if stage == "dpo" and cfg.on_policy_pairs and not (resume and pairs.is_file()):
            _write_on_policy_pairs(cfg, sft, pairs)  # a resumed run keeps the pairs it started with
            stamp = _training_stamp(cfg, stage, config, adapter, args)  # with the new pairs
        atomic_write_text(started, stamp)
        print(f"[pipeline] {stage}: fit --config {config}" + (f" (resuming from {last})" if resume else ""))
        start = time.perf_counter()
        trained[stage] = tensorboard_run(cli_main(_stage_args(cfg, config, stage, adapter, resume)).trainer)
        atomic_write_text(done_stamp, stamp)  # after the adapter: a run stopped in between redoes it
        free_gpu_memory()  # the finished stage's model may still be on the GPU (KeepOnDeviceStrategy)
        print(f"[pipeline] {stage}: done in {time.perf_counter() - start:.0f} s")
    return sft, dpo, trained


def log_evaluations(runs: dict[str, TensorBoardRun | None], reports_dir: Path, table_rows: int = 8) -> None:
    """Write each trained stage's evaluation to its TensorBoard run, at its last step.

    The tags are those of :class:`~qod_lightning.callbacks.GenerationEvaluation` (``gen/...``,
    ``gen/samples``), computed on the whole evaluation set, and ``gen_constrained/...`` for the
    constrained answers (:func:`~qod_lightning.callbacks.log_predictions`).

    Args:
        runs: Stage name (``sft``, ``dpo``) -> its run (:func:`run_training`); ``None`` (a stage
            with no TensorBoard logger) is skipped.
        reports_dir: Where the evaluation wrote ``<stage>[+constrained].predictions.jsonl``.
        table_rows: Sample answers in each ``samples`` table.

    """
    from qod_lightning.callbacks import log_predictions

    for stage, run in runs.items():
        if run is not None:
            log_predictions(run, _stage_predictions(reports_dir, stage), table_rows)


def _stage_predictions(reports_dir: Path, stage: str) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """Tag prefix and scored predictions of each of a stage's evaluations found in ``reports_dir``.

    ``gen`` for ``<stage>.predictions.jsonl``, ``gen_constrained`` for the constrained ones; each
    file is read when its turn comes.
    """
    from qod_lightning.commands.evaluate import predictions_path, read_predictions

    for label, prefix in ((stage, "gen"), (f"{stage}+constrained", "gen_constrained")):
        path = predictions_path(reports_dir / f"{label}.json")
        if path.is_file():
            yield prefix, read_predictions(str(path))


def _inputs_stamp(model: str, cfg: PipelineConfig, constrained: bool) -> str:
    """A digest of what an evaluation report depends on: the model's files, the data, the settings.

    Model files count by path, size and modification time (:func:`~qod_lightning.artifacts.files_fingerprint`).
    """
    what = {
        "model": model,
        "files": files_fingerprint(Path(model)),
        "data": hashlib.sha256(Path(cfg.eval_file).read_bytes()).hexdigest(),
        "constrained": constrained,
        "max_eval_samples": cfg.max_eval_samples,
        "max_new_tokens": cfg.max_new_tokens,
        "eval_batch_size": cfg.eval_batch_size,
    }
    return inputs_digest(what)


def answer_budget(model: str, eval_file: str, cap: int, margin: int = 16) -> int:
    """Tokens enough for the longest reference answer of ``eval_file`` in the model's own form, plus ``margin``.

    A model that never closes its JSON (the base model) decodes its whole budget for every
    request; past the longest reference answer plus a margin, no answer can still match. A model
    that writes a scratchpad note first gets room for it too: the note copies phrases of the
    request, so the longest request bounds it.

    Args:
        model: Model or adapter directory, as evaluated (its tokenizer and saved answer form).
        eval_file: JSONL of ``{"input", "expected"}`` records.
        cap: The configured ``max_new_tokens``: the budget never exceeds it.
        margin: Tokens allowed beyond the longest answer.

    Returns:
        ``min(cap, longest answer + margin)`` in the model's tokens.

    """
    from qod_lightning.data.jsonl import read_objects
    from qod_lightning.model import load_tokenizer, saved_answer_notes

    tokenizer = load_tokenizer(model)
    records = [record for _, record in read_objects(eval_file)]
    longest = max(len(tokenizer(json.dumps(r["expected"], separators=(",", ":"))).input_ids) for r in records)
    if saved_answer_notes(model):
        longest += max(len(tokenizer(r["input"]).input_ids) for r in records) + margin
    return min(cap, longest + margin)


def run_evaluations(cfg: PipelineConfig, models: dict[str, str], force: bool) -> dict[str, dict[str, Any]]:
    """Evaluate every model (and constrained, if configured); reuse reports made from the same inputs.

    A report is reused only when its stamp (``<report>.inputs``, :func:`_inputs_stamp`) says it was
    made from the same model files, evaluation data and settings, so a retrained adapter or an
    edited setting is evaluated again. A model evaluated both ways is loaded once, and its
    constrained answers start from the unconstrained ones
    (:func:`~qod_lightning.commands.evaluate.evaluate_model_both`).
    """
    from qod_lightning.commands.evaluate import evaluate_model, evaluate_model_both

    reports: dict[str, dict[str, Any]] = {}
    options = {"max_samples": cfg.max_eval_samples, "batch_size": cfg.eval_batch_size, "workers": cfg.eval_workers}
    order: list[str] = []  # the comparison's row order
    for name, path in models.items():
        labels = {False: name, True: f"{name}+constrained"} if cfg.constrained else {False: name}
        order += labels.values()
        outputs = {
            constrained: Path(cfg.work_dir) / "reports" / f"{label}.json" for constrained, label in labels.items()
        }
        stamps = {constrained: _inputs_stamp(path, cfg, constrained) for constrained in labels}
        todo = []
        for constrained, out in outputs.items():
            if force or not out.is_file():
                todo.append(constrained)
            elif read_stamp(stamp_path(out)) != stamps[constrained]:
                print(
                    f"[pipeline] evaluate {labels[constrained]}: {out} was made from other model files, "
                    "data or settings, redoing it"
                )
                todo.append(constrained)
            else:
                print(f"[pipeline] evaluate {labels[constrained]}: {out} exists, skipping")
                reports[labels[constrained]] = json.loads(out.read_text(encoding="utf-8"))
        if not todo:
            continue
        # Constrained decoding keeps the whole budget: room for the grammar to close what the model left open.
        budgets = {False: answer_budget(path, cfg.eval_file, cfg.max_new_tokens), True: cfg.max_new_tokens}
        print(
            f"[pipeline] evaluate {' and '.join(labels[c] for c in todo)} on {cfg.eval_file}, "
            f"at most {' and '.join(str(budgets[c]) for c in todo)} new tokens"
        )
        if len(todo) == 2:
            both = evaluate_model_both(
                path,
                cfg.eval_file,
                outputs[False],
                outputs[True],
                max_new_tokens=budgets[False],
                constrained_max_new_tokens=budgets[True],
                **options,
            )
            reports.update(zip(labels.values(), both, strict=True))
        else:
            reports[labels[todo[0]]] = evaluate_model(
                path, cfg.eval_file, outputs[todo[0]], constrained=todo[0], max_new_tokens=budgets[todo[0]], **options
            )
        for constrained in todo:  # after the report: a run stopped in between redoes it
            atomic_write_text(stamp_path(outputs[constrained]), stamps[constrained])
    return {label: reports[label] for label in order}


def run_merge(cfg: PipelineConfig, adapter: Path, force: bool) -> Path:
    """Merge the DPO adapter into a standalone model directory (skipped when complete, or with no adapter).

    A fully fine-tuned DPO model (``finetune: full``) is a standalone model already: it is returned as is.
    """
    from qod_lightning.commands.merge import merge_adapter

    if not (adapter / "adapter_config.json").is_file():
        print(f"[pipeline] merge: {adapter} is a whole model, nothing to merge")
        return adapter
    merged = Path(cfg.work_dir) / "merged"
    if is_complete(merged) and not force:
        print(f"[pipeline] merge: {merged} is complete, skipping")
        return merged
    _report_incomplete("merge", merged)
    print(f"[pipeline] merge: {adapter} -> {merged}")
    return merge_adapter(adapter, merged)


def write_dpo_changes(cfg: PipelineConfig, out_dir: Path) -> str:
    """Write what DPO changed in the SFT model's answers (``dpo_vs_sft.{md,json}``, constrained too).

    Returns:
        The markdown tables, one per decoding mode.

    """
    from qod_lightning.changes import answer_changes, changes_markdown
    from qod_lightning.commands.evaluate import predictions_path, read_predictions

    reports = Path(cfg.work_dir) / "reports"
    tables, summary = [], {}
    for suffix in ("", "+constrained") if cfg.constrained else ("",):
        sft = read_predictions(str(predictions_path(reports / f"sft{suffix}.json")))
        dpo = read_predictions(str(predictions_path(reports / f"dpo{suffix}.json")))
        summary[f"dpo{suffix}"] = answer_changes(
            [r["prediction"] for r in sft],
            [r["prediction"] for r in dpo],
            [r["input"] for r in sft],
            [r["expected"] for r in sft],
        )
        tables.append(changes_markdown(summary[f"dpo{suffix}"], f"sft{suffix}", f"dpo{suffix}"))
    markdown = "\n".join(tables)
    atomic_write_text(out_dir / "dpo_vs_sft.md", markdown)
    atomic_write_text(out_dir / "dpo_vs_sft.json", json.dumps(summary, indent=2) + "\n")
    return markdown


def run_pipeline(cfg: PipelineConfig, force: bool = False) -> Path:
    """Run every stage; return the comparison directory."""
    from qod_lightning.commands.compare import write_comparison
    from qod_lightning.model import resolve_model_path

    start = time.perf_counter()
    print(f"[pipeline] base model: {cfg.model}")
    base = resolve_model_path(cfg.model)
    sft, dpo, trained = run_training(cfg, force)
    run_merge(cfg, dpo, force)
    reports = run_evaluations(cfg, {"base": base, "sft": str(sft), "dpo": str(dpo)}, force)
    log_evaluations(trained, Path(cfg.work_dir) / "reports")
    out_dir = Path(cfg.work_dir) / "comparison"
    markdown = write_comparison(reports, out_dir)
    print(markdown)
    print(write_dpo_changes(cfg, out_dir))
    seconds = time.perf_counter() - start
    print(f"[pipeline] wrote {out_dir}/comparison.{{md,json,png}} and dpo_vs_sft.{{md,json}} in {seconds:.0f} s total")
    return out_dir
