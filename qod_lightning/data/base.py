"""What the SFT and preference data modules share: reading, splitting, length policy, loaders."""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

import lightning as L
import torch
from datasets import Dataset as HFDataset
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerBase

from qod_lightning.data.jsonl import DataError
from qod_lightning.data.sampling import ResumableDataLoader, WindowBatchSampler
from qod_lightning.data.tokenize import PromptFormat
from qod_lightning.extraction import split_note
from qod_lightning.model import load_tokenizer

log = logging.getLogger(__name__)


class ExampleDataset(Dataset):
    """Tokenized examples; a ``(index, window_weight)`` key adds the window weight to the item."""

    def __init__(self, examples: list[dict[str, Any]]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        if isinstance(key, tuple):
            index, weight = key
            return {**self.examples[index], "window_weight": weight}
        return self.examples[key]


class TokenizedDataModule(L.LightningDataModule):
    """Base for JSONL data modules: subclasses define :meth:`read`, :meth:`encode`, :meth:`collate`.

    Args:
        model_name_or_path: Where the tokenizer comes from (linked to the model's by the CLI).
        train_file: Training JSONL.
        val_file: Validation JSONL; without it ``val_fraction`` of the training file is held out.
        val_fraction: Share of training records held out when there is no ``val_file``.
        test_file: JSONL for the ``test`` command (read with the others whenever it is given, so
            a DPO fit can score its reference before training changes the policy).
        max_length: Longest sequence in tokens (see :func:`~qod_lightning.data.tokenize.fit_to_length`).
        batch_size: Examples per training micro-batch.
        eval_batch_size: Examples per validation batch (default: ``batch_size``).
        prompt_format: ``alpaca`` or ``chat``.
        group_by_length: Sort examples by length within each optimizer step's chunk.
        pad_to_multiple_of: Pad every batch to a length that is a multiple of this (1: the longest
            row). On a GPU, 64 keeps the number of distinct shapes, and so of per-shape kernel
            set-ups, small; on a CPU the extra padding only costs.
        num_workers: DataLoader workers.
        seed: Seed of the split and of the shuffling.

    """

    def __init__(
        self,
        model_name_or_path: str,
        train_file: str,
        val_file: str | None = None,
        val_fraction: float = 0.1,
        test_file: str | None = None,
        max_length: int = 512,
        batch_size: int = 2,
        eval_batch_size: int | None = None,
        prompt_format: PromptFormat = "alpaca",
        group_by_length: bool = False,
        pad_to_multiple_of: int = 1,
        num_workers: int = 0,
        seed: int = 42,
    ) -> None:
        super().__init__()
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be at least 1, got {pad_to_multiple_of}")
        self.save_hyperparameters()
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self.train_set: ExampleDataset | None = None
        self.answer_notes = False  # set by setup: every training answer opens with a scratchpad note
        self.val_set: ExampleDataset | None = None
        self.test_set: ExampleDataset | None = None

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer, loaded on first use."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.hparams.model_name_or_path)
        return self._tokenizer

    encoded_keys: tuple[str, ...] = ()
    """Keys that :meth:`encode` returns."""

    answer_key: str = ""
    """The record key of the answer the model learns to write."""

    def read(self, path: str) -> list[dict[str, Any]]:
        """Read and check one file's records (each with its ``_line``)."""
        raise NotImplementedError

    def encode(self, record: dict[str, Any]) -> dict[str, Any] | None:
        """Tokenize one record; ``None`` when its response cannot fit ``max_length``."""
        raise NotImplementedError

    def collate(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Pad a list of encoded examples into a batch."""
        raise NotImplementedError

    def weight(self, example: dict[str, Any]) -> int:
        """The example's share of the loss normaliser (tokens for SFT, 1 per pair for DPO)."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        """Read, split and tokenize (once), the test file included when there is one."""
        hp = self.hparams
        if self.train_set is not None:
            return
        if hp.test_file:
            self.test_set = ExampleDataset(self._encode_all(self.read(hp.test_file), hp.test_file))
        train = self.read(hp.train_file)
        if hp.val_file:
            val = self.read(hp.val_file)
        elif hp.val_fraction > 0 and len(train) > 1:
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(hp.seed)).tolist()
            n_val = max(1, round(len(train) * hp.val_fraction))
            if n_val >= len(train):
                raise DataError(
                    hp.train_file,
                    None,
                    f"val_fraction={hp.val_fraction} of its {len(train)} records holds out {n_val}, leaving "
                    "none to train on; lower val_fraction or give a val_file",
                )
            val = [train[i] for i in sorted(order[:n_val])]
            train = [train[i] for i in sorted(order[n_val:])]
        else:
            val = []
        # Saved with the trained model, so constrained decoding lets it write its note.
        self.answer_notes = bool(train) and all(split_note(r[self.answer_key])[0] is not None for r in train)
        self.train_set = ExampleDataset(self._encode_all(train, hp.train_file))
        self.val_set = ExampleDataset(self._encode_all(val, hp.val_file or hp.train_file))

    def _encode_all(self, records: list[dict[str, Any]], path: str) -> list[dict[str, Any]]:
        """Tokenize through HF ``datasets`` and apply the length policy, reporting what it did."""
        if not records:
            return []
        dataset = HFDataset.from_list(records)
        dataset = dataset.map(
            self._encode_or_skip,
            remove_columns=[c for c in dataset.column_names if c != "_line"],
            desc=f"Tokenizing {path}",
            load_from_cache_file=False,
            # Without a fingerprint of ours, datasets hashes the function, and so this module and
            # all it references: once fitting, the trainer and the model's weights (tens of seconds).
            new_fingerprint=self._fingerprint(records, path),
        )
        examples, skipped, truncated = [], [], 0
        for row in dataset:
            if row["skip"]:
                skipped.append(row["_line"])
                continue
            truncated += row["truncated"]
            examples.append({"index": len(examples), "line": row["_line"], **{k: row[k] for k in self.encoded_keys}})
        if truncated:
            rank_zero_warn(
                f"{path}: {truncated} example(s) longer than max_length={self.hparams.max_length} had "
                "their prompt truncated from the left (responses are never cut)"
            )
        if skipped:
            rank_zero_warn(
                f"{path}: skipped {len(skipped)} example(s) whose response alone does not fit "
                f"max_length={self.hparams.max_length}: line(s) {skipped}"
            )
        if not examples:
            raise ValueError(f"{path}: no example fits max_length={self.hparams.max_length}")
        return examples

    def _fingerprint(self, records: list[dict[str, Any]], path: str) -> str:
        """A digest of what the tokenized examples depend on: records, file, settings, this class."""
        what = [type(self).__qualname__, path, records, dict(self.hparams)]
        return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:32]

    def _encode_or_skip(self, record: dict[str, Any]) -> dict[str, Any]:
        encoded = self.encode(record)
        if encoded is None:
            return {"skip": True, "truncated": False, **{k: [] for k in self.encoded_keys}}
        return {"skip": False, **encoded}

    def _loader(self, dataset: ExampleDataset, shuffle: bool, batch_size: int) -> DataLoader:
        trainer = self.trainer
        sampler = WindowBatchSampler(
            [self.weight(e) for e in dataset.examples],
            batch_size=batch_size,
            accumulate=trainer.accumulate_grad_batches if (trainer and shuffle) else 1,
            shuffle=shuffle,
            seed=self.hparams.seed,
            rank=trainer.global_rank if trainer else 0,
            world_size=trainer.world_size if trainer else 1,
            group_by_length=self.hparams.group_by_length,
            lengths=[len(e["input_ids"]) for e in dataset.examples],
        )
        kwargs = {"batch_sampler": sampler, "collate_fn": self._collate_with_weight}
        if shuffle:
            return ResumableDataLoader(
                dataset, consumed=self._batches_trained, num_workers=self.hparams.num_workers, **kwargs
            )
        return DataLoader(dataset, num_workers=self.hparams.num_workers, **kwargs)

    def _batches_trained(self) -> int:
        """Micro-batches of the current epoch the trainer has finished (where a resume picks up)."""
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.processed if self.trainer else 0

    def _collate_with_weight(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.collate(items)
        batch["window_weight"] = torch.tensor(float(items[0]["window_weight"]))
        batch["index"] = torch.tensor([item["index"] for item in items])
        return batch

    def split(self, name: str) -> ExampleDataset | None:
        """The ``train``, ``val`` or ``test`` examples (``None`` before :meth:`setup` reads them)."""
        if name not in ("train", "val", "test"):
            raise ValueError(f"no split {name!r}: train, val or test")
        return getattr(self, f"{name}_set")

    def ordered_dataloader(self, split: str) -> DataLoader:
        """All examples of ``split`` (``train``, ``val`` or ``test``) in file order, unshuffled."""
        dataset = self.split(split)
        assert dataset is not None, "call setup() first"
        return self._loader(dataset, shuffle=False, batch_size=self.hparams.eval_batch_size or self.hparams.batch_size)

    def train_dataloader(self) -> DataLoader:
        """Shuffled, window-weighted micro-batches."""
        assert self.train_set is not None, "call setup() first"
        return self._loader(self.train_set, shuffle=True, batch_size=self.hparams.batch_size)

    def val_dataloader(self) -> DataLoader | list:
        """Validation batches in file order (none when there is no validation data)."""
        assert self.val_set is not None, "call setup() first"
        return self.ordered_dataloader("val") if len(self.val_set) else []

    def test_dataloader(self) -> DataLoader:
        """The test file's batches in file order."""
        if self.test_set is None:
            raise ValueError("no test data: give the data module a test_file (--data.init_args.test_file FILE)")
        return self.ordered_dataloader("test")
