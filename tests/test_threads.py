"""Chunks of examples on the BLAS's threads (hvp.threads): order, the BLAS's thread count put back, same numbers.

The whole suite runs with OPENBLAS_NUM_THREADS=1 (chunks in the calling thread) and 2 (chunks on two
threads); these tests check what that cannot: the state left behind and agreement between the two paths
in one process.
"""

import multiprocessing
import sys
import threading

import numpy as np
import pytest

import hvp
from hvp import threads


@pytest.fixture
def two_blas_threads():
    """OpenBLAS on two threads for the test (other tests, or examples they run, may have set it to one)."""
    threads.blas_threads()  # finds the BLAS
    if threads._blas is None:
        pytest.skip("numpy's BLAS is not an OpenBLAS this process can find")
    get, set_ = threads._blas
    before = get()
    set_(2)
    yield
    set_(before)


needs_openblas = pytest.mark.usefixtures("two_blas_threads")


@needs_openblas
def test_results_come_back_in_order_from_more_than_one_thread():
    names = set()

    def fn(i):
        names.add(threading.current_thread().name)
        np.ones((64, 64)) @ np.ones((64, 64))  # a little work, so that the threads overlap
        return i * i

    assert threads.map_chunks(fn, list(range(50))) == [i * i for i in range(50)]
    assert any(name.startswith("hvp-chunks") for name in names)


@needs_openblas
def test_the_blas_runs_on_one_thread_inside_and_gets_its_count_back():
    inside = threads.map_chunks(lambda _: threads._blas[0](), [0, 1, 2, 3])
    assert inside == [1, 1, 1, 1]
    assert threads.blas_threads() == threads._blas[0]() == 2


@needs_openblas
def test_the_count_comes_back_after_an_error_in_a_chunk():
    def fn(i):
        if i == 2:
            raise RuntimeError("chunk 2 failed")
        return i

    with pytest.raises(RuntimeError, match="chunk 2 failed"):
        threads.map_chunks(fn, [0, 1, 2, 3])
    assert threads._blas[0]() == 2


@needs_openblas
def test_sections_that_overlap_from_two_threads_leave_the_count_as_it_was():
    start = threading.Barrier(2)

    def section():
        start.wait()
        for _ in range(20):
            threads.map_chunks(lambda i: np.ones((32, 32)) @ np.ones((32, 32)), [0, 1, 2])

    workers = [threading.Thread(target=section) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert threads._blas[0]() == 2


@needs_openblas
def test_a_call_inside_a_chunk_runs_in_that_thread():
    def inner(i):
        return threading.current_thread().name

    def outer(i):
        names = threads.map_chunks(inner, [0, 1, 2, 3])
        assert len(set(names)) == 1 and names[0] == threading.current_thread().name
        return i

    result = []
    caller = threading.Thread(target=lambda: result.append(threads.map_chunks(outer, [0, 1, 2, 3])), daemon=True)
    caller.start()
    caller.join(timeout=60)  # without the rule, the inner call waits forever for the busy pool
    assert result == [[0, 1, 2, 3]]


def one_thread(monkeypatch):
    monkeypatch.setattr(hvp.Conv2d, "PARALLEL_BYTES", float("inf"))


def cnn():
    block = hvp.Residual(hvp.Conv2d(4, 4, 3, padding=1), hvp.ReLU(), hvp.Conv2d(4, 4, 3, padding=1))
    return hvp.Sequential(hvp.Conv2d(2, 4, 3, padding=1), hvp.Tanh(), block, hvp.MaxPool2d(2), hvp.Flatten(),
                          hvp.Linear(4 * 4 * 4, 3))


@needs_openblas
def test_convolutions_give_the_same_numbers_on_one_thread_and_on_several(monkeypatch):
    rng = np.random.default_rng(0)
    net, loss = cnn(), hvp.CrossEntropyLoss()
    theta, X, y = net.init(0), rng.normal(size=(40, 2, 8, 8)), rng.integers(0, 3, 40)
    v = rng.normal(size=net.num_params)
    monkeypatch.setattr(hvp.Conv2d, "CHUNK_BYTES", 1)  # one example per chunk: many chunks on each thread
    monkeypatch.setattr(hvp.Conv2d, "PARALLEL_BYTES", 0)  # and threads for products of any size

    def quantities():
        pt = hvp.linearize(net, loss, theta, X, y)
        return pt.grad, pt.hvp(v), pt.sum_grad_squared(), pt.diag_ggn(), pt.kfac(kind="exact").factors[0][0]

    several = quantities()
    one_thread(monkeypatch)
    for a, b in zip(several, quantities()):
        np.testing.assert_array_equal(a, b)  # the same products, and sums in the same order


def _forked_gradient(args):
    net, theta, X, y = args
    return hvp.loss_and_grad(net, hvp.CrossEntropyLoss(), theta, X, y)[1]


@pytest.mark.skipif(sys.platform != "linux", reason="fork")
def test_a_forked_process_runs_convolutions_after_its_parent_did():
    rng = np.random.default_rng(1)
    net = cnn()
    args = (net, net.init(0), rng.normal(size=(16, 2, 8, 8)), rng.integers(0, 3, 16))
    expected = _forked_gradient(args)  # the parent's threads exist before the fork
    with multiprocessing.get_context("fork").Pool(1) as pool:
        got = pool.apply_async(_forked_gradient, (args,)).get(timeout=60)
    np.testing.assert_array_equal(got, expected)
