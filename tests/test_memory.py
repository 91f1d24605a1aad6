"""hvp's pool of buffers (memory.empty), and reuse_freed_memory: repeated large arrays stop faulting pages in."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import hvp
from hvp import memory

POOL_FAULTS = textwrap.dedent("""
    import resource
    import numpy as np
    import hvp
    rng = np.random.default_rng(0)
    net = hvp.Sequential(hvp.Linear(64, 128), hvp.Tanh(), hvp.Linear(128, 64), hvp.Tanh(), hvp.Linear(64, 10))
    theta = net.init(seed=0)
    X, y = rng.random((1437, 64)), rng.integers(0, 10, 1437)  # the digits example's full batch
    v = rng.normal(size=net.num_params)
    loss = hvp.CrossEntropyLoss()

    def round():
        pt = hvp.linearize(net, loss, theta, X, y)
        pt.sum_grad_squared(), pt.diag_ggn(), pt.hvp(v), pt.kronecker_factors()

    for _ in range(3):  # warm-up
        round()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        round()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
""")


def run_fresh(code, *args):
    """Run ``code`` in a fresh interpreter with glibc's default thresholds: without the MALLOC_* variables that
    a library imported in this process may have set (dask's distributed sets ``MALLOC_TRIM_THRESHOLD_``)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("MALLOC_")}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True,
                          env=env).stdout


def address(a):
    return a.__array_interface__["data"][0]


def test_pool_hands_out_a_buffer_again_only_when_nothing_refers_to_it():
    first = memory.empty((300, 200), np.float64)
    part = first[10:20]
    del first
    second = memory.empty((200, 300), np.float64)  # same size: a new buffer, as the first is still seen by part
    assert not np.shares_memory(second, part)
    held = address(part.base)
    del part
    third = memory.empty((60000,), np.float64)
    assert address(third) == held
    assert third.flags.c_contiguous and third.shape == (60000,)
    fresh = memory.empty((60000,), np.float32)  # another dtype: another buffer
    assert address(fresh) != held


def test_release_memory_returns_free_buffers_only():
    kept = memory.empty((1000, 100), np.float64)
    memory.empty((1000, 101), np.float64)  # dropped at once: free
    released = memory.release_memory()
    assert released >= 1000 * 101 * 8
    assert memory.release_memory() == 0
    kept[...] = 1.0  # still ours
    assert memory.empty((1000, 100), np.float64).base is not kept.base


def test_results_the_caller_keeps_are_never_overwritten():
    """Two linearizations and their products alive at once: each keeps its own numbers."""
    rng = np.random.default_rng(0)
    net = hvp.Sequential(hvp.Linear(64, 128), hvp.Tanh(), hvp.Linear(128, 64), hvp.Tanh(), hvp.Linear(64, 10))
    X, y = rng.normal(size=(300, 64)), rng.integers(0, 10, 300)  # arrays of 64 kB and more: from the pool
    loss = hvp.CrossEntropyLoss()
    theta1, theta2 = net.init(seed=1), net.init(seed=2)
    v, w = rng.normal(size=net.num_params), rng.normal(size=(net.num_params, 3))
    pt1 = hvp.linearize(net, loss, theta1, X, y)
    grad1, hv1, sgs1 = pt1.grad, pt1.hvp(v), pt1.sum_grad_squared()
    copies = [a.copy() for a in (grad1, hv1, sgs1)]
    pt2 = hvp.linearize(net, loss, theta2, X, y)
    others = [pt2.hvp(v), pt2.hvp(w), pt1.hvp(w), pt2.sum_grad_squared(), pt1.diag_ggn(), pt2.grad]
    for a, b in zip((grad1, hv1, sgs1), copies):
        np.testing.assert_array_equal(a, b)
    assert not any(np.shares_memory(a, b) for a in (grad1, hv1, sgs1) for b in others)
    np.testing.assert_allclose(pt1.hvp(v), hv1, rtol=1e-10, atol=1e-14)
    assert not np.allclose(others[0], hv1)  # θ2 gives other numbers: the check above could fail


@pytest.mark.skipif(memory._glibc() is None, reason="the C library is not glibc")
def test_products_do_not_fault_pages_in_with_glibcs_default_allocator():
    """Counted minor page faults, not time: a full-batch linearization of the digits MLP (arrays of 0.3 to 1.5 MB)
    and four quantities per round, in a fresh process with glibc's default thresholds (which, without the pool,
    fault about 1,800 pages back in per round here)."""
    assert float(run_fresh(POOL_FAULTS)) < 100

FAULTS = textwrap.dedent("""
    import resource, sys
    import numpy as np
    import hvp
    if sys.argv[1] == "reuse":
        assert hvp.reuse_freed_memory()
    y = np.random.default_rng(0).random((1437, 128))
    for _ in range(5):  # warm-up
        1 - y * y
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(50):
        1 - y * y  # two 1.5 MB temporaries alive at once, then both freed
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


@pytest.mark.skipif(memory._glibc() is None, reason="the C library is not glibc")
def test_freed_temporaries_are_reused_without_page_faults():
    """Counted minor page faults, not time: 50 rounds of two 1.5 MB temporaries (360 pages each)."""
    def faults(mode):
        return int(run_fresh(FAULTS, mode))
    default, reuse = faults("default"), faults("reuse")
    assert default > 50 * 360  # glibc's default returns both blocks every round
    assert reuse < 0.02 * default


@pytest.mark.parametrize("kwargs, error, match", [
    ({"max_block": 0}, ValueError, "max_block must lie in"),
    ({"max_block": 64 * 2**20}, ValueError, "max_block must lie in"),
    ({"max_block": 1.5e6}, TypeError, "max_block must be an int"),
    ({"keep": -1}, ValueError, "keep must lie in"),
    ({"keep": 2**31}, ValueError, "keep must lie in"),
    ({"keep": True}, TypeError, "keep must be an int"),
], ids=["block_zero", "block_above_glibc_ceiling", "block_float", "keep_negative", "keep_beyond_c_int",
        "keep_bool"])
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        hvp.reuse_freed_memory(**kwargs)


def test_reports_whether_applied():
    assert hvp.reuse_freed_memory() is (memory._glibc() is not None)


def test_results_dropped_together_are_not_all_kept():
    kept = [memory.empty((70000,), np.float64) for _ in range(memory.FREE_PER_SIZE + 10)]
    del kept  # that many free buffers of one size
    memory.empty((70000,), np.float64)
    assert len(memory._buffers[(70000, np.dtype(np.float64))]) == memory.FREE_PER_SIZE
