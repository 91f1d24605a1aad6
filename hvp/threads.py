"""Chunks of examples spread over as many threads as numpy's BLAS uses, the BLAS on one thread meanwhile.

Convolutions loop over chunks of a few examples: patches copied while in cache, then small matrix
products (:mod:`hvp.layers.patches`). OpenBLAS threads each small product over the cores, while the
copies between them run on one core. Giving each core whole chunks instead, with OpenBLAS told to use
one thread while they run, keeps every core busy: 1.7× on a 16-channel 3×3 convolution at batch 128 on
2 cores.

OpenBLAS is found among the libraries loaded in this process (``/proc/self/maps``), as numpy's wheels
bundle it; with another BLAS, or where the BLAS uses one thread (``OPENBLAS_NUM_THREADS=1``), chunks run
one after another in the calling thread. While chunks run, other threads of the process that call the
BLAS get one thread too.
"""

import ctypes
import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait

_lock = threading.Lock()
_state = {"active": 0, "threads": 1}  # sections running, and the BLAS's thread count before the first of them
_executors = {}  # (process id, threads) -> ThreadPoolExecutor; a forked child makes its own
_NOT_FOUND = object()
_blas = _NOT_FOUND


def _find_openblas():
    """``(get_num_threads, set_num_threads)`` of the OpenBLAS loaded in this process (numpy's first, where scipy
    brings its own), or None."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.lower() and "/" in line}
    except OSError:
        return None
    paths = sorted(paths, key=lambda path: ("numpy" not in path, path))
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix, suffix in (("scipy_", "64_"), ("scipy_", ""), ("", "64_"), ("", "")):
            get = getattr(lib, f"{prefix}openblas_get_num_threads{suffix}", None)
            set_ = getattr(lib, f"{prefix}openblas_set_num_threads{suffix}", None)
            if get is not None and set_ is not None:
                get.restype, set_.argtypes = ctypes.c_int, [ctypes.c_int]
                return get, set_
    return None


def blas_threads():
    """The threads numpy's BLAS uses for one call: OpenBLAS's own count (outside a section of
    :func:`map_chunks`), or 1 where the BLAS cannot be told."""
    global _blas
    if _blas is _NOT_FOUND:
        _blas = _find_openblas()
    if _blas is None:
        return 1
    with _lock:
        return _state["threads"] if _state["active"] else _blas[0]()


_inside = threading.local()  # set in a thread while it runs chunks: a map_chunks there runs in that thread


def _run(fn, chunks):
    _inside.active = True
    try:
        return [fn(c) for c in chunks]
    finally:
        _inside.active = False


def map_chunks(fn, chunks, threads=None):
    """``[fn(c) for c in chunks]``, in order; the calls spread over ``threads`` threads (default
    :func:`blas_threads`; the calling one among them), a run of consecutive chunks each, the BLAS on one thread
    while they run. ``fn`` must write only what belongs to its chunk."""
    threads = min(blas_threads() if threads is None else threads, len(chunks))
    nested = getattr(_inside, "active", False)  # inside a chunk: the outer call has the threads
    if threads < 2 or nested or not isinstance(_blas, tuple):  # no BLAS this module can tell
        return [fn(c) for c in chunks]
    get, set_ = _blas
    with _lock:
        if not _state["active"]:
            _state["threads"] = get()
            set_(1)
        _state["active"] += 1
        key = (os.getpid(), threads)
        if key not in _executors:
            _executors[key] = ThreadPoolExecutor(threads - 1, thread_name_prefix="hvp-chunks")
        executor = _executors[key]
    try:  # contiguous runs of chunks, one per thread, the calling thread's among them
        runs = [chunks[i * len(chunks) // threads:(i + 1) * len(chunks) // threads] for i in range(threads)]
        others = [executor.submit(_run, fn, run) for run in runs[1:]]
        try:
            results = _run(fn, runs[0])
        finally:
            wait(others)  # no chunk left running once this returns or raises
        for future in others:
            results += future.result()
        return results
    finally:
        with _lock:
            _state["active"] -= 1
            if not _state["active"]:
                set_(_state["threads"])
