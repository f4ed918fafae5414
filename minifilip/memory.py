"""Peak CPU memory of one call, measured: for the tutorials' memory plots (CMLI, gradient caching).

PyTorch keeps no allocator statistics on the CPU, so we ask the kernel. Linux tracks each process's resident-set
high-water mark (VmHWM in /proc/self/status) and lets the process reset it to the current size (writing "5" to
/proc/self/clear_refs). Before the call, glibc's `malloc_trim` hands freed heap pages back to the OS, so memory
freed by earlier work is not silently reused and hidden. The result, peak RSS during the call minus RSS before it,
counts every page the call touched: intermediates, saved activations, gradients, allocator overhead.
"""
from __future__ import annotations

import ctypes
import ctypes.util


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # the kernel reports kB
    raise OSError(f"{field} not in /proc/self/status")


def _release_free_heap() -> None:
    libc_name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(libc_name) if libc_name else None
    if libc is not None and hasattr(libc, "malloc_trim"):  # glibc only; elsewhere freed pages may be reused
        libc.malloc_trim(0)


def peak_memory_supported() -> bool:
    """True where `peak_extra_bytes` can measure (Linux with a writable /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _status_bytes("VmHWM")
        return True
    except OSError:
        return False


def peak_extra_bytes(fn) -> int:
    """Run fn() and return its peak resident memory above what was resident before, in bytes (Linux only)."""
    _release_free_heap()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current RSS
    before = _status_bytes("VmRSS")
    fn()
    return _status_bytes("VmHWM") - before
