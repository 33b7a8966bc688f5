"""Direct Preference Optimization, hand-written: policy = SFT adapter, reference = frozen SFT model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from qod_lightning.losses import dpo_loss
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
    """AdamW at the design's DPO learning rate, for code that builds the module without a config."""
    return torch.optim.AdamW(params, lr=5e-5)


class DPOModule(L.LightningModule):
    """DPO on LoRA: the trainable policy starts from the SFT adapter, the reference is its copy.

    Reference log-probs are computed once, before the first step, by the policy itself with
    dropout off (at step 0 the policy *is* the reference) and cached by example index. This keeps
    one model in memory and no second adapter; it costs one no-grad pass over the data before
    training, the same forwards a per-step reference would do in one epoch, and none in later
    epochs. The cache is saved in Lightning checkpoints, so a resumed run does not recompute it.

    Args:
        model: The base model and ``adapter_path`` of the SFT adapter to start from.
        beta: DPO temperature (strength of the implicit KL penalty).
        label_smoothing: Conservative-DPO flip probability (0: plain DPO).
        optimizer: Built over the LoRA parameters.
        scheduler: Per-step LR schedule (optional).
        output_dir: The DPO adapter goes to ``output_dir/final`` at the end of fit.
        skip_nonfinite: Skip a batch whose loss is NaN/inf (with a warning) instead of stopping.
    """

    def __init__(
        self,
        model: ModelSettings,
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        optimizer: OptimizerCallable = default_optimizer,
        scheduler: LRSchedulerCallable | None = None,
        output_dir: str = "artifacts/dpo",
        skip_nonfinite: bool = False,
    ) -> None:
        super().__init__()
        if beta <= 0:
            raise ValueError(f"beta must be positive, got {beta}")
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.settings = model
        self.optimizer, self.scheduler = optimizer, scheduler
        self.model = build_model(self.settings)
        self.model.train()  # from_pretrained returns eval mode; LoRA dropout must be live
        self.strict_loading = False  # checkpoints hold the adapter only (see drop_frozen_weights)
        self.reference: dict[str, torch.Tensor] = {}
        self._throughput = Throughput()
        trainable, total = count_parameters(self.model)
        rank_zero_info(f"DPO policy: {trainable:,} trainable of {total:,} parameters")

    # -- reference log-probs -------------------------------------------------------------------

    @torch.no_grad()
    def compute_reference(self, loader: DataLoader, split: str) -> torch.Tensor:
        """Score every pair of ``loader`` with the current model in eval mode (no dropout).

        Returns:
            (N, 2) chosen/rejected log-probs indexed by example index.

        """
        was_training = self.model.training
        self.model.eval()
        n = len(loader.dataset)
        table = torch.full((n, 2), float("nan"))
        for batch in tqdm(loader, desc=f"Reference log-probs ({split})", disable=not self.trainer.is_global_zero):
            batch = self.transfer_batch_to_device(batch, self.device, 0)
            logps, _ = batch_logps(self.model, batch)
            pairs = logps.view(2, -1).T  # (B, 2): chosen, rejected
            table[batch["index"].cpu()] = pairs.float().cpu()
        self.model.train(was_training)
        if torch.isnan(table).any():
            raise RuntimeError(f"reference log-probs missing for some {split} examples")
        return table

    def _ensure_reference(self, split: str) -> None:
        if split in self.reference:
            return
        datamodule = self.trainer.datamodule
        dataset = datamodule.train_set if split == "train" else datamodule.val_set
        if dataset is not None and len(dataset) > 0:
            self.reference[split] = self.compute_reference(datamodule.ordered_dataloader(split), split)

    def on_fit_start(self) -> None:
        """Cache reference log-probs for training and validation pairs before any update."""
        self._ensure_reference("train")
        self._ensure_reference("val")

    def on_validation_start(self) -> None:
        """``validate`` without ``fit`` needs the cache too."""
        self._ensure_reference("val")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the adapter and the reference cache, not the frozen base."""
        drop_frozen_weights(self, checkpoint)
        checkpoint["dpo_reference"] = self.reference

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the reference cache of the interrupted run."""
        self.reference = checkpoint.get("dpo_reference", {})

    # -- steps -----------------------------------------------------------------------------------

    def _shared_step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        split = "train" if stage == "train" else "val"
        logps, _ = batch_logps(self.model, batch)  # (2B,): chosen rows, then rejected rows
        policy_chosen, policy_rejected = logps.view(2, -1)  # each (B,)
        ref = self.reference[split][batch["index"].cpu()].to(logps)  # (B, 2)
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            policy_chosen, policy_rejected, ref[:, 0], ref[:, 1], self.hparams.beta, self.hparams.label_smoothing
        )
        if stage == "train":
            # Exact mean over the optimizer step's pairs (see WindowBatchSampler).
            scale = self.trainer.accumulate_grad_batches * self.trainer.world_size
            loss = losses.sum() * scale / batch["window_weight"]
        else:
            loss = losses.mean()
        n = losses.numel()
        on_step = stage == "train"
        metrics = {
            f"{stage}/loss": losses.mean().detach(),
            f"{stage}/rewards/chosen": chosen_rewards.mean(),
            f"{stage}/rewards/rejected": rejected_rewards.mean(),
            f"{stage}/rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            f"{stage}/rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            f"{stage}/logps/chosen": policy_chosen.detach().mean(),
            f"{stage}/logps/rejected": policy_rejected.detach().mean(),
        }
        self.log_dict(metrics, batch_size=n, on_step=on_step, on_epoch=True, sync_dist=not on_step)
        return loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        """One micro-batch of pairs; also logs response tokens per second."""
        return finish_training_step(self, self._shared_step(batch, "train"), batch, batch_idx)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """DPO loss and rewards on held-out pairs."""
        return self._shared_step(batch, "val")

    def on_fit_end(self) -> None:
        """Save the DPO adapter."""
        self.save_adapter("final")

    def save_adapter(self, name: str) -> Path | None:
        """Write the adapter and tokenizer to ``output_dir/name`` (rank zero only)."""
        return save_module_adapter(self, name)

    def configure_optimizers(self) -> dict[str, Any]:
        """The injected optimizer and scheduler."""
        return configure_optimization(self, self.optimizer, self.scheduler)
