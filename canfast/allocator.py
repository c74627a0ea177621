"""Memory allocator settings for a process that canfast owns (the ``canfast`` command).

Torch's CPU tensors come from the C library's ``malloc``. glibc, by default, hands a freed block
above its mmap threshold straight back to the kernel and trims the top of the heap as soon as a
little of it is free. A scoring or sweep pass frees and allocates the same few hundred MB for
every batch, so the next batch gets fresh pages, and the kernel zeroes each one on its first
touch: tens of thousands of page faults per pass of a 50M-parameter model, a few percent of its
time, and a number that depends on the order in which tensors happen to be freed rather than on
the work (``bench/score_end_to_end.py`` applies the same settings to every path it times).

:func:`keep_freed_memory` keeps freed memory in the process instead. The cost is resident
memory: what a pass freed stays mapped for the next one. A library call never changes the
allocator of its caller's process; only the command line calls this.
"""

from __future__ import annotations

import ctypes
import sys

# mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

# Blocks up to this size come from the heap, never from a fresh mapping. glibc caps the
# threshold at 32 MiB on 64-bit systems (HEAP_MAX_SIZE / 2): larger blocks are mapped anyway.
MMAP_THRESHOLD = 32 << 20
# Free memory at the top of the heap kept before any of it goes back to the kernel.
TRIM_THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds for this process; False where they do not apply
    (not Linux, or a C library without ``mallopt``, such as musl)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success; setting either threshold also stops glibc from raising
    # them on its own, which is what lets a freed block be returned in the first place.
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
