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
