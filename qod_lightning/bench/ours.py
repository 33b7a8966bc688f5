"""Our side: the real :class:`SFTModule` / :class:`DPOModule` driven by a Lightning ``Trainer``."""

from __future__ import annotations

import functools
import importlib
import time
from typing import Any

import lightning as L
import torch

from qod_lightning.bench.data import data_module, first_batches, training_order
from qod_lightning.bench.memory import current_rss_mb
from qod_lightning.bench.model import model_settings
from qod_lightning.bench.options import StageSpec
from qod_lightning.bench.timing import stage_clock, summarize, synchronize, warm_up
from qod_lightning.modules.dpo import DPOModule
from qod_lightning.modules.sft import SFTModule
from qod_lightning.strategy import KeepOnDeviceStrategy


class _NoFinalSave:
    """Mixin: no adapter written at the end of fit (file output is not part of the timed work)."""

    def on_fit_end(self) -> None:
        """Skip :meth:`save_adapter` ("final")."""


class BenchSFTModule(_NoFinalSave, SFTModule):
    """:class:`SFTModule` without the final adapter save."""


class BenchDPOModule(_NoFinalSave, DPOModule):
    """:class:`DPOModule` without the final adapter save."""


class StepRecorder(L.Callback):
    """Record when reference precomputation and every optimizer step end, losses, first-batch log-probs, RSS probes.

    Lightning calls callbacks' ``on_fit_start`` before the module's (where :class:`DPOModule` computes
    its reference log-probs) and ``on_train_start`` after it, so the gap is the precomputation.
    Between ``on_train_end`` and ``on_fit_end`` runs the strategy's teardown.
    """

    def __init__(self) -> None:
        self.fit_start = self.train_start = self.train_end = self.fit_end = 0.0
        self.step_ends: list[float] = []
        self.losses: list[float] = []
        self.first_logps: dict[str, float] | None = None
        self.rss_mb: dict[str, float] = {}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Clock the start of fit."""
        self.fit_start = time.perf_counter()
        self.rss_mb["fit_start"] = current_rss_mb()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Clock the start of the first step."""
        self.train_start = time.perf_counter()
        self.rss_mb["train_start"] = current_rss_mb()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Clock the end of the training loop."""
        synchronize()
        self.train_end = time.perf_counter()
        self.rss_mb["train_end"] = current_rss_mb()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Clock the end of the strategy's teardown."""
        synchronize()
        self.fit_end = time.perf_counter()
        self.rss_mb["fit_end"] = current_rss_mb()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Clock the step, keep its loss and, on the first DPO batch, the mean policy log-probs."""
        synchronize()
        self.step_ends.append(time.perf_counter())
        if "first_step_end" not in self.rss_mb:
            self.rss_mb["first_step_end"] = current_rss_mb()
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))
        metrics = trainer.callback_metrics
        if batch_idx == 0 and "train/logps/chosen_step" in metrics:
            self.first_logps = {
                "chosen": float(metrics["train/logps/chosen_step"]),
                "rejected": float(metrics["train/logps/rejected_step"]),
            }


def build_module(spec: StageSpec) -> L.LightningModule:
    """Our LightningModule for ``spec`` (model loaded, adapter attached), AdamW at a constant LR."""
    optimizer = functools.partial(torch.optim.AdamW, lr=spec.learning_rate, weight_decay=0.0)
    settings = model_settings(spec)
    if spec.stage == "sft":
        return BenchSFTModule(model=settings, optimizer=optimizer, output_dir=f"{spec.workdir}/ours_sft")
    return BenchDPOModule(model=settings, beta=spec.beta, optimizer=optimizer, output_dir=f"{spec.workdir}/ours_dpo")


def build_trainer(spec: StageSpec, recorder: StepRecorder) -> L.Trainer:
    """A Lightning ``Trainer`` of ``spec.steps`` steps: clip 1.0, no validation, logger or checkpoints.

    fp32 on the CPU; bf16 autocast on a GPU (``configs/sft.yaml``'s ``bf16-mixed``). The strategy
    is ``configs/sft.yaml``'s too: the model stays on its device after ``fit``.
    """
    gpu = spec.device == "cuda"
    return L.Trainer(
        accelerator="gpu" if gpu else "cpu",
        devices=1,
        strategy=KeepOnDeviceStrategy(),
        precision="bf16-mixed" if gpu else "32-true",
        max_steps=spec.steps,
        max_epochs=1,
        accumulate_grad_batches=1,
        gradient_clip_val=1.0,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        default_root_dir=f"{spec.workdir}/lightning_{spec.stage}",
        callbacks=[recorder],
    )


def run_ours(spec: StageSpec) -> dict[str, Any]:
    """Load, warm up, then time one ``Trainer.fit`` of our module (reference precomputation included).

    Args:
        spec: The run (``framework == "ours"``).

    Returns:
        The result record (see :func:`~qod_lightning.bench.timing.summarize`).
    """
    torch.set_num_threads(spec.threads)
    if spec.import_trl:  # the same libraries in memory as TRL's run (see StageSpec.import_trl)
        importlib.import_module("trl.trainer.sft_trainer")
        importlib.import_module("trl.trainer.dpo_trainer")
    L.seed_everything(spec.seed, verbose=False)
    dm = data_module(spec)
    load_start = time.perf_counter()
    module = build_module(spec).to(spec.device)  # 4-bit weights are already there; others are not
    model_load_s = time.perf_counter() - load_start
    warmup_s = warm_up(module.model, first_batches(dm, spec.warmup_steps))
    recorder = StepRecorder()
    with stage_clock(gpu=spec.device == "cuda") as numbers:
        trainer = build_trainer(spec, recorder)
        trainer.fit(module, datamodule=dm)
    examples = [dm.train_set.examples[i] for i in training_order(dm)][: spec.steps * spec.batch_size]
    offload_start = time.perf_counter()
    module.cpu()  # after the clock: what Lightning's default teardown would have added to the stage
    synchronize()
    offload_s = time.perf_counter() - offload_start
    return summarize(
        spec,
        numbers,
        recorder.step_ends,
        recorder.train_start,
        examples,
        precompute_s=recorder.train_start - recorder.fit_start if spec.stage == "dpo" else 0.0,
        teardown_s=recorder.fit_end - recorder.train_end,
        model_to_cpu_s=offload_s,
        losses=recorder.losses,
        first_batch_logps=recorder.first_logps,
        rss_probes_mb=recorder.rss_mb,
        model_load_s=model_load_s,
        warmup_s=warmup_s,
    )
