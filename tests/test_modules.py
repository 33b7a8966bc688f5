"""SFT and DPO LightningModules on the tiny Phi-3: what changes, what must not, and the math."""

import math
from pathlib import Path

import lightning as L
import pytest
import torch

from qod_lightning.data.preference import PreferenceDataModule
from qod_lightning.data.sft import SFTDataModule
from qod_lightning.logprobs import PairLayout, batch_logps, pair_logps, sequence_logps
from qod_lightning.model import ModelSettings
from qod_lightning.modules import DPOModule, SFTModule

pytestmark = pytest.mark.numerics  # also run under the other instruction set's settings (.ci/run)


def trainer(tmp_path, **kwargs):
    defaults = dict(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
    )
    return L.Trainer(**{**defaults, **kwargs})


def sgd(lr):
    return lambda params: torch.optim.SGD(params, lr=lr)


def test_sft_changes_only_lora_and_keeps_base_bit_identical(tiny_model_dir, small_data, tmp_path):
    L.seed_everything(0)
    module = SFTModule(ModelSettings(str(tiny_model_dir)), optimizer=sgd(0.5), output_dir=str(tmp_path / "out"))
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    dm = SFTDataModule(str(tiny_model_dir), str(small_data["sft"]), val_fraction=0.25, batch_size=2)
    trainer(tmp_path, max_epochs=1).fit(module, dm)
    changed = {n for n, p in module.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert any("lora_B" in n for n in changed)
    for n, p in module.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, before[n]), n
    assert (tmp_path / "out/final/adapter_config.json").is_file()
    assert (tmp_path / "out/final/adapter_model.safetensors").is_file()
    assert (tmp_path / "out/final/tokenizer.json").is_file()
    assert (tmp_path / "out/best/adapter_config.json").is_file()
    # Inference answers in the prompt format the adapter learned (model.resolve_prompt_format).
    assert (tmp_path / "out/final/qod_prompt.json").read_text() == '{"prompt_format": "alpaca"}\n'


def test_sft_accumulated_step_is_a_token_weighted_mean(tiny_model_dir, small_data, tmp_path):
    """One optimizer step over 2 micro-batches equals SGD on the per-token mean of the 4 examples."""
    L.seed_everything(0)
    settings = ModelSettings(str(tiny_model_dir))
    settings.lora.dropout = 0.0
    module = SFTModule(settings, optimizer=sgd(1.0))
    dm = SFTDataModule(str(tiny_model_dir), str(small_data["sft"]), val_fraction=0.0, batch_size=2)
    dm.setup("fit")
    # The examples the first window will use (seeded order of epoch 0).
    from qod_lightning.data.sampling import WindowBatchSampler

    order = [i for b in list(WindowBatchSampler([1] * len(dm.train_set), 2, 2, seed=dm.hparams.seed))[:2] for i, _ in b]
    reference = SFTModule(settings, optimizer=sgd(1.0))
    reference.load_state_dict(module.state_dict())
    batch = dm.collate([dm.train_set[i] for i in order])
    logps, counts = batch_logps(reference.model, batch)
    (-logps.sum() / counts.sum()).backward()
    expected = {n: p.detach() - p.grad for n, p in reference.named_parameters() if p.requires_grad}

    trainer(tmp_path, max_steps=1, accumulate_grad_batches=2).fit(module, dm)
    for n, p in module.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.detach(), expected[n], rtol=1e-5, atol=1e-6)


def _sft_adapter(tiny_model_dir, small_data, tmp_path) -> ModelSettings:
    """Settings of a DPO policy that starts from a one-step SFT adapter."""
    L.seed_everything(0)
    sft_dir = tmp_path / "sft"
    sft = SFTModule(ModelSettings(str(tiny_model_dir)), output_dir=str(sft_dir))
    trainer(tmp_path, max_steps=1).fit(
        sft, SFTDataModule(str(tiny_model_dir), str(small_data["sft"]), val_fraction=0.0)
    )
    return ModelSettings(str(tiny_model_dir), adapter_path=str(sft_dir / "final"))


def test_short_dpo_run_raises_accuracy_and_margin(tiny_model_dir, small_data, tmp_path):
    settings = _sft_adapter(tiny_model_dir, small_data, tmp_path)
    dpo = DPOModule(
        settings, beta=0.5, optimizer=lambda p: torch.optim.AdamW(p, lr=5e-3), output_dir=str(tmp_path / "dpo")
    )
    dm = PreferenceDataModule(str(tiny_model_dir), str(small_data["preferences"]), val_fraction=0.0, batch_size=4)
    dm.setup("fit")

    def rewards():
        dpo.model.eval()
        with torch.no_grad():
            logps = pair_logps(dpo.model, dm.collate(dm.train_set.examples))  # the layout the module chose
        chosen, rejected = logps.view(2, -1)
        ref = dpo.reference["train"]
        margin = (chosen - ref[:, 0]) - (rejected - ref[:, 1])
        return (margin > 0).float().mean().item(), margin.mean().item()

    trainer(tmp_path, max_epochs=4).fit(dpo, dm)
    accuracy, margin = rewards()
    # At step 0 the policy equals the reference: every margin is 0 and accuracy 0.
    assert accuracy > 0.9 and margin > 0.5
    assert (tmp_path / "dpo/final/adapter_model.safetensors").is_file()


def test_dpo_keeps_its_best_adapter_and_tests_against_the_starting_policy(tiny_model_dir, small_data, tmp_path):
    settings = _sft_adapter(tiny_model_dir, small_data, tmp_path)
    pairs = str(small_data["preferences"])

    def dpo():
        return DPOModule(
            settings, beta=0.5, optimizer=lambda p: torch.optim.AdamW(p, lr=5e-3), output_dir=str(tmp_path / "dpo")
        )

    def data(test_file):
        return PreferenceDataModule(str(tiny_model_dir), pairs, val_fraction=0.25, test_file=test_file, batch_size=2)

    # Untrained, the policy is its own reference: every pair's loss is log 2, every margin 0.
    [result] = trainer(tmp_path).test(dpo(), data(pairs))
    assert result["test/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert result["test/rewards/margins"] == pytest.approx(0.0, abs=1e-6)

    # The test pairs given at fit start are scored then, by the policy before any update.
    trained = dpo()
    trainer(tmp_path, max_epochs=3).fit(trained, data(pairs))
    assert (tmp_path / "dpo/best/adapter_model.safetensors").is_file()
    assert trained.best_val_loss < math.log(2)
    [result] = trainer(tmp_path).test(trained, data(pairs))
    assert result["test/loss"] < math.log(2) and result["test/rewards/margins"] > 0
    # Other pairs, as many: their reference was never scored (index-aligned, it would look fine).
    other = tmp_path / "other.jsonl"
    other.write_text(Path(pairs).read_text().replace("QOS_HIGH", "QOS_LOW_LATENCY"))
    with pytest.raises(RuntimeError, match="scored on other test pairs"):
        trainer(tmp_path).test(trained, data(str(other)))

    # Without them, the trained policy cannot stand in for its own reference.
    blind = dpo()
    trainer(tmp_path, max_steps=2).fit(blind, data(None))
    with pytest.raises(RuntimeError, match="scored on no test pairs"):
        trainer(tmp_path).test(blind, data(pairs))


def test_sft_tests_on_the_test_file_and_asks_for_one(tiny_model_dir, small_data, tmp_path):
    module = SFTModule(ModelSettings(str(tiny_model_dir)))
    sft = str(small_data["sft"])
    [result] = trainer(tmp_path).test(module, SFTDataModule(str(tiny_model_dir), sft, val_fraction=0.0, test_file=sft))
    assert result["test/loss"] > 0
    with pytest.raises(ValueError, match="no test data: give the data module a test_file"):
        trainer(tmp_path).test(module, SFTDataModule(str(tiny_model_dir), sft, val_fraction=0.0))


def _poisoned_sft(tiny_model_dir, tmp_path, skip):
    module = SFTModule(ModelSettings(str(tiny_model_dir)), output_dir=str(tmp_path / "out"), skip_nonfinite=skip)
    with torch.no_grad():
        next(p for n, p in module.named_parameters() if "lora_A" in n).fill_(float("nan"))
        next(p for n, p in module.named_parameters() if "lora_B" in n).fill_(1.0)
    return module


def test_nonfinite_loss_stops_with_step_and_batch(tiny_model_dir, small_data, tmp_path):
    import pytest

    module = _poisoned_sft(tiny_model_dir, tmp_path, skip=False)
    dm = SFTDataModule(str(tiny_model_dir), str(small_data["sft"]), val_fraction=0.0)
    with pytest.raises(FloatingPointError, match="global step 0, epoch 0, batch 0"):
        trainer(tmp_path, max_steps=2).fit(module, dm)


def test_nonfinite_loss_can_skip_batches(tiny_model_dir, small_data, tmp_path):
    import pytest

    module = _poisoned_sft(tiny_model_dir, tmp_path, skip=True)
    dm = SFTDataModule(str(tiny_model_dir), str(small_data["sft"]), val_fraction=0.0)
    with pytest.warns(UserWarning, match="skipping batch with non-finite loss"):
        trainer(tmp_path, max_steps=2, limit_train_batches=2).fit(module, dm)


def _nan_gradient_sft(tiny_model_dir, tmp_path, skip):
    module = SFTModule(ModelSettings(str(tiny_model_dir)), output_dir=str(tmp_path / "out"), skip_nonfinite=skip)
    lora_a = next(p for n, p in module.named_parameters() if "lora_A" in n)
    lora_a.register_hook(lambda grad: torch.full_like(grad, float("nan")))  # finite loss, NaN gradient
    return module


def test_nonfinite_gradient_stops_with_step(tiny_model_dir, small_data, tmp_path):
    import pytest

    module = _nan_gradient_sft(tiny_model_dir, tmp_path, skip=False)
    dm = SFTDataModule(str(tiny_model_dir), str(small_data["sft"]), val_fraction=0.0)
    with pytest.raises(FloatingPointError, match="non-finite gradient at global step 0, epoch 0"):
        trainer(tmp_path, max_steps=2).fit(module, dm)


def test_nonfinite_gradient_can_skip_the_step(tiny_model_dir, small_data, tmp_path):
    import pytest

    module = _nan_gradient_sft(tiny_model_dir, tmp_path, skip=True)
    before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    dm = SFTDataModule(str(tiny_model_dir), str(small_data["sft"]), val_fraction=0.0)
    with pytest.warns(UserWarning, match="skipping optimizer step with non-finite gradient"):
        trainer(tmp_path, max_steps=2, limit_train_batches=2).fit(module, dm)
    for name, param in module.named_parameters():
        if param.requires_grad:
            assert torch.isfinite(param).all(), name
            torch.testing.assert_close(param.detach(), before[name], rtol=0, atol=0, msg=name)


def _fp16_trainer(tmp_path, **kwargs):
    # Lightning turns precision="16-mixed" into bf16 on CPU; GPUs get this plugin by default.
    from lightning.pytorch.plugins.precision import MixedPrecision

    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    return trainer(tmp_path, plugins=[plugin], **kwargs)


def test_fp16_mixed_precision_trains_with_loss_scaling(tiny_model_dir, small_data, tmp_path):
    module = SFTModule(ModelSettings(str(tiny_model_dir)), output_dir=str(tmp_path / "out"))
    before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    dm = SFTDataModule(str(tiny_model_dir), str(small_data["sft"]), val_fraction=0.0)
    run = _fp16_trainer(tmp_path, max_steps=3)
    run.fit(module, dm)
    assert run.precision_plugin.scaler.get_scale() == 2.0**16  # no overflow: the initial scale stands
    assert run.global_step == 3
    changed = [not torch.equal(p.detach(), before[n]) for n, p in module.named_parameters() if p.requires_grad]
    assert any(changed)


def test_fp16_overflow_is_skipped_by_the_loss_scaler(tiny_model_dir, small_data, tmp_path):
    module = _nan_gradient_sft(tiny_model_dir, tmp_path, skip=False)  # the scaler handles it, no error
    before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    dm = SFTDataModule(str(tiny_model_dir), str(small_data["sft"]), val_fraction=0.0)
    run = _fp16_trainer(tmp_path, max_steps=2, limit_train_batches=2)
    run.fit(module, dm)
    assert run.precision_plugin.scaler.get_scale() == 2.0**14  # halved at each of the two overflows
    for name, param in module.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.detach(), before[name], rtol=0, atol=0, msg=name)


def test_unwritable_output_dir_fails_before_training(tiny_model_dir, small_data, tmp_path):
    import pytest

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    module = SFTModule(ModelSettings(str(tiny_model_dir)), output_dir=str(blocker / "out"))
    dm = SFTDataModule(str(tiny_model_dir), str(small_data["sft"]), val_fraction=0.0)
    run = trainer(tmp_path, max_steps=1)
    with pytest.raises(PermissionError, match=r"cannot write to .*file/out"):
        run.fit(module, dm)
    assert run.global_step == 0


def test_dpo_reference_is_scored_at_the_training_precision(tiny_model_dir, small_data, tmp_path):
    """Under bf16-mixed the unchanged policy's first loss is exactly log 2 (reference under autocast too)."""
    import math

    settings = ModelSettings(str(tiny_model_dir))
    settings.lora.dropout = 0.0
    dpo = DPOModule(settings, optimizer=sgd(0.0), output_dir=str(tmp_path / "dpo"))
    dm = PreferenceDataModule(str(tiny_model_dir), str(small_data["preferences"]), val_fraction=0.0, batch_size=2)
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(trainer.callback_metrics["train/loss_step"]))

    trainer(tmp_path, max_steps=1, precision="bf16-mixed", callbacks=[Record()]).fit(dpo, dm)
    assert losses and abs(losses[0] - math.log(2)) < 1e-6


def test_setup_turns_off_cudnn_attention_on_a_gpu_only(tiny_model_dir, monkeypatch):
    from types import SimpleNamespace

    calls = []
    monkeypatch.setattr(torch.backends.cuda, "enable_cudnn_sdp", calls.append)
    module = SFTModule(ModelSettings(str(tiny_model_dir)))
    for device in ("cpu", "cuda"):
        strategy = SimpleNamespace(root_device=torch.device(device))
        module._trainer = SimpleNamespace(strategy=strategy, is_global_zero=False)
        module.setup("fit")
    assert calls == [False]


def test_dpo_nll_weight_adds_the_chosen_answers_per_token_nll(tiny_model_dir, small_data, tmp_path):
    """RPO: at step 0 (policy = reference) each pair's loss is log 2 + alpha * NLL per chosen token."""
    settings = _sft_adapter(tiny_model_dir, small_data, tmp_path)
    dm = PreferenceDataModule(str(tiny_model_dir), str(small_data["preferences"]), val_fraction=0.5, batch_size=4)
    dpo = DPOModule(settings, nll_weight=0.5)
    dm.layout = PairLayout(packed=False)
    logged = trainer(tmp_path).validate(dpo, dm)[0]
    assert dm.layout.packed  # the module laid the batches out for its model: scored in packed rows
    dm.layout = PairLayout(packed=False)
    batch = dm.collate(dm.val_set.examples)
    dpo.model.eval()
    with torch.no_grad():
        logits = dpo.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    logps, counts = sequence_logps(logits, batch["labels"])  # the two-row layout, full logits, float64
    n = len(dm.val_set.examples)
    nll = (-logps[:n] / counts[:n]).mean().item()
    assert logged["val/nll/chosen"] == pytest.approx(nll, rel=1e-4)
    assert logged["val/loss"] == pytest.approx(math.log(2) + 0.5 * nll, rel=1e-4)
    with pytest.raises(ValueError):
        DPOModule(settings, nll_weight=-1.0)
