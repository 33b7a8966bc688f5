"""Direct Preference Optimization, hand-written: policy = SFT adapter, reference = frozen SFT model."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader
from torchmetrics import SumMetric
from tqdm.auto import tqdm

from qod_lightning.logprobs import CHOSEN, IGNORE_INDEX, pair_layout, pair_logps
from qod_lightning.losses import chosen_nll, dpo_loss
from qod_lightning.model import ModelSettings, count_parameters
from qod_lightning.modules.common import AdapterModule


def chosen_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B,) number of answer tokens in each chosen answer of a preference batch, in either layout."""
    if "packed_segments" in batch:
        scored = (batch["packed_segments"] == CHOSEN) & (batch["packed_targets"] != IGNORE_INDEX)  # (B, L)
        return scored.sum(-1)
    chosen_labels = batch["labels"][: batch["labels"].size(0) // 2, 1:]  # (B, T-1): rows [:B], targets as scored
    return (chosen_labels != IGNORE_INDEX).sum(-1)


def split_digest(examples: list[dict[str, Any]], keys: tuple[str, ...]) -> str:
    """A digest of a split's encoded examples, in order: a reference cache holds for these only.

    Args:
        examples: The split's examples (:class:`~qod_lightning.data.base.ExampleDataset`).
        keys: The token-id keys of each example.

    Returns:
        A hex digest.

    """
    digest = hashlib.sha256()
    for example in examples:
        digest.update(json.dumps([example[key] for key in keys]).encode())
    return digest.hexdigest()


def default_optimizer(params: Any) -> torch.optim.Optimizer:
    """AdamW at the design's DPO learning rate, for code that builds the module without a config."""
    return torch.optim.AdamW(params, lr=5e-5)


class DPOModule(AdapterModule):
    """DPO on LoRA: the trainable policy starts from the SFT adapter, the reference is its copy.

    Reference log-probs are computed once, before the first step, by the policy itself with
    dropout off (at step 0 the policy *is* the reference) and cached by example index. This keeps
    one model in memory and no second adapter; it costs one no-grad pass over the data before
    training, the same forwards a per-step reference would do in one epoch, and none in later
    epochs. The cache is saved in Lightning checkpoints, so a resumed run does not recompute it.
    Test pairs (the data module's ``test_file``) are scored with the others at the start of fit,
    so ``test --ckpt_path`` compares the trained policy with the policy it started from.

    Args:
        model: The base model and ``adapter_path`` of the SFT adapter to start from.
        beta: DPO temperature (strength of the implicit KL penalty).
        label_smoothing: Conservative-DPO flip probability (0: plain DPO).
        optimizer: Built over the LoRA parameters.
        scheduler: Per-step LR schedule (optional).
        output_dir: The DPO adapter goes to ``output_dir/final`` at the end of fit and
            ``output_dir/best`` whenever the validation loss improves.
        skip_nonfinite: Skip a batch whose loss is NaN/inf (with a warning) instead of stopping.
        share_prompt: Score each pair as one packed row, so its prompt runs through the model once
            instead of twice (:func:`~qod_lightning.logprobs.pair_logps`; same numbers, fewer tokens).
        nll_weight: Weight ``alpha`` of the chosen answers' per-token NLL added to each pair's DPO
            loss (RPO, :func:`~qod_lightning.losses.chosen_nll`); 0 is plain DPO.
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
        share_prompt: bool = True,
        nll_weight: float = 0.0,
    ) -> None:
        if beta <= 0:
            raise ValueError(f"beta must be positive, got {beta}")
        if nll_weight < 0:
            raise ValueError(f"nll_weight must be >= 0, got {nll_weight}")
        super().__init__(model, optimizer, scheduler)
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.reference: dict[str, torch.Tensor] = {}
        self.reference_digests: dict[str, str] = {}  # split -> split_digest of the pairs scored
        self.val_loss_sum, self.val_pairs = SumMetric(), SumMetric()
        self._policy_trained = False  # by a step of this module's, or in the checkpoint it was loaded from
        trainable, total = count_parameters(self.model)
        rank_zero_info(f"DPO policy: {trainable:,} trainable of {total:,} parameters")

    # -- reference log-probs -------------------------------------------------------------------

    @torch.no_grad()
    def compute_reference(self, loader: DataLoader, split: str) -> torch.Tensor:
        """Score every pair of ``loader`` with the current model in eval mode (no dropout).

        Runs in the trainer's precision context (bf16 autocast under ``bf16-mixed``), the one the
        policy is scored in during steps: Lightning applies it to steps, not to ``on_fit_start``,
        and a reference scored at another precision would make the first-step DPO loss differ
        from log 2 for an unchanged policy. Under DDP each rank scores its shard and the tables
        are summed across ranks.

        Returns:
            (N, 2) chosen/rejected log-probs indexed by example index.

        """
        was_training = self.model.training
        self.model.eval()
        n = len(loader.dataset)
        table, scored = torch.zeros(n, 2), torch.zeros(n)
        for batch in tqdm(loader, desc=f"Reference log-probs ({split})", disable=not self.trainer.is_global_zero):
            batch = self.transfer_batch_to_device(batch, self.device, 0)
            with self.trainer.precision_plugin.forward_context():
                logps = pair_logps(self.model, batch, self.hparams.share_prompt)
            pairs = logps.view(2, -1).T  # (B, 2): chosen, rejected
            index = batch["index"].cpu()
            table[index] = pairs.float().cpu()
            scored[index] += 1
        self.model.train(was_training)
        if self.trainer.world_size > 1:  # each rank scored its shard; every rank needs the whole table
            table = self.trainer.strategy.reduce(table.to(self.device), reduce_op="sum").cpu()
            scored = self.trainer.strategy.reduce(scored.to(self.device), reduce_op="sum").cpu()
        if (scored != 1).any():
            bad = int((scored != 1).sum())
            raise RuntimeError(f"{bad} {split} pair(s) were not scored exactly once for the reference log-probs")
        return table

    def _ensure_reference(self, split: str) -> None:
        datamodule = self.trainer.datamodule
        dataset = datamodule.split(split)
        if dataset is None or len(dataset) == 0:
            return
        digest = split_digest(dataset.examples, datamodule.encoded_keys)
        # A cache from a checkpoint is only good for the pairs it was scored on (older
        # checkpoints hold no digest: taken as they are).
        if split in self.reference and self.reference_digests.get(split, digest) == digest:
            return
        if self._policy_trained:
            # Scoring the trained policy now would compare it with itself.
            what = "other" if split in self.reference else "no"
            raise RuntimeError(
                f"the reference log-probs were scored on {what} {split} pairs when this policy's training "
                f"started (step 0), and the trained policy is no reference. Give the data module these {split} "
                f"pairs when fitting (or, to resume, the ones it had then), or {split} the untrained SFT adapter."
            )
        self.reference[split] = self.compute_reference(datamodule.ordered_dataloader(split), split)
        self.reference_digests[split] = digest

    def setup(self, stage: str) -> None:
        """Lay out the preference batches for this model: packed rows if it can score them exactly."""
        super().setup(stage)
        datamodule = self.trainer.datamodule
        if datamodule is not None:
            datamodule.layout = pair_layout(self.model, self.hparams.share_prompt)

    def on_fit_start(self) -> None:
        """Cache reference log-probs for every split's pairs before any update."""
        for split in ("train", "val", "test"):
            self._ensure_reference(split)

    def on_validation_start(self) -> None:
        """``validate`` without ``fit`` needs the cache too."""
        self._ensure_reference("val")

    def on_test_start(self) -> None:
        """``test`` needs the test pairs' reference."""
        self._ensure_reference("test")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Also store the reference cache, so a resumed run does not recompute it from a trained policy."""
        super().on_save_checkpoint(checkpoint)
        checkpoint["dpo_reference"] = self.reference
        checkpoint["dpo_reference_digests"] = self.reference_digests

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the reference cache of the interrupted run."""
        super().on_load_checkpoint(checkpoint)
        self.reference = checkpoint.get("dpo_reference", {})
        self.reference_digests = checkpoint.get("dpo_reference_digests", {})
        self._policy_trained = checkpoint.get("global_step", 0) > 0

    # -- steps -----------------------------------------------------------------------------------

    def _shared_step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        self._policy_trained |= stage == "train"
        logps = pair_logps(self.model, batch, self.hparams.share_prompt)  # (2B,): chosen, then rejected
        policy_chosen, policy_rejected = logps.view(2, -1)  # each (B,)
        ref = self.reference[stage][batch["index"].cpu()].to(logps)  # (B, 2)
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            policy_chosen, policy_rejected, ref[:, 0], ref[:, 1], self.hparams.beta, self.hparams.label_smoothing
        )
        nll = chosen_nll(policy_chosen, chosen_tokens(batch))  # (B,)
        if self.hparams.nll_weight > 0:
            losses = losses + self.hparams.nll_weight * nll
        if stage == "train":
            # Exact mean over the optimizer step's pairs (see WindowBatchSampler).
            scale = self.trainer.accumulate_grad_batches * self.trainer.world_size
            loss = losses.sum() * scale / batch["window_weight"]
        else:
            loss = losses.mean()
        if stage == "val":
            self.val_loss_sum.update(losses.detach().sum())
            self.val_pairs.update(losses.numel())
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
            f"{stage}/nll/chosen": nll.detach().mean(),
        }
        self.log_dict(metrics, batch_size=n, on_step=on_step, on_epoch=True, sync_dist=not on_step)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """DPO loss and rewards on held-out pairs."""
        return self._shared_step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """As validation, on the test pairs, logged under ``test/``."""
        return self._shared_step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        """Keep the adapter with the lowest mean validation loss over all pairs (exact under DDP)."""
        done = not self.trainer.sanity_checking and self.val_pairs.update_count > 0
        mean_loss = float(self.val_loss_sum.compute() / self.val_pairs.compute().clamp(min=1)) if done else None
        self.val_loss_sum.reset()
        self.val_pairs.reset()
        if mean_loss is not None:
            self.keep_best(mean_loss)
