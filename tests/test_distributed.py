"""hvp.distributed on a LocalCluster of two worker processes, against the single-process results.

The single-process operators and optimizers are checked against independent oracles in
test_operators.py, test_kfac.py and test_newton_cg.py; here the sharded versions must give the
same numbers (to 1e-12 in float64) whatever the shards and wherever they live, the same
optimizer iterates, and a clear error or a correct result when a worker dies mid-product.
"""

import os
import signal
import sys
import threading
import time

import numpy as np
import pytest
from conftest import make_problem

pytest.importorskip("distributed", reason="hvp.distributed needs dask and distributed (the test extra has them)")
da = pytest.importorskip("dask.array", reason="hvp.distributed needs dask[array] (the test extra has it)")
import cloudpickle  # noqa: E402  (comes with distributed)
from distributed import Client, LocalCluster  # noqa: E402

import hvp  # noqa: E402
import hvp.distributed as hd  # noqa: E402
import optimizers  # noqa: E402

# The loaders below run on the workers, which cannot import this test module: send them by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

SPLITS = [(0, 3), (3, 4), (4, 9), (9, 11)]  # four shards of unequal size
OPERATORS = {"hessian": (hd.HessianOperator, hvp.HessianOperator), "ggn": (hd.GGNOperator, hvp.GGNOperator),
             "ef": (hd.EmpiricalFisherOperator, hvp.EmpiricalFisherOperator)}


def _cluster():
    return LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                        silence_logs=50)


@pytest.fixture(scope="module")
def client():
    with _cluster() as cluster, Client(cluster) as c:
        yield c


def _close(got, want, rtol=1e-12):
    want = np.asarray(want)
    assert np.max(np.abs(want)) > 0
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.max(np.abs(want)))


PROBLEMS = {
    "tanh-mlp_ce-mean": dict(spec=("lin:3:5", "tanh", "lin:5:3"), kind="ce_labels", reduction="mean"),
    "sigmoid-mlp_mse-sum": dict(spec=("lin:3:4", "sigmoid", "lin:4:2"), kind="mse", reduction="sum"),
    "softplus-mlp_mse-mean": dict(spec=("lin:3:4", "softplus", "lin:4:4", "tanh", "lin:4:2"), kind="mse",
                                  reduction="mean"),
}


@pytest.fixture(params=list(PROBLEMS), ids=list(PROBLEMS))
def problem(request):
    return make_problem(batch=SPLITS[-1][1], seed=3, **PROBLEMS[request.param])


def _load_rows(args):
    """A loader as users write one (it would read a file): here it takes its rows of the arrays it is sent."""
    X, y, start, stop = args
    return X[start:stop].copy(), y[start:stop].copy()


def shards_of(client, pr, how):
    batches = [(pr.X[a:b], pr.y[a:b]) for a, b in SPLITS]
    if how == "batches":
        return hd.ShardedData.from_batches(client, batches)
    if how == "loader":
        return hd.ShardedData.from_loader(client, _load_rows, [(pr.X, pr.y, a, b) for a, b in SPLITS])
    chunks = tuple(b - a for a, b in SPLITS)
    return hd.ShardedData.from_dask_arrays(client, da.from_array(pr.X, chunks=(chunks, -1)),
                                           da.from_array(pr.y, chunks=(chunks,) + (-1,) * (pr.y.ndim - 1)))


# -- operators ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["batches", "loader", "dask-arrays"])
@pytest.mark.parametrize("kind", list(OPERATORS))
def test_operator_equals_the_single_process_one(client, problem, kind, how):
    data = shards_of(client, problem, how)
    assert data.shard_sizes == [b - a for a, b in SPLITS] and len(data.groups) == 2
    sharded, local = OPERATORS[kind]
    A = sharded(problem.net, problem.loss, problem.theta, data, l2=0.3)
    B = local(problem.net, problem.loss, problem.theta, (problem.X, problem.y), l2=0.3)
    V = np.random.default_rng(1).standard_normal((problem.P, 3))
    _close(A @ V, B @ V)
    _close(A.matvec(V[:, 0]), B.matvec(V[:, 0]))
    _close(A.grad, B.grad)
    assert A.loss == pytest.approx(B.loss, rel=1e-12)
    assert A.num_examples == problem.B


def test_uncached_operator_equals_the_cached_one(client, problem):
    data = shards_of(client, problem, "batches")
    V = np.random.default_rng(2).standard_normal((problem.P, 2))
    cached = hd.HessianOperator(problem.net, problem.loss, problem.theta, data)
    fresh = hd.HessianOperator(problem.net, problem.loss, problem.theta, data, cache=False)
    _close(fresh @ V, cached @ V, rtol=1e-14)


@pytest.mark.parametrize("kind", ["exact", "empirical"])
def test_kfac_operator_equals_the_single_process_one(client, problem, kind):
    data = shards_of(client, problem, "loader")
    A = hd.KFACOperator(problem.net, problem.loss, problem.theta, data, kind=kind, l2=0.1)
    B = hvp.KFACOperator(problem.net, problem.loss, problem.theta, (problem.X, problem.y), kind=kind, l2=0.1)
    for (A1, G1), (A2, G2) in zip(A.factors, B.factors, strict=True):
        _close(A1, A2)
        _close(G1, G2)
    V = np.random.default_rng(3).standard_normal((problem.P, 2))
    _close(A.inverse(0.5) @ V, B.inverse(0.5) @ V)


def test_mc_kfac_operator_is_seeded(client, problem):
    data = shards_of(client, problem, "batches")
    first, again, other = (hd.KFACOperator(problem.net, problem.loss, problem.theta, data, kind="mc", seed=s)
                           for s in (4, 4, 5))
    np.testing.assert_array_equal(first.factors[-1][1], again.factors[-1][1])
    assert not np.allclose(first.factors[-1][1], other.factors[-1][1])


def test_convolutional_network(client):
    rng = np.random.default_rng(4)
    net = hvp.Sequential(hvp.Conv2d(2, 3, 3, padding=1), hvp.Tanh(), hvp.MaxPool2d(2), hvp.Flatten(),
                         hvp.Linear(12, 3))
    X, y = rng.standard_normal((11, 2, 4, 4)), rng.integers(0, 3, 11)
    loss, theta = hvp.CrossEntropyLoss(), net.init(seed=1)
    data = hd.ShardedData.from_batches(client, [(X[a:b], y[a:b]) for a, b in SPLITS])
    V = rng.standard_normal((net.num_params, 2))
    _close(hd.HessianOperator(net, loss, theta, data) @ V, hvp.HessianOperator(net, loss, theta, (X, y)) @ V)


def test_estimators_and_scipy_take_the_operators(client, problem):
    from scipy.sparse.linalg import cg

    data = shards_of(client, problem, "batches")
    A = hd.GGNOperator(problem.net, problem.loss, problem.theta, data, l2=0.5)
    B = hvp.GGNOperator(problem.net, problem.loss, problem.theta, (problem.X, problem.y), l2=0.5)
    _close(hvp.curvature.eigenvalues(A, k=2).values, hvp.curvature.eigenvalues(B, k=2).values, rtol=1e-9)
    _close(cg(A, problem.theta, maxiter=8)[0], cg(B, problem.theta, maxiter=8)[0], rtol=1e-9)


def test_linearization_pieces_equal_the_single_process_ones(client, problem):
    data = shards_of(client, problem, "dask-arrays")
    pt = data.linearize(problem.net, problem.loss, problem.theta, l2=0.2)
    lp = hvp.linearize(problem.net, problem.loss, problem.theta, problem.X, problem.y, l2=0.2)
    V = np.random.default_rng(5).standard_normal((problem.P, 2))
    _close(pt.sum_grad_squared(), lp.sum_grad_squared())
    _close(pt.ggn_quadratic(V), lp.ggn_quadratic(V))
    other = problem.theta + 0.3 * V[:, 0]
    assert pt.loss_at(other) == pytest.approx(lp.loss_at(other), rel=1e-12)
    assert pt.loss_at(np.full(problem.P, np.inf)) == np.inf
    assert (pt.num_examples, pt.num_outputs) == (lp.num_examples, lp.num_outputs)


# -- optimizers ---------------------------------------------------------------------------------------------

OPTIMIZERS = {
    "newton-cg_ggn_kfac-preconditioned": lambda net, loss, theta: optimizers.NewtonCG(net, loss, theta, l2=1e-2),
    "newton-cg_hessian_diag-preconditioned": lambda net, loss, theta: optimizers.NewtonCG(
        net, loss, theta, curvature="hessian", precondition="diag", l2=1e-2),
    "kfac_exact": lambda net, loss, theta: optimizers.KFAC(net, loss, theta, kind="exact", l2=1e-2),
}


@pytest.mark.parametrize("make", list(OPTIMIZERS.values()), ids=list(OPTIMIZERS))
def test_optimizer_iterates_equal_the_single_process_ones(client, make):
    pr = make_problem(("lin:3:6", "tanh", "lin:6:3"), kind="ce_labels", batch=SPLITS[-1][1], seed=6)
    data = shards_of(client, pr, "loader")
    sharded, local = make(pr.net, pr.loss, pr.theta), make(pr.net, pr.loss, pr.theta)
    for _ in range(6):
        a, b = sharded.step(data), local.step(pr.X, pr.y)
        assert a["accepted"] == b["accepted"] and a["products"] == b["products"]
        _close(sharded.theta, local.theta, rtol=1e-10)
    assert sharded.history[-1]["loss"] < 0.9 * sharded.history[0]["loss"]


def test_kfac_with_sampled_factors_is_reproducible_on_sharded_data(client):
    pr = make_problem(("lin:3:6", "tanh", "lin:6:3"), kind="ce_labels", batch=SPLITS[-1][1], seed=6)
    data = shards_of(client, pr, "batches")
    runs = [optimizers.KFAC(pr.net, pr.loss, pr.theta, l2=1e-2) for _ in range(2)]
    for opt in runs:
        opt.minimize(data, max_iters=5, gtol=0)
    np.testing.assert_array_equal(runs[0].theta, runs[1].theta)
    assert runs[0].history[-1]["trial_loss"] < 0.9 * runs[0].history[0]["loss"]


def test_optimizer_checkpoint_resumes_on_sharded_data(client, tmp_path):
    pr = make_problem(("lin:3:6", "tanh", "lin:6:3"), kind="ce_labels", batch=SPLITS[-1][1], seed=7)
    data = shards_of(client, pr, "batches")
    straight = optimizers.NewtonCG(pr.net, pr.loss, pr.theta)
    straight.minimize(data, max_iters=4, gtol=0)
    first = optimizers.NewtonCG(pr.net, pr.loss, pr.theta)
    first.minimize(data, max_iters=2, gtol=0)
    first.save(tmp_path / "opt.npz")
    resumed = optimizers.NewtonCG.load(tmp_path / "opt.npz", pr.net, pr.loss)
    result = resumed.minimize(data, max_iters=2, gtol=0)
    np.testing.assert_array_equal(resumed.theta, straight.theta)
    assert result.fun == pytest.approx(pr.loss_and_grad(resumed.theta)[0], rel=1e-12)


# -- bad input ----------------------------------------------------------------------------------------------


def test_bad_input_gets_clear_errors(client):
    pr = make_problem(("lin:3:4", "tanh", "lin:4:2"), kind="mse", batch=SPLITS[-1][1], seed=8)
    data = shards_of(client, pr, "batches")
    with pytest.raises(TypeError, match="data must be an hvp.distributed.ShardedData"):
        hd.GGNOperator(pr.net, pr.loss, pr.theta, (pr.X, pr.y))
    with pytest.raises(TypeError, match="shards must be Dask futures"):
        hd.ShardedData(client, [(pr.X, pr.y)])
    with pytest.raises(ValueError, match="shard 1 must hold X of shape"):
        hd.ShardedData.from_batches(client, [(pr.X, pr.y), (pr.X[:3], pr.y[:2])])
    with pytest.raises(ValueError, match="shard 0: X must have 3 features"):
        hd.ShardedData.from_batches(client, [(pr.X[:, :2], pr.y)]).linearize(pr.net, pr.loss, pr.theta)
    with pytest.raises(TypeError, match="loader must be callable"):
        hd.ShardedData.from_loader(client, "load.npz", [1])
    with pytest.raises(TypeError, match="X must be a dask.array.Array"):
        hd.ShardedData.from_dask_arrays(client, pr.X, da.from_array(pr.y))
    with pytest.raises(ValueError, match=rf"v must have shape \({pr.P},\)"):
        hd.HessianOperator(pr.net, pr.loss, pr.theta, data).matvec(np.ones(pr.P + 1))
    with pytest.raises(TypeError, match="curvature_batch needs the batch on this machine"):
        optimizers.NewtonCG(pr.net, pr.loss, pr.theta, curvature_batch=2).step(data)
    with pytest.raises(TypeError, match="and no y"):
        optimizers.NewtonCG(pr.net, pr.loss, pr.theta).step(pr.X)


# -- a worker lost mid-product ----------------------------------------------------------------------------------


def _kill_a_worker_during(client, compute):
    """Run compute() in a thread; SIGKILL the first worker seen running one of its product tasks; its result."""
    pids = client.run(os.getpid)
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("result", _capture(compute)))
    thread.start()
    killed = None
    deadline = time.monotonic() + 60
    while killed is None and thread.is_alive() and time.monotonic() < deadline:
        for address, keys in client.processing().items():
            if any(str(key).startswith("_group_sum") for key in keys):
                os.kill(pids[address], signal.SIGKILL)
                killed = address
                break
        time.sleep(0.002)
    thread.join(120)
    assert killed is not None, "the product ended before a worker could be stopped"
    return out["result"]


def _capture(compute):
    try:
        return compute()
    except Exception as e:  # handed to the test thread
        return e


def _big_problem():
    rng = np.random.default_rng(9)
    net = hvp.Sequential(hvp.Linear(40, 300), hvp.Tanh(), hvp.Linear(300, 300), hvp.Tanh(), hvp.Linear(300, 10))
    X, y = rng.standard_normal((16000, 40)), rng.integers(0, 10, 16000)
    return net, hvp.CrossEntropyLoss(), net.init(seed=2), X, y


def test_worker_lost_mid_product_is_recomputed():
    net, loss, theta, X, y = _big_problem()
    V = np.random.default_rng(10).standard_normal((net.num_params, 4))
    want = hvp.HessianOperator(net, loss, theta, (X, y)) @ V
    with _cluster() as cluster, Client(cluster) as c:
        data = hd.ShardedData.from_loader(c, _load_rows, [(X, y, a, a + 4000) for a in range(0, 16000, 4000)])
        H = hd.HessianOperator(net, loss, theta, data)
        got = _kill_a_worker_during(c, lambda: H @ V)
    assert not isinstance(got, Exception), got
    _close(got, want, rtol=1e-11)


@pytest.mark.parametrize("how", ["loader", "batches"])
def test_products_cancelled_in_flight_are_submitted_again(client, problem, how, monkeypatch):
    """A worker's loss may cancel the tasks in flight (dask: "lost dependencies", "already forgotten"): θ is sent
    again, the shards linearized again and the product submitted once more, with the same result."""
    from distributed.client import FutureCancelledError

    data = shards_of(client, problem, how)
    A = hd.HessianOperator(problem.net, problem.loss, problem.theta, data, l2=0.3)
    B = hvp.HessianOperator(problem.net, problem.loss, problem.theta, (problem.X, problem.y), l2=0.3)
    V = np.random.default_rng(5).standard_normal((problem.P, 2))
    gather, calls = client.gather, []

    def cancel_the_first(futures):
        calls.append(len(futures))
        if len(calls) == 1:
            raise FutureCancelledError("_group_sum-0", reason="lost dependencies")
        return gather(futures)

    monkeypatch.setattr(client, "gather", cancel_the_first)
    _close(A @ V, B @ V)
    assert calls == [2, 2]  # one task per worker, twice


def test_worker_lost_with_shards_sent_from_here_is_a_clear_error():
    net, loss, theta, X, y = _big_problem()
    V = np.random.default_rng(11).standard_normal((net.num_params, 4))
    with _cluster() as cluster, Client(cluster) as c:
        data = hd.ShardedData.from_batches(c, [(X[a:a + 4000], y[a:a + 4000]) for a in range(0, 16000, 4000)])
        H = hd.HessianOperator(net, loss, theta, data)
        got = _kill_a_worker_during(c, lambda: H @ V)
    assert isinstance(got, RuntimeError) and "cannot be recomputed" in str(got), got
