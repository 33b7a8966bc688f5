"""Supervised fine-tuning: causal-LM loss on response tokens, token-weighted."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics import SumMetric

from qod_lightning.model import (
    ModelSettings,
    build_model,
    count_parameters,
)
from qod_lightning.modules.common import (
    Throughput,
    batch_logps,
    configure_optimization,
    drop_frozen_weights,
    finish_training_step,
    save_module_adapter,
)


def default_optimizer(params: Any) -> torch.optim.Optimizer:
    """AdamW at the design's SFT learning rate, for code that builds the module without a config."""
    return torch.optim.AdamW(params, lr=2e-4)


class SFTModule(L.LightningModule):
    """LoRA/QLoRA supervised fine-tuning of a causal LM.

    The training loss is the mean negative log-likelihood over every response token of the
    optimizer step (all micro-batches of the accumulation window on all ranks), not a mean of
    per-batch means: each batch carries its window's token count (``window_weight``).

    Args:
        model: What to load and adapt.
        optimizer: Built over the LoRA parameters.
        scheduler: Per-step LR schedule (optional).
        output_dir: Adapters (PEFT format + tokenizer) go to ``output_dir/final`` at the end of fit
            and ``output_dir/best`` whenever the validation loss improves.
        skip_nonfinite: Skip a batch whose loss is NaN/inf (with a warning) instead of stopping.
    """

    def __init__(
        self,
        model: ModelSettings,
        optimizer: OptimizerCallable = default_optimizer,
        scheduler: LRSchedulerCallable | None = None,
        output_dir: str = "artifacts/sft",
        skip_nonfinite: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.settings = model
        self.optimizer, self.scheduler = optimizer, scheduler
        self.model = build_model(self.settings)
        self.model.train()  # from_pretrained returns eval mode; LoRA dropout must be live
        self.strict_loading = False  # checkpoints hold the adapter only (see drop_frozen_weights)
        self.val_nll, self.val_tokens = SumMetric(), SumMetric()
        self.best_val_loss = math.inf
        self._throughput = Throughput()
        trainable, total = count_parameters(self.model)
        rank_zero_info(f"LoRA: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%)")

    def _shared_step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        logps, counts = batch_logps(self.model, batch)
        nll, tokens = -logps.sum(), counts.sum()
        if stage == "train":
            # Lightning divides by accumulate_grad_batches and DDP averages over ranks; scaling by
            # both over the window's token count makes the step's gradient a true per-token mean.
            scale = self.trainer.accumulate_grad_batches * self.trainer.world_size
            loss = nll * scale / batch["window_weight"]
        else:
            self.val_nll.update(nll.detach())
            self.val_tokens.update(tokens)
            loss = nll / tokens.clamp(min=1)
        self.log(
            f"{stage}/loss",
            nll.detach() / tokens.clamp(min=1),
            batch_size=int(tokens),
            prog_bar=True,
            sync_dist=stage != "train",
        )
        return loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        """One micro-batch; also logs target tokens per second."""
        return finish_training_step(self, self._shared_step(batch, "train"), batch, batch_idx)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Accumulates token-weighted NLL for the epoch."""
        return self._shared_step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """As validation, logged under ``test/``."""
        return self._shared_step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        """Log ``val/perplexity`` from token sums (exact under DDP) and keep the best adapter."""
        if self.trainer.sanity_checking or self.val_tokens.update_count == 0:
            self.val_nll.reset()
            self.val_tokens.reset()
            return
        mean_nll = float(self.val_nll.compute() / self.val_tokens.compute().clamp(min=1))
        self.val_nll.reset()
        self.val_tokens.reset()
        self.log("val/perplexity", math.exp(min(mean_nll, 50.0)), sync_dist=False)
        if mean_nll < self.best_val_loss and self.trainer.state.fn == "fit":
            self.best_val_loss = mean_nll
            self.save_adapter("best")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the adapter, not the frozen base."""
        drop_frozen_weights(self, checkpoint)

    def on_fit_end(self) -> None:
        """Save the final adapter."""
        self.save_adapter("final")

    def save_adapter(self, name: str) -> Path | None:
        """Write the adapter and tokenizer to ``output_dir/name`` (rank zero only)."""
        return save_module_adapter(self, name)

    def configure_optimizers(self) -> dict[str, Any]:
        """The injected optimizer and scheduler."""
        return configure_optimization(self, self.optimizer, self.scheduler)
