"""KeepOnDeviceStrategy: Lightning's teardown minus the move to the CPU; the device follows the accelerator."""

from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

from qod_lightning.cli import cli_main
from qod_lightning.strategy import KeepOnDeviceStrategy, check_one_device
from tests.test_cli import TRAINING_CONFIGS, tiny_overrides
from tests.test_modules import trainer


class _Linear(L.LightningModule):
    """Two optimizer steps of a linear layer, counting the calls of ``cpu()``."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.cpu_calls = 0

    def cpu(self) -> "_Linear":
        self.cpu_calls += 1
        return super().cpu()

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.layer(batch[0]).pow(2).mean()

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 4)), batch_size=4)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=0.1)


def _fit(strategy, tmp_path) -> tuple[L.Trainer, _Linear]:
    module = _Linear()
    fitted = trainer(tmp_path, accelerator="cpu", devices=1, strategy=strategy, max_steps=2)
    fitted.fit(module)
    return fitted, module


def test_teardown_leaves_the_model_and_optimizer_where_they_are(tmp_path, monkeypatch):
    moved = []
    monkeypatch.setattr(
        "lightning.pytorch.strategies.strategy._optimizers_to_device", lambda opts, device: moved.append(opts)
    )
    trainer, module = _fit(KeepOnDeviceStrategy(), tmp_path)
    assert module.cpu_calls == 0
    assert moved[-1] == []  # teardown's call (setup moved the optimizer to the root device before)
    # what the teardown hid from Lightning's is back, and the model still trained
    assert trainer.strategy.lightning_module is module and len(trainer.strategy.optimizers) == 1
    assert trainer.global_step == 2


def test_lightnings_own_teardown_moves_the_model(tmp_path):
    # the behaviour KeepOnDeviceStrategy removes, so the test above can tell the two apart
    _, module = _fit(SingleDeviceStrategy(device="cpu"), tmp_path)
    assert module.cpu_calls == 1


def test_teardown_still_tears_down_the_plugins(tmp_path, monkeypatch):
    called = []
    monkeypatch.setattr(CPUAccelerator, "teardown", lambda self: called.append("accelerator"))
    _fit(KeepOnDeviceStrategy(), tmp_path)
    assert called == ["accelerator"]


def test_device_follows_the_accelerator_unless_given(monkeypatch):
    strategy = KeepOnDeviceStrategy()
    strategy.accelerator = CPUAccelerator()
    assert strategy.root_device == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    strategy.accelerator = CUDAAccelerator()
    assert strategy.root_device == torch.device("cuda", 1)
    given = KeepOnDeviceStrategy(device="cpu")
    given.accelerator = CUDAAccelerator()
    assert given.root_device == torch.device("cpu")


@pytest.mark.parametrize("config", TRAINING_CONFIGS, ids=lambda c: c.name)
def test_gpu_recipe_configs_keep_the_model_and_scale_out_with_ddp(config, tiny_model_dir, small_data, tmp_path):
    if "dpo" in config.name:  # DPO starts from an SFT adapter
        cli_main(["fit", *tiny_overrides(tiny_model_dir, tmp_path, small_data, config.with_name("sft.yaml"), False)])
    args = tiny_overrides(tiny_model_dir, tmp_path, small_data, config, False)
    cli = cli_main(args, run=False)
    assert isinstance(cli.trainer.strategy, KeepOnDeviceStrategy)
    assert cli.trainer.strategy.root_device == torch.device("cpu")  # no GPU here: the config still runs
    cli = cli_main([*args, "--trainer.strategy", "ddp", "--trainer.devices", "2"], run=False)  # README's scale-out
    assert isinstance(cli.trainer.strategy, DDPStrategy) and cli.trainer.num_devices == 2


OURS = SimpleNamespace(class_path="qod_lightning.strategy.KeepOnDeviceStrategy", init_args={})


@pytest.mark.parametrize("devices", [1, "1", [0], (3,), "3,"])
def test_one_device_passes(devices):
    check_one_device(OURS, devices)
    check_one_device(KeepOnDeviceStrategy(), devices)


@pytest.mark.parametrize(
    ("devices", "num_nodes"), [(2, 1), ("2", 1), ("auto", 1), (-1, 1), ([0, 1], 1), ("0,1", 1), (1, 2)]
)
def test_several_devices_are_refused_not_ignored(devices, num_nodes):
    with pytest.raises(ValueError, match=r"trains on one device.*--trainer\.strategy ddp"):
        check_one_device(OURS, devices, num_nodes)


@pytest.mark.parametrize("strategy", ["auto", "ddp", DDPStrategy(), SimpleNamespace(class_path="x.DDPStrategy")])
def test_other_strategies_take_any_device_count(strategy):
    check_one_device(strategy, 4, 2)


def test_cli_refuses_more_devices_without_another_strategy(tiny_model_dir, small_data, tmp_path):
    args = tiny_overrides(tiny_model_dir, tmp_path, small_data, TRAINING_CONFIGS[1], False)
    with pytest.raises(ValueError, match="devices='2'"):
        cli_main([*args, "--trainer.devices", "2"], run=False)
