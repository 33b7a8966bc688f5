"""The in-place KV cache against Hugging Face's DynamicLayer, operation by operation."""

import pytest
import torch
from transformers.cache_utils import DynamicLayer

from qod_lightning.kv_cache import ReservedCache, ReservedLayer

pytestmark = pytest.mark.numerics  # also run under the other instruction set's settings (.ci/run)


def _states(batch: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(batch, 3, length, 4, generator=generator)  # (B, H, t, D)
    return keys, torch.randn(batch, 3, length, 5, generator=generator)  # values may have another D


def _same(ours: ReservedLayer, reference: DynamicLayer) -> None:
    assert ours.get_seq_length() == reference.get_seq_length()
    assert torch.equal(ours.keys, reference.keys) and torch.equal(ours.values, reference.values)


def test_reserved_layer_holds_what_a_dynamic_layer_holds_through_every_operation():
    ours, reference = ReservedLayer(reserve=3), DynamicLayer()
    seed = 0

    def update(batch: int, length: int) -> None:
        nonlocal seed
        seed += 1
        states = _states(batch, length, seed)
        returned = ours.update(*states)
        assert all(torch.equal(a, b) for a, b in zip(returned, reference.update(*states), strict=True))
        _same(ours, reference)

    update(1, 5)  # a shared prefix, as one row
    for layer in (ours, reference):
        layer.batch_repeat_interleave(4)  # (1, ...) -> (4, ...)
    _same(ours, reference)
    update(4, 2)  # the rest of the prompts
    for _ in range(5):  # one token per step, past the reserve: the buffers must grow
        update(4, 1)
    index = torch.tensor([0, 2, 3])
    for layer in (ours, reference):
        layer.batch_select_indices(index)  # row 1 finished
    _same(ours, reference)
    update(3, 1)
    for layer in (ours, reference):
        layer.crop(-2)
    _same(ours, reference)
    update(3, 1)
    beams = torch.tensor([2, 2, 0])
    for layer in (ours, reference):
        layer.reorder_cache(beams)
    _same(ours, reference)
    update(3, 1)


def test_a_step_within_the_reserve_writes_in_place():
    layer = ReservedLayer(reserve=4)
    layer.update(*_states(2, 6, seed=1))
    buffer = layer.keys.data_ptr()
    for step in range(4):
        layer.update(*_states(2, 1, seed=2 + step))
        assert layer.keys.data_ptr() == buffer  # a view of the same buffer, no copy of the past
    layer.update(*_states(2, 1, seed=9))
    assert layer.keys.data_ptr() != buffer and layer.get_seq_length() == 11


def test_reset_drops_the_buffers():
    layer = ReservedLayer(reserve=2)
    layer.update(*_states(2, 3, seed=1))
    layer.reset()
    assert layer.get_seq_length() == 0
    layer.update(*_states(1, 2, seed=2))
    assert layer.keys.shape == (1, 3, 2, 4)


def test_reserved_cache_creates_its_layers_as_the_model_uses_them():
    cache = ReservedCache(reserve=7)
    keys, values = _states(2, 3, seed=1)
    cache.update(keys, values, layer_idx=1)
    assert len(cache.layers) == 2 and all(isinstance(layer, ReservedLayer) for layer in cache.layers)
    assert cache.layers[1].reserve == 7 and cache.get_seq_length(1) == 3
