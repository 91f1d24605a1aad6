"""Keep freed array memory in the process, so that the next product does not fault it back in.

Every product allocates fresh (B, n) arrays. glibc hands blocks of 128 kB and more back to
the operating system when numpy frees them (it unmaps them, or trims the top of the heap),
and the next array of that size is faulted in again one 4 kB page at a time. On a batch of
a few hundred rows this costs more than the arithmetic: ``1 - y*y`` on a (1437, 128)
float64 array takes 1.2 ms fresh and 0.05 ms with its memory kept, and a gradient of the
digits MLP of ``benchmarks/optimizers.py`` on its 1,437 rows falls from 6.7 ms to 3.7 ms.

:func:`reuse_freed_memory` raises glibc's two thresholds (``mallopt``) so that freed blocks
stay in the heap for reuse. It changes the whole process, which is why it is a call and not
a side effect of ``import hvp``. The same holds from the shell with
``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824``.
"""

import ctypes
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h>
MAX_MMAP_THRESHOLD = 32 * 2**20  # glibc's ceiling on 64-bit systems (HEAP_MAX_SIZE / 2)


def _glibc():
    """The C library if it is glibc, else None."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None)
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None


def reuse_freed_memory(max_block=MAX_MMAP_THRESHOLD, keep=2**30):
    """Make glibc keep freed memory for reuse instead of returning it to the operating system.

    Parameters
    ----------
    max_block : int
        Blocks up to this many bytes come from the heap and are reused after ``free``
        (glibc's ``M_MMAP_THRESHOLD``; at most 32 MiB, glibc's ceiling). Larger blocks are
        still mapped and unmapped each time.
    keep : int
        Free memory at the top of the heap is returned to the system only beyond this many
        bytes (``M_TRIM_THRESHOLD``). The process's resident size stays near its peak.

    Returns
    -------
    bool
        True if applied; False where the C library is not glibc (macOS, Windows, musl), where
        there is nothing to change.
    """
    for name, value in (("max_block", max_block), ("keep", keep)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int number of bytes, got {type(value).__name__} {value!r}")
    if not 0 < max_block <= MAX_MMAP_THRESHOLD:
        raise ValueError(f"max_block must lie in (0, {MAX_MMAP_THRESHOLD}] bytes, got {max_block}")
    if not 0 <= keep < 2**31:  # mallopt takes a C int
        raise ValueError(f"keep must lie in [0, 2**31) bytes, got {keep}")
    libc = _glibc()
    if libc is None:
        return False
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(libc.mallopt(M_MMAP_THRESHOLD, max_block)) and bool(libc.mallopt(M_TRIM_THRESHOLD, keep))
