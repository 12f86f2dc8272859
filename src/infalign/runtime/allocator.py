"""glibc malloc settings for the trainer, applied once at start-up by `train.py` (opt out: INFALIGN_MALLOC_TUNING=0).

An RL iteration allocates and frees the same large tensors over and over. glibc serves a block above its mmap
threshold (at most 32 MiB) with fresh pages and unmaps them on free, so the kernel faults in and zeroes them again
on every use; with the thresholds raised, freed blocks stay in the heap for the next iteration (docs/benchmarks.md,
section 3: kernel time per iteration 0.88 -> 0.30 s; the cost, peak RSS kept: 1.45 -> 1.61 GB). Equivalent to
MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=1073741824; settings the user made (those variables, or
GLIBC_TUNABLES) win. Not glibc (macOS, musl): nothing happens.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

__all__ = ["tune_malloc", "THRESHOLD"]

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from glibc's <malloc.h>
THRESHOLD = 1 << 30  # 1 GiB: larger than any single tensor of the default runs; mallopt takes an int
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def tune_malloc() -> bool:
    """Raise glibc's mmap and trim thresholds in this process; True if they were set."""
    if os.environ.get("INFALIGN_MALLOC_TUNING", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if any(k in os.environ for k in USER_SETTINGS):
        return False  # the user chose the allocator settings: theirs win
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 (raises AttributeError unless this is glibc)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(M_MMAP_THRESHOLD, THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, THRESHOLD) == 1
    log.debug("glibc mallopt mmap/trim thresholds = %d: %s", THRESHOLD, "set" if ok else "refused")
    return ok
