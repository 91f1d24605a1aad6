"""Array memory kept for reuse, so that the speed of a product does not depend on the C library's allocator.

Every product allocates fresh (B, n) arrays. glibc hands blocks of 128 kB and more back to
the operating system when numpy frees them (it unmaps them, or trims the top of the heap),
and the next array of that size is faulted in again one 4 kB page at a time. On a batch of
a few hundred rows this costs more than the arithmetic: ``1 - y*y`` on a (1437, 128)
float64 array takes 1.2 ms fresh and 0.05 ms with its memory kept, and a gradient of the
digits MLP of ``benchmarks/optimizers.py`` on its 1,437 rows falls from 6.7 ms to 3.7 ms.

hvp therefore takes its large arrays (θ's copy, gradients, products, the arrays a linearization keeps,
layer outputs, tangents and adjoints) from :func:`empty` (and :func:`zeros`, :func:`copy`,
:func:`matmul`, :func:`multiply`), a pool of buffers handed out again once nothing refers to them:
the pool's own reference is then the only one (a view refers to its buffer through numpy's
``base``). An array the caller keeps is never reused; one the caller drops is reused by the next
call that needs an array of that size and dtype. The pool keeps at most ``POOL_BYTES`` of free
buffers; :func:`release_memory` hands them back.

:func:`reuse_freed_memory` instead raises glibc's two thresholds (``mallopt``) so that every freed
block, numpy's temporaries included, stays in the heap. hvp no longer needs it
(``benchmarks/allocator.py``); it helps code outside hvp, changes the whole process, which is why
it is a call and not a side effect of ``import hvp``. The same holds from the shell with
``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824``.
"""

import ctypes
import sys
import threading

import numpy as np

MIN_BYTES = 1 << 16  # smaller arrays come from numpy as usual: glibc keeps them in its heap
POOL_BYTES = 1 << 29  # at most this much free memory is kept
FREE_PER_SIZE = 16  # free buffers of one size kept once one of them is handed out again

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


_buffers = {}  # (size, dtype) -> 1-D arrays the pool owns; a buffer is free when only the pool refers to it
_lock = threading.Lock()


def _is_free(buffers, i):
    # References: the list's and getrefcount's argument. A view of the buffer refers to it (numpy's ``base``).
    return sys.getrefcount(buffers[i]) <= 2


def empty(shape, dtype):
    """An uninitialized C-contiguous array, from a buffer of the pool when one of this size is free.

    Parameters
    ----------
    shape : tuple of int
    dtype : numpy dtype

    Returns
    -------
    ndarray, shape ``shape``
        A view of a buffer the pool owns (a fresh array below ``MIN_BYTES`` or above ``POOL_BYTES``).
    """
    dtype = np.dtype(dtype)
    size = 1
    for n in shape:
        size *= int(n)
    if not MIN_BYTES <= size * dtype.itemsize <= POOL_BYTES:
        return np.empty(shape, dtype)
    with _lock:
        buffers = _buffers.setdefault((size, dtype), [])
        free = [i for i in range(len(buffers)) if _is_free(buffers, i)]
        if free:
            out = buffers[free[0]].reshape(shape)
            for i in reversed(free[FREE_PER_SIZE:]):  # results kept and then dropped: keep a few of them
                del buffers[i]
            return out
        if _free_bytes() + size * dtype.itemsize > POOL_BYTES:
            _drop_free()
            buffers = _buffers.setdefault((size, dtype), [])
        buffer = np.empty(size, dtype)
        buffers.append(buffer)
        return buffer.reshape(shape)


def zeros(shape, dtype):
    """:func:`empty`, filled with zeros."""
    out = empty(shape, dtype)
    out.fill(0)
    return out


def copy(a):
    """A C-contiguous copy of the array ``a`` from :func:`empty`."""
    out = empty(a.shape, a.dtype)
    out[...] = a
    return out


def multiply(a, b):
    """``a * b`` (numpy broadcasting) into an array from :func:`empty`."""
    shape = np.broadcast_shapes(np.shape(a), np.shape(b))
    return np.multiply(a, b, out=empty(shape, np.result_type(a, b)))


def matmul(a, b):
    """``a @ b`` (numpy's rules for stacks of matrices) into an array from :func:`empty`."""
    shape = np.broadcast_shapes(a.shape[:-2], b.shape[:-2]) + (a.shape[-2], b.shape[-1])
    return np.matmul(a, b, out=empty(shape, np.result_type(a, b)))


def _free_bytes():
    return sum(buffers[i].nbytes for buffers in _buffers.values() for i in range(len(buffers))
               if _is_free(buffers, i))


def _drop_free():
    for key in list(_buffers):
        buffers = _buffers[key]
        buffers[:] = [buffers[i] for i in range(len(buffers)) if not _is_free(buffers, i)]
        if not buffers:
            del _buffers[key]


def release_memory():
    """Return the pool's free buffers to the allocator; arrays still in use are not touched.

    Returns
    -------
    int
        The bytes released.
    """
    with _lock:
        released = _free_bytes()
        _drop_free()
    return released
