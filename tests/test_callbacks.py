"""GenerationEvaluation logs gen/* metrics and a sample table into TensorBoard during fit and test."""

import json

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from qod_lightning.callbacks import (
    GenerationEvaluation,
    TensorBoardRun,
    log_predictions,
    samples_table,
    tensorboard_run,
)
from qod_lightning.data.sft import SFTDataModule
from qod_lightning.model import ModelSettings
from qod_lightning.modules import SFTModule

EXPECTED = {
    "device": {"ipv4Address": {"publicAddress": "203.0.113.7", "privateAddress": "203.0.113.7"}},
    "applicationServer": {"ipv4Address": "192.0.2.200"},
    "qosProfile": "QOS_E",
    "duration": 7200,
}


class SFTDataWithTest(SFTDataModule):
    def test_dataloader(self):
        return self.val_dataloader()


@pytest.fixture
def eval_file(tmp_path):
    path = tmp_path / "eval.jsonl"
    records = [
        {"input": f"gaming, device 203.0.113.{i}, server 192.0.2.200, 2 hours", "expected": EXPECTED} for i in (7, 8, 9)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def events(log_dir) -> EventAccumulator:
    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def one_batch_trainer(tmp_path, callback, **limits) -> tuple[L.Trainer, TensorBoardLogger]:
    """A CPU trainer of one train and one validation batch per epoch, logging to TensorBoard."""
    logger = TensorBoardLogger(str(tmp_path / "logs"), name="gen")
    trainer = L.Trainer(
        **limits,
        limit_train_batches=1,
        limit_val_batches=1,
        logger=logger,
        callbacks=[callback],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    return trainer, logger


def test_logs_metrics_and_a_sample_table_every_n_epochs(tiny_model_dir, small_data, eval_file, tmp_path):
    L.seed_everything(0)
    module = SFTModule(ModelSettings(str(tiny_model_dir)), output_dir=str(tmp_path / "out"))
    data = SFTDataWithTest(str(tiny_model_dir), str(small_data["sft"]), val_fraction=0.25, batch_size=2)
    callback = GenerationEvaluation(str(eval_file), every_n_epochs=2, max_new_tokens=12, batch_size=2, num_table_rows=2)
    trainer, logger = one_batch_trainer(tmp_path, callback, max_epochs=2, num_sanity_val_steps=1)
    trainer.fit(module, data)

    accumulator = events(logger.log_dir)
    scalars = accumulator.Tags()["scalars"]
    for name in ("json_validity", "spec_compliance", "hallucination_rate", "qos_profile_accuracy", "exact_match"):
        assert f"gen/{name}" in scalars
    assert "gen/constrained" in scalars and "gen/n" in scalars
    assert any(tag.startswith("gen/field_accuracy/") for tag in scalars)
    # Sanity check and epoch 0 skipped, epoch 1 evaluated: one point.
    assert [event.value for event in accumulator.Scalars("gen/n")] == [3.0]
    assert accumulator.Scalars("gen/constrained")[0].value == 0.0
    text_tags = [tag for tag in accumulator.Tags()["tensors"] if tag.startswith("gen/samples")]
    assert text_tags
    table = accumulator.Tensors(text_tags[0])[0].tensor_proto.string_val[0].decode()
    assert table.startswith("| request | output | verdict |")
    assert table.count("\n") == 3  # header, rule, two rows
    assert "gen/spec_compliance" in trainer.callback_metrics

    results = trainer.test(module, data, verbose=False)
    assert results[0]["gen/n"] == 3.0

    module.model.train()
    callback._generate(trainer, module)
    assert module.model.training  # restored after generating in eval mode


@pytest.mark.parametrize(
    ("limits", "points"),
    [({"max_epochs": 3}, 2), ({"max_epochs": 5, "max_steps": 1}, 1)],
    ids=["every-2nd-and-the-last-epoch", "max-steps-ends-the-first-epoch"],
)
def test_the_last_epoch_is_always_evaluated(tiny_model_dir, small_data, eval_file, tmp_path, limits, points):
    module = SFTModule(ModelSettings(str(tiny_model_dir)), output_dir=str(tmp_path / "out"))
    data = SFTDataModule(str(tiny_model_dir), str(small_data["sft"]), val_fraction=0.25, batch_size=2)
    callback = GenerationEvaluation(str(eval_file), every_n_epochs=2, max_samples=1, max_new_tokens=2)
    trainer, logger = one_batch_trainer(tmp_path, callback, num_sanity_val_steps=0, **limits)
    trainer.fit(module, data)
    assert len(events(logger.log_dir).Scalars("gen/n")) == points


def test_a_finished_runs_predictions_are_logged_under_the_callbacks_tags_at_its_step(tmp_path):
    record = {"input": "gaming, device 203.0.113.7, server 192.0.2.200, 2 hours", "expected": EXPECTED}
    right, wrong = {**record, "prediction": json.dumps(EXPECTED)}, {**record, "prediction": "no JSON"}
    log_predictions(TensorBoardRun(str(tmp_path), 7), iter([("gen", [right, wrong]), ("gen_constrained", [right])]))
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 1  # one writer for every set of answers
    accumulator = events(tmp_path)
    assert [(e.step, e.value) for e in accumulator.Scalars("gen/n")] == [(7, 2.0)]
    assert [e.value for e in accumulator.Scalars("gen/exact_match")] == [0.5]
    assert [e.value for e in accumulator.Scalars("gen_constrained/exact_match")] == [1.0]
    assert "gen/constrained" not in accumulator.Tags()["scalars"]
    table = accumulator.Tensors("gen/samples/text_summary")[0].tensor_proto.string_val[0].decode()
    assert table.count("\n") == 3  # header, rule, two rows


def test_the_tensorboard_run_of_a_trainer_is_its_first_tensorboard_loggers(tmp_path):
    logger = TensorBoardLogger(str(tmp_path / "logs"), name="run")
    trainer = L.Trainer(logger=[CSVLogger(str(tmp_path / "csv")), logger], default_root_dir=tmp_path)
    assert tensorboard_run(trainer) == TensorBoardRun(logger.log_dir, 0)
    assert tensorboard_run(L.Trainer(logger=False, default_root_dir=tmp_path)) is None


def test_sample_table_escapes_cells():
    table = samples_table(
        ["a | b\nc"],
        ["{x}|"],
        [{"exact": False, "parses": True, "valid": False, "hallucinated": True, "wrong_fields": ["qosProfile"]}],
    )
    row = table.splitlines()[2]
    assert row == "| a \\| b c | {x}\\| | invalid; hallucinated; wrong qosProfile |"


def test_rejects_bad_settings():
    with pytest.raises(ValueError, match="every_n_epochs"):
        GenerationEvaluation(every_n_epochs=0)


def fit_tiny(model_dir, train_file, out, callbacks, batch_size: int = 1, ckpt_path=None, **trainer_args) -> None:
    """Fit the tiny model fully on ``train_file``'s 9 training records, one epoch unless ``trainer_args`` say else."""
    module = SFTModule(ModelSettings(str(model_dir), finetune="full"), output_dir=str(out))
    data = SFTDataModule(str(model_dir), str(train_file), val_fraction=0.25, batch_size=batch_size)
    trainer = L.Trainer(
        **{"max_epochs": 1, **trainer_args},
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=any(isinstance(c, L.pytorch.callbacks.ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
    )
    # The checkpoint is this test's own; its hyperparameters hold a ModelSettings (the CLI stores plain values).
    trainer.fit(module, data, ckpt_path=ckpt_path, weights_only=False)


def snapshot_index(model_dir, train_file, tmp_path, batch_size: int, every_n_steps: int, **trainer_args) -> list:
    """Fit the tiny model fully with :class:`Snapshots` and return its ``index.json`` entries."""
    from qod_lightning.callbacks import Snapshots

    out = tmp_path / "out"
    fit_tiny(model_dir, train_file, out, [Snapshots(every_n_steps=every_n_steps)], batch_size, **trainer_args)
    return json.loads((out / "snapshots/index.json").read_text())


def test_snapshots_along_the_run_with_records_seen_and_training_seconds(tiny_model_dir, small_data, tmp_path):
    from qod_lightning.model import load_for_inference

    L.seed_everything(0)
    index = snapshot_index(tiny_model_dir, small_data["sft"], tmp_path, batch_size=2, every_n_steps=2, max_steps=5)
    # 9 training records in batches of 2: the fifth step has one; the last step always gets a snapshot.
    assert [(entry["step"], entry["records"]) for entry in index] == [(2, 4), (4, 8), (5, 9)]
    seconds = [entry["train_seconds"] for entry in index]
    assert seconds == sorted(seconds) and seconds[0] >= 0
    model, _ = load_for_inference(index[0]["path"])  # each snapshot is a model directory
    assert model is not None


def test_snapshots_count_optimizer_steps_under_gradient_accumulation(tiny_model_dir, small_data, tmp_path):
    """The micro-batches before the first optimizer step must not snapshot the untrained model as step 0."""
    index = snapshot_index(
        tiny_model_dir,
        small_data["sft"],
        tmp_path,
        batch_size=1,
        every_n_steps=1,
        max_steps=2,
        accumulate_grad_batches=3,
    )
    assert [(entry["step"], entry["records"]) for entry in index] == [(1, 3), (2, 6)]


def test_snapshots_count_records_not_rows():
    """A DPO batch of 3 pairs is 3 records, whether packed (3 rows) or in two rows per pair (6 rows)."""
    from types import SimpleNamespace

    from qod_lightning.callbacks import Snapshots

    snapshots = Snapshots(every_n_steps=10)
    trainer = SimpleNamespace(world_size=2, global_step=0)
    packed = {"packed_ids": torch.zeros(3, 9, dtype=torch.long), "index": torch.tensor([4, 0, 7])}
    two_rows = {"input_ids": torch.zeros(6, 7, dtype=torch.long), "index": torch.tensor([1, 2, 3])}
    for batch in (packed, two_rows):
        snapshots.on_train_batch_end(trainer, None, None, batch, 0)
    assert snapshots._records == 12  # 6 pairs on each of 2 ranks


def weights(model_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {name: tensor.double() for name, tensor in load_file(model_dir / "model.safetensors").items()}


def test_tail_average_ends_on_the_mean_of_the_snapshot_weights(tiny_model_dir, small_data, tmp_path):
    from qod_lightning.callbacks import Snapshots, TailAverage

    L.seed_everything(0)
    out = tmp_path / "out"
    # Snapshots first: they keep the weights as trained, steps 3, 6 and 9 (the last).
    callbacks = [Snapshots(every_n_steps=3), TailAverage(every_n_steps=3, count=3)]
    fit_tiny(tiny_model_dir, small_data["sft"], out, callbacks)
    points = [weights(out / f"snapshots/step-{step}") for step in (3, 6, 9)]
    final = weights(out / "final")
    assert final.keys() == points[0].keys()
    for name, tensor in final.items():
        expected = sum(point[name] for point in points) / 3  # float64 reference
        torch.testing.assert_close(tensor, expected, rtol=0, atol=1e-6)
    assert any(not torch.equal(final[name], points[-1][name]) for name in final)  # not the last weights


def test_tail_average_of_one_point_keeps_the_last_weights(tiny_model_dir, small_data, tmp_path):
    from qod_lightning.callbacks import Snapshots, TailAverage

    L.seed_everything(0)
    out = tmp_path / "out"
    callbacks = [Snapshots(every_n_steps=3), TailAverage(every_n_steps=3, count=1)]
    fit_tiny(tiny_model_dir, small_data["sft"], out, callbacks)
    last, final = weights(out / "snapshots/step-9"), weights(out / "final")
    assert all(torch.equal(final[name], last[name]) for name in final)


def test_tail_average_resumes_with_the_checkpoints_mean(tiny_model_dir, small_data, tmp_path):
    """Resumed after step 7, the run still averages step 6's weights (kept in the checkpoint) with the last."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from qod_lightning.callbacks import TailAverage

    def callbacks(out):
        saving = ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=7, save_top_k=-1)
        return [TailAverage(every_n_steps=3, count=2), saving]

    L.seed_everything(0)
    whole = tmp_path / "whole"
    fit_tiny(tiny_model_dir, small_data["sft"], whole, callbacks(whole))
    (checkpoint,) = (whole / "ckpt").glob("*step=7.ckpt")
    L.seed_everything(0)
    resumed = tmp_path / "resumed"
    fit_tiny(tiny_model_dir, small_data["sft"], resumed, [TailAverage(every_n_steps=3, count=2)], ckpt_path=checkpoint)
    expected, final = weights(whole / "final"), weights(resumed / "final")
    for name, tensor in final.items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-6)


def test_tail_average_rejects_bad_settings():
    from qod_lightning.callbacks import TailAverage

    with pytest.raises(ValueError, match="every_n_steps and count"):
        TailAverage(every_n_steps=0)
    with pytest.raises(ValueError, match="every_n_steps and count"):
        TailAverage(every_n_steps=4, count=0)
