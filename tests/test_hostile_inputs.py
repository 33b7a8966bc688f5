"""The hostile-input corpus (tests/data/hostile): every file ends in a clear error or a handled result.

Errors name the file and line and raise a ``ValueError`` subclass (data modules) or end the command
with one ``error: FILE:LINE: ...`` line and a nonzero exit status; a failed command leaves what an
earlier run wrote untouched. Handled inputs load (or translate) with any dropped or suspicious
record named in a warning. No case may end in a traceback.
"""

import importlib.util
import json
import logging
import warnings
from pathlib import Path

import pytest

from qod_lightning.commands import evaluate, translate
from qod_lightning.data.jsonl import DataError
from qod_lightning.data.preference import PreferenceDataModule
from qod_lightning.data.sft import SFTDataModule
from qod_lightning.extraction import find_json_object
from qod_lightning.schema import VALIDATOR

HOSTILE = Path(__file__).resolve().parent / "data" / "hostile"
MANIFEST = json.loads((HOSTILE / "MANIFEST.json").read_text(encoding="utf-8"))["cases"]
PREVIOUS = "written by an earlier run\n"


def cases(*loaders):
    return [pytest.param(case, id=case["path"]) for case in MANIFEST if case["loader"] in loaders]


def where(path, case):
    """The prefix every error message about ``path`` starts with."""
    return f"{path}:{case['line']}: " if case["line"] is not None else f"{path}: "


def run(capsys, main, argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


# -- the corpus itself ----------------------------------------------------------------------------


def test_checked_in_corpus_is_what_the_generator_writes():
    spec = importlib.util.spec_from_file_location("make_corpus", HOSTILE / "make_corpus.py")
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    expected, _ = generator.build()
    on_disk = {
        p.relative_to(HOSTILE).as_posix(): p.read_bytes()
        for p in HOSTILE.rglob("*")
        if p.is_file() and p.suffix != ".py" and "__pycache__" not in p.parts
    }
    assert sorted(on_disk) == sorted(expected), "run: python tests/data/hostile/make_corpus.py"
    changed = [name for name in expected if on_disk[name] != expected[name]]
    assert not changed, f"stale corpus files {changed}; run: python tests/data/hostile/make_corpus.py"
    # Its records carry the instruction generation uses, so only the cases about it warn of it.
    from qod_lightning.data.prompts import SYSTEM_PROMPT

    assert generator.INSTRUCTION == SYSTEM_PROMPT


def test_manifest_covers_at_least_50_files_of_every_kind():
    assert len(MANIFEST) >= 50
    assert len({case["path"] for case in MANIFEST}) == len(MANIFEST)
    for case in MANIFEST:
        assert (HOSTILE / case["path"]).is_file()
        assert case["loader"] == case["path"].split("/")[0]
        assert case["outcome"] in ("error", "handled")
    loaders = {case["loader"] for case in MANIFEST}
    assert loaders == {"sft", "preference", "eval", "predictions", "translate", "translate_input"}
    for loader in loaders:
        assert {c["outcome"] for c in MANIFEST if c["loader"] == loader} == {"error", "handled"}, loader
    assert sum(p.stat().st_size for p in HOSTILE.rglob("*") if p.is_file()) < 1_000_000


# -- data modules ---------------------------------------------------------------------------------


@pytest.mark.parametrize("case", cases("sft", "preference"))
def test_data_module(case, tiny_model_dir):
    path = HOSTILE / case["path"]
    module = SFTDataModule if case["loader"] == "sft" else PreferenceDataModule
    dm = module(str(tiny_model_dir), str(path), val_fraction=0.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if case["outcome"] == "error":
            with pytest.raises(ValueError) as info:
                dm.setup("fit")
            message = str(info.value)
            assert message.startswith(where(path, case)) and case["message"] in message
            assert "\n" not in message
            if case["line"] is not None:
                assert isinstance(info.value, DataError) and info.value.line == case["line"]
            return
        dm.setup("fit")
    assert len(dm.train_set) == case["records"]
    about_this_file = [str(w.message) for w in caught if str(path) in str(w.message)]
    if case["warning"] is None:
        assert about_this_file == []
    else:
        assert any(case["warning"] in message for message in about_this_file), about_this_file


# -- evaluate and translate --input ---------------------------------------------------------------


@pytest.mark.parametrize("case", cases("eval", "predictions", "translate_input"))
def test_command_on_data_file(case, capsys, caplog, tmp_path, tiny_model_dir):
    path = HOSTILE / case["path"]
    if case["loader"] == "translate_input":
        main, outputs = translate.main, [tmp_path / "answers.jsonl"]
        argv = ["--model", tiny_model_dir, "--input", path, "--output", outputs[0], "--max-new-tokens", 8]
    elif case["loader"] == "eval":
        main, outputs = evaluate.main, [tmp_path / "report.json", tmp_path / "report.predictions.jsonl"]
        argv = ["--model", tiny_model_dir, "--data", path, "--output", outputs[0], "--max-new-tokens", 4]
    else:
        main, outputs = evaluate.main, [tmp_path / "report.json"]
        argv = ["--predictions", path, "--output", outputs[0]]
    for output in outputs:
        output.write_text(PREVIOUS)
    with caplog.at_level(logging.WARNING):
        code, out, err = run(capsys, main, [*argv, *case.get("args", [])])

    if case["outcome"] == "error":
        assert code == case["exit_code"] and out == ""
        assert err.startswith(f"error: {where(path, case)}") and err.count("\n") == 1
        assert case["message"] in err
        # Nothing an earlier run wrote is lost, and no temporary file is left behind.
        assert [o.read_text() for o in outputs] == [PREVIOUS] * len(outputs)
        assert sorted(tmp_path.iterdir()) == sorted(outputs)
        return

    assert code in case["exit_codes"], err
    if case["loader"] == "translate_input":
        answers = [json.loads(line) for line in outputs[0].read_text(encoding="utf-8").splitlines()]
        assert len(answers) == case["records"]
        for answer in answers:
            assert answer["valid"] == (answer["output"] is not None)
            assert answer["valid"] or answer["errors"]
            if answer["valid"]:
                assert not list(VALIDATOR.iter_errors(answer["output"]))
    else:
        assert json.loads(outputs[0].read_text(encoding="utf-8"))["n"] == case["records"]
    if case["warning"] is None:
        assert "WARNING" not in caplog.text
    else:
        assert case["warning"] in caplog.text


# -- translate REQUEST ----------------------------------------------------------------------------


@pytest.mark.parametrize("case", cases("translate"))
def test_translate_request(case, capsys, caplog, tiny_model_dir):
    # What Python makes of command-line bytes: UTF-8, undecodable bytes as lone surrogates.
    request = (HOSTILE / case["path"]).read_bytes().decode("utf-8", "surrogateescape")
    argv = ["--model", tiny_model_dir, "--max-new-tokens", 8, *case.get("args", []), "--", request]
    with caplog.at_level(logging.WARNING):
        code, out, err = run(capsys, translate.main, argv)

    if case["outcome"] == "error":
        assert code == case["exit_code"] and out == ""
        assert err.startswith(f"error: {case['message']}") and err.count("\n") == 1
        return

    assert code in case["exit_codes"]
    if code == 0:
        assert not list(VALIDATOR.iter_errors(json.loads(out)))
    else:  # the structured error, after the model-loading progress bar
        assert out == ""
        found = find_json_object(err)
        assert found is not None and err[found[2] :].strip() == ""
        error = found[0]
        assert set(error) == {"error", "checks", "raw_output"} and error["checks"]["valid"] is False
    if case["warning"] is not None:
        assert case["warning"] in caplog.text


def test_a_failed_write_leaves_no_partial_file(capsys, tmp_path):
    """The report is written through a temporary file: a failing write leaves nothing behind."""
    target = tmp_path / "report.json"
    target.mkdir()  # os.replace cannot put a file there
    (target / "kept.txt").write_text(PREVIOUS)
    source = HOSTILE / "predictions" / "utf8_bom.jsonl"
    code, out, err = run(capsys, evaluate.main, ["--predictions", source, "--output", target])
    assert code == 1 and out == "" and err.startswith("error: IsADirectoryError") and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]
    assert (target / "kept.txt").read_text() == PREVIOUS
