"""A process's own memory: what a long-running generation actor reports and hands back."""
from __future__ import annotations

import os


def release_free_memory() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Freed sample buffers otherwise stay in the allocator's arenas (one per thread: the decode
    loop and the writer), so a long-running actor's RSS would creep with fragmentation even
    though nothing is kept; trimming after each shard keeps RSS equal to what is live.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def current_rss_mb() -> float:
    """Private (anonymous) resident memory of this process now, MiB: resident minus shared pages
    (Linux /proc; elsewhere the peak RSS). Shared pages — libraries, and in a Ray worker the
    memory-mapped object store — are left out: they are not this process' working set."""
    try:
        with open("/proc/self/statm") as f:
            fields = f.read().split()
        pages = int(fields[1]) - int(fields[2])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
