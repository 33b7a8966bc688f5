"""scripts/average_models.py: the mean of saved models' weights, against a float64 mean of the files."""

import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "average_models.py"


@pytest.fixture(scope="module")
def average_models():
    spec = importlib.util.spec_from_file_location("average_models", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.average_models


def model_dir(path: Path, seed: int, shape=(3, 5)) -> Path:
    path.mkdir()
    generator = torch.Generator().manual_seed(seed)
    tensors = {"a.weight": torch.randn(shape, generator=generator), "b.bias": torch.randn(4, generator=generator)}
    save_file(tensors, path / "model.safetensors")
    (path / "config.json").write_text(f'{{"seed": {seed}}}')
    (path / ".complete").touch()
    return path


def test_the_mean_of_three_models_with_the_first_ones_files(average_models, tmp_path):
    models = [model_dir(tmp_path / f"m{seed}", seed) for seed in range(3)]
    out = average_models(models, tmp_path / "mean")
    mean = load_file(out / "model.safetensors")
    states = [load_file(m / "model.safetensors") for m in models]
    for name, tensor in mean.items():
        expected = sum(state[name].double() for state in states) / 3
        assert tensor.dtype == torch.float32
        torch.testing.assert_close(tensor.double(), expected, rtol=0, atol=1e-7)
    assert (out / "config.json").read_text() == '{"seed": 0}'
    assert (out / ".complete").is_file()


def test_refuses_one_model_an_adapter_and_mismatched_tensors(average_models, tmp_path):
    first = model_dir(tmp_path / "first", 0)
    with pytest.raises(ValueError, match="at least two"):
        average_models([first], tmp_path / "out")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").touch()
    with pytest.raises(ValueError, match=r"no model\.safetensors"):
        average_models([first, adapter], tmp_path / "out")
    other = model_dir(tmp_path / "other", 1, shape=(5, 3))
    with pytest.raises(ValueError, match="do not match"):
        average_models([first, other], tmp_path / "out")
    assert not (tmp_path / "out").exists()
