"""Opt-in process memory tuning, for processes quantlens owns (the CLI, benchmarks).

glibc raises its mmap threshold after large blocks are freed (up to 32 MiB), after which
activation-sized buffers come from the heap and stay in RSS when freed: a chunked sweep then grows
far past its cache bound. Fixing the threshold turns that adaptation off. The library never calls
this itself: changing the allocator of a process that merely imports quantlens (a notebook, the
Streamlit server) is not ours to do.
"""

from __future__ import annotations


def return_freed_memory_to_the_os(threshold_bytes: int = 1 << 20) -> bool:
    """Serve allocations above `threshold_bytes` with mmap (Linux/glibc; elsewhere a no-op).
    Returns whether the setting took effect."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_mmap_threshold = -3
        return bool(libc.mallopt(m_mmap_threshold, threshold_bytes))
    except (OSError, AttributeError):
        return False
