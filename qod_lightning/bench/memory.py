"""Memory probes of a benchmark process: resident set now and at its peak, from /proc and getrusage."""

from __future__ import annotations

import ctypes
import gc
import re
import resource
from contextlib import suppress
from pathlib import Path

RSS_METHOD = (
    "peak_rss_mb: VmHWM of the stage's own process, reset through /proc/self/clear_refs when the stage clock "
    "starts, after malloc_trim(0) returned warm-up's freed heap to the OS (so it is the highest resident set "
    "while the stage ran: weights + training); process_peak_rss_mb: "
    "getrusage(RUSAGE_SELF).ru_maxrss of that process (includes imports, model loading and warm-up)"
)
"""How peak memory is measured, recorded in every result."""


def _status_kb(name: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    found = re.search(rf"^{name}:\s+(\d+) kB", text, re.MULTILINE)
    return int(found.group(1)) if found else None


def release_free_memory() -> None:
    """Hand memory that ``free`` kept in the C heap back to the OS (glibc ``malloc_trim``; no-op elsewhere).

    Without it the heap still holds what warm-up freed, and the RSS of the stage that follows starts
    at warm-up's peak whatever the stage itself needs.
    """
    gc.collect()
    with suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux); ``False`` when not possible."""
    release_free_memory()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_mb() -> float:
    """Highest resident set since the last :func:`reset_peak_rss` (or since start), in MiB."""
    kb = _status_kb("VmHWM")
    return kb / 1024 if kb is not None else process_peak_rss_mb()


def current_rss_mb() -> float:
    """Resident set now, in MiB."""
    kb = _status_kb("VmRSS")
    return kb / 1024 if kb is not None else float("nan")


def process_peak_rss_mb() -> float:
    """Highest resident set of this process over its whole life, in MiB (``ru_maxrss``)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
