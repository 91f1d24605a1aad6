"""hvp.scipy_objective: fun, jac, hessp against oracles, with scipy.optimize.minimize, one linearization per θ."""

from __future__ import annotations

import numpy as np
import oracles
import pytest
import scipy.optimize
from conftest import logreg_loss_and_grad, make_problem

import hvp

TINY = ("lin:2:3", "tanh", "lin:3:2")


def fd_hessian_vector(f, theta, v, h=1e-4):
    """``(H v)_i`` from four-point second differences of the scalar f alone."""
    out = np.empty_like(theta)
    for i in range(theta.size):
        e = np.zeros_like(theta)
        e[i] = h
        w = h * v
        out[i] = (f(theta + e + w) - f(theta + e - w) - f(theta - e + w) + f(theta - e - w)) / (4 * h * h)
    return out


@pytest.mark.parametrize("kind", ["ce_labels", "mse"])
@pytest.mark.parametrize("l2", [0.0, 0.3], ids=["l2_0", "l2_0.3"])
def test_fun_jac_hessp_match_oracles(kind, l2):
    p = make_problem(TINY, kind, "mean", batch=5, seed=2)
    fun, jac, hessp = hvp.scipy_objective(p.net, p.loss, p.X, p.y, l2=l2)
    _, _, ggnp = hvp.scipy_objective(p.net, p.loss, p.X, p.y, l2=l2, curvature="ggn")

    def ref(t):
        return oracles.ref_loss(p.layers, t, p.X, p.y, kind, "mean", l2)

    assert fun(p.theta) == pytest.approx(ref(p.theta), rel=1e-12)
    np.testing.assert_allclose(jac(p.theta), oracles.fd_gradient(ref, p.theta), rtol=1e-6, atol=1e-9)
    v = np.random.default_rng(0).normal(size=p.P)
    np.testing.assert_allclose(hessp(p.theta, v), fd_hessian_vector(ref, p.theta, v), rtol=1e-5, atol=1e-6)
    G = oracles.ref_ggn(p.layers, p.theta, p.X, p.y, kind, "mean", l2)
    np.testing.assert_allclose(ggnp(p.theta, v), G @ v, rtol=1e-6, atol=1e-8)
    assert not np.allclose(hessp(p.theta, v), G @ v, rtol=1e-3)  # the tanh layer makes them differ


@pytest.mark.parametrize("method", ["Newton-CG", "trust-ncg", "trust-krylov"])
def test_scipy_methods_reach_the_lbfgs_optimum(logreg, method):
    fun, jac, hessp = hvp.scipy_objective(logreg.net, logreg.loss, logreg.X, logreg.y, l2=logreg.l2)
    # scipy's trust-krylov (trlib) stalls between 1e-8 and 6e-8 or steps to NaN below that, by BLAS kernel
    options = {"xtol": 1e-12} if method == "Newton-CG" else {"gtol": 1e-8 if method == "trust-krylov" else 1e-9}
    res = scipy.optimize.minimize(fun, np.zeros(logreg.net.num_params), jac=jac, hessp=hessp, method=method,
                                  options={**options, "maxiter": 500})
    value, grad = logreg_loss_and_grad(res.x, logreg.X, logreg.y, logreg.l2)
    assert np.linalg.norm(grad) < 1e-7
    assert value == pytest.approx(logreg_loss_and_grad(logreg.theta_star, logreg.X, logreg.y, logreg.l2)[0],
                                  rel=1e-12)
    C = logreg.net.out_features
    np.testing.assert_allclose(logreg.canonical(res.x, C), logreg.canonical(logreg.theta_star, C), atol=1e-5)


def test_one_linearization_per_theta():
    p = make_problem(TINY, "ce_labels", "mean", batch=6, seed=3)
    forwards = []
    real = p.net.forward_cached
    p.net.forward_cached = lambda *args: forwards.append(1) or real(*args)
    fun, jac, hessp = hvp.scipy_objective(p.net, p.loss, p.X, p.y, l2=0.1)
    a, b, v = p.theta, p.theta + 0.01, np.ones(p.P)
    fun(a), jac(a), hessp(a, v), hessp(a, 2 * v)
    assert len(forwards) == 1
    fun(b), jac(b), hessp(b, v)
    assert len(forwards) == 2
    hessp(a, v), fun(a)  # the point before: still cached (a rejected trust-region trial goes back)
    assert len(forwards) == 2
    fun(a + 0.02), fun(b)  # a third point pushes out the oldest
    assert len(forwards) == 3
    fun(a)
    assert len(forwards) == 4
    x = a.copy()
    fun(x)
    x += 0.5  # θ changed in place by the caller: recomputed, not served stale
    assert fun(x) == pytest.approx(oracles.ref_loss(p.layers, x, p.X, p.y, "ce_labels", "mean", 0.1), rel=1e-12)


def test_caller_arrays_are_neither_modified_nor_aliased():
    p = make_problem(TINY, "mse", "mean", batch=4, seed=4)
    X, y, theta = p.X.copy(), p.y.copy(), p.theta.copy()
    fun, jac, hessp = hvp.scipy_objective(p.net, p.loss, X, y)
    before = fun(theta)
    g = jac(theta)
    g[:] = 0  # the returned gradient is a fresh array
    assert np.linalg.norm(jac(theta)) > 0
    X += 1.0
    y += 1.0
    assert fun(theta + 0.0) == before == fun(theta)
    assert np.array_equal(theta, p.theta)


@pytest.mark.parametrize("args, error, match", [
    ({"net": "net"}, TypeError, "net must be an hvp.Sequential"),
    ({"loss": "mse"}, TypeError, "loss must be an hvp loss"),
    ({"X": np.zeros((4, 3))}, ValueError, "X must have 2 features"),
    ({"y": np.zeros((4, 3))}, ValueError, "y must have the outputs' shape"),
    ({"l2": -1.0}, ValueError, "l2 must be a finite number >= 0"),
    ({"curvature": "fisher"}, ValueError, "curvature must be one of"),
], ids=["net", "loss", "X", "y", "l2", "curvature"])
def test_bad_arguments(args, error, match):
    p = make_problem(TINY, "mse", "mean", batch=4)
    kwargs = {"net": p.net, "loss": p.loss, "X": p.X, "y": p.y, **args}
    with pytest.raises(error, match=match):
        hvp.scipy_objective(kwargs.pop("net"), kwargs.pop("loss"), kwargs.pop("X"), kwargs.pop("y"), **kwargs)


def test_non_finite_points_give_nan_not_an_error():
    # scipy's trust-krylov can step to NaN near convergence; it recovers from NaN, not from an exception.
    p = make_problem(TINY, "ce_labels", "mean", batch=6, seed=3)
    fun, jac, hessp = hvp.scipy_objective(p.net, p.loss, p.X, p.y)
    bad = p.theta.copy()
    bad[0] = np.nan
    assert np.isnan(fun(bad)) and np.isnan(jac(bad)).all() and jac(bad).shape == (p.P,)
    assert np.isnan(hessp(bad, np.ones(p.P))).all()
    v = np.ones(p.P)
    v[1] = np.inf
    assert np.isnan(hessp(p.theta, v)).all()
    assert np.isfinite(hessp(p.theta, np.ones(p.P))).all()
