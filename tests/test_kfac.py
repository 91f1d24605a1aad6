"""K-FAC (``pt.kfac``, ``hvp.KFACOperator``) against independent float64 oracles.

Nothing here shares code with ``hvp/kfac.py``. The oracles re-run the network in float64
(``oracles.ref_unflatten`` / ``oracles.activation``) to get each Linear layer's input I and
output O; A is ``mean_b ā_b ā_bᵀ`` with ``ā_b = [I_b, 1]``; G "exact" is
``Σ_b J_bᵀ ∇²ℓ_b J_b`` from a finite-difference Jacobian of the rest of the network with
respect to O and the closed-form loss Hessian ``oracles.ref_output_hessian``; G "empirical"
is ``N Σ_b DO_b DO_bᵀ`` with DO a finite-difference gradient of the loss with respect to O.
Dense operators are assembled one unit vector at a time and compared with ``np.kron``.
"""

import numpy as np
import oracles
import pytest
from conftest import ARCHS, make_problem
from scipy.sparse.linalg import LinearOperator

import hvp

FACTOR_ARCHS = ["relu_3-4-2", "tanh-sigmoid_3-4-3-2_mixedbias", "relu-softsign_nobias_3-4-3-2",
                "deep4_softplus-elu-tanh_out-leaky"]
MIXED = ARCHS["tanh-sigmoid_3-4-3-2_mixedbias"]


# --------------------------------------------------------------------------- oracles


def linear_blocks(layers):
    """Per Linear layer: (index in the net, start, stop in θ, rows of W̄ = m (+1 with bias), n)."""
    blocks, pos = [], 0
    for i, (layer, offs) in enumerate(zip(layers, oracles.offsets(layers))):
        if oracles.is_linear(layer):
            m, n = int(layer.in_features), int(layer.out_features)
            rows = m + int(oracles.has_bias(layer))
            assert offs["weight"][0] == pos  # W then b, contiguous: W̄ = [W; b] in C order
            blocks.append((i, pos, pos + rows * n, rows, n))
            pos += rows * n
    assert pos == oracles.num_params(layers)
    return blocks


def run(layers, params, h, start, stop=None):
    """The reference forward pass through layers[start:stop] from h."""
    for layer, p in zip(layers[start:stop], params[start:stop]):
        if oracles.is_linear(layer):
            h = h @ p["weight"] + p.get("bias", 0.0)
        else:
            h = oracles.activation(layer, h)
    return h


def normalizer(kind, reduction, B, C):
    if reduction == "sum":
        return 1
    return B if kind.startswith("ce") else B * C


def oracle_factors(pr, kind):
    """[(A, G)] per Linear layer, G for kind "exact" or "empirical"; all float64."""
    layers, y = pr.layers, pr.y
    params = oracles.ref_unflatten(layers, pr.theta.astype(np.float64))
    X = pr.X.astype(np.float64)
    B = X.shape[0]
    factors = []
    for i, _, _, rows, n in linear_blocks(layers):
        I = run(layers, params, X, 0, i)
        Abar = np.hstack([I, np.ones((B, 1))]) if rows > I.shape[1] else I
        O = run(layers, params, I, i, i + 1)

        def rest(o, i=i, n=n):
            return run(layers, params, np.reshape(o, (B, n)), i + 1)

        if kind == "exact":
            J = oracles.fd_jacobian(rest, O.ravel())  # (B·C, B·n), block diagonal over examples
            full = J.T @ oracles.ref_output_hessian(rest(O), y, pr.kind, pr.reduction) @ J
            G = sum(full[b * n:(b + 1) * n, b * n:(b + 1) * n] for b in range(B))
        else:
            DO = oracles.fd_gradient(lambda o: oracles.ref_output_loss(rest(o), y, pr.kind, pr.reduction),
                                     O.ravel()).reshape(B, n)
            G = normalizer(pr.kind, pr.reduction, B, pr.C) * DO.T @ DO
        factors.append((Abar.T @ Abar / B, G))
    return factors


def kron_dense(layers, factors, l2=0.0):
    """Block diagonal of kron(A, G) over the Linear layers, plus l2 on the weight diagonal."""
    P = oracles.num_params(layers)
    K = np.zeros((P, P))
    for (_, a, b, _, _), (A, G) in zip(linear_blocks(layers), factors):
        K[a:b, a:b] = np.kron(A, G)
    K[np.diag_indices(P)] += l2 * oracles.weight_mask(layers)
    return K


def dense(op):
    return oracles.dense_matrix(op.matvec, op.shape[1], dtype=op.dtype)


def close(actual, expected, rtol=1e-7):
    """Entrywise, with an absolute floor scaled by the largest entry (FD oracles: ~1e-9 relative)."""
    expected = np.asarray(expected, dtype=np.float64)
    atol = rtol * max(np.abs(expected).max(), 1e-300)
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), expected, rtol=rtol, atol=atol)


# --------------------------------------------------------------------------- 1. single layer = GGN


@pytest.mark.parametrize("l2", [0.0, 0.3], ids=["l2=0", "l2=0.3"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("arch", ["lin3-2", "lin4-3_nobias"])
def test_single_linear_layer_mse_exact_equals_ggn(arch, reduction, l2):
    pr = make_problem(ARCHS[arch], "mse", reduction, batch=5, seed=1)
    K = pr.linearize(l2=l2).kfac(kind="exact")
    expected = oracles.ref_ggn(pr.layers, pr.theta, pr.X, pr.y, "mse", reduction, l2)
    close(dense(K), expected, rtol=1e-9)


# --------------------------------------------------------------------------- 2. factors and dense operator


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss_kind", oracles.LOSS_KINDS)
@pytest.mark.parametrize("arch", FACTOR_ARCHS)
def test_factors_and_dense_operator_match_oracles(arch, loss_kind, reduction):
    pr = make_problem(ARCHS[arch], loss_kind, reduction, batch=4, seed=0)
    for kind in ("exact", "empirical"):
        K = pr.linearize(l2=0.25).kfac(kind=kind)
        assert isinstance(K, LinearOperator) and K.shape == (pr.P, pr.P) and K.dtype == np.float64
        expected = oracle_factors(pr, kind)
        assert len(K.factors) == len(expected)
        for (A, G), (A_ref, G_ref) in zip(K.factors, expected):
            assert np.shape(A) == A_ref.shape and np.shape(G) == G_ref.shape
            close(A, A_ref, rtol=1e-12)
            close(G, G_ref, rtol=1e-5)
        close(dense(K), kron_dense(pr.layers, expected, l2=0.25), rtol=1e-5)


# --------------------------------------------------------------------------- 3. batch size 1


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss_kind", oracles.LOSS_KINDS)
@pytest.mark.parametrize("arch", ["tanh_2-5-3", "tanh-sigmoid_3-4-3-2_mixedbias", "deep4_softplus-elu-tanh_out-leaky"])
def test_batch_of_one_blocks_are_empirical_fisher_and_ggn_blocks(arch, loss_kind, reduction):
    """B = 1: "empirical" blocks = (1/N) g gᵀ (g the FD gradient of the unreduced loss), and
    "exact" blocks = the GGN's diagonal blocks (ā āᵀ ⊗ J_Oᵀ H J_O has no cross-example sum)."""
    pr = make_problem(ARCHS[arch], loss_kind, reduction, batch=1, seed=4)
    g = oracles.fd_gradient(lambda t: oracles.ref_loss(pr.layers, t, pr.X, pr.y, loss_kind, "sum"), pr.theta)
    fisher = np.outer(g, g) / normalizer(loss_kind, reduction, 1, pr.C)
    ggn = oracles.ref_ggn(pr.layers, pr.theta, pr.X, pr.y, loss_kind, reduction)
    pt = pr.linearize()
    for kind, oracle in (("empirical", fisher), ("exact", ggn)):
        K = dense(pt.kfac(kind=kind))
        expected = np.zeros_like(oracle)
        for _, a, b, _, _ in linear_blocks(pr.layers):
            expected[a:b, a:b] = oracle[a:b, a:b]
        close(K, expected, rtol=1e-5)


# --------------------------------------------------------------------------- 4. inverse


def expected_inverse(layers, factors, damping, l2, pi):
    gamma = damping + l2
    P = oracles.num_params(layers)
    inv = np.zeros((P, P))
    for (_, a, b, _, _), (A, G) in zip(linear_blocks(layers), factors):
        A, G = np.asarray(A, dtype=np.float64), np.asarray(G, dtype=np.float64)
        if pi:
            p = np.sqrt((np.trace(A) / A.shape[0]) / (np.trace(G) / G.shape[0]))
            M = np.kron(A + p * np.sqrt(gamma) * np.eye(len(A)), G + np.sqrt(gamma) / p * np.eye(len(G)))
        else:
            M = np.kron(A, G) + gamma * np.eye(b - a)
        inv[a:b, a:b] = np.linalg.solve(M, np.eye(b - a))
    return inv


@pytest.mark.parametrize("pi", [False, True], ids=["pi=False", "pi=True"])
@pytest.mark.parametrize("damping,l2", [(1e-3, 0.0), (1.0, 0.0), (1e-3, 0.2), (0.0, 0.2)],
                         ids=["d=1e-3", "d=1", "d=1e-3,l2=0.2", "d=0,l2=0.2"])
@pytest.mark.parametrize("arch", ["tanh-sigmoid_3-4-3-2_mixedbias", "deep4_softplus-elu-tanh_out-leaky"])
def test_inverse_matches_dense_solve(arch, damping, l2, pi):
    pr = make_problem(ARCHS[arch], "ce_labels", "mean", batch=4, seed=2)
    K = pr.linearize(l2=l2).kfac(kind="exact")
    inv = K.inverse(damping, pi=pi)
    assert isinstance(inv, LinearOperator) and inv.shape == (pr.P, pr.P)
    expected = expected_inverse(pr.layers, K.factors, damping, l2, pi)
    V = np.random.default_rng(0).standard_normal((pr.P, 3))
    scale = np.linalg.norm(expected @ V)
    np.testing.assert_allclose(inv.matmat(V), expected @ V, rtol=1e-8, atol=1e-10 * scale)
    np.testing.assert_allclose(inv @ V[:, 0], expected @ V[:, 0], rtol=1e-8, atol=1e-10 * scale)
    np.testing.assert_allclose(inv.matvec(V[:, 1]), expected @ V[:, 1], rtol=1e-8, atol=1e-10 * scale)
    if l2 == 0 and not pi:  # the exact inverse of K + damping·I
        np.testing.assert_allclose(K.matmat(inv.matmat(V)) + damping * inv.matmat(V), V, rtol=0, atol=1e-8)


# --------------------------------------------------------------------------- 5. Monte Carlo


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss_kind", oracles.LOSS_KINDS)
def test_mc_is_unbiased_deterministic_and_shares_a(loss_kind, reduction):
    """G_mc averages M i.i.d. rank-one draws with mean G_exact, so E‖G_mc − G_exact‖² = V/M whatever
    the sampling scheme: the RMS relative error over 128 seeds must fall by √16 = 4 from M = 64 to
    16M = 1024. Over 25 disjoint sets of 128 seeds this ratio measured 4.0–4.3 ± 0.3 (3.5 … 4.6) for
    every loss, hence the bounds 2.8 … 5.5; a bias b adds b² to both squared errors and pulls the
    ratio toward 1, a missing 1/M makes the error grow. At 16M the RMS error measured 0.02–0.045."""
    pr = make_problem(MIXED, loss_kind, reduction, batch=4, seed=6)
    pt = pr.linearize()
    exact = pt.kfac(kind="exact").factors
    ref = np.concatenate([np.ravel(G) for _, G in exact])

    def rms_relative_error(M, seeds):
        errors = [np.concatenate([np.ravel(G) for _, G in pt.kfac(kind="mc", num_samples=M, seed=s).factors]) - ref
                  for s in seeds]
        return np.sqrt(np.mean([e @ e for e in errors])) / np.linalg.norm(ref)

    small, large = rms_relative_error(64, range(128)), rms_relative_error(1024, range(128, 256))
    assert 2.8 < small / large < 5.5, (small, large)
    assert large < 0.08, large

    K1 = pt.kfac(kind="mc", num_samples=20, seed=11)
    K2 = pt.kfac(kind="mc", num_samples=20, seed=11)
    K3 = pt.kfac(kind="mc", num_samples=20, seed=12)
    v = np.random.default_rng(0).standard_normal(pr.P)
    np.testing.assert_array_equal(K1 @ v, K2 @ v)
    assert not np.allclose(K1 @ v, K3 @ v, rtol=1e-6, atol=0)
    for (A, G1), (_, G2), (_, G3), (A_exact, _) in zip(K1.factors, K2.factors, K3.factors, exact):
        np.testing.assert_allclose(A, A_exact, rtol=1e-13, atol=0)
        np.testing.assert_array_equal(G1, G2)
        assert not np.allclose(G1, G3, rtol=1e-6, atol=0)
    np.testing.assert_array_equal(pt.kfac(kind="mc") @ v, pt.kfac(kind="mc", num_samples=1, seed=0) @ v)


# --------------------------------------------------------------------------- 6. diagonal and trace


@pytest.mark.parametrize("kind", ["exact", "empirical", "mc"])
@pytest.mark.parametrize("arch", ["tanh-sigmoid_3-4-3-2_mixedbias", "relu-softsign_nobias_3-4-3-2"])
def test_diagonal_and_trace_of_dense_matrix(arch, kind):
    pr = make_problem(ARCHS[arch], "ce_probs", "mean", batch=4, seed=3)
    K = pr.linearize(l2=0.4).kfac(kind=kind, num_samples=2, seed=5)
    D = dense(K)
    diag = K.diagonal()
    assert np.shape(diag) == (pr.P,)
    np.testing.assert_allclose(diag, np.diag(D), rtol=1e-12, atol=1e-15)
    assert isinstance(K.trace(), float)
    assert K.trace() == pytest.approx(np.trace(D), rel=1e-12)


# --------------------------------------------------------------------------- 7. KFACOperator over batches


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss_kind", ["ce_labels", "mse", "bce"])
@pytest.mark.parametrize("kind", ["exact", "empirical"])
def test_operator_over_batches_equals_kfac_of_concatenation(kind, loss_kind, reduction):
    pr = make_problem(MIXED, loss_kind, reduction, batch=7, seed=8)
    batches = [(pr.X[:3], pr.y[:3]), (pr.X[3:], pr.y[3:])]
    op = hvp.KFACOperator(pr.net, pr.loss, pr.theta, batches, kind=kind, l2=0.1)
    K = pr.linearize(l2=0.1).kfac(kind=kind)
    assert isinstance(op, LinearOperator) and op.shape == (pr.P, pr.P) and op.dtype == np.float64
    assert len(op.factors) == len(K.factors)
    for (A, G), (A_ref, G_ref) in zip(op.factors, K.factors):
        close(A, A_ref, rtol=1e-12)
        close(G, G_ref, rtol=1e-12)
    D = dense(K)
    close(dense(op), D, rtol=1e-12)
    close(op.diagonal(), np.diag(D), rtol=1e-12)
    assert op.trace() == pytest.approx(np.trace(D), rel=1e-12)
    V = np.random.default_rng(1).standard_normal((pr.P, 2))
    for pi in (False, True):
        close(op.inverse(0.01, pi=pi).matmat(V), K.inverse(0.01, pi=pi).matmat(V), rtol=1e-9)
    one = hvp.KFACOperator(pr.net, pr.loss, pr.theta, (pr.X, pr.y), kind=kind, l2=0.1)
    close(dense(one), D, rtol=1e-12)


def test_operator_mc_defaults_and_determinism():
    pr = make_problem(MIXED, "ce_labels", "mean", batch=7, seed=8)
    batches = [(pr.X[:3], pr.y[:3]), (pr.X[3:], pr.y[3:])]
    default = hvp.KFACOperator(pr.net, pr.loss, pr.theta, batches)
    close(dense(default), dense(pr.linearize().kfac()), rtol=1e-12)  # kind="exact", l2=0 by default
    a = hvp.KFACOperator(pr.net, pr.loss, pr.theta, batches, kind="mc", num_samples=2, seed=3)
    b = hvp.KFACOperator(pr.net, pr.loss, pr.theta, batches, kind="mc", num_samples=2, seed=3)
    v = np.ones(pr.P)
    np.testing.assert_array_equal(a @ v, b @ v)
    for (A, _), (A_ref, _) in zip(a.factors, default.factors):
        close(A, A_ref, rtol=1e-12)


# --------------------------------------------------------------------------- 8. forms, symmetry, float32


@pytest.mark.parametrize("kind", ["exact", "empirical", "mc"])
def test_matmat_symmetry_and_positive_semidefinite(kind):
    pr = make_problem(ARCHS["deep4_softplus-elu-tanh_out-leaky"], "ce_labels", "mean", batch=4, seed=9)
    K = pr.linearize(l2=0.05).kfac(kind=kind, num_samples=2, seed=1)
    V = np.random.default_rng(2).standard_normal((pr.P, 3))
    block = K.matmat(V)
    assert block.shape == (pr.P, 3)
    for j in range(3):
        column = K.matvec(V[:, j])
        assert column.shape == (pr.P,)
        np.testing.assert_allclose(column, block[:, j], rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(K @ V[:, j], block[:, j], rtol=1e-12, atol=1e-15)
    D = dense(K)
    np.testing.assert_allclose(D, D.T, rtol=0, atol=1e-13 * np.abs(D).max())
    eig = np.linalg.eigvalsh(0.5 * (D + D.T))
    assert eig[0] >= -1e-10 * eig[-1]


@pytest.mark.parametrize("kind", ["exact", "empirical"])
def test_float32_theta_gives_float32_close_to_float64(kind):
    pr = make_problem(MIXED, "bce", "mean", batch=5, seed=10)
    K64 = pr.linearize(l2=0.1).kfac(kind=kind)
    K32 = hvp.linearize(pr.net, pr.loss, pr.theta.astype(np.float32), pr.X.astype(np.float32),
                        pr.y.astype(np.float32), l2=0.1).kfac(kind=kind)
    assert K32.dtype == np.float32
    v = np.random.default_rng(3).standard_normal(pr.P).astype(np.float32)
    assert (K32 @ v).dtype == np.float32 and K32.matmat(np.eye(pr.P, dtype=np.float32)).dtype == np.float32
    D64 = dense(K64)
    np.testing.assert_allclose(dense(K32), D64, rtol=0, atol=1e-4 * np.abs(D64).max())


# --------------------------------------------------------------------------- 9. bad inputs


def test_bad_inputs_are_reported():
    pr = make_problem(MIXED, "ce_labels", "mean", batch=4, seed=0)
    pt = pr.linearize()
    with pytest.raises(ValueError, match="kind"):
        pt.kfac(kind="fisher")
    with pytest.raises(ValueError, match="kind"):
        hvp.KFACOperator(pr.net, pr.loss, pr.theta, (pr.X, pr.y), kind="bogus")
    for bad in (0, -2):
        with pytest.raises(ValueError, match="num_samples"):
            pt.kfac(kind="mc", num_samples=bad)
    for bad in (1.5, "3", None):
        with pytest.raises((TypeError, ValueError), match="num_samples"):
            pt.kfac(kind="mc", num_samples=bad)
    with pytest.raises((TypeError, ValueError), match="num_samples"):
        hvp.KFACOperator(pr.net, pr.loss, pr.theta, (pr.X, pr.y), kind="mc", num_samples=0)
    K = pt.kfac()
    for bad in (-1e-3, np.nan, np.inf, -np.inf):
        with pytest.raises(ValueError, match="damping"):
            K.inverse(bad)
        with pytest.raises(ValueError, match="damping"):
            K.inverse(bad, pi=False)
    with pytest.raises(ValueError):  # γ = damping + l2 = 0
        K.inverse(0.0)
    for K in (pr.linearize(l2=0.5).kfac(), hvp.KFACOperator(pr.net, pr.loss, pr.theta, (pr.X, pr.y), l2=0.5)):
        with pytest.raises(ValueError, match="damping"):  # negative even though γ = damping + l2 > 0
            K.inverse(-1e-3)
