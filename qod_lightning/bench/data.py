"""Benchmark data: records cycled to a run's size, our data module over them, their order and token counts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from qod_lightning.bench.options import StageSpec
from qod_lightning.logprobs import PairLayout


def write_cycled_jsonl(source: str | Path, count: int, target: str | Path, prompt_repeat: int = 1) -> Path:
    """Write ``count`` records to ``target``: those of ``source`` in order, cycled as often as needed.

    Args:
        source: A JSONL file.
        count: Records to write.
        target: Output path.
        prompt_repeat: Write each record's request (``input`` of an SFT record, ``prompt`` of a
            preference pair) this many times over, one copy per line; the data module then cuts
            the prompt from the left so every example fills ``max_length``.

    Returns:
        ``target``.

    Raises:
        ValueError: When ``source`` has no record.
    """
    lines = [line for line in Path(source).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{source}: no records")
    if prompt_repeat > 1:
        lines = [_repeat_request(line, prompt_repeat) for line in lines]
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    Path(target).write_text("\n".join(lines[i % len(lines)] for i in range(count)) + "\n", encoding="utf-8")
    return Path(target)


def _repeat_request(line: str, times: int) -> str:
    record = json.loads(line)
    key = "prompt" if "prompt" in record else "input"
    record[key] = "\n".join([record[key]] * times)
    return json.dumps(record, ensure_ascii=False)


def data_module(spec: StageSpec) -> Any:
    """Our data module for ``spec``: its file, no validation split, tokenized (``setup`` done)."""
    from qod_lightning.data.preference import PreferenceDataModule
    from qod_lightning.data.sft import SFTDataModule

    cls = SFTDataModule if spec.stage == "sft" else PreferenceDataModule
    dm = cls(
        model_name_or_path=spec.model_path,
        train_file=spec.data_file,
        val_fraction=0.0,
        max_length=spec.max_length,
        batch_size=spec.batch_size,
        pad_to_multiple_of=spec.pad_to_multiple_of,
        seed=spec.seed,
    )
    if spec.stage == "dpo":
        # Both frameworks warm up on two-row batches (first_batches); our DPO module lays out
        # its own training batches when the trainer sets it up.
        dm.layout = PairLayout(packed=False)
    dm.setup("fit")
    return dm


def training_order(dm: Any) -> list[int]:
    """Example indices in the order our training loader yields them (epoch 0, one process)."""
    return [index for batch in dm.train_dataloader().batch_sampler for index, _weight in batch]


def response_tokens(spec: StageSpec, examples: list[dict[str, Any]]) -> int:
    """Target tokens of ``examples``: response + EOS (SFT), chosen + rejected responses (DPO)."""
    if spec.stage == "sft":
        return sum(sum(1 for label in e["labels"][1:] if label != -100) for e in examples)
    return sum(len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in examples)


def sequence_tokens(spec: StageSpec, examples: list[dict[str, Any]]) -> int:
    """Tokens that go through the model, padding excluded: SFT rows; DPO as two rows per pair.

    A DPO pair counts ``2 * prompt + chosen + rejected``, the tokens that two unpadded rows hold,
    whether or not a framework scores the shared prompt once.
    """
    if spec.stage == "sft":
        return sum(len(e["input_ids"]) for e in examples)
    return sum(2 * len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in examples)


def first_batches(dm: Any, count: int) -> list[dict[str, torch.Tensor]]:
    """The first ``count`` training batches of ``dm``, as its collate function builds them."""
    batches = []
    for batch in dm.train_dataloader():
        if len(batches) >= count:
            break
        batches.append({k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")})
    return batches


def sft_batches(model: str, train_file: str | Path, steps: int, batch_size: int = 2) -> list[dict[str, torch.Tensor]]:
    """The first ``steps`` SFT batches of ``train_file``, encoded and collated by the SFT data module itself.

    Args:
        model: The model whose tokenizer encodes the records.
        train_file: SFT records (JSONL).
        steps: Batches wanted; fewer when records are too long (the module drops those too).
        batch_size: Records per batch.

    Returns:
        The batches, in file order.

    """
    from qod_lightning.data.sft import SFTDataModule

    data = SFTDataModule(model, str(train_file), batch_size=batch_size)
    examples = [data.encode(record) for record in data.read(data.hparams.train_file)[: batch_size * steps]]
    examples = [example for example in examples if example is not None]
    return [data.collate(examples[i : i + batch_size]) for i in range(0, len(examples), batch_size)]
