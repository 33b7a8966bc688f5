"""Pieces both LightningModules use: scoring a batch, optimizers and schedules, adapter saving."""

from __future__ import annotations

import inspect
import math
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from peft import PeftModel
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from qod_lightning.data.tokenize import IGNORE_INDEX
from qod_lightning.logprobs import response_logps, sequence_logps
from qod_lightning.model import load_tokenizer, save_adapter


def batch_logps(model: PeftModel, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed target-token log-probs of each row of ``batch``.

    Runs the decoder, then the LM head on response positions only
    (:func:`~qod_lightning.logprobs.response_logps`). Models whose causal-LM forward does more
    than ``lm_head(hidden)`` (logit soft-capping) take the full-logits path instead.

    Args:
        model: The PEFT model (adapters active or disabled by the caller).
        batch: ``input_ids``, ``attention_mask``, ``labels``, each (B, T).

    Returns:
        ``(logps, counts)``, each (B,).

    """
    causal_lm = model.get_base_model()
    if getattr(causal_lm.config, "final_logit_softcapping", None):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        return sequence_logps(logits, batch["labels"])
    decoder = causal_lm.get_decoder()
    hidden = decoder(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).last_hidden_state  # (B, T, H)
    return response_logps(hidden, causal_lm.get_output_embeddings(), batch["labels"])


class LinearWarmupDecay(LambdaLR):
    """Linear warm-up from 0 to the base LR, then linear decay to 0 at the last step.

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


def save_module_adapter(module: Any, name: str) -> Path | None:
    """Write ``module.model``'s adapter and the tokenizer to ``output_dir/name`` (rank zero only)."""
    if not module.trainer.is_global_zero:
        return None
    tokenizer = getattr(module.trainer.datamodule, "tokenizer", None) or load_tokenizer(
        module.settings.model_name_or_path
    )
    return save_adapter(module.model, tokenizer, Path(module.hparams.output_dir) / name)


def drop_frozen_weights(module: torch.nn.Module, checkpoint: dict[str, Any]) -> None:
    """Keep only trainable tensors (and buffers we own) in a Lightning checkpoint.

    The base model never changes and is reloaded from its source, so storing it would make each
    checkpoint the size of the model (gigabytes for Phi-3) instead of the adapter's megabytes.
    """
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    state = checkpoint["state_dict"]
    for key in list(state):
        if key.startswith("model.") and key not in trainable:
            del state[key]


def finish_training_step(
    module: Any, loss: torch.Tensor, batch: dict[str, torch.Tensor], batch_idx: int
) -> torch.Tensor | None:
    """Refuse a non-finite loss and log response tokens per second.

    A NaN or infinite loss stops the run with the step and batch that produced it, unless the
    module was built with ``skip_nonfinite=True``: then the batch is skipped (Lightning skips the
    backward pass and optimizer step for a ``None`` loss) with a warning.

    Returns:
        The loss, or ``None`` to skip the batch.
    """
    if not torch.isfinite(loss):
        where = f"global step {module.global_step}, epoch {module.current_epoch}, batch {batch_idx}"
        if not module.hparams.skip_nonfinite:
            raise FloatingPointError(f"non-finite training loss ({loss.item()}) at {where}; set skip_nonfinite to skip")
        rank_zero_warn(f"skipping batch with non-finite loss ({loss.item()}) at {where}")
        return None
    rate = module._throughput.update(int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()))
    if rate is not None:
        module.log("train/tokens_per_sec", rate, batch_size=1)
    return loss
