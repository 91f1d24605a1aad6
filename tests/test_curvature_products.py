"""Hessian, Gauss-Newton and Jacobian products against dense reference matrices."""

from __future__ import annotations

import numpy as np
import oracles
import pytest

import hvp

L2_VALUES = [0.0, 0.3]


def _scale(A) -> float:
    return float(np.max(np.abs(A)))


def _directions(P: int, k: int, seed: int = 1, dtype=np.float64) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((P, k)).astype(dtype)


@pytest.fixture(params=["unit_products", "row_products"])
def rule4_path(request, monkeypatch):
    """A Linear layer's rule 4 takes one of two routes by batch size (per input unit on the columns, or on the
    directions as rows): the tests' small batches take the first; also run them through the second."""
    if request.param == "row_products":
        monkeypatch.setattr(hvp.layers.dense, "SMALL_BATCH", 0)


# --------------------------------------------------------------------------- Hessian


@pytest.mark.parametrize("l2", L2_VALUES)
def test_hessian_matches_fd_of_gradient(problem, l2, rule4_path):
    pt = problem.linearize(l2=l2)
    H = oracles.dense_matrix(pt.hvp, problem.P)
    H_fd = oracles.fd_hessian_from_gradient(lambda t: problem.loss_and_grad(t, l2=l2)[1], problem.theta)
    scale = _scale(H_fd)
    assert scale > 0
    np.testing.assert_allclose(H, H_fd, rtol=1e-6, atol=1e-6 * scale)


def test_hessian_is_symmetric(problem):
    pt = problem.linearize(l2=0.1)
    U = _directions(problem.P, 3, seed=2)
    V = _directions(problem.P, 3, seed=3)
    for j in range(3):
        u, v = U[:, j], V[:, j]
        Hv, Hu = pt.hvp(v), pt.hvp(u)
        lhs, rhs = u @ Hv, v @ Hu
        tol = 1e-11 * (np.linalg.norm(u) * np.linalg.norm(Hv) + np.linalg.norm(v) * np.linalg.norm(Hu))
        assert abs(lhs - rhs) <= tol, (lhs, rhs)


# --------------------------------------------------------------------------- Gauss-Newton


@pytest.mark.parametrize("l2", L2_VALUES)
def test_ggn_quadratic_matches_the_reference_ggn(problem, l2):
    pt = problem.linearize(l2=l2)
    V = _directions(problem.P, 3, seed=4)
    G_ref = oracles.ref_ggn(problem.layers, problem.theta, problem.X, problem.y, problem.kind,
                            problem.reduction, l2=l2)
    want = V.T @ G_ref @ V
    got = pt.ggn_quadratic(V)
    assert got.shape == (3, 3) and got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7 * _scale(want))


def test_loss_at_is_the_loss_at_another_point(problem):
    pt = problem.linearize(l2=0.2)
    other = problem.theta + 0.1 * _directions(problem.P, 1, seed=5)[:, 0]
    want = oracles.ref_loss(problem.layers, other, problem.X, problem.y, problem.kind, problem.reduction, 0.2)
    assert pt.loss_at(other) == pytest.approx(want, rel=1e-10)
    assert pt.loss_at(other) != pytest.approx(pt.loss, rel=1e-6)
    assert pt.loss_at(np.full(problem.P, np.nan)) == np.inf


@pytest.mark.parametrize("l2", L2_VALUES)
def test_ggn_matches_jt_hl_j(problem, l2):
    pt = problem.linearize(l2=l2)
    G = oracles.dense_matrix(pt.ggnvp, problem.P)
    G_ref = oracles.ref_ggn(problem.layers, problem.theta, problem.X, problem.y, problem.kind,
                            problem.reduction, l2=l2)
    scale = _scale(G_ref)
    assert scale > 0
    np.testing.assert_allclose(G, G_ref, rtol=1e-6, atol=1e-7 * scale)


def test_ggn_is_symmetric_psd(problem):
    pt = problem.linearize()
    G = oracles.dense_matrix(pt.ggnvp, problem.P)
    scale = _scale(G)
    np.testing.assert_allclose(G, G.T, rtol=0, atol=1e-12 * scale)
    eig = np.linalg.eigvalsh(0.5 * (G + G.T))
    assert eig.min() >= -1e-10 * scale, eig.min()


LINEAR_SPECS = {
    "lin3-2": ("lin:3:2",),
    "lin4-3_nobias": ("lin:4:3:nobias",),
    "lin3-3_identity": ("lin:3:3", "identity"),
}


@pytest.mark.parametrize("l2", L2_VALUES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kind", oracles.LOSS_KINDS)
@pytest.mark.parametrize("spec", list(LINEAR_SPECS.values()), ids=list(LINEAR_SPECS.keys()))
def test_ggn_equals_hessian_for_linear_network(make_problem, spec, kind, reduction, l2):
    p = make_problem(spec, kind, reduction, batch=5, seed=3)
    pt = p.linearize(l2=l2)
    H = oracles.dense_matrix(pt.hvp, p.P)
    G = oracles.dense_matrix(pt.ggnvp, p.P)
    np.testing.assert_allclose(H, G, rtol=1e-10, atol=1e-12 * _scale(H))


def test_ggn_differs_from_hessian_for_nonlinear_network(make_problem):
    # the net's own curvature (sigma'' and cross terms) must show up in hvp but not in ggnvp
    p = make_problem(("lin:3:4", "tanh", "lin:4:3"), "ce_labels", "mean")
    pt = p.linearize()
    H = oracles.dense_matrix(pt.hvp, p.P)
    G = oracles.dense_matrix(pt.ggnvp, p.P)
    assert np.max(np.abs(H - G)) > 1e-2 * _scale(H)


# --------------------------------------------------------------------------- blocks of directions


@pytest.mark.parametrize("op", ["hvp", "ggnvp"])
def test_block_products_equal_columnwise(problem, op, rule4_path):
    pt = problem.linearize(l2=0.2)
    V = _directions(problem.P, 3, seed=4)
    f = getattr(pt, op)
    out = f(V)
    assert out.shape == (problem.P, 3)
    cols = np.stack([f(V[:, j]) for j in range(3)], axis=1)
    np.testing.assert_allclose(out, cols, rtol=1e-12, atol=1e-13 * _scale(cols))
    one = f(V[:, :1])
    assert one.shape == (problem.P, 1)
    np.testing.assert_allclose(one[:, 0], cols[:, 0], rtol=1e-12, atol=1e-13 * _scale(cols))


def test_block_jvp_equals_columnwise(problem):
    pt = problem.linearize()
    V = _directions(problem.P, 3, seed=5)
    out = pt.jvp(V)
    assert out.shape == (problem.B, 3, problem.C)
    for j in range(3):
        col = pt.jvp(V[:, j])
        assert col.shape == (problem.B, problem.C)
        np.testing.assert_allclose(out[:, j, :], col, rtol=1e-12, atol=1e-13 * _scale(col))


# --------------------------------------------------------------------------- Jacobian products


def test_jvp_matches_dense_jacobian(problem):
    pt = problem.linearize()
    J = oracles.output_jacobian(problem.layers, problem.theta, problem.X)
    scale = _scale(J)
    V = _directions(problem.P, 3, seed=6)
    ref = (J @ V)  # (B*C, k), rows ordered (b, c)
    tol = dict(rtol=1e-6, atol=1e-7 * scale * np.abs(V).max() * problem.P)
    single = pt.jvp(V[:, 0])
    assert single.shape == (problem.B, problem.C)
    np.testing.assert_allclose(single, ref[:, 0].reshape(problem.B, problem.C), **tol)
    block = pt.jvp(V)
    assert block.shape == (problem.B, 3, problem.C)
    np.testing.assert_allclose(block, ref.T.reshape(3, problem.B, problem.C).transpose(1, 0, 2), **tol)


def test_vjp_matches_dense_jacobian_transpose(problem):
    pt = problem.linearize()
    J = oracles.output_jacobian(problem.layers, problem.theta, problem.X)
    U = np.random.default_rng(7).standard_normal((problem.B, problem.C))
    ref = J.T @ U.ravel()
    out = pt.vjp(U)
    assert out.shape == (problem.P,)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-7 * _scale(ref))


def test_vjp_is_adjoint_of_jvp(problem):
    pt = problem.linearize()
    rng = np.random.default_rng(8)
    v = rng.standard_normal(problem.P)
    U = rng.standard_normal((problem.B, problem.C))
    Jv = pt.jvp(v)
    JtU = pt.vjp(U)
    lhs, rhs = np.sum(U * Jv), v @ JtU
    assert abs(lhs - rhs) <= 1e-11 * (np.abs(U).sum() * np.abs(Jv).max() + np.abs(v).sum() * np.abs(JtU).max())


# --------------------------------------------------------------------------- L2 term


@pytest.mark.parametrize("op", ["hvp", "ggnvp"])
def test_l2_adds_l2_times_v_on_weights_only(problem, op):
    l2 = 0.37
    pt0 = problem.linearize(l2=0.0)
    pt1 = problem.linearize(l2=l2)
    V = _directions(problem.P, 2, seed=9)
    mask = problem.weight_mask()
    diff = getattr(pt1, op)(V) - getattr(pt0, op)(V)
    scale = _scale(getattr(pt0, op)(V)) + l2 * _scale(V)
    np.testing.assert_allclose(diff, np.where(mask[:, None], l2 * V, 0.0), rtol=1e-10, atol=1e-13 * scale)
    np.testing.assert_allclose(pt1.grad - pt0.grad, np.where(mask, l2 * problem.theta, 0.0), rtol=1e-10,
                               atol=1e-13 * (_scale(pt0.grad) + 1.0))


# --------------------------------------------------------------------------- dtypes


DTYPE_SPECS = {
    "tanh_2-5-3": ("lin:2:5", "tanh", "lin:5:3"),
    "mixed_3-4-3-2": ("lin:3:4", "softplus", "lin:4:3:nobias", "sigmoid", "lin:3:2"),
    "deep4": ("lin:3:4", "softsign", "lin:4:3", "elu:0.7", "lin:3:4", "leaky:0.1", "lin:4:2", "relu"),
}


@pytest.mark.parametrize("kind", oracles.LOSS_KINDS)
@pytest.mark.parametrize("spec", list(DTYPE_SPECS.values()), ids=list(DTYPE_SPECS.keys()))
def test_float32_agrees_with_float64(make_problem, spec, kind):
    p32 = make_problem(spec, kind, "mean", batch=5, seed=11, dtype=np.float32)
    p64 = make_problem(spec, kind, "mean", batch=5, seed=11, dtype=np.float64)
    # the same (float32-representable) numbers, run in float64
    p64.theta = p32.theta.astype(np.float64)
    p64.X = p32.X.astype(np.float64)
    # probability targets stay float32: their rows sum to 1 only to float32's rounding, which the
    # float64 network accepts for float32 targets (it converts them itself)
    p64.y = p32.y.copy() if kind.startswith("ce") else p32.y.astype(np.float64)
    rng = np.random.default_rng(12)
    V = rng.standard_normal((p32.P, 2)).astype(np.float32)
    U = rng.standard_normal((p32.B, p32.C)).astype(np.float32)
    l2 = 0.05
    pt32, pt64 = p32.linearize(l2=l2), p64.linearize(l2=l2)

    def close(a, b):
        assert a.dtype == np.float32
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * _scale(b))

    np.testing.assert_allclose(float(pt32.loss), float(pt64.loss), rtol=1e-5)
    close(pt32.grad, pt64.grad)
    close(pt32.outputs, pt64.outputs)
    close(pt32.hvp(V), pt64.hvp(V.astype(np.float64)))
    close(pt32.ggnvp(V), pt64.ggnvp(V.astype(np.float64)))
    close(pt32.jvp(V), pt64.jvp(V.astype(np.float64)))
    close(pt32.vjp(U), pt64.vjp(U.astype(np.float64)))
    loss32, grad32 = p32.loss_and_grad(l2=l2)
    np.testing.assert_allclose(loss32, float(pt64.loss), rtol=1e-5)
    close(grad32, pt64.grad)


@pytest.mark.parametrize("other", [np.float32, np.float64], ids=["other-f32", "other-f64"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["theta-f32", "theta-f64"])
def test_results_have_theta_dtype(make_problem, dtype, other):
    p = make_problem(("lin:3:4", "tanh", "lin:4:2"), "mse", "mean", dtype=dtype)
    # inputs, targets and directions in the other dtype: the result still follows theta
    X, y = p.X.astype(other), p.y.astype(other)
    loss, grad = hvp.loss_and_grad(p.net, p.loss, p.theta, X, y)
    assert grad.dtype == dtype
    assert p.net.forward(p.theta, X).dtype == dtype
    pt = hvp.linearize(p.net, p.loss, p.theta, X, y, l2=0.1)
    assert pt.grad.dtype == dtype
    assert pt.outputs.dtype == dtype
    v = np.ones(p.P, dtype=other)
    V = np.ones((p.P, 2), dtype=other)
    U = np.ones((p.B, p.C), dtype=other)
    for out in (pt.hvp(v), pt.hvp(V), pt.ggnvp(v), pt.ggnvp(V), pt.jvp(v), pt.jvp(V), pt.vjp(U)):
        assert out.dtype == dtype
        assert np.all(np.isfinite(out))


def test_block_vjp_equals_columnwise(problem):
    # u of shape (B, k, C) gives (P, k), one column per cotangent u[:, j, :]
    pt = problem.linearize()
    U = np.random.default_rng(13).standard_normal((problem.B, 3, problem.C))
    out = pt.vjp(U)
    assert out.shape == (problem.P, 3)
    for j in range(3):
        col = pt.vjp(np.ascontiguousarray(U[:, j, :]))
        np.testing.assert_allclose(out[:, j], col, rtol=1e-12, atol=1e-13 * _scale(col))


# --------------------------------------------------------------------------- soft targets normalized in float32


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_ce_soft_targets_rounded_to_float32(make_problem, reduction):
    # rows sum to 1 only to float32's rounding; the float64 network takes them as they are, and the
    # loss Hessian carries s_b = sum_c t_bc, so that the products are exact for these targets
    p = make_problem(("lin:3:4", "sigmoid", "lin:4:3"), "ce_probs", reduction, batch=4, seed=5)
    p.y = p.y.astype(np.float32)
    l2 = 0.1
    loss, grad = p.loss_and_grad(l2=l2)
    np.testing.assert_allclose(loss, p.ref_loss(l2=l2), rtol=1e-12)
    fd = oracles.fd_gradient(lambda t: p.ref_loss(t, l2=l2), p.theta)
    np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-7 * _scale(fd))
    pt = p.linearize(l2=l2)
    H = oracles.dense_matrix(pt.hvp, p.P)
    H_fd = oracles.fd_hessian_from_gradient(lambda t: p.loss_and_grad(t, l2=l2)[1], p.theta)
    np.testing.assert_allclose(H, H_fd, rtol=1e-6, atol=1e-6 * _scale(H_fd))
    G = oracles.dense_matrix(pt.ggnvp, p.P)
    G_ref = oracles.ref_ggn(p.layers, p.theta, p.X, p.y, p.kind, p.reduction, l2=l2)
    np.testing.assert_allclose(G, G_ref, rtol=1e-6, atol=1e-7 * _scale(G_ref))
