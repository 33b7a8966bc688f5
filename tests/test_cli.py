"""Every config in configs/ instantiates; SFT then DPO train a few steps through the CLI."""

import warnings
from pathlib import Path

import pytest

from qod_lightning.cli import cli_main, main

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
TRAINING_CONFIGS = [c for c in CONFIGS if c.name in ("sft.yaml", "dpo.yaml")]


def tiny_overrides(tiny_model_dir, tmp_path, small_data, config: Path, four_bit: bool) -> list[str]:
    data = small_data["preferences"] if "dpo" in config.name else small_data["sft"]
    args = [
        "--config",
        str(config),
        "--model.init_args.model.model_name_or_path",
        str(tiny_model_dir),
        "--model.init_args.model.quantization.load_in_4bit",
        str(four_bit).lower(),
        "--model.init_args.model.quantization.compute_dtype",
        "float32",
        "--model.init_args.model.dtype",
        "float32",
        "--model.init_args.model.gradient_checkpointing",
        "false",
        "--model.init_args.output_dir",
        str(tmp_path / config.stem),
        "--data.init_args.train_file",
        str(data),
        "--trainer.precision",
        "32",
        "--trainer.logger.init_args.save_dir",
        str(tmp_path / "logs"),
        "--trainer.default_root_dir",
        str(tmp_path / "logs"),
        "--trainer.callbacks.dirpath",  # the configs' ModelCheckpoint is their last callback
        str(tmp_path / config.stem / "checkpoints"),
        "--trainer.max_steps",
        "2",
        "--trainer.limit_val_batches",
        "1",
        "--trainer.enable_progress_bar",
        "false",
    ]
    if "dpo" in config.name:
        args += ["--model.init_args.model.adapter_path", str(tmp_path / "sft" / "final")]
    return args


def test_help_lists_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("fit", "validate", "test", "data"):
        assert f"  {command}" in out


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
def test_every_config_instantiates(config, tiny_model_dir, small_data, tmp_path):
    if "dpo" in config.name:  # DPO starts from an SFT adapter
        cli_main(
            ["fit", *tiny_overrides(tiny_model_dir, tmp_path, small_data, CONFIGS[-1].with_name("sft.yaml"), False)]
        )
    cli = cli_main(tiny_overrides(tiny_model_dir, tmp_path, small_data, config, False), run=False)
    assert cli.model is not None and cli.datamodule is not None and cli.trainer is not None


@pytest.mark.parametrize("four_bit", [False, True], ids=["fp32", "nf4"])
def test_sft_then_dpo_through_the_cli(four_bit, tiny_model_dir, small_data, tmp_path):
    sft, dpo = TRAINING_CONFIGS[1], TRAINING_CONFIGS[0]
    assert sft.name == "sft.yaml" and dpo.name == "dpo.yaml"
    cli = cli_main(["fit", *tiny_overrides(tiny_model_dir, tmp_path, small_data, sft, four_bit)])
    assert cli.trainer.global_step == 2
    assert (tmp_path / "sft/final/adapter_model.safetensors").is_file()
    cli = cli_main(["fit", *tiny_overrides(tiny_model_dir, tmp_path, small_data, dpo, four_bit)])
    assert cli.trainer.global_step == 2
    logged = cli.trainer.callback_metrics
    for name in (
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
    ):
        assert f"train/{name}" in logged or f"train/{name}_step" in logged
    assert (tmp_path / "dpo/final/adapter_model.safetensors").is_file()


def test_full_finetuning_sft_then_dpo_through_the_cli(tiny_model_dir, small_data, tmp_path):
    from safetensors.torch import load_file

    sft, dpo = TRAINING_CONFIGS[1], TRAINING_CONFIGS[0]
    full = ["--model.init_args.model.finetune", "full", "--generation_checks", "false"]
    cli_main(["fit", *tiny_overrides(tiny_model_dir, tmp_path, small_data, sft, False), *full])
    assert (tmp_path / "sft/final/model.safetensors").is_file()
    assert not (tmp_path / "sft/final/adapter_config.json").exists()
    before = load_file(tmp_path / "sft/final/model.safetensors")
    tiny = load_file(tiny_model_dir / "model.safetensors")
    assert any(not (before[k] == tiny[k]).all() for k in tiny if k in before)  # every weight trains
    # DPO starts from the whole SFT model; at step 0 the policy is its own reference (loss log 2).
    test_file = ["--data.init_args.test_file", str(small_data["preferences"])]
    cli = cli_main(["test", *tiny_overrides(tiny_model_dir, tmp_path, small_data, dpo, False), *full, *test_file])
    assert float(cli.trainer.callback_metrics["test/loss"]) == pytest.approx(0.6931472, abs=1e-6)
    cli = cli_main(["fit", *tiny_overrides(tiny_model_dir, tmp_path, small_data, dpo, False), *full])
    assert cli.trainer.global_step == 2
    after = load_file(tmp_path / "dpo/final/model.safetensors")
    assert any(not (after[k] == before[k]).all() for k in before)


def test_dpo_test_command_scores_the_test_pairs(tiny_model_dir, small_data, tmp_path):
    sft, dpo = TRAINING_CONFIGS[1], TRAINING_CONFIGS[0]
    cli_main(["fit", *tiny_overrides(tiny_model_dir, tmp_path, small_data, sft, False)])
    test_file = ["--data.init_args.test_file", str(small_data["preferences"]), "--generation_checks", "false"]
    cli = cli_main(["test", *tiny_overrides(tiny_model_dir, tmp_path, small_data, dpo, False), *test_file])
    # No checkpoint: the policy is the SFT adapter, its own reference (loss log 2).
    assert float(cli.trainer.callback_metrics["test/loss"]) == pytest.approx(0.6931472, abs=1e-6)


def test_print_config(capsys, tiny_model_dir, small_data, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(
            ["fit", *tiny_overrides(tiny_model_dir, tmp_path, small_data, TRAINING_CONFIGS[1], False), "--print_config"]
        )
    assert exit_info.value.code == 0
    assert "class_path: qod_lightning.modules.SFTModule" in capsys.readouterr().out


def test_args_from_a_caller_do_not_warn_about_sys_argv(monkeypatch, tiny_model_dir, small_data, tmp_path):
    # The pipeline runs each stage with its own arguments while sys.argv holds `pipeline --config ...`;
    # LightningCLI's warning about passing both is noise there.
    monkeypatch.setattr("sys.argv", ["qod_lightning", "pipeline", "--config", "configs/pipeline/smoke.yaml"])
    config = CONFIGS[-1].with_name("sft.yaml")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli_main(tiny_overrides(tiny_model_dir, tmp_path, small_data, config, False), run=False)
    assert not [w for w in caught if "args parameter" in str(w.message)]
