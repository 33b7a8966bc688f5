"""AdapterEMA against an average computed by hand in float64, with accumulation, validation and resume."""

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from qod_lightning.ema import AdapterEMA


class _Toy(L.LightningModule):
    """A frozen layer and a trainable one; records the live trainable weights after every step."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.frozen = nn.Linear(3, 3)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(3, 1)
        self.live: list[torch.Tensor] = []
        self.validated: list[torch.Tensor] = []

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return ((self.head(self.frozen(x)) - y) ** 2).mean()

    def on_train_batch_end(self, outputs: object, batch: object, batch_idx: int) -> None:
        self.live.append(self.head.weight.detach().double().clone())

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        if batch_idx == 0:
            self.validated.append(self.head.weight.detach().double().clone())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader() -> DataLoader:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(16, 3, generator=generator)
    return DataLoader(TensorDataset(x, x.sum(dim=1, keepdim=True)), batch_size=4)  # 4 batches an epoch


def _trainer(tmp_path, callbacks: list[L.Callback], **kwargs: object) -> L.Trainer:
    options = {
        "max_steps": 8,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "default_root_dir": tmp_path,
    }
    options.update(kwargs)
    return L.Trainer(callbacks=callbacks, **options)


def _reference(live: list[torch.Tensor], decay: float) -> torch.Tensor:
    average = live[0]
    for weight in live[1:]:
        average = decay * average + (1 - decay) * weight
    return average


def test_training_ends_on_the_average_of_the_step_weights(tmp_path):
    toy = _Toy()
    frozen_before = toy.frozen.weight.detach().clone()
    _trainer(tmp_path, [AdapterEMA(decay=0.7)]).fit(toy, _loader())
    assert len(toy.live) == 8
    expected = _reference(toy.live, 0.7)
    torch.testing.assert_close(toy.head.weight.detach().double(), expected, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(expected, toy.live[-1])  # the average is not the last step
    torch.testing.assert_close(toy.frozen.weight, frozen_before)


def test_decay_zero_keeps_the_live_weights(tmp_path):
    toy = _Toy()
    _trainer(tmp_path, [AdapterEMA(decay=0.0)]).fit(toy, _loader())
    torch.testing.assert_close(toy.head.weight.detach().double(), toy.live[-1])


def test_one_update_per_optimizer_step_under_accumulation(tmp_path):
    """With accumulation 2 the weights change every second batch; folding per batch would count them twice."""
    toy = _Toy()
    _trainer(tmp_path, [AdapterEMA(decay=0.5)], accumulate_grad_batches=2).fit(toy, _loader())
    per_step = toy.live[1::2]  # the weights after each optimizer step
    assert len(per_step) == 8
    torch.testing.assert_close(toy.head.weight.detach().double(), _reference(per_step, 0.5), rtol=1e-6, atol=1e-7)


def test_validation_sees_the_average_and_training_resumes_on_live_weights(tmp_path):
    toy = _Toy()
    ema = AdapterEMA(decay=0.5)
    trainer = _trainer(tmp_path, [ema], val_check_interval=4, num_sanity_val_steps=0)
    trainer.fit(toy, _loader(), _loader())
    assert len(toy.validated) >= 1
    torch.testing.assert_close(toy.validated[0], _reference(toy.live[:4], 0.5), rtol=1e-6, atol=1e-7)
    # Training went on from the live weights, not the average: the plain run takes the same path.
    plain = _Toy()
    _trainer(tmp_path, []).fit(plain, _loader())
    for ours, theirs in zip(toy.live, plain.live, strict=True):
        torch.testing.assert_close(ours, theirs)


def test_a_resumed_run_continues_the_same_average(tmp_path):
    first = _Toy()
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _trainer(tmp_path / "a", [AdapterEMA(decay=0.6), checkpoint], max_epochs=1, enable_checkpointing=True).fit(
        first, _loader()
    )
    resumed = _Toy()
    _trainer(tmp_path / "b", [AdapterEMA(decay=0.6)]).fit(resumed, _loader(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert (len(first.live), len(resumed.live)) == (4, 4)
    # The average of all eight steps: the four before the checkpoint came back with it.
    expected = _reference(first.live + resumed.live, 0.6)
    torch.testing.assert_close(resumed.head.weight.detach().double(), expected, rtol=1e-6, atol=1e-7)


def test_decay_out_of_range_is_refused():
    for decay in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="decay"):
            AdapterEMA(decay=decay)
