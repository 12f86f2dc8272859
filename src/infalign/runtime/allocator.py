"""glibc malloc settings for the trainer, applied once at start-up by `train.py` (opt out: INFALIGN_MALLOC_TUNING=0).

Why: an RL iteration allocates and frees the same large tensors over and over (logits, activations and
their gradients, each tens to hundreds of MiB). glibc serves any block above its mmap threshold (dynamic,
at most 32 MiB) with fresh pages from mmap and gives them back with munmap on free, so the kernel faults
in and zeroes those pages again on every use. Measured on the benchmark setting of docs/benchmarks.md,
section 3 (1 thread): 25% of TRL's CPU time per iteration is such kernel time, 12% of ours; with the
thresholds raised, freed blocks stay in the heap for the next iteration: ours 0.88 -> 0.30 s kernel time.
The cost: the process keeps its peak heap between iterations instead of returning it to the system (peak
RSS there: 1.45 -> 1.61 GB).

Equivalent environment: MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=1073741824. Settings the
user made (those variables, or GLIBC_TUNABLES) are left alone. Not glibc (macOS, musl): nothing happens.
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


def tune_malloc(threshold: int = THRESHOLD) -> bool:
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
    ok = mallopt(M_MMAP_THRESHOLD, threshold) == 1 and mallopt(M_TRIM_THRESHOLD, threshold) == 1
    log.debug("glibc mallopt mmap/trim thresholds = %d: %s", threshold, "set" if ok else "refused")
    return ok
