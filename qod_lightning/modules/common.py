"""What both LightningModules share: optimizers and schedules, checkpoints, adapter saving."""

from __future__ import annotations

import inspect
import math
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from qod_lightning.artifacts import check_writable
from qod_lightning.logprobs import target_tokens
from qod_lightning.model import ModelSettings, build_model, load_tokenizer, save_adapter


class LinearWarmupDecay(LambdaLR):
    """Linear warm-up from 0 to the base LR, then linear decay that reaches 0 just after the last step.

    As transformers' linear schedule: the first step runs at ``1 / (warmup + 1)`` of the base LR
    and the last at ``1 / (num_training_steps - warmup)`` of it (a step at 0 would be wasted).

    Args:
        optimizer: The optimizer.
        warmup_ratio: Share of all optimizer steps spent warming up.
        num_training_steps: Total optimizer steps; the LightningModules fill it in from
            ``Trainer.estimated_stepping_batches`` when the config leaves it out.

    """

    def __init__(self, optimizer: Optimizer, warmup_ratio: float = 0.03, num_training_steps: int = 1000) -> None:
        if not 0.0 <= warmup_ratio < 1.0 or num_training_steps < 1:
            raise ValueError(f"bad schedule: warmup_ratio={warmup_ratio}, num_training_steps={num_training_steps}")
        warmup = math.ceil(warmup_ratio * num_training_steps)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            return max(0.0, (num_training_steps - step) / max(1, num_training_steps - warmup))

        super().__init__(optimizer, factor)


def configure_optimization(
    module: Any, optimizer: OptimizerCallable, scheduler: LRSchedulerCallable | None
) -> dict[str, Any]:
    """Build the injected optimizer over trainable parameters, and the scheduler stepping per step.

    A scheduler that takes ``num_training_steps`` and was not given one gets the Trainer's
    estimate, so a config does not have to repeat the dataset size.
    """
    opt = optimizer([p for p in module.parameters() if p.requires_grad])
    if scheduler is None:
        return {"optimizer": opt}
    kwargs = {}
    params = inspect.signature(scheduler).parameters
    keywords = getattr(scheduler, "keywords", {}) or {}
    if "num_training_steps" in params and "num_training_steps" not in keywords:
        kwargs["num_training_steps"] = max(1, int(module.trainer.estimated_stepping_batches))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler(opt, **kwargs), "interval": "step"}}


class Throughput:
    """Target tokens per second between consecutive training batches."""

    def __init__(self) -> None:
        self._last: float | None = None

    def update(self, tokens: int) -> float | None:
        """Record a finished batch; returns tokens/s since the previous one (``None`` at first)."""
        now = time.perf_counter()
        rate = None if self._last is None else tokens / max(now - self._last, 1e-9)
        self._last = now
        return rate


class AdapterModule(L.LightningModule):
    """What the SFT and DPO modules share: a PEFT model, adapter-only checkpoints that resume exactly.

    Subclasses implement ``_shared_step(batch, stage)``. Checkpoints keep the trainable tensors
    and the random-number state, never the frozen base (reloaded from its source), so a run
    resumed with ``--ckpt_path`` draws the same dropout masks as one that was never interrupted.

    Args:
        settings: What to load and adapt.
        optimizer: Built over the trainable parameters.
        scheduler: Per-step LR schedule (optional).
    """

    def __init__(
        self, settings: ModelSettings, optimizer: OptimizerCallable, scheduler: LRSchedulerCallable | None
    ) -> None:
        super().__init__()
        self.settings = settings
        self.optimizer, self.scheduler = optimizer, scheduler
        self.model = build_model(settings)
        self.model.train()  # from_pretrained returns eval mode; LoRA dropout must be live
        self.strict_loading = False  # checkpoints hold the adapter only (see on_save_checkpoint)
        self._throughput = Throughput()
        self._rng_to_restore: dict[str, Any] | None = None
        self.best_val_loss = math.inf

    def _shared_step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        raise NotImplementedError

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        """One micro-batch: refuse a non-finite loss, log response tokens per second.

        A NaN or infinite loss stops the run with the step and batch that produced it, unless the
        module was built with ``skip_nonfinite=True``: then the batch is skipped (Lightning skips
        the backward pass and optimizer step for a ``None`` loss) with a warning.

        Returns:
            The loss, or ``None`` to skip the batch.
        """
        loss = self._shared_step(batch, "train")
        if not torch.isfinite(loss):
            where = f"global step {self.global_step}, epoch {self.current_epoch}, batch {batch_idx}"
            if not self.hparams.skip_nonfinite:
                raise FloatingPointError(
                    f"non-finite training loss ({loss.item()}) at {where}; set skip_nonfinite to skip"
                )
            rank_zero_warn(f"skipping batch with non-finite loss ({loss.item()}) at {where}")
            return None
        rate = self._throughput.update(target_tokens(batch))
        if rate is not None:
            self.log("train/tokens_per_sec", rate, batch_size=1)
        return loss

    def setup(self, stage: str) -> None:
        """Choose the attention kernels; before fitting, check the adapter and checkpoint directories."""
        if self.trainer.strategy.root_device.type == "cuda":
            # cuDNN's fused attention builds an execution graph for each new (batch, length) shape,
            # seconds each with a boolean mask (benchmarks/README.md), and dynamic padding makes
            # most batches a new shape. Flash and memory-efficient attention need no
            # per-shape build. Process-wide: it also holds for the generation callbacks.
            torch.backends.cuda.enable_cudnn_sdp(False)
        if stage != "fit" or not self.trainer.is_global_zero:
            return
        trainable = [p for p in self.parameters() if p.requires_grad]
        trainable_bytes = sum(p.numel() * p.element_size() for p in trainable)
        # final + best adapters, each written beside its old copy before the rename
        check_writable(self.hparams.output_dir, 4 * trainable_bytes + 2**20)
        # weights + two Adam moments (fp32), also written beside the old checkpoint
        checkpoint_bytes = 2 * 3 * 4 * sum(p.numel() for p in trainable)
        for callback in self.trainer.checkpoint_callbacks:
            if getattr(callback, "dirpath", None):
                check_writable(callback.dirpath, checkpoint_bytes)

    def on_before_optimizer_step(self, optimizer: Optimizer) -> None:
        """Refuse (or skip, with ``skip_nonfinite``) a step whose gradients hold NaN or inf.

        Under fp16 loss scaling the scaler already skips such steps and lowers the scale, which is
        how it finds its range, so the check is left to it.
        """
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            return
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if not grads or torch.stack([torch.isfinite(g).all() for g in grads]).all():
            return
        where = f"global step {self.global_step}, epoch {self.current_epoch}"
        if not self.hparams.skip_nonfinite:
            raise FloatingPointError(f"non-finite gradient at {where}; set skip_nonfinite to skip such steps")
        rank_zero_warn(f"skipping optimizer step with non-finite gradient at {where}")
        optimizer.zero_grad(set_to_none=True)  # parameters without a gradient are not updated

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only trainable tensors, and store the random-number state.

        The base model never changes and is reloaded from its source, so storing it would make each
        checkpoint the size of the model (gigabytes for Phi-3) instead of the adapter's megabytes.
        """
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        state = checkpoint["state_dict"]
        for key in list(state):
            if key.startswith("model.") and key not in trainable:
                del state[key]
        checkpoint["rng_state"] = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }
        checkpoint["best_val_loss"] = self.best_val_loss  # so a resumed run does not overwrite best

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Hold the saved random-number state until training resumes (after sanity checks)."""
        self._rng_to_restore = checkpoint.get("rng_state")
        self.best_val_loss = checkpoint.get("best_val_loss", math.inf)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Restore the checkpoint's random-number state just before the first resumed batch."""
        if self._rng_to_restore is None:
            return
        torch.set_rng_state(self._rng_to_restore["torch"])
        if self._rng_to_restore["cuda"]:
            torch.cuda.set_rng_state_all(self._rng_to_restore["cuda"])
        self._rng_to_restore = None

    def on_fit_end(self) -> None:
        """Save the final adapter."""
        self.save_adapter("final")

    def keep_best(self, val_loss: float) -> None:
        """Save the adapter to ``output_dir/best`` when ``val_loss`` is the lowest of this fit so far."""
        if val_loss < self.best_val_loss and self.trainer.state.fn == "fit":
            self.best_val_loss = val_loss
            self.save_adapter("best")

    def save_adapter(self, name: str) -> Path | None:
        """Write the adapter and tokenizer to ``output_dir/name`` (rank zero only)."""
        if not self.trainer.is_global_zero:
            return None
        datamodule = self.trainer.datamodule
        tokenizer = getattr(datamodule, "tokenizer", None) or load_tokenizer(self.settings.model_name_or_path)
        prompt_format = getattr(getattr(datamodule, "hparams", None), "prompt_format", None)
        notes = getattr(datamodule, "answer_notes", False)
        return save_adapter(self.model, tokenizer, Path(self.hparams.output_dir) / name, prompt_format, notes)

    def configure_optimizers(self) -> dict[str, Any]:
        """The injected optimizer and scheduler."""
        return configure_optimization(self, self.optimizer, self.scheduler)
