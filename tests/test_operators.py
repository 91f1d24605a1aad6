"""HessianOperator, GGNOperator, EmpiricalFisherOperator against dense oracles over a data set.

Oracles share no code with the operators: the Hessian is a central difference of
``hvp.loss_and_grad`` over the concatenated data, the GGN is ``oracles.ref_ggn`` (its own
forward pass, FD Jacobian, explicit loss Hessian), the empirical Fisher an explicit loop
of ``hvp.loss_and_grad`` over single examples with an unreduced ("sum") loss.
"""

import inspect

import numpy as np
import oracles
import pytest
from conftest import ARCHS, build_loss, make_problem
from scipy.sparse.linalg import LinearOperator, aslinearoperator, cg, eigsh, minres

import hvp

# SciPy < 1.12 names the relative tolerance of cg and minres tol; 1.14 removed that name.
_RTOL = "rtol" if "rtol" in inspect.signature(cg).parameters else "tol"

KINDS = {"hessian": hvp.HessianOperator, "ggn": hvp.GGNOperator, "ef": hvp.EmpiricalFisherOperator}
SPLITS = [(0, 2), (2, 5), (5, 9)]  # three batches of unequal size, 9 examples
OPERATOR_ARCHS = ["tanh_2-5-3", "tanh-sigmoid_3-4-3-2_mixedbias", "softplus_2-4-3", "lin4-3_nobias"]


def batches_of(pr):
    return [(pr.X[a:b], pr.y[a:b]) for a, b in SPLITS]


def loss_normalizer(pr):
    """N of the loss over all the data: B (cross-entropy mean), B·C (MSE mean), 1 (sum)."""
    if pr.reduction == "sum":
        return 1
    return pr.B * pr.C if pr.kind == "mse" else pr.B


def dense_oracle(kind, pr, l2):
    if kind == "hessian":
        H = oracles.fd_hessian_from_gradient(
            lambda t: hvp.loss_and_grad(pr.net, pr.loss, t, pr.X, pr.y, l2=l2)[1], pr.theta)
        return 0.5 * (H + H.T)
    if kind == "ggn":
        return oracles.ref_ggn(pr.layers, pr.theta, pr.X, pr.y, pr.kind, pr.reduction, l2)
    unreduced = build_loss(pr.kind, "sum")
    F = np.zeros((pr.P, pr.P))
    for n in range(pr.B):
        g = hvp.loss_and_grad(pr.net, unreduced, pr.theta, pr.X[n:n + 1], pr.y[n:n + 1])[1]
        F += np.outer(g, g)
    F /= loss_normalizer(pr)
    F[np.diag_indices_from(F)] += l2 * oracles.weight_mask(pr.layers)
    return F


def dense(op):
    return op.matmat(np.eye(op.shape[0], dtype=op.dtype))


@pytest.mark.parametrize("l2", [0.0, 0.3], ids=["l2=0", "l2=0.3"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss_kind", ["ce_labels", "ce_probs", "mse"])
@pytest.mark.parametrize("arch", OPERATOR_ARCHS)
@pytest.mark.parametrize("kind", list(KINDS))
def test_dataset_operator_matches_dense_oracle_of_all_data(kind, arch, loss_kind, reduction, l2):
    pr = make_problem(ARCHS[arch], loss_kind, reduction, batch=9, seed=3)
    op = KINDS[kind](pr.net, pr.loss, pr.theta, batches_of(pr), l2=l2)
    expected = dense_oracle(kind, pr, l2)
    scale = max(1.0, np.abs(expected).max())
    np.testing.assert_allclose(dense(op), expected, rtol=0, atol=2e-7 * scale)


@pytest.mark.parametrize("cache", [True, False], ids=["cached", "recomputed"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss_kind", ["ce_labels", "mse"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_dataset_operator_equals_one_batch_operator(kind, loss_kind, reduction, cache):
    pr = make_problem(ARCHS["tanh-sigmoid_3-4-3-2_mixedbias"], loss_kind, reduction, batch=9, seed=5)
    many = KINDS[kind](pr.net, pr.loss, pr.theta, batches_of(pr), l2=0.1, cache=cache)
    one = KINDS[kind](pr.net, pr.loss, pr.theta, (pr.X, pr.y), l2=0.1)
    V = np.random.default_rng(0).standard_normal((pr.P, 4))
    np.testing.assert_allclose(many @ V, one @ V, rtol=1e-12, atol=1e-13)
    assert many.num_examples == one.num_examples == 9 and many.batch_sizes == [2, 3, 4]
    # and both equal the engine's own single-batch products
    pt = hvp.linearize(pr.net, pr.loss, pr.theta, pr.X, pr.y, l2=0.1)
    if kind != "ef":
        product = pt.hvp if kind == "hessian" else pt.ggnvp
        np.testing.assert_allclose(one @ V, product(V), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_loss_and_grad_attributes_are_those_of_all_data(reduction):
    pr = make_problem(ARCHS["tanh_2-5-3"], "ce_labels", reduction, batch=9, seed=2)
    op = hvp.HessianOperator(pr.net, pr.loss, pr.theta, batches_of(pr), l2=0.2)
    loss, grad = hvp.loss_and_grad(pr.net, pr.loss, pr.theta, pr.X, pr.y, l2=0.2)
    assert op.loss == pytest.approx(loss, rel=1e-12)
    np.testing.assert_allclose(op.grad, grad, rtol=1e-12, atol=1e-14)


def test_empirical_fisher_scaling_between_reductions():
    """F(mean) = F(sum)/N: the same factor as the loss (N = B for cross-entropy, B·C for MSE)."""
    for loss_kind, N in (("ce_labels", 9), ("mse", 9 * 3)):
        mean = make_problem(ARCHS["tanh_2-5-3"], loss_kind, "mean", batch=9, seed=4)
        total = make_problem(ARCHS["tanh_2-5-3"], loss_kind, "sum", batch=9, seed=4)
        F_mean = dense(hvp.EmpiricalFisherOperator(mean.net, mean.loss, mean.theta, batches_of(mean)))
        F_sum = dense(hvp.EmpiricalFisherOperator(total.net, total.loss, total.theta, batches_of(total)))
        np.testing.assert_allclose(F_mean * N, F_sum, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("kind", list(KINDS))
def test_shapes_dtype_and_matvec_forms(kind):
    pr = make_problem(ARCHS["tanh_2-5-3"], "ce_labels", "mean", batch=9, seed=1, dtype=np.float32)
    op = KINDS[kind](pr.net, pr.loss, pr.theta, batches_of(pr))
    assert isinstance(op, LinearOperator)
    assert op.shape == (pr.P, pr.P) and op.dtype == np.float32
    V = np.random.default_rng(1).standard_normal((pr.P, 3))
    block = op.matmat(V)
    assert block.shape == (pr.P, 3) and block.dtype == np.float32
    for j in range(3):
        column = op.matvec(V[:, j])
        assert column.shape == (pr.P,) and column.dtype == np.float32
        np.testing.assert_allclose(column, block[:, j], rtol=1e-4, atol=1e-6)
    assert op.matmat(V[:, :1]).shape == (pr.P, 1)
    np.testing.assert_allclose(op.rmatvec(V[:, 0]), op.matvec(V[:, 0]))
    np.testing.assert_array_equal(op.H @ V, op @ V)
    assert "9 examples in 3 batches" in repr(op)


def test_float32_operator_close_to_float64():
    pr64 = make_problem(ARCHS["tanh_2-5-3"], "mse", "mean", batch=9, seed=1)
    op64 = hvp.HessianOperator(pr64.net, pr64.loss, pr64.theta, batches_of(pr64))
    op32 = hvp.HessianOperator(pr64.net, pr64.loss, pr64.theta.astype(np.float32),
                               [(X.astype(np.float32), y.astype(np.float32)) for X, y in batches_of(pr64)])
    H64 = dense(op64)
    np.testing.assert_allclose(dense(op32), H64, rtol=0, atol=1e-5 * np.abs(H64).max())


def test_scipy_eigsh_cg_minres_work_on_the_operators():
    pr = make_problem(ARCHS["tanh-sigmoid_3-4-3-2_mixedbias"], "ce_labels", "mean", batch=9, seed=7)
    G = hvp.GGNOperator(pr.net, pr.loss, pr.theta, batches_of(pr))
    H = hvp.HessianOperator(pr.net, pr.loss, pr.theta, batches_of(pr))
    Gd, Hd = dense(G), dense(H)
    top = eigsh(G, k=3, which="LA", return_eigenvectors=False, v0=np.ones(pr.P), tol=0)
    np.testing.assert_allclose(np.sort(top), np.linalg.eigvalsh(Gd)[-3:], rtol=1e-10)
    b = np.random.default_rng(0).standard_normal(pr.P)
    damped = G + aslinearoperator(0.1 * np.eye(pr.P))
    x, info = cg(damped, b, **{_RTOL: 1e-12}, atol=0, maxiter=1000)
    assert info == 0
    np.testing.assert_allclose(x, np.linalg.solve(Gd + 0.1 * np.eye(pr.P), b), rtol=1e-8, atol=1e-9)
    shift = 0.05  # H + shift·I is indefinite here, minres's case
    assert np.linalg.eigvalsh(Hd + shift * np.eye(pr.P))[0] < 0
    x, info = minres(H + aslinearoperator(shift * np.eye(pr.P)), b, **{_RTOL: 1e-12}, maxiter=5000)
    assert info == 0
    np.testing.assert_allclose(x, np.linalg.solve(Hd + shift * np.eye(pr.P), b), rtol=1e-6, atol=1e-6)


class CountingData:
    """A re-iterable data set that counts how often it is iterated."""

    def __init__(self, batches):
        self.batches, self.passes = batches, 0

    def __iter__(self):
        self.passes += 1
        return iter(self.batches)


def test_cache_false_relinearizes_at_every_product_and_agrees():
    pr = make_problem(ARCHS["tanh_2-5-3"], "ce_labels", "mean", batch=9, seed=1)
    data = CountingData(batches_of(pr))
    cached = hvp.HessianOperator(pr.net, pr.loss, pr.theta, data)
    assert data.passes == 1
    v = np.random.default_rng(2).standard_normal(pr.P)
    expected = cached @ v
    assert data.passes == 1
    recomputed = hvp.HessianOperator(pr.net, pr.loss, pr.theta, data, cache=False)
    passes = data.passes
    np.testing.assert_array_equal(recomputed @ v, expected)
    recomputed @ np.ones((pr.P, 3))
    assert data.passes == passes + 2


def test_one_shot_iterator_allowed_only_with_cache():
    pr = make_problem(ARCHS["tanh_2-5-3"], "mse", "mean", batch=9, seed=1)
    op = hvp.GGNOperator(pr.net, pr.loss, pr.theta, iter(batches_of(pr)))
    np.testing.assert_allclose(dense(op), dense(hvp.GGNOperator(pr.net, pr.loss, pr.theta, (pr.X, pr.y))),
                               rtol=1e-12, atol=1e-15)
    with pytest.raises(TypeError, match="re-iterable"):
        hvp.GGNOperator(pr.net, pr.loss, pr.theta, (b for b in batches_of(pr)), cache=False)


def test_data_that_changes_between_passes_is_an_error():
    pr = make_problem(ARCHS["tanh_2-5-3"], "mse", "mean", batch=9, seed=1)
    data = CountingData(batches_of(pr))
    op = hvp.HessianOperator(pr.net, pr.loss, pr.theta, data, cache=False)
    data.batches = data.batches[:2]
    with pytest.raises(RuntimeError, match="same batches"):
        op @ np.ones(pr.P)


def test_bad_inputs_are_reported():
    pr = make_problem(ARCHS["tanh_2-5-3"], "ce_labels", "mean", batch=9, seed=1)
    with pytest.raises(ValueError, match="no batch"):
        hvp.HessianOperator(pr.net, pr.loss, pr.theta, [])
    with pytest.raises(TypeError, match="batch 1"):
        hvp.HessianOperator(pr.net, pr.loss, pr.theta, [(pr.X, pr.y), pr.X])
    with pytest.raises(TypeError, match="iterable of"):
        hvp.HessianOperator(pr.net, pr.loss, pr.theta, 3)
    with pytest.raises(TypeError, match="loss"):
        hvp.HessianOperator(pr.net, "cross-entropy", pr.theta, (pr.X, pr.y))
    with pytest.raises(ValueError, match="l2"):
        hvp.HessianOperator(pr.net, pr.loss, pr.theta, (pr.X, pr.y), l2=-1.0)
    with pytest.raises(ValueError, match="theta"):
        hvp.HessianOperator(pr.net, pr.loss, pr.theta[:-1], (pr.X, pr.y))
    op = hvp.HessianOperator(pr.net, pr.loss, pr.theta, (pr.X, pr.y))
    with pytest.raises(ValueError):
        op @ np.ones(pr.P + 1)


def test_caller_arrays_are_not_modified():
    pr = make_problem(ARCHS["tanh_2-5-3"], "mse", "mean", batch=9, seed=1)
    theta, X, y = pr.theta.copy(), pr.X.copy(), pr.y.copy()
    V = np.random.default_rng(0).standard_normal((pr.P, 2))
    V_copy = V.copy()
    for cls in KINDS.values():
        op = cls(pr.net, pr.loss, pr.theta, batches_of(pr), l2=0.1)
        before = op @ V
        pr.theta[0] += 1.0  # the operator keeps its own copy of θ
        np.testing.assert_array_equal(op @ V, before)
        pr.theta[0] = theta[0]
    np.testing.assert_array_equal(pr.theta, theta)
    np.testing.assert_array_equal(pr.X, X)
    np.testing.assert_array_equal(pr.y, y)
    np.testing.assert_array_equal(V, V_copy)
