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
