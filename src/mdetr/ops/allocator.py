"""Keep freed memory in the process, so that large activations do not cost page faults at every call.

glibc's ``malloc`` hands a block above its mmap threshold (128 KiB, raised as blocks are freed, but never
above 32 MiB) to the kernel at ``free`` and asks it for fresh pages at the next ``malloc``; the first
write to each fresh 4 KiB page is a page fault. A detection model's activations pass 32 MiB from a few
images up (ResNet-18's first feature map for eight 320x480 images in float32 is 78 MiB), so every forward
pass then faults in every such buffer anew: a quarter of an official-MDETR CLEVR call of batch 8 on the
benchmark machine of BENCHMARKS.md (section 9). :func:`keep_freed_memory` raises both thresholds
with glibc's ``mallopt``, so that freed blocks stay in the process and are reused. The price is resident
memory: what a peak allocated stays held (up to the trim threshold beyond it) after the peak.

Other allocators (jemalloc, tcmalloc) do the same by design, but they are loaded with ``LD_PRELOAD``
before the process starts and do not install from PyPI; ``mallopt`` is glibc's own interface for this,
reached through ``ctypes`` because neither Python nor PyTorch exposes it.
"""

from __future__ import annotations

import ctypes
import os
import sys

__all__ = ["ALLOCATOR_ENV", "keep_freed_memory"]

_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers, glibc <malloc.h>
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 256 << 20
TRIM_THRESHOLD = 1 << 30

# Environment variables that can choose or tune the allocator; it is left alone where one of them does.
ALLOCATOR_ENV = ("LD_PRELOAD", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def _allocator_chosen() -> bool:
    """Whether the environment preloads another allocator (jemalloc, tcmalloc, mimalloc: each library's
    name has "malloc") or sets glibc's malloc thresholds or tunables."""
    env = os.environ
    return bool("malloc" in env.get("LD_PRELOAD", "") or env.get("MALLOC_MMAP_THRESHOLD_")
                or env.get("MALLOC_TRIM_THRESHOLD_") or "glibc.malloc." in env.get("GLIBC_TUNABLES", ""))


def keep_freed_memory(*, mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Serve blocks up to ``mmap_threshold`` bytes from the heap and return freed heap memory to the kernel
    only beyond ``trim_threshold`` bytes (glibc ``mallopt``), for the whole process, from now on; returns
    whether the setting took effect. It does nothing (and returns False) off Linux, on a C library other
    than glibc, and where the environment chooses the allocator (:data:`ALLOCATOR_ENV`: another allocator
    in ``LD_PRELOAD``, or glibc's malloc settings). The ``mdetr`` command calls it at start unless
    ``MDETR_KEEP_FREED_MEMORY=0``."""
    if not sys.platform.startswith("linux") or _allocator_chosen():
        return False
    libc = _glibc()
    if libc is None:
        return False
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    applied = mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1
    return mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1 and applied


def _glibc() -> ctypes.CDLL | None:
    """The process's own C library (the symbols already loaded: no library search), if it is glibc."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 (only glibc has it)
        libc.mallopt  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc
