"""Give freed heap memory back to the operating system after a load.

Loading a checkpoint reads the whole file, unpacks and copies tensors, then frees the temporaries;
glibc keeps most of that freed heap in the process, so the resident size after loading a
DiT-XL/2-shaped W4A8 model stayed about 1 GB above what its tensors hold
(``benchmarks/resident_memory.py``). ``malloc_trim(0)`` returns it. A no-op where there is no glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from functools import lru_cache


@lru_cache(maxsize=1)
def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def release_freed_memory() -> None:
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
