"""Batch sampling that makes the loss weighted exactly across a whole optimizer step.

With gradient accumulation Lightning divides each micro-batch loss by the accumulation factor,
which weights micro-batches equally however many response tokens (SFT) or pairs (DPO) they hold.
To weight every token equally the loss of a micro-batch must be divided by the token count of its
whole accumulation window on all ranks, which is only known by looking ahead. This sampler knows
the order in advance, so it hands each micro-batch its window's total weight.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler


class WindowBatchSampler(Sampler[list[tuple[int, int]]]):
    """Yield micro-batches of ``(index, window_weight)`` for one rank.

    The global order is a seeded permutation per epoch (or the file order). Each optimizer step
    consumes ``accumulate`` micro-batches of ``batch_size`` examples on each of ``world_size``
    ranks; ``window_weight`` is the summed weight of all of them, so that
    ``loss = loss_sum * accumulate * world_size / window_weight`` gives exact weighting after
    Lightning's division by ``accumulate`` and DDP's gradient averaging.

    Args:
        weights: Weight of each example: its target tokens (SFT) or 1 (DPO, one per pair).
        batch_size: Examples per micro-batch.
        accumulate: Micro-batches per optimizer step (``Trainer.accumulate_grad_batches``).
        shuffle: Shuffle every epoch.
        seed: Base seed; epoch ``e`` uses ``seed + e``.
        rank: This process's rank.
        world_size: Number of processes.
        group_by_length: Within each window-sized chunk of the shuffled order, sort examples by
            length so micro-batches pad little while the chunk order stays random.
        lengths: Sequence lengths, needed with ``group_by_length``.

    """

    def __init__(
        self,
        weights: Sequence[int],
        batch_size: int,
        accumulate: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        group_by_length: bool = False,
        lengths: Sequence[int] | None = None,
    ) -> None:
        if batch_size < 1 or accumulate < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError("batch_size, accumulate and world_size must be >= 1 and 0 <= rank < world_size")
        if group_by_length and lengths is None:
            raise ValueError("group_by_length needs lengths")
        self.weights = list(weights)
        self.lengths = list(lengths) if lengths is not None else None
        self.batch_size, self.accumulate = batch_size, accumulate
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0
        self.rank, self.world_size = rank, world_size
        self.group_by_length = group_by_length
        self._resume_at: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of ``epoch`` (Lightning calls this at every epoch start)."""
        self.epoch = epoch

    def resume(self, epoch: int, consumed: int) -> None:
        """Make the next pass over ``epoch`` skip its first ``consumed`` micro-batches.

        The order is a pure function of (seed, epoch), so skipping reproduces exactly the batches
        an uninterrupted run would have drawn next. Applies once; other epochs are not affected.
        """
        self._resume_at = (epoch, consumed)

    def _order(self) -> list[int]:
        n = len(self.weights)
        if not self.shuffle:
            order = list(range(n))
        else:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=generator).tolist()
        if self.group_by_length:
            chunk = self.batch_size * self.accumulate * self.world_size
            lengths = self.lengths
            order = [
                i
                for start in range(0, n, chunk)
                for i in sorted(order[start : start + chunk], key=lambda j: lengths[j])  # type: ignore[index]
            ]
        return order

    def _global_batches(self) -> list[list[int]]:
        """Micro-batches of the whole step order: rank ``r`` takes every ``world_size``-th one."""
        order = self._order()
        step = self.batch_size * self.world_size
        # Training drops the ragged tail that cannot give every rank a micro-batch: uneven batch
        # counts would hang DDP's gradient all-reduce. Unshuffled (evaluation) passes keep every
        # example; ranks may then run one batch more or less, which needs no collective.
        drop = self.shuffle and self.world_size > 1
        usable = len(order) - len(order) % step if drop else len(order)
        order = order[:usable]
        size = self.batch_size
        if not self.shuffle and self.world_size > 1:
            # Every rank needs a batch: Lightning skips an empty loop with its epoch-end hooks,
            # whose collectives (metric syncs) would then wait for that rank forever.
            if 0 < len(order) < self.world_size:
                raise ValueError(
                    f"{len(order)} evaluation example(s) for {self.world_size} ranks: a rank would have none, "
                    "and the others would wait for it forever; give every rank at least one example"
                )
            size = max(1, min(size, len(order) // self.world_size))
        return [order[i : i + size] for i in range(0, len(order), size)]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        skip = 0
        if self._resume_at is not None:
            epoch, consumed = self._resume_at
            self._resume_at = None
            skip = consumed if epoch == self.epoch else 0
        yield from self._rank_batches()[skip:]

    def _rank_batches(self) -> list[list[tuple[int, int]]]:
        batches = self._global_batches()
        per_window = self.accumulate * self.world_size
        mine = []
        for w in range(0, len(batches), per_window):
            window = batches[w : w + per_window]
            total = sum(self.weights[i] for batch in window for i in batch)
            mine += [[(i, total) for i in batch] for batch in window[self.rank :: self.world_size]]
        return mine

    def __len__(self) -> int:
        # This rank's own count: in an unshuffled pass the first ranks may hold one batch more, and
        # Lightning stops an evaluation loop after len(loader) batches.
        return len(self._rank_batches())


class ResumableDataLoader(DataLoader):
    """A DataLoader over a :class:`WindowBatchSampler` whose place in the epoch survives a restart.

    Lightning saves ``state_dict()`` of every loader that has one in its checkpoints and hands it
    back through ``load_state_dict()`` on ``--ckpt_path``, then expects the loader to yield only
    the batches not yet trained on. The number of consumed batches comes from the trainer's
    progress (``consumed``), not from the sampler: Lightning and DataLoader workers prefetch, so
    the sampler has always run ahead of training.

    Args:
        *args: As for :class:`~torch.utils.data.DataLoader`; ``batch_sampler`` must be a
            :class:`WindowBatchSampler`.
        consumed: Returns the micro-batches of the current epoch already trained on.
        **kwargs: As for :class:`~torch.utils.data.DataLoader`.
    """

    def __init__(self, *args: Any, consumed: Callable[[], int], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.batch_sampler, WindowBatchSampler):
            raise TypeError("ResumableDataLoader needs a WindowBatchSampler as batch_sampler")
        self._consumed = consumed

    def state_dict(self) -> dict[str, int]:
        """Epoch and micro-batches consumed in it, for Lightning's checkpoint."""
        return {"epoch": self.batch_sampler.epoch, "consumed": int(self._consumed())}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Skip the consumed micro-batches the next time this epoch is iterated."""
        self.batch_sampler.resume(state["epoch"], state["consumed"])
