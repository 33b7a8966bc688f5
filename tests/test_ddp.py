"""Two CPU processes (DDP over gloo) train exactly as one process on the same global batch.

One process at micro-batch 2 and two at micro-batch 1 see the same 2 examples per optimizer
step; the token-weighted loss (WindowBatchSampler's window weights) and DDP's gradient averaging
must give the same updates, the same synced validation metrics, and artifacts from rank 0 only.
"""

import json

import pytest
import torch

from tests.runs import adapter, fit, stage_config

DDP = {"strategy": "ddp", "devices": 2, "accelerator": "cpu", "accumulate_grad_batches": 1, "max_epochs": 1}
SINGLE = {"devices": 1, "accelerator": "cpu", "accumulate_grad_batches": 1, "max_epochs": 1}


def _run(stage, tiny_model_dir, data, root, batch_size, trainer, sft_adapter=None):
    # No dropout: two ranks draw different masks than one process does.
    config = stage_config(
        stage, tiny_model_dir, data, root, None, dropout=0.0, batch_size=batch_size, sft_adapter=sft_adapter, **trainer
    )
    done = fit(config)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def _assert_same_training(single, ddp, metric_names):
    expected, actual = adapter(single), adapter(ddp)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)
    one = json.loads((single / "metrics" / "rank0.json").read_text())
    ranks = [json.loads((ddp / "metrics" / f"rank{r}.json").read_text()) for r in (0, 1)]
    for name in metric_names:
        for metrics in ranks:
            assert metrics[name] == pytest.approx(one[name], rel=1e-5), name
    # Only rank 0 writes: one final adapter, one set of checkpoints.
    assert sorted(p.name for p in (ddp / "checkpoints").iterdir()) == ["last.ckpt"]
    assert not list(ddp.rglob("*.tmp*"))


@pytest.mark.slow
def test_sft_and_dpo_ddp_equal_single_process(tiny_model_dir, small_data, tmp_path):
    _run("sft", tiny_model_dir, small_data["sft"], tmp_path / "sft1", 2, SINGLE)
    _run("sft", tiny_model_dir, small_data["sft"], tmp_path / "sft2", 1, DDP)
    _assert_same_training(tmp_path / "sft1", tmp_path / "sft2", ["val/loss", "val/perplexity"])

    sft_adapter = tmp_path / "sft1" / "out" / "final"
    prefs = small_data["preferences"]
    _run("dpo", tiny_model_dir, prefs, tmp_path / "dpo1", 2, SINGLE, sft_adapter)
    _run("dpo", tiny_model_dir, prefs, tmp_path / "dpo2", 1, DDP, sft_adapter)
    _assert_same_training(
        tmp_path / "dpo1", tmp_path / "dpo2", ["val/loss", "val/rewards/accuracies", "val/rewards/margins"]
    )
