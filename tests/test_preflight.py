"""A config whose model, starting adapter or data is missing fails at once, through the CLI, saying what to run."""

import time

import pytest
from huggingface_hub import constants

from qod_lightning import preflight
from qod_lightning.cli import main
from tests.conftest import REPO


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    """No model is cached; the hub is off (conftest forces HF_HUB_OFFLINE=1)."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.chdir(REPO)


def fit(capsys, *args: str) -> tuple[int, str]:
    code = main(["fit", *args])
    return code, capsys.readouterr().err


def fit_embedded_sft(capsys, model: str, *args: str) -> tuple[int, str]:
    return fit(
        capsys, "--config", "configs/embedded_sft.yaml", "--model.init_args.model.model_name_or_path", model, *args
    )


def test_the_designs_dpo_command_names_the_missing_sft_adapter_and_the_uncached_model(
    capsys, empty_hub_cache, tmp_path
):
    start = time.perf_counter()
    code, err = fit(
        capsys, "--config", "configs/dpo.yaml", "--model.init_args.model.adapter_path", str(tmp_path / "sft/final")
    )
    assert code == 2
    assert time.perf_counter() - start < 30  # no hub retries
    assert f"the starting adapter {tmp_path / 'sft/final'} does not exist" in err
    assert "train it first with `python -m qod_lightning fit --config configs/sft.yaml`" in err
    assert (
        "model microsoft/Phi-3-mini-4k-instruct is not in the local Hugging Face cache and HF_HUB_OFFLINE is set" in err
    )
    assert preflight.EMBEDDED_RECIPE in err
    assert "Namespace(" not in err  # no jsonargparse dump


def test_an_embedded_dpo_config_points_to_its_own_sft_config(capsys, empty_hub_cache, tmp_path):
    code, err = fit(
        capsys, "--config", "configs/embedded_dpo.yaml", "--model.init_args.model.adapter_path", str(tmp_path / "no")
    )
    assert code == 2
    assert "`python -m qod_lightning fit --config configs/embedded_sft.yaml`" in err
    assert "Hugging Face cache" not in err  # the embedded model needs no hub


def test_a_missing_data_file_is_named(capsys, empty_hub_cache, tiny_model_dir):
    code, err = fit_embedded_sft(capsys, str(tiny_model_dir), "--data.init_args.train_file", "data/no_such_file.jsonl")
    assert code == 2
    assert err.startswith("error: data.train_file: data/no_such_file.jsonl does not exist")
    assert "python -m qod_lightning data generate" in err


def test_a_hub_model_neither_cached_nor_reachable(capsys, empty_hub_cache, tiny_model_dir):
    code, err = fit_embedded_sft(capsys, "qod-tests/never-cached")
    assert code == 2
    assert err.startswith("error: model qod-tests/never-cached is not in the local Hugging Face cache")
    assert "`hf download qod-tests/never-cached`" in err


def test_a_cached_hub_model_passes(empty_hub_cache, tmp_path):
    snapshot = tmp_path / "hub-cache" / "models--qod-tests--cached" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abc")
    assert preflight.model_problem("qod-tests/cached") is None
    assert "not in the local Hugging Face cache" in preflight.model_problem("qod-tests/other")


def test_local_paths_and_hub_ids():
    assert preflight.looks_like_hub_id("microsoft/Phi-3-mini-4k-instruct")
    assert not preflight.looks_like_hub_id("artifacts/sft/final")
    assert not preflight.looks_like_hub_id("./sft")
    assert "no local directory" in preflight.model_problem("artifacts/no/such/model")
    assert preflight.model_problem("embedded:smollm2-135m") is None


def test_the_offline_variables_turn_the_hub_off(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert preflight.hub_offline() and not preflight.hub_reachable()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    assert not preflight.hub_offline()
