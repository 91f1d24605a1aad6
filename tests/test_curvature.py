"""hvp.curvature estimators against dense matrices of small nets (and synthetic spectra).

The operators themselves are checked against independent oracles in test_operators.py;
here the dense matrix of an operator (its products with the identity) is the reference
for eigenvalues (LAPACK ``eigh``), traces, diagonals and moments ``tr(Aʲ)/P``, plus one
eigenvalue check straight against the finite-difference Hessian. Statistical tests use
fixed seeds, and margins derived from the estimators' exact variances, wide enough to
hold for every seed yet far narrower than a factor-2 error.
"""

import functools
import sys

import numpy as np
import oracles
import pytest
from conftest import ARCHS, make_problem
from scipy.integrate import trapezoid  # np.trapezoid is numpy >= 2.0 only
from scipy.linalg import qr
from scipy.sparse.linalg import LinearOperator, aslinearoperator

import hvp
from hvp import curvature
from hvp.curvature.traces import _xtrace_estimates

DEEP = ARCHS["deep4_softplus-elu-tanh_out-leaky"]  # P = 54


def problem_operator(kind, loss_kind="mse", arch=DEEP, batch=16, seed=3, l2=0.0):
    pr = make_problem(arch, loss_kind, "mean", batch=batch, seed=seed)
    cls = {"hessian": hvp.HessianOperator, "ggn": hvp.GGNOperator, "ef": hvp.EmpiricalFisherOperator}[kind]
    return pr, cls(pr.net, pr.loss, pr.theta, (pr.X, pr.y), l2=l2)


def dense(op):
    return op.matmat(np.eye(op.shape[0], dtype=op.dtype))


class Counting(LinearOperator):
    """Counts the columns it multiplies, independently of the estimators' own count."""

    def __init__(self, A):
        super().__init__(dtype=A.dtype, shape=A.shape)
        self.A, self.columns = A, 0

    def _matmat(self, X):
        self.columns += X.shape[1]
        return self.A @ X

    def _matvec(self, x):
        return self._matmat(x.reshape(-1, 1))[:, 0]

    def _adjoint(self):
        return self


def rademacher_variance(A):
    """Var(zᵀAz) for a Rademacher z and symmetric A: 2(‖A‖_F² − Σ A_ii²)."""
    return 2 * (np.sum(A * A) - np.sum(np.diag(A) ** 2))


@functools.cache
def outlier_matrix(n=200, outliers=(1000.0, 500.0, 300.0, 200.0, 100.0), seed=0):
    """Symmetric, a few large eigenvalues over a bulk in [0, 1] (read-only, shared)."""
    rng = np.random.default_rng(seed)
    Q = qr(rng.standard_normal((n, n)))[0]
    spectrum = np.concatenate([outliers, rng.uniform(0, 1, n - len(outliers))])
    A = (Q * spectrum) @ Q.T
    A = 0.5 * (A + A.T)
    A.flags.writeable = False
    return A


# -- eigenvalues ------------------------------------------------------------------


@pytest.mark.parametrize("kind, which", [
    ("hessian", "largest"), ("hessian", "smallest"), ("hessian", "magnitude"),
    ("ggn", "largest"), ("ggn", "magnitude"), ("ef", "largest"), ("ef", "magnitude"),
])  # a singular GGN/EF's smallest eigenvalues are a cluster of zeros: no relative accuracy there
def test_lanczos_eigenvalues_match_dense_eigh(kind, which):
    pr, op = problem_operator(kind, "ce_labels")
    A = dense(op)
    exact = np.linalg.eigvalsh(A)
    order = {"largest": np.argsort(-exact), "smallest": np.argsort(exact),
             "magnitude": np.argsort(-np.abs(exact))}[which]
    result = curvature.eigenvalues(op, k=3, which=which, tol=0)
    values, vectors = result
    np.testing.assert_allclose(values, exact[order[:3]], rtol=1e-8, atol=1e-12 * np.abs(exact).max())
    assert vectors.shape == (pr.P, 3)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=0), 1, rtol=1e-10)
    residual = np.linalg.norm(A @ vectors - vectors * values, axis=0)
    assert np.all(residual <= 1e-8 * np.abs(exact).max())
    assert result.method == "lanczos" and result.converged


def test_top_eigenvalues_match_finite_difference_hessian():
    pr, op = problem_operator("hessian", "ce_labels", l2=0.05)
    H = oracles.fd_hessian_from_gradient(
        lambda t: hvp.loss_and_grad(pr.net, pr.loss, t, pr.X, pr.y, l2=0.05)[1], pr.theta)
    exact = np.sort(np.linalg.eigvalsh(0.5 * (H + H.T)))[::-1]
    np.testing.assert_allclose(curvature.eigenvalues(op, k=4).values, exact[:4], rtol=1e-6)


@pytest.mark.parametrize("which", ["largest", "magnitude", "smallest"])
def test_block_power_iteration_matches_dense_eigh(which):
    _, op = problem_operator("hessian", "mse")
    exact = np.linalg.eigvalsh(dense(op))
    want = {"largest": exact[::-1], "smallest": exact, "magnitude": exact[np.argsort(-np.abs(exact))]}[which]
    result = curvature.eigenvalues(op, k=2, which=which, method="power", tol=1e-10, maxiter=5000)
    assert result.converged and result.method == "power"
    np.testing.assert_allclose(result.values, want[:2], rtol=1e-8)
    assert result.num_matvecs % 4 == 0  # whole blocks of 2k = 4 vectors


def test_power_iteration_that_runs_out_warns_and_says_so():
    _, op = problem_operator("hessian", "mse")
    with pytest.warns(RuntimeWarning, match="did not reach"):
        result = curvature.eigenvalues(op, k=1, method="power", tol=1e-14, maxiter=3)
    assert not result.converged and result.num_matvecs == 3 * 2


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_eigenvalues_report_matvecs_and_are_deterministic(method):
    _, op = problem_operator("ggn", "ce_labels")
    counting = Counting(dense(op))
    first = curvature.eigenvalues(counting, k=2, method=method, tol=1e-8, seed=5)
    assert first.num_matvecs == counting.columns > 0
    again = curvature.eigenvalues(counting, k=2, method=method, tol=1e-8, seed=5)
    np.testing.assert_array_equal(first.values, again.values)
    np.testing.assert_array_equal(first.vectors, again.vectors)


@pytest.mark.parametrize("which", ["largest", "smallest", "magnitude"])
def test_eigenvalues_of_an_identically_zero_hessian(which):
    # Cross-entropy with one class is constant (log softmax of one logit is 0): H = 0, and ARPACK
    # stops with its error -9 at once; the power method gives the k zero eigenvalues instead.
    net = hvp.Sequential(hvp.Linear(3, 4), hvp.Tanh(), hvp.Linear(4, 1))
    X = np.random.default_rng(0).normal(size=(6, 3))
    H = hvp.HessianOperator(net, hvp.CrossEntropyLoss(), net.init(seed=0), (X, np.zeros(6, dtype=np.int64)))
    assert not np.any(oracles.dense_matrix(H.matvec, net.num_params))
    result = curvature.eigenvalues(H, k=3, which=which)
    # SciPy >= 1.15 ARPACK stops with error -9 and the power method takes over; older ARPACK returns the zeros.
    assert result.method in ("power", "lanczos") and result.converged
    assert np.array_equal(result.values, np.zeros(3))
    np.testing.assert_allclose(result.vectors.T @ result.vectors, np.eye(3), atol=1e-12)


def test_eigenvalues_of_float32_operator():
    pr = make_problem(DEEP, "ce_labels", "mean", batch=16, seed=3, dtype=np.float32)
    op = hvp.HessianOperator(pr.net, pr.loss, pr.theta, (pr.X, pr.y))
    values, vectors = curvature.eigenvalues(op, k=2, tol=1e-5)
    exact = np.sort(np.linalg.eigvalsh(dense(op).astype(np.float64)))[::-1]
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(values, exact[:2], rtol=1e-4)


# -- trace ------------------------------------------------------------------------


@pytest.mark.parametrize("kind, loss_kind", [("hessian", "mse"), ("ggn", "ce_labels"), ("hessian", "ce_labels")])
def test_hutchinson_within_its_exact_confidence_bound(kind, loss_kind):
    _, op = problem_operator(kind, loss_kind)
    A = dense(op)
    m = 400
    sd = np.sqrt(rademacher_variance(A) / m)
    assert 8 * sd < abs(np.trace(A))  # the bound below is far tighter than a factor-2 error
    for seed in range(5):
        estimate, stderr = curvature.trace(op, m, "hutchinson", seed=seed)
        assert abs(estimate - np.trace(A)) <= 4 * sd
        assert 0.6 * sd <= stderr <= 1.6 * sd  # the reported error estimates the true one


@pytest.mark.parametrize("method", ["hutchinson", "hutch++", "xtrace"])
@pytest.mark.parametrize("kind, loss_kind", [("hessian", "mse"), ("ggn", "ce_labels"), ("hessian", "ce_labels")])
def test_trace_estimators_unbiased_with_calibrated_stderr(kind, loss_kind, method):
    _, op = problem_operator(kind, loss_kind)
    A = dense(op)
    exact = np.trace(A)
    results = [curvature.trace(A, 24, method, seed=seed) for seed in range(200)]
    estimates = np.array([r.estimate for r in results])
    z = np.abs(estimates - exact) / np.array([r.stderr for r in results])
    assert abs(estimates.mean() - exact) <= 4 * estimates.std() / np.sqrt(len(results)) + 1e-12 * abs(exact)
    assert np.mean(z <= 2) >= 0.8  # a stderr half the true one covers ~65%
    assert np.mean(z <= 0.5) <= 0.55  # a stderr twice the true one gives ~65% here
    assert all(r.num_matvecs <= 24 for r in results)  # fewer when op Ω is rank-deficient
    assert any(r.num_matvecs == 24 for r in results)


@pytest.mark.parametrize("method", ["hutchinson", "hutch++", "xtrace"])
def test_trace_through_the_operator_equals_trace_of_its_matrix(method):
    _, op = problem_operator("hessian", "ce_labels")
    through_op = curvature.trace(op, 30, method, seed=3, block_size=7)
    of_matrix = curvature.trace(dense(op), 30, method, seed=3)
    np.testing.assert_allclose(through_op, of_matrix, rtol=1e-9)
    assert through_op.num_matvecs == 30


def test_hutchpp_and_xtrace_beat_hutchinson_on_a_few_large_eigenvalues():
    A = outlier_matrix()
    exact = np.trace(A)

    def rms_error(method):
        errors = [curvature.trace(A, 60, method, seed=seed).estimate - exact for seed in range(30)]
        return np.sqrt(np.mean(np.square(errors)))

    hutchinson, hutchpp, xtrace = rms_error("hutchinson"), rms_error("hutch++"), rms_error("xtrace")
    assert hutchpp < 0.2 * hutchinson
    assert xtrace < 0.2 * hutchinson


@pytest.mark.parametrize("method, m", [("hutch++", 3 * 20), ("xtrace", 2 * 20)])
def test_trace_exact_when_the_sketch_spans_the_range(method, m):
    """GGN of 2 examples × 3 outputs has rank <= 6 < 20: the low-rank part captures it all."""
    _, op = problem_operator("ggn", "mse", batch=2)
    exact = np.trace(dense(op))
    estimate, stderr = curvature.trace(op, m, method, seed=1)
    assert estimate == pytest.approx(exact, rel=1e-10)
    assert stderr <= 1e-10 * exact


def test_xtrace_estimates_equal_explicit_leave_one_out():
    rng = np.random.default_rng(0)
    A = rng.standard_normal((25, 25))
    A = A + A.T
    Omega = rng.choice([-1.0, 1.0], size=(25, 7))
    fast = _xtrace_estimates(lambda V: A @ V, Omega, np.finfo(np.float64).eps)
    for i in range(7):
        Q = qr(A @ np.delete(Omega, i, axis=1), mode="economic")[0]
        residual = Omega[:, i] - Q @ (Q.T @ Omega[:, i])
        assert fast[i] == pytest.approx(np.trace(Q.T @ A @ Q) + residual @ A @ residual, rel=1e-10)


def test_trace_deterministic_for_a_seed_and_varies_with_it():
    A = outlier_matrix(n=50)
    assert curvature.trace(A, 20, seed=4) == curvature.trace(A, 20, seed=4)
    assert curvature.trace(A, 20, seed=4) != curvature.trace(A, 20, seed=5)


# -- diagonal -----------------------------------------------------------------------


@pytest.mark.parametrize("kind, loss_kind", [("hessian", "mse"), ("ggn", "ce_labels"), ("ef", "ce_labels")])
def test_diagonal_converges_to_the_exact_diagonal(kind, loss_kind):
    _, op = problem_operator(kind, loss_kind)
    A = dense(op)
    exact = np.diag(A)
    off_diagonal = np.sum(A * A, axis=1) - exact ** 2  # m · Var of entry i
    errors = []
    for m in (50, 200, 800):
        estimate = curvature.diagonal(op, m, seed=m)
        assert np.all(np.abs(estimate - exact) <= 5 * np.sqrt(off_diagonal / m) + 1e-12)
        ratio = np.sum((estimate - exact) ** 2) / np.sum(off_diagonal / m)
        assert 0.3 <= ratio <= 3.0  # squared error as the variance predicts
        errors.append(np.linalg.norm(estimate - exact))
    assert errors[2] < 0.5 * errors[0]


def test_diagonal_of_ggn_operator_converges_to_diag_ggn():
    pr, op = problem_operator("ggn", "ce_labels", l2=0.1)
    pt = hvp.linearize(pr.net, pr.loss, pr.theta, pr.X, pr.y, l2=0.1)
    if not hasattr(pt, "diag_ggn"):
        pytest.skip("Linearization.diag_ggn is not there yet")
    exact = pt.diag_ggn()
    A = dense(op)
    sd = np.sqrt((np.sum(A * A, axis=1) - np.diag(A) ** 2) / 1000)
    estimate = curvature.diagonal(op, 1000, seed=0)
    assert np.all(np.abs(estimate - exact) <= 5 * sd + 1e-12)
    assert not np.all(np.abs(estimate / 2 - exact) <= 5 * sd)  # the margin rejects a factor 2


def test_diagonal_deterministic_and_blocking_invariant():
    A = outlier_matrix(n=40)
    np.testing.assert_array_equal(curvature.diagonal(A, 48, seed=1, block_size=16),
                                  curvature.diagonal(A, 48, seed=1, block_size=16))
    assert curvature.diagonal(A, 5, seed=1).shape == (40,)


# -- spectral density -------------------------------------------------------------------


def moments_with_gaussian_kernel(nodes, weights, sigma, num_probes):
    """∫ tʲ φ(t) dt for j = 0…4 when each node is blurred by N(0, σ²)."""
    m = [np.sum(weights * nodes ** j) / num_probes for j in range(5)]
    s2 = sigma ** 2
    return np.array([m[0], m[1], m[2] + s2 * m[0], m[3] + 3 * s2 * m[1], m[4] + 6 * s2 * m[2] + 3 * s2 ** 2 * m[0]])


@pytest.mark.parametrize("reorthogonalize", [True, False], ids=["reorth", "no-reorth"])
@pytest.mark.parametrize("kind, loss_kind", [("hessian", "ce_labels"), ("ggn", "mse")])
def test_slq_moments_match_traces_of_powers(kind, loss_kind, reorthogonalize):
    pr, op = problem_operator(kind, loss_kind)
    A = dense(op)
    num_probes = 300
    sigma = 1e-3 * np.ptp(np.linalg.eigvalsh(A))
    result = curvature.spectral_density(op, num_probes=num_probes, lanczos_steps=12, sigma=sigma,
                                        reorthogonalize=reorthogonalize, seed=0)
    grid, density = result
    assert result.sigma == sigma and result.num_matvecs == num_probes * 12
    np.testing.assert_allclose(result.weights.sum(axis=1), 1, rtol=1e-10)
    quadrature = [np.sum(result.weights * result.nodes ** j) / num_probes for j in range(5)]
    density_moments = [trapezoid(grid ** j * density, grid) for j in range(5)]
    expected_smoothing = moments_with_gaussian_kernel(result.nodes, result.weights, sigma, num_probes)
    for j in range(5):
        Aj = np.linalg.matrix_power(A, j)
        exact = np.trace(Aj) / pr.P
        sd = np.sqrt(rademacher_variance(Aj) / num_probes) / pr.P
        assert abs(quadrature[j] - exact) <= 5 * sd + 1e-10 * abs(exact), j
        assert density_moments[j] == pytest.approx(expected_smoothing[j], rel=1e-6, abs=1e-12), j
        assert abs(density_moments[j] - exact) <= 5 * sd + 1e-4 * abs(exact), j
    assert density_moments[0] == pytest.approx(1, abs=1e-6)


def test_density_with_default_grid_and_sigma_integrates_to_one():
    _, op = problem_operator("hessian", "ce_labels")
    result = curvature.spectral_density(op, num_probes=4, lanczos_steps=20)
    grid, density = result
    assert trapezoid(density, grid) == pytest.approx(1, abs=1e-6)
    assert result.sigma == pytest.approx(np.ptp(result.nodes) / 20)
    assert result.nodes.shape == result.weights.shape == (4, 20)
    assert grid[0] < result.nodes.min() and grid[-1] > result.nodes.max()
    again = curvature.spectral_density(op, num_probes=4, lanczos_steps=20)
    np.testing.assert_array_equal(again.density, density)


def test_density_on_a_given_grid():
    A = np.diag([1.0, 2.0, 3.0, 4.0])
    grid = np.linspace(0, 5, 11)
    result = curvature.spectral_density(A, num_probes=2, lanczos_steps=4, grid=grid, sigma=0.1)
    np.testing.assert_array_equal(result.grid, grid)
    peak = 0.25 / (0.1 * np.sqrt(2 * np.pi))  # each eigenvalue holds 1/4 of the mass
    np.testing.assert_allclose(result.density[[2, 4, 6, 8]], peak, rtol=1e-6)


@pytest.mark.parametrize("reorthogonalize", [True, False], ids=["reorth", "no-reorth"])
def test_low_rank_operator_stops_lanczos_early(reorthogonalize):
    """GGN of 2 examples × 3 outputs has rank <= 6: Krylov spaces end after at most 7 steps."""
    pr, op = problem_operator("ggn", "mse", batch=2)
    result = curvature.spectral_density(op, num_probes=3, lanczos_steps=30, reorthogonalize=reorthogonalize, seed=0)
    assert result.num_matvecs <= 3 * 7
    np.testing.assert_allclose(result.weights.sum(axis=1), 1, rtol=1e-10)
    eigenvalues = np.linalg.eigvalsh(dense(op))
    # an exhausted Krylov space makes the quadrature exact: its nodes are eigenvalues
    nodes = result.nodes[result.weights > 1e-10]
    distance = np.min(np.abs(nodes[:, None] - eigenvalues[None, :]), axis=1)
    assert np.all(distance <= 1e-8 * eigenvalues[-1])


# -- plot, progress, errors -------------------------------------------------------------


def test_plot_spectral_density_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    result = curvature.spectral_density(outlier_matrix(n=60), num_probes=3, lanczos_steps=15)
    ax = curvature.plot_spectral_density(result, path=tmp_path / "density.png")
    assert (tmp_path / "density.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "σ" in ax.get_title()


def test_plot_without_matplotlib_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        curvature.plot_spectral_density((np.arange(3.0), np.ones(3)))


def test_progress_line_only_when_asked_or_long(capsys):
    A = outlier_matrix(n=30)
    curvature.trace(A, 10, progress=True)
    assert "trace (hutchinson): 10/10 matvecs" in capsys.readouterr().err
    curvature.trace(A, 10)
    curvature.eigenvalues(A, k=1, progress=False)
    assert capsys.readouterr().err == ""


def test_bad_arguments_are_reported():
    A = outlier_matrix(n=20)
    with pytest.raises(ValueError, match="which"):
        curvature.eigenvalues(A, which="top")
    with pytest.raises(ValueError, match="method"):
        curvature.eigenvalues(A, method="arnoldi")
    with pytest.raises(ValueError, match="smaller than"):
        curvature.eigenvalues(A, k=20)
    with pytest.raises(ValueError, match="num_matvecs"):
        curvature.trace(A, 3, method="hutch++")
    with pytest.raises(ValueError, match="method"):
        curvature.trace(A, 10, method="girard")
    with pytest.raises(ValueError, match="square"):
        curvature.diagonal(np.ones((3, 4)), 5)
    with pytest.raises(TypeError, match="op must"):
        curvature.trace("matrix", 10)
    with pytest.raises(ValueError, match="sigma"):
        curvature.spectral_density(A, sigma=0.0)
    with pytest.raises(ValueError, match="grid"):
        curvature.spectral_density(A, grid=np.array([[0.0, 1.0]]))
    with pytest.raises(ValueError, match="block_size"):
        curvature.eigenvalues(A, k=3, method="power", block_size=2)


def test_estimators_accept_scipy_operators_and_arrays_alike():
    A = outlier_matrix(n=40)
    np.testing.assert_allclose(curvature.eigenvalues(aslinearoperator(A), k=2).values,
                               curvature.eigenvalues(A, k=2).values, rtol=1e-12)
