"""Write artifacts atomically, and stamp each with a digest of its inputs so a stale one is redone.

An artifact is written to a temporary sibling first, then renamed into place
(:func:`atomic_directory`, :func:`atomic_write_text`). Its stamp, a file beside it
(:func:`stamp_path`), holds :func:`inputs_digest` of what it was made from; an artifact whose
stamp differs from the digest of the current inputs is out of date.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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


def stamp_path(artifact: str | Path) -> Path:
    """Where ``artifact``'s stamp goes: ``final`` -> ``final.inputs``, ``sft.json`` -> ``sft.inputs``."""
    return Path(artifact).with_suffix(".inputs")


def read_stamp(path: str | Path) -> str | None:
    """The stamp in the file ``path``, or ``None`` when there is none (an artifact made before stamps)."""
    path = Path(path)
    return path.read_text(encoding="utf-8") if path.is_file() else None


def inputs_digest(inputs: dict[str, Any]) -> str:
    """The SHA-256 of ``inputs`` as key-sorted JSON: the stamp of an artifact made from them.

    Args:
        inputs: Everything the artifact depends on, JSON-serializable (file contents as
            :func:`file_digests` or :func:`files_fingerprint`, settings as they are).

    Returns:
        64 hex digits.

    """
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def files_fingerprint(root: str | Path) -> list[tuple[str, int, int]]:
    """Path, size and modification time of every file under ``root`` (empty if it is no directory).

    A retrained adapter is a new file; hashing a base model's weights would cost seconds per run.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(
        (str(f.relative_to(root)), f.stat().st_size, f.stat().st_mtime_ns) for f in root.rglob("*") if f.is_file()
    )


def file_digests(values: list[str]) -> dict[str, str]:
    """The SHA-256 of each of ``values`` that names a file (an option's ``--key=value`` counts by value)."""
    digests = {}
    for value in values:
        path = Path(value.split("=", 1)[1] if value.startswith("--") and "=" in value else value)
        if path.is_file():
            digests[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


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
