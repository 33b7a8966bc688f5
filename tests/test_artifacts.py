import errno
import shutil
from collections import namedtuple

import pytest

from qod_lightning.artifacts import check_writable


def test_check_writable_creates_the_directory_and_leaves_nothing(tmp_path):
    check_writable(tmp_path / "a" / "b", needed_bytes=1)
    assert list((tmp_path / "a" / "b").iterdir()) == []


def test_check_writable_refuses_a_path_under_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(PermissionError, match="cannot write to"):
        check_writable(tmp_path / "file" / "out", needed_bytes=1)


def test_check_writable_reports_a_full_disk(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 * 2**20, 9 * 2**20, 2**20))
    with pytest.raises(OSError, match="1 MiB free, about 64 MiB needed") as error:
        check_writable(tmp_path, needed_bytes=64 * 2**20)
    assert error.value.errno == errno.ENOSPC


def test_leftovers_of_an_interrupted_write_are_reported_and_removed(tmp_path, caplog):
    import logging

    from qod_lightning.artifacts import atomic_directory, atomic_write_text, is_complete

    (tmp_path / ".final.tmp-abc123").mkdir()  # what a crash mid-write leaves
    (tmp_path / ".final.tmp-abc123" / "adapter_model.safetensors").write_bytes(b"half")
    (tmp_path / ".report.json.tmp-xyz").write_text("{")
    with caplog.at_level(logging.WARNING), atomic_directory(tmp_path / "final") as out:
        (out / "x").write_text("x")
    atomic_write_text(tmp_path / "report.json", "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final", "report.json"]
    assert is_complete(tmp_path / "final")
    assert "interrupted write of" in caplog.text and ".final.tmp-abc123" in caplog.text


def test_a_stamp_lies_beside_its_artifact_and_is_none_until_written(tmp_path):
    from qod_lightning.artifacts import atomic_write_text, read_stamp, stamp_path

    assert stamp_path(tmp_path / "sft" / "final") == tmp_path / "sft" / "final.inputs"
    assert stamp_path(tmp_path / "reports" / "dpo+constrained.json") == tmp_path / "reports" / "dpo+constrained.inputs"
    assert read_stamp(stamp_path(tmp_path / "final")) is None
    atomic_write_text(stamp_path(tmp_path / "final"), "abc")
    assert read_stamp(tmp_path / "final.inputs") == "abc"


def test_the_inputs_digest_is_the_sha256_of_key_sorted_json():
    # The format of the stamps already on disk: a change here would redo every stage.
    import hashlib

    from qod_lightning.artifacts import inputs_digest

    expected = hashlib.sha256(b'{"a": null, "b": [["x", 1, 2]], "c": {"d": true}}').hexdigest()
    assert inputs_digest({"c": {"d": True}, "b": [("x", 1, 2)], "a": None}) == expected


def test_files_count_by_contents_and_directories_by_path_size_and_time(tmp_path):
    import hashlib
    import os

    from qod_lightning.artifacts import file_digests, files_fingerprint

    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    (model / "sub" / "w.bin").write_bytes(b"1234")
    (model / "a.json").write_text("{}")
    os.utime(model / "a.json", ns=(5, 7))
    fingerprint = files_fingerprint(model)
    assert [entry[:2] for entry in fingerprint] == [("a.json", 2), ("sub/w.bin", 4)]
    assert fingerprint[0][2] == 7
    assert files_fingerprint(tmp_path / "absent") == files_fingerprint(model / "a.json") == []
    data = model / "a.json"
    digest = hashlib.sha256(b"{}").hexdigest()
    assert file_digests([f"--data.init_args.train_file={data}", str(data), "--trainer.max_steps=2", "fit"]) == {
        str(data): digest
    }
