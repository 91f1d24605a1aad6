"""Property tests over random small architectures, batch sizes, dtypes and losses."""

from __future__ import annotations

import numpy as np
import oracles
from hypothesis import given, settings
from hypothesis import strategies as st

ACTIVATIONS = ["relu", "leaky", "leaky:0.2", "tanh", "sigmoid", "softsign", "softplus", "elu", "elu:0.5",
               "identity"]

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, database=None)


@st.composite
def architectures(draw):
    depth = draw(st.integers(1, 3))
    widths = draw(st.lists(st.integers(1, 5), min_size=depth + 1, max_size=depth + 1))
    spec = []
    for i in range(depth):
        bias = draw(st.booleans())
        spec.append(f"lin:{widths[i]}:{widths[i + 1]}" + ("" if bias else ":nobias"))
        last = i == depth - 1
        if not last or draw(st.integers(0, 3)) == 0:
            spec.append(draw(st.sampled_from(ACTIVATIONS)))
    return tuple(spec)


@st.composite
def problems(draw, dtypes=(np.float32, np.float64)):
    return dict(
        spec=draw(architectures()),
        kind=draw(st.sampled_from(oracles.LOSS_KINDS)),
        reduction=draw(st.sampled_from(oracles.REDUCTIONS)),
        batch=draw(st.integers(1, 6)),
        seed=draw(st.integers(0, 10_000)),
        dtype=draw(st.sampled_from(dtypes)),
    )


def _tol(dtype) -> float:
    return 1e-4 if dtype == np.float32 else 1e-10


@SETTINGS
@given(setting=problems(dtypes=(np.float64,)), l2=st.sampled_from([0.0, 0.2]))
def test_gradient_matches_reference_fd(make_problem, setting, l2):
    p = make_problem(**setting)
    loss, grad = p.loss_and_grad(l2=l2)
    ref = p.ref_loss(l2=l2)
    np.testing.assert_allclose(loss, ref, rtol=1e-12, atol=1e-14)
    fd = oracles.fd_gradient(lambda t: p.ref_loss(t, l2=l2), p.theta)
    atol = 1e-7 * max(np.max(np.abs(fd)), 1e-3 * abs(ref), 1e-6)
    np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=atol)


@SETTINGS
@given(setting=problems())
def test_float32_gradient_close_to_reference(make_problem, setting):
    p = make_problem(**setting)
    loss, grad = p.loss_and_grad(l2=0.1)
    assert grad.dtype == p.dtype
    ref = p.ref_loss(l2=0.1)
    np.testing.assert_allclose(loss, ref, rtol=1e-5 if p.dtype == np.float32 else 1e-12, atol=1e-7)
    fd = oracles.fd_gradient(lambda t: p.ref_loss(t, l2=0.1), p.theta.astype(np.float64))
    scale = max(np.max(np.abs(fd)), 1e-6)
    np.testing.assert_allclose(grad, fd, rtol=1e-4, atol=(1e-4 if p.dtype == np.float32 else 1e-7) * scale)


@SETTINGS
@given(setting=problems(), l2=st.sampled_from([0.0, 0.2]))
def test_hessian_symmetric(make_problem, setting, l2):
    p = make_problem(**setting)
    pt = p.linearize(l2=l2)
    H = pt.hvp(np.eye(p.P, dtype=p.dtype)).astype(np.float64)
    assert H.shape == (p.P, p.P)
    scale = max(np.max(np.abs(H)), 1e-30)
    np.testing.assert_allclose(H, H.T, rtol=0, atol=_tol(p.dtype) * scale)
    # bilinear form with random vectors
    rng = np.random.default_rng(0)
    u, v = rng.standard_normal(p.P).astype(p.dtype), rng.standard_normal(p.P).astype(p.dtype)
    Hv, Hu = pt.hvp(v).astype(np.float64), pt.hvp(u).astype(np.float64)
    lhs, rhs = u.astype(np.float64) @ Hv, v.astype(np.float64) @ Hu
    bound = np.linalg.norm(u) * np.linalg.norm(Hv) + np.linalg.norm(v) * np.linalg.norm(Hu)
    assert abs(lhs - rhs) <= _tol(p.dtype) * bound + 1e-30


@SETTINGS
@given(setting=problems(), l2=st.sampled_from([0.0, 0.2]))
def test_ggn_psd(make_problem, setting, l2):
    p = make_problem(**setting)
    pt = p.linearize(l2=l2)
    G = pt.ggnvp(np.eye(p.P, dtype=p.dtype)).astype(np.float64)
    scale = max(np.max(np.abs(G)), 1e-30)
    np.testing.assert_allclose(G, G.T, rtol=0, atol=_tol(p.dtype) * scale)
    eig = np.linalg.eigvalsh(0.5 * (G + G.T))
    # float32 entries carry ~1e-7 relative error, which moves eigenvalues by up to ~P * 1e-7 * scale
    assert eig.min() >= -_tol(p.dtype) * scale, (eig.min(), scale)
    # with the penalty, the spectrum is shifted: G - l2 * diag(mask) is still PSD
    Gn = G - np.diag(l2 * p.weight_mask())
    eig_n = np.linalg.eigvalsh(0.5 * (Gn + Gn.T))
    assert eig_n.min() >= -_tol(p.dtype) * scale - 1e-12


@SETTINGS
@given(setting=problems(), k=st.integers(1, 4))
def test_block_products_equal_columns(make_problem, setting, k):
    p = make_problem(**setting)
    pt = p.linearize(l2=0.1)
    V = np.random.default_rng(1).standard_normal((p.P, k)).astype(p.dtype)
    tol = 1e-5 if p.dtype == np.float32 else 1e-12
    for op in ("hvp", "ggnvp"):
        f = getattr(pt, op)
        block = f(V)
        assert block.shape == (p.P, k) and block.dtype == p.dtype
        cols = np.stack([f(V[:, j]) for j in range(k)], axis=1)
        scale = max(np.max(np.abs(cols)), 1e-30)
        np.testing.assert_allclose(block, cols, rtol=tol, atol=tol * scale)
    block = pt.jvp(V)
    assert block.shape == (p.B, k, p.C) and block.dtype == p.dtype
    cols = np.stack([pt.jvp(V[:, j]) for j in range(k)], axis=1)
    scale = max(np.max(np.abs(cols)), 1e-30)
    np.testing.assert_allclose(block, cols, rtol=tol, atol=tol * scale)
