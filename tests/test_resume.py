"""A run killed with SIGKILL mid-epoch resumes with ``--ckpt_path last`` and ends where an
uninterrupted run ends: same adapter to 1e-6, same data order, LR schedule, optimizer state,
dropout masks (LoRA dropout is live) and (DPO) cached reference log-probs."""

import signal

import pytest
import torch

from tests.runs import adapter, fit, stage_config

# 10 training examples at batch 1 and accumulation 2: 5 optimizer steps per epoch, 2 epochs.
MICRO_BATCHES_PER_EPOCH = 10


def _assert_resumes_exactly(stage: str, kill_at: int, tiny_model_dir, data, tmp_path, sft_adapter=None) -> None:
    reference = tmp_path / f"{stage}_reference"
    done = fit(stage_config(stage, tiny_model_dir, data, reference, None, sft_adapter=sft_adapter))
    assert done.returncode == 0, done.stderr[-3000:]
    if stage == "dpo":
        assert "Reference log-probs" in done.stderr

    crashed = tmp_path / f"{stage}_crashed"
    killed = fit(stage_config(stage, tiny_model_dir, data, crashed, kill_at, sft_adapter=sft_adapter))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert (crashed / "checkpoints" / "last.ckpt").is_file()
    assert not (crashed / "out" / "final").exists(), "a killed run must not leave a final adapter"
    checkpoint = torch.load(crashed / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == kill_at // 2, "last checkpoint is the last finished optimizer step"

    resumed = fit(
        stage_config(stage, tiny_model_dir, data, crashed, None, sft_adapter=sft_adapter), "--ckpt_path", "last"
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "not resumable" not in resumed.stderr
    if stage == "dpo":
        assert "Reference log-probs" not in resumed.stderr, "the cached reference must come from the checkpoint"
    expected, actual = adapter(reference), adapter(crashed)
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=1e-6, msg=name)
    # The run really trained: the adapter moved away from its initialisation (B starts at zero).
    assert any(t.abs().max() > 0 for name, t in actual.items() if "lora_B" in name)


@pytest.mark.slow
def test_sft_killed_mid_window_resumes_to_the_same_adapter(tiny_model_dir, small_data, tmp_path):
    # Micro-batch 7 is the second of the 4th accumulation window of epoch 0: killed between the
    # two backward passes of one optimizer step.
    _assert_resumes_exactly("sft", 7, tiny_model_dir, small_data["sft"], tmp_path)


@pytest.mark.slow
def test_dpo_killed_in_second_epoch_resumes_to_the_same_adapter(tiny_model_dir, small_data, tmp_path):
    sft = fit(stage_config("sft", tiny_model_dir, small_data["sft"], tmp_path / "sft", None))
    assert sft.returncode == 0, sft.stderr[-3000:]
    _assert_resumes_exactly(
        "dpo",
        MICRO_BATCHES_PER_EPOCH + 5,
        tiny_model_dir,
        small_data["preferences"],
        tmp_path,
        sft_adapter=tmp_path / "sft" / "out" / "final",
    )
