"""ByteDropout: the mask's rate and independence, scaling, gradients, and the swap in PEFT models."""

import math

import pytest
import torch
from torch import nn

from qod_lightning.dropout import ByteDropout, use_byte_dropout
from qod_lightning.model import LoRASettings, ModelSettings, build_model

pytestmark = pytest.mark.numerics  # also run under the other instruction set's settings (.ci/run)


def test_p_is_rounded_to_a_byte_threshold():
    dropout = ByteDropout(0.05)
    assert dropout.threshold == 13
    assert dropout.p == 13 / 256
    assert dropout.scale == pytest.approx(256 / 243)
    for p in (0.0, 0.001, 0.999, 1.0):
        with pytest.raises(ValueError):
            ByteDropout(p)


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_drop_rate_is_binomial_and_kept_values_are_scaled(p):
    torch.manual_seed(0)
    dropout = ByteDropout(p).train()
    x = torch.ones(1001, 997)  # an odd size: the last random word is only partly used
    out = dropout(x)
    dropped = (out == 0).double()
    n, q = dropped.numel(), dropout.p
    # Within 5 standard deviations of Binomial(n, q).
    assert abs(dropped.sum().item() - n * q) < 5 * math.sqrt(n * q * (1 - q))
    kept = out[out != 0]
    torch.testing.assert_close(kept, torch.full_like(kept, 1 / (1 - q)))
    assert out.mean().item() == pytest.approx(1.0, abs=5 * math.sqrt(q / (1 - q) / n))


def test_byte_positions_and_neighbours_are_independent():
    """Every byte of a word decides its own element: per-column rates agree, neighbours are uncorrelated."""
    torch.manual_seed(1)
    dropped = (ByteDropout(0.25)(torch.ones(200_000, 8)) == 0).double()  # column j: byte j of each word
    sd = math.sqrt(0.25 * 0.75 / dropped.size(0))
    assert (dropped.mean(0) - 0.25).abs().max() < 5 * sd
    both = (dropped[:, :-1] * dropped[:, 1:]).mean(0)  # P(j and j+1 dropped) = p^2 if independent
    assert (both - 0.0625).abs().max() < 5 * math.sqrt(0.0625 * 0.9375 / dropped.size(0))


def test_eval_mode_is_identity_and_seed_reproduces_the_mask():
    x = torch.randn(4, 33)
    dropout = ByteDropout(0.3)
    assert dropout.eval()(x) is x
    dropout.train()
    torch.manual_seed(7)
    first = dropout(x)
    torch.manual_seed(7)
    torch.testing.assert_close(dropout(x), first)


def test_gradient_is_the_mask_times_the_scale():
    torch.manual_seed(3)
    x = torch.randn(8, 16, requires_grad=True)
    out = ByteDropout(0.2)(x)
    out.sum().backward()
    expected = (out != 0).to(x.dtype) / (1 - 51 / 256)
    torch.testing.assert_close(x.grad, expected)


def test_the_factory_swaps_every_lora_dropout_and_keeps_the_config(tiny_model_dir, tmp_path):
    plain = build_model(ModelSettings(model_name_or_path=str(tiny_model_dir)))
    settings = ModelSettings(model_name_or_path=str(tiny_model_dir), lora=LoRASettings(byte_dropout=True))
    model = build_model(settings)
    lora_layers = [m for m in model.modules() if isinstance(getattr(m, "lora_dropout", None), nn.ModuleDict)]
    assert lora_layers
    assert all(isinstance(m.lora_dropout["default"], ByteDropout) for m in lora_layers)
    assert not any(isinstance(m, ByteDropout) for m in plain.modules())
    assert model.peft_config["default"].lora_dropout == 0.05
    # Loaded from a saved adapter, in eval mode: swapped, and still off.
    model.save_pretrained(tmp_path / "adapter")
    loaded = build_model(
        ModelSettings(
            model_name_or_path=str(tiny_model_dir),
            adapter_path=str(tmp_path / "adapter"),
            lora=LoRASettings(byte_dropout=True),
        ),
        trainable=False,
    )
    swapped = [m for m in loaded.modules() if isinstance(m, ByteDropout)]
    assert len(swapped) == len(lora_layers)
    assert all(m.training == loaded.training for m in swapped)


def test_dropouts_that_would_round_to_zero_stay_as_they_are(tiny_model_dir):
    settings = ModelSettings(model_name_or_path=str(tiny_model_dir), lora=LoRASettings(dropout=0.001))
    model = build_model(settings)
    assert use_byte_dropout(model) == 0
