"""Training callbacks and their TensorBoard logging: generation checks, weight snapshots, a finished run's evaluation.

:class:`GenerationEvaluation` evaluates what the model generates during training,
:class:`Snapshots` saves weights for a learning curve, :class:`TailAverage` ends training on the
mean of the last weights along the run; :func:`log_predictions` writes an
evaluation made after training to the run's TensorBoard, under the callback's tags.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from qod_lightning.artifacts import atomic_write_text
from qod_lightning.data.jsonl import read_jsonl
from qod_lightning.generation import generate
from qod_lightning.metrics import per_example_verdicts, score_predictions

EVAL_RECORD = {"input": str, "expected": dict}


class GenerationEvaluation(L.Callback):
    """Generate answers for an evaluation set and log the QoD metrics under ``gen/``.

    Runs at the end of every ``every_n_epochs``-th validation epoch and of the last one (not in
    the sanity check), and at the end of testing. Logs each metric of
    :func:`~qod_lightning.metrics.score_predictions` as
    ``gen/<name>`` (``gen/field_accuracy/<field>`` per field) and ``gen/constrained``, and, with a
    TensorBoard logger, a markdown table of sample requests, outputs and verdicts. Under DDP only
    rank 0 generates; the figures are broadcast so every rank logs the same values (and monitors
    such as ``ModelCheckpoint(monitor="gen/spec_compliance")`` work on all ranks).

    The model is the module's ``model`` attribute; the tokenizer and prompt format come from the
    trainer's data module (``tokenizer`` and ``hparams.prompt_format``), so prompts are the ones
    training used.

    Args:
        eval_file: JSONL of ``{"input", "expected"}`` records.
        every_n_epochs: Evaluate every N validation epochs (and after the last one whatever N).
        max_samples: Use only the first N records (all when ``None``).
        max_new_tokens: Tokens generated per answer.
        batch_size: Requests per generation batch.
        constrained: Grammar-constrained decoding.
        num_table_rows: Samples in the TensorBoard table.

    """

    def __init__(
        self,
        eval_file: str = "data/eval.jsonl",
        every_n_epochs: int = 1,
        max_samples: int | None = None,
        max_new_tokens: int = 512,
        batch_size: int = 8,
        constrained: bool = False,
        num_table_rows: int = 8,
    ) -> None:
        if every_n_epochs < 1 or (max_samples is not None and max_samples < 1):
            raise ValueError(f"every_n_epochs and max_samples must be >= 1, got {every_n_epochs}, {max_samples}")
        self.eval_file = eval_file
        self.every_n_epochs = every_n_epochs
        self.max_samples = max_samples
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.constrained = constrained
        self.num_table_rows = num_table_rows
        self.records: list[dict[str, Any]] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Read the evaluation set, so a bad file fails before training, not after an epoch."""
        self.records = read_jsonl(self.eval_file, EVAL_RECORD)[: self.max_samples]

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Evaluate after every ``every_n_epochs``-th validation epoch and after the last one."""
        if trainer.sanity_checking or ((trainer.current_epoch + 1) % self.every_n_epochs and not _last_epoch(trainer)):
            return
        self._evaluate(trainer, pl_module)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Evaluate at the end of testing."""
        self._evaluate(trainer, pl_module)

    def _evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        figures: dict[str, float] | None = None
        if trainer.is_global_zero:
            predictions = self._generate(trainer, pl_module)
            figures = self._figures(predictions)
            self._write_table(trainer, predictions)
        figures = trainer.strategy.broadcast(figures, src=0)
        for name, value in figures.items():
            pl_module.log(name, value, sync_dist=False)

    def _generate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[str]:
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "tokenizer"):
            raise RuntimeError("GenerationEvaluation needs a data module with a `tokenizer` (SFT or DPO data)")
        model = pl_module.model
        was_training = model.training
        model.eval()  # no dropout while generating (generate itself runs without autograd)
        try:
            return generate(
                model,
                datamodule.tokenizer,
                [r["input"] for r in self.records],
                prompt_format=datamodule.hparams.prompt_format,
                max_new_tokens=self.max_new_tokens,
                batch_size=self.batch_size,
                constrained=self.constrained,
                notes=getattr(datamodule, "answer_notes", False),
            )
        finally:
            model.train(was_training)

    def _figures(self, predictions: list[str]) -> dict[str, float]:
        report = score_predictions(
            predictions, [r["input"] for r in self.records], [r["expected"] for r in self.records]
        )
        return {"gen/constrained": float(self.constrained), **report_scalars(report, "gen")}

    def _write_table(self, trainer: L.Trainer, predictions: list[str]) -> None:
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not loggers or not self.num_table_rows:
            return
        table = records_table(self.records[: self.num_table_rows], predictions)
        for logger in loggers:
            logger.experiment.add_text("gen/samples", table, global_step=trainer.global_step)


def report_scalars(report: dict[str, Any], prefix: str) -> dict[str, float]:
    """The numbers of a :func:`~qod_lightning.metrics.score_predictions` report as scalar tags.

    Args:
        report: The report; its nested ``field_accuracy`` becomes ``<prefix>/field_accuracy/<field>``.
        prefix: Tag prefix, e.g. ``gen``.

    Returns:
        ``{tag: value}`` for every entry.

    """
    figures: dict[str, float] = {}
    for key, value in report.items():
        if isinstance(value, dict):
            figures.update({f"{prefix}/{key}/{field}": float(v) for field, v in value.items()})
        else:
            figures[f"{prefix}/{key}"] = float(value)
    return figures


def records_table(records: list[dict[str, Any]], predictions: list[str]) -> str:
    """:func:`samples_table` of ``{"input", "expected"}`` records and their outputs (extra outputs ignored)."""
    outputs = predictions[: len(records)]
    requests = [r["input"] for r in records]
    return samples_table(requests, outputs, per_example_verdicts(outputs, requests, [r["expected"] for r in records]))


@dataclass(frozen=True)
class TensorBoardRun:
    """Where a training run logged to TensorBoard, and its last step (a later evaluation is logged at that step)."""

    log_dir: str
    step: int


def tensorboard_run(trainer: L.Trainer) -> TensorBoardRun | None:
    """A finished trainer's TensorBoard run (its first TensorBoard logger's), or ``None`` when it had none."""
    loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
    return TensorBoardRun(loggers[0].log_dir, trainer.global_step) if loggers else None


def log_predictions(
    run: TensorBoardRun, predictions: Iterable[tuple[str, list[dict[str, Any]]]], table_rows: int = 8
) -> None:
    """Write scored predictions to a finished run at its last step, as :class:`GenerationEvaluation` logs.

    Each set of predictions gets the :func:`~qod_lightning.metrics.score_predictions` figures as
    ``<prefix>/...`` scalars and a ``<prefix>/samples`` table, like the callback's ``gen/``.

    Args:
        run: The run (:func:`tensorboard_run`).
        predictions: ``(tag prefix, {"input", "expected", "prediction"} records)`` per set of
            answers (e.g. ``gen`` and ``gen_constrained``); taken one at a time, with the writer open.
        table_rows: Sample answers in each ``samples`` table.

    """
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(run.log_dir) as writer:
        for prefix, records in predictions:
            answers = [r["prediction"] for r in records]
            report = score_predictions(answers, [r["input"] for r in records], [r["expected"] for r in records])
            for tag, value in report_scalars(report, prefix).items():
                writer.add_scalar(tag, value, run.step)
            writer.add_text(f"{prefix}/samples", records_table(records[:table_rows], answers), run.step)


def _last_epoch(trainer: L.Trainer) -> bool:
    """Whether training ends after this epoch: its ``max_epochs``-th, or ``max_steps`` reached."""
    if trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
        return True
    return bool(trainer.max_epochs and trainer.max_epochs > 0 and trainer.current_epoch + 1 >= trainer.max_epochs)


def _verdict(verdict: dict[str, Any]) -> str:
    if verdict["exact"]:
        return "exact match"
    if not verdict["parses"]:
        return "no JSON"
    parts = ["valid" if verdict["valid"] else "invalid"]
    if verdict["hallucinated"]:
        parts.append("hallucinated")
    if verdict["wrong_fields"]:
        parts.append("wrong " + ", ".join(verdict["wrong_fields"]))
    return "; ".join(parts)


def _cell(text: str, limit: int = 300) -> str:
    """Text that stays inside one markdown table cell."""
    text = text if len(text) <= limit else text[:limit] + "…"
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ").replace("`", "'")


def samples_table(requests: list[str], outputs: list[str], verdicts: list[dict[str, Any]]) -> str:
    """A markdown table of request | output | verdict rows (TensorBoard renders it).

    Args:
        requests: Request texts.
        outputs: Raw model outputs, aligned with ``requests``.
        verdicts: :func:`~qod_lightning.metrics.per_example_verdicts` rows, aligned too.

    Returns:
        The markdown.

    """
    lines = ["| request | output | verdict |", "|---|---|---|"]
    for request, output, verdict in zip(requests, outputs, verdicts, strict=True):
        lines.append(f"| {_cell(request)} | {_cell(output)} | {_cell(_verdict(verdict))} |")
    return "\n".join(lines)


class Snapshots(L.Callback):
    """Save the trained weights every ``every_n_steps`` optimizer steps, for a time-to-quality curve.

    Each snapshot goes to ``<module output_dir>/snapshots/step-<N>`` (as the module saves its
    final weights), and ``snapshots/index.json`` lists them with the records seen and the
    training seconds so far: wall time since fit start, less the time spent saving snapshots and
    in validation. ``scripts/time_to_quality.py`` evaluates them.

    Args:
        every_n_steps: Optimizer steps between snapshots (the last step always gets one).
    """

    def __init__(self, every_n_steps: int) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self._start = 0.0
        self._excluded = 0.0
        self._records = 0
        self._validation_start: float | None = None
        self.index: list[dict[str, Any]] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Start the clock."""
        self._start, self._excluded, self._records, self.index = time.perf_counter(), 0.0, 0, []

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, _: int
    ) -> None:
        """Count the batch's records (DPO: pairs); snapshot after every ``every_n_steps``-th optimizer step."""
        self._records += int(batch["index"].numel()) * trainer.world_size  # one index per record, in any layout
        step = trainer.global_step  # the micro-batches of an accumulation window before the first step see 0
        if step > 0 and step % self.every_n_steps == 0 and step not in {entry["step"] for entry in self.index}:
            self._snapshot(trainer, pl_module)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Stop the clock during validation."""
        self._validation_start = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Restart the clock."""
        if self._validation_start is not None:
            self._excluded += time.perf_counter() - self._validation_start
            self._validation_start = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Snapshot the last step too."""
        if trainer.global_step not in {entry["step"] for entry in self.index}:
            self._snapshot(trainer, pl_module)

    def _snapshot(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        seconds = time.perf_counter() - self._start - self._excluded
        saving = time.perf_counter()
        step = trainer.global_step
        path = pl_module.save_adapter(f"snapshots/step-{step}")
        if path is not None:
            self.index.append(
                {"step": step, "records": self._records, "train_seconds": round(seconds, 1), "path": str(path)}
            )
            atomic_write_text(Path(path).parent / "index.json", json.dumps(self.index, indent=1) + "\n")
        self._excluded += time.perf_counter() - saving


class TailAverage(L.Callback):
    """End training on the mean of the trainable weights at the run's last few points (a one-run model soup).

    The points are every ``every_n_steps``-th optimizer step and the last step; training ends on
    the uniform mean of the weights at the last ``count`` of them (Izmailov et al., 2018, "Averaging
    Weights Leads to Wider Optima and Better Generalization", with the points of a decaying
    schedule). The steps between two late points still move the weights along directions that
    differ from one stretch of records to the next; the mean keeps what the stretches agree on.

    The mean is kept on the CPU (one copy of the trainable weights), goes into checkpoints so a
    resumed run averages the same weights, and replaces the weights in ``on_train_end``: the module
    saves ``final`` after it, and validation during the run sees the weights as trained. Listed
    after :class:`Snapshots`, the snapshots stay the weights as trained, the last one included.

    Args:
        every_n_steps: Optimizer steps between two points.
        count: Points averaged, the last step included; 1 keeps the last weights as they are.
    """

    def __init__(self, every_n_steps: int, count: int = 2) -> None:
        if every_n_steps < 1 or count < 1:
            raise ValueError(f"every_n_steps and count must be >= 1, got {every_n_steps} and {count}")
        self.every_n_steps, self.count = every_n_steps, count
        self.points: list[int] = []
        self.steps: list[int] = []  # the points in the mean so far
        self.mean: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Choose the points before the last step: the last ``count - 1`` multiples of ``every_n_steps`` below it."""
        last = int(trainer.estimated_stepping_batches)
        below = range(self.every_n_steps, last, self.every_n_steps)
        self.points = list(below[len(below) - min(self.count - 1, len(below)) :])
        if not set(self.steps) <= set(self.points):
            rank_zero_warn(f"TailAverage: dropped the checkpoint's mean of steps {self.steps}, not this run's points")
            self.steps, self.mean = [], {}

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Add the weights to the mean after the optimizer step of a point."""
        step = trainer.global_step  # micro-batches of an accumulation window after a step see the same count
        if step in self.points and step not in self.steps:
            self._add(pl_module, step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Add the last weights and load the mean into the model."""
        if not self.steps:  # no point before the last step: nothing to average with
            return
        if trainer.global_step not in self.steps:
            self._add(pl_module, trainer.global_step)
        if len(self.steps) > 1:
            rank_zero_info(f"TailAverage: training ends on the mean of the weights at steps {self.steps}")
            with torch.no_grad():
                for name, param in self._trainable(pl_module):
                    param.copy_(self.mean[name])

    def state_dict(self) -> dict[str, Any]:
        """The mean so far and its steps, so that a resumed run averages the same weights."""
        return {"steps": list(self.steps), "mean": dict(self.mean)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the mean of a checkpoint (checked against the run's points at train start)."""
        self.steps, self.mean = list(state_dict["steps"]), dict(state_dict["mean"])

    @staticmethod
    def _trainable(pl_module: L.LightningModule) -> list[tuple[str, torch.nn.Parameter]]:
        return [(name, param) for name, param in pl_module.named_parameters() if param.requires_grad]

    def _add(self, pl_module: L.LightningModule, step: int) -> None:
        """Running mean: ``mean += (weights - mean) / n``, in float32 on the CPU."""
        n = len(self.steps) + 1
        with torch.no_grad():
            for name, param in self._trainable(pl_module):
                weights = param.detach().to("cpu", torch.float32)
                if n == 1:
                    self.mean[name] = weights.clone()
                else:
                    self.mean[name] += (weights - self.mean[name]) / n
        self.steps.append(step)
