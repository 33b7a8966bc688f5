"""Write artifacts atomically: to a temporary sibling first, then renamed into place."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

COMPLETE_MARKER = ".complete"
"""Written last into every artifact directory; a directory without it is incomplete."""

log = logging.getLogger(__name__)


def remove_leftovers(target: str | Path) -> list[Path]:
    """Report and delete what an interrupted write of ``target`` left beside it.

    A crash between creating the temporary sibling and renaming it leaves ``.NAME.tmp-*`` (or,
    mid-replacement, ``.NAME.old-*``); nothing ever reads them, but they hold disk space.

    Returns:
        The paths removed.
    """
    target = Path(target)
    found = sorted(target.parent.glob(f".{target.name}.tmp-*")) + sorted(target.parent.glob(f".{target.name}.old-*"))
    for leftover in found:
        log.warning("removing %s, left by an interrupted write of %s", leftover, target)
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
    return found


@contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``target`` only if the block succeeds.

    Args:
        target: The final directory.

    Yields:
        The temporary directory to write into (same filesystem, so the rename is atomic).

    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        (tmp / COMPLETE_MARKER).touch()
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def is_complete(directory: str | Path) -> bool:
    """Whether ``directory`` is a finished artifact written by :func:`atomic_directory`."""
    return (Path(directory) / COMPLETE_MARKER).is_file()


def check_writable(directory: str | Path, needed_bytes: int) -> None:
    """Fail early if ``directory`` cannot take ``needed_bytes`` of artifacts.

    Creates the directory, writes and removes a probe file, and compares the free space with the
    need, so that a training run learns about a read-only or full disk before hours of work
    rather than when it first saves.

    Args:
        directory: Where artifacts will be written.
        needed_bytes: A conservative estimate of what will be written there.

    Raises:
        PermissionError: The directory cannot be created or written.
        OSError: Not enough free space (``errno.ENOSPC``).

    """
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise PermissionError(f"cannot write to {directory}: {error.strerror or error}") from error
    free = shutil.disk_usage(directory).free
    if free < needed_bytes:
        raise OSError(
            errno.ENOSPC,
            f"{directory}: {free / 2**20:.0f} MiB free, about {needed_bytes / 2**20:.0f} MiB needed for adapters "
            "and checkpoints",
        )
