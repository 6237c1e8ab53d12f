"""CPU training speed: keep freed memory inside the process (Linux, glibc).

By default glibc serves large blocks with ``mmap`` and hands freed memory back to the kernel,
so every training step maps its activation buffers afresh and page-faults them in again.
Measured on this project's 2-core machine (kd step, width 1, batch 64, 2 threads): 60 -> 93
images/s in bf16 and 37 -> 58 in fp32. ``keep_freed_memory`` raises glibc's thresholds so
freed blocks stay in the heap for the next step; the process keeps its peak memory instead.
"""

from __future__ import annotations

import ctypes
import platform
import sys

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # from glibc's <malloc.h>
SETTINGS = {
    M_MMAP_THRESHOLD: 32 << 20,  # glibc's maximum: blocks up to 32 MiB come from the heap
    M_TRIM_THRESHOLD: 1 << 30,  # return memory to the kernel only beyond 1 GiB of free top
    M_TOP_PAD: 256 << 20,  # grow the heap in 256 MiB steps
}
_applied = False


def keep_freed_memory() -> bool:
    """Apply ``SETTINGS`` with ``mallopt`` once per process; True where glibc accepted them.

    A no-op (False) on other platforms and C libraries.
    """
    global _applied
    if _applied:
        return True
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    _applied = all(libc.mallopt(param, value) == 1 for param, value in SETTINGS.items())
    return _applied
