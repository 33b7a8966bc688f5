"""TRL's side: ``SFTTrainer`` / ``DPOTrainer`` (TRL 1.x) on our token ids, model and LoRA adapter.

TRL is given exactly what our run gets: the model built by :func:`~qod_lightning.model.build_model`
(the same LoRA config on the same base, or the same starting adapter), the examples our data module
tokenized, in the order our sampler yields them (TRL reads them sequentially), and the same
optimizer, learning rate, clipping, batch size, precision and number of steps.

TRL 1.16 specifics (line numbers of the installed ``trl/``):

* ``SFTTrainer`` takes pre-tokenized ``input_ids`` + ``labels`` as they are (``trainer/sft_trainer.py``
  ``_prepare_dataset``; a ``labels`` column is used as is, then truncated and filtered again).
* ``DPOTrainer._prepare_dataset`` always re-tokenizes from text: with no ``prompt`` column it maps
  ``extract_prompt`` (``trainer/dpo_trainer.py:1050-1054``), although the comment in ``evaluate``
  (``:1627``) calls it idempotent. :class:`BenchDPOTrainer` passes a dataset that already has
  ``prompt_ids``/``chosen_ids``/``rejected_ids`` through; ``DataCollatorForPreference`` then pads
  it exactly as our collate does (chosen rows, then rejected rows, one length).
* The base config defaults to ``gradient_checkpointing=True`` and ``bf16=True``
  (``trainer/base_config.py:63,108``) and transformers 5 to the fused AdamW (``optim`` default
  ``adamw_torch_fused``); all three are overridden here to match our runs (fp32 on the CPU, bf16
  autocast on a GPU) with plain AdamW.
* Given a ``PeftModel`` that already has an adapter, ``DPOTrainer`` copies it into a frozen ``ref``
  adapter for the reference (``dpo_trainer.py:689``). With ``precompute_ref_log_probs=True`` the
  reference pass runs in ``__init__`` after hashing every model parameter (``:981``) and is cached
  in an Arrow file keyed by dataset fingerprint and model hash (``:1182``): timed here, as the stage
  clock starts before the trainer is built. ``padding_free=True`` is silently turned off (``:739``).
* The log-probs come from a fused, chunked LM head (``trainer/utils.py::add_fused_lm_head``) that
  also computes entropy, mean logits and top-1 hits for its metrics (``dpo_trainer.py:957``); off
  CUDA/XPU it projects every position, prompt and padding included (``utils.py:1642``,
  ``kernels/chunked_logprob.py:48``), and recomputes the projection in backward.
* For a 4-bit base model both trainers cast the trainable LoRA weights to bf16 (``dpo_trainer.py:729``,
  ``sft_trainer.py:911``); ours stay fp32. :func:`run_trl` puts the fp32 weights back before training
  unless ``StageSpec.trl_fp32_lora`` is off (then TRL trains bf16 LoRA weights, rounded).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from datasets import Dataset
from torch.utils.data import Sampler, SequentialSampler
from transformers import TrainerCallback
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

from qod_lightning.bench.data import data_module, first_batches, training_order
from qod_lightning.bench.memory import current_rss_mb
from qod_lightning.bench.model import model_settings
from qod_lightning.bench.options import StageSpec
from qod_lightning.bench.timing import stage_clock, summarize, synchronize, warm_up
from qod_lightning.model import build_model


class StepClock(TrainerCallback):
    """``perf_counter`` at the start of training and at the end of every optimizer step."""

    def __init__(self) -> None:
        self.train_start = 0.0
        self.step_ends: list[float] = []
        self.rss_mb: dict[str, float] = {}

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Clock the start of the first step."""
        self.train_start = time.perf_counter()
        self.rss_mb["train_start"] = current_rss_mb()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Clock the end of an optimizer step."""
        synchronize()
        self.step_ends.append(time.perf_counter())
        if "first_step_end" not in self.rss_mb:
            self.rss_mb["first_step_end"] = current_rss_mb()


class _SequentialMixin:
    """Read the training set in order: it is already in our sampler's order (any transformers version)."""

    train_dataset: Any

    def _get_train_sampler(self, *args: Any, **kwargs: Any) -> Sampler:
        """A sequential sampler over the training set."""
        dataset = args[0] if args else kwargs.get("train_dataset")
        return SequentialSampler(dataset if dataset is not None else self.train_dataset)


class BenchSFTTrainer(_SequentialMixin, SFTTrainer):
    """``SFTTrainer`` that reads examples in order and records each training loss."""

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        """TRL's loss; training losses are also kept in ``bench_losses``."""
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if model.training:
            loss = result[0] if return_outputs else result
            self.__dict__.setdefault("bench_losses", []).append(float(loss.detach()))
        return result


class BenchDPOTrainer(_SequentialMixin, DPOTrainer):
    """``DPOTrainer`` that accepts pre-tokenized pairs, reads them in order, records losses, log-probs, precompute."""

    def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
        """Pass already tokenized pairs through; anything else goes to TRL's preparation."""
        if {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(dataset.column_names):
            return dataset
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    def _precompute_ref_logps(self, dataset: Dataset, name: str, batch_size: int) -> Dataset:
        """TRL's reference precomputation, timed into ``bench_precompute_s``."""
        start = time.perf_counter()
        result = super()._precompute_ref_logps(dataset, name, batch_size)
        self.__dict__["bench_precompute_s"] = self.__dict__.get("bench_precompute_s", 0.0) + (
            time.perf_counter() - start
        )
        return result

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        """TRL's loss; during training also keep the loss and the first batch's mean policy log-probs."""
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if model.training:
            loss = result[0] if return_outputs else result
            losses = self.__dict__.setdefault("bench_losses", [])
            losses.append(float(loss.detach()))
            if len(losses) == 1:
                metrics = self._metrics["train"]
                self.__dict__["bench_first_logps"] = {
                    "chosen": metrics["logps/chosen"][-1],
                    "rejected": metrics["logps/rejected"][-1],
                }
        return result


def _common_args(spec: StageSpec) -> dict[str, Any]:
    """Training arguments shared by both trainers, chosen to match our Lightning runs."""
    return {
        "output_dir": f"{spec.workdir}/trl_{spec.stage}",
        "per_device_train_batch_size": spec.batch_size,
        "gradient_accumulation_steps": 1,
        "max_steps": spec.steps,
        "learning_rate": spec.learning_rate,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "optim": "adamw_torch",  # torch.optim.AdamW, not the fused default: ours uses the plain one
        "max_grad_norm": 1.0,
        "bf16": spec.device == "cuda",  # bf16 autocast on a GPU, like our bf16-mixed
        "fp16": False,
        "use_cpu": spec.device == "cpu",
        "gradient_checkpointing": spec.gradient_checkpointing,
        "dataloader_num_workers": 0,
        "report_to": "none",
        "save_strategy": "no",
        "eval_strategy": "no",
        "disable_tqdm": True,
        "seed": spec.seed,
        "max_length": spec.max_length,
        "pad_to_multiple_of": spec.pad_to_multiple_of if spec.pad_to_multiple_of > 1 else None,
    }


def _dataset(spec: StageSpec, examples: list[dict[str, Any]]) -> Dataset:
    """Our tokenized examples as a ``datasets.Dataset`` with the columns TRL reads."""
    keys = ("input_ids", "labels") if spec.stage == "sft" else ("prompt_ids", "chosen_ids", "rejected_ids")
    return Dataset.from_list([{k: e[k] for k in keys} for e in examples])


def _trainer(spec: StageSpec, model: Any, tokenizer: Any, dataset: Dataset, clock: StepClock) -> Any:
    """Build TRL's trainer (for DPO with ``precompute_ref_log_probs=True`` this runs the reference pass)."""
    if spec.stage == "sft":
        config = SFTConfig(**_common_args(spec), packing=False, padding_free=False)
        return BenchSFTTrainer(
            model=model, args=config, train_dataset=dataset, processing_class=tokenizer, callbacks=[clock]
        )
    config = DPOConfig(
        **_common_args(spec),
        beta=spec.beta,
        loss_type=["sigmoid"],
        precompute_ref_log_probs=spec.trl_precompute,
        padding_free=False,
    )
    return BenchDPOTrainer(
        model=model, args=config, train_dataset=dataset, processing_class=tokenizer, callbacks=[clock]
    )


def trainable_lora(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the trainable LoRA weights, by parameter name."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n}


def restore_lora(model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> int:
    """Put back the saved LoRA weights where TRL changed their dtype (its bf16 cast); returns how many.

    Restoring the saved tensors, not casting back, undoes the bf16 rounding too.
    """
    restored = 0
    for name, param in model.named_parameters():
        if name in saved and param.dtype != saved[name].dtype:
            param.data = saved[name]
            restored += 1
    return restored


def run_trl(spec: StageSpec) -> dict[str, Any]:
    """Load, warm up, then time TRL's trainer construction and ``train()`` on our token ids.

    Args:
        spec: The run (``framework == "trl"``).

    Returns:
        The result record (see :func:`~qod_lightning.bench.timing.summarize`).
    """
    torch.set_num_threads(spec.threads)
    torch.manual_seed(spec.seed)
    dm = data_module(spec)
    examples = [dm.train_set.examples[i] for i in training_order(dm)][: spec.steps * spec.batch_size]
    dataset = _dataset(spec, examples)
    load_start = time.perf_counter()
    model = build_model(model_settings(spec)).to(spec.device)  # 4-bit weights are already there
    model_load_s = time.perf_counter() - load_start
    warmup_s = warm_up(model, first_batches(dm, spec.warmup_steps))
    saved = trainable_lora(model) if spec.trl_fp32_lora else {}
    clock = StepClock()
    with stage_clock(gpu=spec.device == "cuda") as numbers:
        trainer = _trainer(spec, model, dm.tokenizer, dataset, clock)
        restored = restore_lora(trainer.model, saved)
        trainer.train()
    state = trainer.__dict__
    return summarize(
        spec,
        numbers,
        clock.step_ends,
        clock.train_start,
        examples,
        precompute_s=state.get("bench_precompute_s"),  # None: reference forward in every step
        losses=state.get("bench_losses", []),
        first_batch_logps=state.get("bench_first_logps"),
        rss_probes_mb=clock.rss_mb,
        model_load_s=model_load_s,
        warmup_s=warmup_s,
        lora_restored_to_fp32=restored,
    )
