"""Supervised fine-tuning: causal-LM loss on response tokens, token-weighted."""

from __future__ import annotations

import math
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics import SumMetric

from qod_lightning.logprobs import batch_logps
from qod_lightning.model import ModelSettings, count_parameters
from qod_lightning.modules.common import AdapterModule


def default_optimizer(params: Any) -> torch.optim.Optimizer:
    """AdamW at the design's SFT learning rate, for code that builds the module without a config."""
    return torch.optim.AdamW(params, lr=2e-4)


class SFTModule(AdapterModule):
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
        super().__init__(model, optimizer, scheduler)
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.val_nll, self.val_tokens = SumMetric(), SumMetric()
        trainable, total = count_parameters(self.model)
        share = 100 * trainable / total
        rank_zero_info(f"{model.finetune}: {trainable:,} trainable of {total:,} parameters ({share:.2f}%)")

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
        self.keep_best(mean_nll)
