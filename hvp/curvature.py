"""Randomized estimators of a symmetric operator's spectrum: eigenvalues, trace, diagonal, density.

Every function takes ``op``: an ``hvp`` curvature operator (:class:`~hvp.HessianOperator`,
:class:`~hvp.GGNOperator`, :class:`~hvp.EmpiricalFisherOperator`), any square
``scipy.sparse.linalg.LinearOperator``, or an array; it must be symmetric. Random probes
come from ``numpy.random.default_rng(seed)``: the same seed gives the same result.
Products go through ``op.matmat`` in blocks of ``block_size`` columns (one pass over the
data per block) wherever the algorithm allows it; each result reports ``num_matvecs``,
the number of columns multiplied. ``progress=None`` prints a progress line on stderr
once a run has taken more than 2 s (``True``: always, ``False``: never).

Results are tuples that also carry named attributes::

    values, vectors = eigenvalues(H, k=5)          # EigenResult
    estimate, stderr = trace(H, 100)                # TraceResult
    grid, density = spectral_density(H)             # DensityResult (.nodes, .weights, .sigma)
"""

import sys
import time
import warnings

import numpy as np
from scipy.linalg import eigh_tridiagonal
from scipy.sparse.linalg import ArpackError, LinearOperator, aslinearoperator, eigsh

from ._checks import check_bool, check_seed, describe, real_array

_ARPACK_WHICH = {"largest": "LA", "smallest": "SA", "magnitude": "LM"}
# Dense factorizations use numpy.linalg: the same BLAS as the products. scipy.linalg links
# its own copy, whose idle threads spin against numpy's on a 2-core machine.


# -- results ------------------------------------------------------------------


class EigenResult(tuple):
    """``(values, vectors)``; also ``.values`` (k,), ``.vectors`` (P, k), ``.num_matvecs``,
    ``.method``, ``.converged``."""

    def __new__(cls, values, vectors, num_matvecs, method, converged=True):
        self = super().__new__(cls, (values, vectors))
        self.values, self.vectors, self.num_matvecs = values, vectors, num_matvecs
        self.method, self.converged = method, converged
        return self


class TraceResult(tuple):
    """``(estimate, stderr)``; also ``.estimate``, ``.stderr``, ``.num_matvecs``, ``.method``."""

    def __new__(cls, estimate, stderr, num_matvecs, method):
        self = super().__new__(cls, (estimate, stderr))
        self.estimate, self.stderr, self.num_matvecs, self.method = estimate, stderr, num_matvecs, method
        return self


class DensityResult(tuple):
    """``(grid, density)``; also ``.nodes`` and ``.weights`` (num_probes, steps), ``.sigma``,
    ``.num_matvecs``."""

    def __new__(cls, grid, density, nodes, weights, sigma, num_matvecs):
        self = super().__new__(cls, (grid, density))
        self.grid, self.density, self.nodes, self.weights = grid, density, nodes, weights
        self.sigma, self.num_matvecs = sigma, num_matvecs
        return self


# -- plumbing -----------------------------------------------------------------


class _Progress:
    """A one-line progress report on stderr for runs longer than ``after`` seconds, redrawn at most once a second."""

    def __init__(self, label, total, show, after=2.0):
        if show not in (None, True, False):
            raise TypeError(f"progress must be None, True or False, got {describe(show)}")
        self.label, self.total, self.show, self.after = label, total, show, after
        self.start = time.perf_counter()
        self.last = None  # time of the last report

    def update(self, done):
        now = time.perf_counter()
        if self.show is False or (self.show is None and now - self.start < self.after):
            return
        if self.last is None or now - self.last >= 1.0 or done == self.total:
            of = f"/{self.total}" if self.total else ""
            print(f"\r{self.label}: {done}{of} matvecs, {now - self.start:.1f} s", end="", file=sys.stderr, flush=True)
            self.last = now

    def close(self):
        if self.last is not None:
            print(file=sys.stderr, flush=True)


class _Counted(LinearOperator):
    """``op`` that counts the columns it multiplies and reports progress."""

    def __init__(self, op, progress):
        super().__init__(dtype=op.dtype, shape=op.shape)
        self.op, self.progress, self.count = op, progress, 0

    def _matmat(self, X):
        Y = self.op.matmat(X)
        self.count += X.shape[1]
        self.progress.update(self.count)
        return Y

    def _matvec(self, x):
        return self._matmat(np.reshape(x, (-1, 1)))[:, 0]

    def _adjoint(self):
        return self


def _operator(op):
    """``op`` as a square LinearOperator with a float dtype."""
    if not isinstance(op, LinearOperator):
        try:
            op = aslinearoperator(op)
        except TypeError:
            raise TypeError(f"op must be a square LinearOperator or array, got {describe(op)}") from None
    if len(op.shape) != 2 or op.shape[0] != op.shape[1] or op.shape[0] == 0:
        raise ValueError(f"op must be square and non-empty, got shape {op.shape}")
    if op.dtype is None or np.dtype(op.dtype).kind != "f":
        raise TypeError(f"op must have a float dtype, got {op.dtype}")
    return op


def _positive_int(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
    return value


def _apply(counted, V, block_size):
    """``op @ V`` for V (P, m), m columns in blocks of ``block_size``; float64 result."""
    out = np.empty(V.shape, dtype=np.float64)
    for start in range(0, V.shape[1], block_size):
        out[:, start:start + block_size] = counted.matmat(np.asarray(V[:, start:start + block_size], counted.dtype))
    return out


def _rademacher(rng, n, m, dtype):
    """m Rademacher columns (n, m) in ``dtype``, drawn one column after another.

    Column j is the same however the columns are split into blocks; the array is the
    transpose of a C-contiguous (m, n) one, the layout the products work in.
    """
    rows = np.empty((m, n), dtype=dtype)
    for j in range(m):
        rows[j] = np.unpackbits(np.frombuffer(rng.bytes((n + 7) // 8), dtype=np.uint8), count=n)
    rows *= 2
    rows -= 1
    return rows.T


def _orthonormal_basis(Y):
    """Orthonormal columns (P, r) spanning range(Y) (P, s), r <= s, float64.

    Two passes of ``Q ← Q V Λ^(-1/2)`` from the eigendecomposition ``QᵀQ = V Λ Vᵀ`` (a
    Gram–Schmidt done in BLAS-3, several times faster than Householder QR for P ≫ s; the
    second pass restores orthogonality to working precision). Directions of Y with
    singular values below √(s·eps) of the largest carry no reliable information and are
    dropped.
    """
    Q = np.asarray(Y, dtype=np.float64)
    for _ in range(2):
        if Q.shape[1] == 0:
            break
        lam, V = np.linalg.eigh(Q.T @ Q)
        keep = lam > max(lam[-1], 0.0) * Q.shape[1] * np.finfo(np.float64).eps
        Q = Q @ (V[:, keep] / np.sqrt(lam[keep]))
    return Q


def _probe_blocks(counted, rng, m, block_size):
    """(Z, op Z) for m Rademacher probes in blocks of ``block_size`` columns."""
    for start in range(0, m, block_size):
        Z = _rademacher(rng, counted.shape[0], min(block_size, m - start), counted.dtype)
        yield Z, counted.matmat(Z)


# -- eigenvalues -----------------------------------------------------------------


def _order(values, which):
    """Indices sorting ``values`` best first for ``which``."""
    if which == "largest":
        return np.argsort(-values, kind="stable")
    if which == "smallest":
        return np.argsort(values, kind="stable")
    return np.argsort(-np.abs(values), kind="stable")


def eigenvalues(op, k=1, which="largest", tol=1e-6, maxiter=None, method="lanczos", block_size=None,
                seed=0, progress=None):
    """The k extreme eigenvalues of a symmetric operator and their eigenvectors.

    ``method="lanczos"``: implicitly restarted Lanczos, ``scipy.sparse.linalg.eigsh``
    (ARPACK; Lehoucq, Sorensen & Yang 1998), started from a seeded vector. ARPACK asks
    for one product at a time. ``method="power"``: block power iteration (subspace
    iteration with Rayleigh–Ritz; Rutishauser 1970, Saad 2011 §5.2) on ``block_size``
    vectors, every product a block product — the method of PyHessian (Yao et al. 2020),
    which runs it with one vector, widened to a block. For "largest"/"smallest" it is
    shifted by the farthest Ritz value of the other sign, so that the wanted end dominates.
    Lanczos needs far fewer products for the same accuracy; "smallest" in particular
    converges slowly with power iteration. Where ARPACK stops because its Krylov space ran out
    (its error -9, "starting vector is zero": an operator that is identically zero, such as the
    Hessian of cross-entropy with one class, or one of tiny rank), the power method takes over
    and the result says ``method="power"``; for a zero operator it returns k zeros. The smallest
    eigenvalues of a singular GGN or empirical Fisher are a cluster of zeros, which no relative
    tolerance resolves.

    Parameters
    ----------
    op : LinearOperator or array, shape (P, P), symmetric
    k : int
        Number of eigenpairs, 1 <= k < P.
    which : {"largest", "smallest", "magnitude"}
        Largest algebraic, smallest algebraic, or largest |λ|.
    tol : float
        Relative residual ``‖op v − λ v‖ <= tol·|λ|`` for each returned pair (ARPACK's
        criterion, also used for the power variant). 1e-6 as pytorch-hessian-eigenthings'
        Lanczos; PyHessian's power iteration stops at a 1e-3 relative change of λ.
    maxiter : int or None
        Lanczos: ARPACK restarts (None: 10·P, scipy's default). Power: block iterations
        (None: 100, PyHessian's default).
    method : {"lanczos", "power"}
    block_size : int or None
        Power only: vectors in the block, >= k (None: 2k, at most P).
    seed : int, numpy.random.Generator or None
    progress : bool or None

    Returns
    -------
    EigenResult
        ``(values, vectors)``: values (k,) float64 best first (descending for "largest"
        and "magnitude", ascending for "smallest"), vectors (P, k) unit columns in op's
        dtype; ``.num_matvecs``, ``.converged`` (power: False when maxiter ran out, with a
        RuntimeWarning).

    Raises
    ------
    scipy.sparse.linalg.ArpackNoConvergence
        Lanczos did not converge within maxiter.
    """
    op = _operator(op)
    n = op.shape[0]
    k = _positive_int("k", k)
    if k >= n:
        raise ValueError(f"k must be smaller than the operator's size {n}, got k={k}")
    _choice("which", which, tuple(_ARPACK_WHICH))
    _choice("method", method, ("lanczos", "power"))
    if not (np.isscalar(tol) and np.isreal(tol) and tol >= 0):
        raise ValueError(f"tol must be a number >= 0, got {tol!r}")
    if maxiter is not None:
        maxiter = _positive_int("maxiter", maxiter)
    rng = check_seed(seed)
    counted = _Counted(op, _Progress(f"eigenvalues ({method})", None, progress))
    try:
        if method == "lanczos":
            v0 = rng.standard_normal(n).astype(op.dtype)
            try:
                values, vectors = eigsh(counted, k=k, which=_ARPACK_WHICH[which], v0=v0, tol=tol, maxiter=maxiter)
                converged = True
            except ArpackError as e:
                if not str(e).startswith("ARPACK error -9:"):  # the Krylov space ran out, e.g. op v0 = 0
                    raise
                method = "power"
        if method == "power":
            b = min(n, 2 * k) if block_size is None else _positive_int("block_size", block_size, k)
            values, vectors, converged = _block_power(counted, k, b, which, tol, maxiter or 100, rng)
    finally:
        counted.progress.close()
    order = _order(values, which)[:k]
    return EigenResult(np.asarray(values, dtype=np.float64)[order], np.asarray(vectors[:, order], dtype=op.dtype),
                       counted.count, method, converged)


def _block_power(counted, k, b, which, tol, maxiter, rng):
    """Subspace iteration with Rayleigh–Ritz; returns Ritz values, vectors, converged."""
    Q = np.linalg.qr(rng.standard_normal((counted.shape[0], b)))[0]
    for _ in range(maxiter):
        Z = _apply(counted, Q, b)
        theta, S = np.linalg.eigh(0.5 * (Q.T @ Z + Z.T @ Q))
        U, AU = Q @ S, Z @ S
        wanted = _order(theta, which)[:k]
        residuals = np.linalg.norm(AU[:, wanted] - U[:, wanted] * theta[wanted], axis=0)
        if np.all(residuals <= tol * np.abs(theta[wanted])):
            return theta, U, True
        shift = 0.0
        if which == "largest":
            shift = min(0.0, theta.min())
        elif which == "smallest":
            shift = max(0.0, theta.max())
        Q = np.linalg.qr(AU - shift * U)[0]
    warnings.warn(f"block power iteration did not reach tol={tol} in {maxiter} iterations "
                  f"(relative residuals up to {np.max(residuals / np.abs(theta[wanted])):.2e})",
                  RuntimeWarning, stacklevel=3)
    return theta, U, False


# -- trace and diagonal ------------------------------------------------------------


def trace(op, num_matvecs=100, method="hutchinson", seed=0, block_size=8, progress=None):
    """Randomized estimate of ``tr(op)`` and its standard error, from ``num_matvecs`` products.

    - ``"hutchinson"`` (Hutchinson 1990): mean of ``zᵀ op z`` over Rademacher probes z,
      the minimum-variance choice of i.i.d. probes (Avron & Toledo 2011); PyHessian's
      method, run there for up to 100 probes. Standard error = sample std / √m.
    - ``"hutch++"`` (Meyer, Musco, Musco & Woodruff 2021, Alg. 1): a third of the products
      find ``Q = orth(op S)``, a third give ``tr(Qᵀ op Q)`` exactly, a third run
      Hutchinson on the deflated ``(I − QQᵀ) op (I − QQᵀ)``. Far lower error when a few
      eigenvalues dominate (Hessians' outliers); standard error of the Hutchinson part.
    - ``"xtrace"`` (Epperly, Tropp & Webber 2024, XTrace): half the products build
      ``op Ω``, half ``op Q``; the average of the leave-one-out Hutch++-like estimates
      over the s = m/2 probes, computed from s×s matrices (their §2.2); standard error =
      std of those estimates / √s, the paper's error estimate.

    Parameters
    ----------
    op : LinearOperator or array, shape (P, P), symmetric
    num_matvecs : int
        Products to spend: >= 2 for Hutchinson, >= 4 for the others (PyHessian: 100).
    method : {"hutchinson", "hutch++", "xtrace"}
    seed : int, numpy.random.Generator or None
    block_size : int
        Columns per block product.
    progress : bool or None

    Returns
    -------
    TraceResult
        ``(estimate, stderr)`` as floats; ``.num_matvecs`` (Hutch++ and XTrace use fewer
        than asked when ``op S`` has numerically lower rank than its s columns: its range
        is then captured exactly), ``.method``.
    """
    op = _operator(op)
    n = op.shape[0]
    _choice("method", method, ("hutchinson", "hutch++", "xtrace"))
    m = _positive_int("num_matvecs", num_matvecs, 2 if method == "hutchinson" else 4)
    block_size = _positive_int("block_size", block_size)
    rng = check_seed(seed)
    counted = _Counted(op, _Progress(f"trace ({method})", m, progress))
    try:
        if method == "hutchinson":
            samples = np.concatenate([np.sum(Z * AZ, axis=0, dtype=np.float64)
                                      for Z, AZ in _probe_blocks(counted, rng, m, block_size)])
            estimate = samples.mean()
        elif method == "hutch++":
            s = m // 3
            Q = _orthonormal_basis(_apply(counted, _rademacher(rng, n, s, op.dtype), block_size))
            exact_part = np.einsum("ij,ij->", Q, _apply(counted, Q, block_size))
            G = _rademacher(rng, n, m - 2 * s, np.float64)
            G -= Q @ (Q.T @ G)
            samples = np.einsum("ij,ij->j", G, _apply(counted, G, block_size))
            estimate = exact_part + samples.mean()
        else:
            samples = _xtrace_estimates(lambda V: _apply(counted, V, block_size),
                                        _rademacher(rng, n, m // 2, op.dtype), np.finfo(op.dtype).eps)
            estimate = samples.mean()
    finally:
        counted.progress.close()
    stderr = samples.std(ddof=1) / np.sqrt(samples.size)
    return TraceResult(float(estimate), float(stderr), counted.count, method)


def _xtrace_estimates(apply, Omega, eps):
    """XTrace's s leave-one-out estimates (Epperly, Tropp & Webber 2024), from 2s products.

    With ``Y = op Ω = QR`` and ``H = Qᵀ op Q``, estimate i uses the basis of Y without its
    column i, ``Π_i = Q M_i Qᵀ`` (``M_i`` the projector onto range(R without column i)):
    ``tr(M_i H) + ω_iᵀ(I − Π_i) op (I − Π_i)ω_i``. With ``w = Qᵀω_i``, ``p = (I − M_i) w``,
    ``r = R e_i`` (so ``Qᵀ op ω_i = r`` and ``ω_iᵀ op ω_i = wᵀr``) the second term is
    ``−wᵀr + wᵀHw + 2pᵀ(r − Hw) + pᵀHp``: only s×s algebra after the products. For an
    invertible R, ``I − M_i = s_i s_iᵀ`` with ``s_i = R⁻ᵀe_i/‖R⁻ᵀe_i‖`` (the paper's §2.2);
    otherwise each ``M_i`` comes from an SVD.
    """
    s = Omega.shape[1]
    Y = apply(Omega)
    Q = _orthonormal_basis(Y)
    if Q.shape[1] == 0:  # op Ω = 0: each estimate is plain Hutchinson, ω_iᵀ op ω_i
        return np.einsum("ij,ij->j", Omega, Y)
    R = Q.T @ Y  # (r, s), r = rank of Y
    H = Q.T @ apply(Q)
    H = 0.5 * (H + H.T)
    W = Q.T @ Omega
    HW = H @ W
    base = -np.einsum("ij,ij->j", W, R) + np.einsum("ij,ij->j", W, HW)
    singular_values = np.linalg.svd(R, compute_uv=False)
    rcond = 10 * s * eps  # directions of Y at working precision add nothing
    if R.shape[0] == s and singular_values[-1] > rcond * singular_values[0]:
        S = np.linalg.inv(R).T
        S /= np.linalg.norm(S, axis=0)
        P = S * np.einsum("ij,ij->j", S, W)  # column i: p_i = s_i s_iᵀ w_i
        sHs = np.einsum("ij,ij->j", S, H @ S)
        return (np.trace(H) - sHs + base + 2 * np.einsum("ij,ij->j", P, R - HW)
                + np.einsum("ij,ij->j", P, H @ P))
    estimates = np.empty(s)
    for i in range(s):
        U, sv, _ = np.linalg.svd(np.delete(R, i, axis=1), full_matrices=False)
        U = U[:, sv > rcond * sv[0]] if sv[0] > 0 else U[:, :0]
        p = W[:, i] - U @ (U.T @ W[:, i])
        estimates[i] = (np.einsum("ij,ik,kj->", U, H, U) + base[i]
                        + 2 * p @ (R[:, i] - HW[:, i]) + p @ H @ p)
    return estimates


def diagonal(op, num_matvecs=100, seed=0, block_size=8, progress=None):
    """Hutchinson estimate of the diagonal, ``mean over z of z ⊙ (op z)`` (Bekas, Kokiopoulou & Saad 2007).

    Rademacher probes z (``z ⊙ z = 1``, so no division is needed); unbiased, entry i with
    variance ``Σ_{j≠i} op_ij² / m``.

    Parameters
    ----------
    op : LinearOperator or array, shape (P, P), symmetric
    num_matvecs : int
        Probes m >= 1 (100 as in PyHessian's trace).
    seed : int, numpy.random.Generator or None
    block_size : int
    progress : bool or None

    Returns
    -------
    ndarray, shape (P,), float64
    """
    op = _operator(op)
    m = _positive_int("num_matvecs", num_matvecs)
    block_size = _positive_int("block_size", block_size)
    rng = check_seed(seed)
    counted = _Counted(op, _Progress("diagonal", m, progress))
    total = np.zeros(op.shape[0])
    try:
        for Z, AZ in _probe_blocks(counted, rng, m, block_size):
            total += np.sum(Z * AZ, axis=1, dtype=np.float64)
    finally:
        counted.progress.close()
    return total / m


# -- spectral density -------------------------------------------------------------


def spectral_density(op, num_probes=10, lanczos_steps=80, grid=None, sigma=None, reorthogonalize=False,
                     seed=0, progress=None):
    """Eigenvalue density ``φ(t) = (1/P) Σ_i δ(t − λ_i)`` by stochastic Lanczos quadrature, smoothed.

    SLQ (Lin, Saad & Yang 2016; Ubaru, Chen & Saad 2017; Ghorbani, Krishnan & Xiao 2019):
    each of ``num_probes`` Lanczos runs starts from a Rademacher vector ``z/√P`` and after
    m steps gives the Gauss quadrature of its spectral measure: nodes θ_k (eigenvalues of
    the tridiagonal T) and weights τ_k (squared first entries of T's eigenvectors, summing
    to 1), with ``Σ_k τ_k θ_k^j = vᵀ op^j v`` for j <= 2m−1, whose mean is ``tr(op^j)/P``.
    All probes advance together: one block product of ``num_probes`` columns per step.
    Then ``φ(t) = (1/num_probes) Σ_probes Σ_k τ_k g_σ(t − θ_k)``, g_σ the Gaussian density
    with standard deviation σ: a probability density (it integrates to 1).

    The kernel's width is explicit because peers differ: σ here is a standard deviation
    in eigenvalue units; the default ``σ = (θ_max − θ_min)/lanczos_steps``, the spacing
    of m nodes across the spectrum, is pytorch-hessian-eigenthings' choice. PyHessian's
    ``density_generate`` and Ghorbani et al.'s code smooth with a kernel *variance* of
    ``1e-5·max(1, θ_max − θ_min)``, i.e. ``sigma=sqrt(1e-5·max(1, θ_max − θ_min))``, a
    standard deviation typically 10–50× narrower. Pass ``sigma`` to reproduce either.

    Defaults: 10 probes of 80 steps as pytorch-hessian-eigenthings (PyHessian: 1 × 100).
    No reorthogonalization by default, as Papyan (2019) at scale: in floating point the
    Lanczos quadrature still matches the spectral measure (Greenbaum 1989; Golub & Meurant
    2010) — converged outliers come back as ghost copies that share their weight, which
    leaves the density unchanged — and it keeps three blocks in memory. PyHessian and
    Ghorbani et al. reorthogonalize fully: ``reorthogonalize=True`` does so (classical
    Gram–Schmidt against every earlier vector), at the cost of num_probes·m·P numbers in
    op's dtype and a memory-bound pass over them at each step (4× the time of the
    products on the benchmark MLP).

    Parameters
    ----------
    op : LinearOperator or array, shape (P, P), symmetric
    num_probes : int
    lanczos_steps : int
        m, capped at P. A run stops early when its Krylov space is exhausted.
    grid : int, array_like of shape (G,), or None
        Points where φ is evaluated: an array, or how many evenly spaced points span
        ``[θ_min − 6σ, θ_max + 6σ]`` (None: enough for 8 points per σ, 1000 to 200000).
    sigma : float or None
        Standard deviation of the Gaussian kernel, > 0.
    reorthogonalize : bool
    seed : int, numpy.random.Generator or None
    progress : bool or None

    Returns
    -------
    DensityResult
        ``(grid, density)``, both (G,) float64; ``.nodes`` and ``.weights``
        (num_probes, m) float64 — a run that stopped early after j steps has weight 0
        on its last m − j entries (node repeated); ``.sigma``; ``.num_matvecs``.
    """
    op = _operator(op)
    n = op.shape[0]
    num_probes = _positive_int("num_probes", num_probes)
    steps = min(_positive_int("lanczos_steps", lanczos_steps), n)
    reorthogonalize = check_bool("reorthogonalize", reorthogonalize)
    if sigma is not None and not (np.isscalar(sigma) and np.isreal(sigma) and np.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
    rng = check_seed(seed)
    counted = _Counted(op, _Progress("spectral density", num_probes * steps, progress))
    try:
        start = _rademacher(rng, n, num_probes, op.dtype).T / op.dtype.type(np.sqrt(n))
        alphas, betas, lengths = _block_lanczos(counted, start, steps, reorthogonalize)
    finally:
        counted.progress.close()
    nodes = np.empty((num_probes, steps))
    weights = np.zeros((num_probes, steps))
    for p in range(num_probes):
        j = lengths[p]
        theta, S = eigh_tridiagonal(alphas[p, :j], betas[p, :j - 1])
        nodes[p, :j], nodes[p, j:] = theta, theta[-1]
        weights[p, :j] = S[0] ** 2
    if sigma is None:
        width = nodes.max() - nodes.min()
        sigma = (width if width > 0 else max(abs(nodes.max()), 1.0)) / steps
    sigma = float(sigma)
    if grid is None or np.isscalar(grid):
        lo, hi = nodes.min() - 6 * sigma, nodes.max() + 6 * sigma
        points = int(np.clip(8 * (hi - lo) / sigma, 1000, 200_000)) if grid is None else \
            _positive_int("grid", grid, 2)
        grid = np.linspace(lo, hi, points)
    else:
        grid = real_array("grid", grid, np.float64)
        if grid.ndim != 1 or grid.size == 0 or not np.isfinite(grid).all():
            raise ValueError(f"grid must be a number of points or a finite 1-D array, got {describe(grid)}")
    density = _gaussian_mixture(grid, nodes.ravel(), weights.ravel() / num_probes, sigma)
    return DensityResult(grid, density, nodes, weights, sigma, counted.count)


def _gaussian_mixture(grid, centers, weights, sigma, chunk=1 << 22):
    """``Σ_i weights_i · N(grid; centers_i, σ²)`` evaluated in chunks of the grid."""
    keep = weights > 0
    centers, weights = centers[keep], weights[keep]
    out = np.empty(grid.shape)
    rows = max(1, chunk // max(1, centers.size))
    for start in range(0, grid.size, rows):
        z = (grid[start:start + rows, None] - centers) / sigma
        out[start:start + rows] = np.exp(-0.5 * z * z) @ weights
    return out / (sigma * np.sqrt(2 * np.pi))


def _block_lanczos(counted, V0, steps, reorthogonalize):
    """Lanczos from each row of V0 (q, P) (unit norms), all advanced by one block product per step.

    Vectors are kept as rows in op's dtype; dot products accumulate in float64. Returns
    α (q, steps), β (q, steps), and each run's length (steps unless its Krylov space was
    exhausted: β below √eps of the largest |α|, β seen).
    """
    q, n = V0.shape
    dtype = counted.dtype
    alphas, betas = np.zeros((q, steps)), np.zeros((q, steps))
    lengths = np.full(q, steps)
    basis = np.empty((q, steps, n), dtype=dtype) if reorthogonalize else None
    V, V_prev = V0, np.zeros_like(V0)
    active = np.arange(q)
    scale = np.zeros(q)
    for j in range(steps):
        if reorthogonalize:
            basis[active, j] = V[active]
        W = np.zeros_like(V)
        W[active] = counted.matmat(V[active].T).T
        alpha = np.sum(V * W, axis=1, dtype=np.float64)
        W -= alpha.astype(dtype)[:, None] * V
        if j > 0:
            W -= betas[:, j - 1].astype(dtype)[:, None] * V_prev
        if reorthogonalize:
            for p in active:
                B = basis[p, :j + 1]
                W[p] -= (B @ W[p]) @ B
        beta = np.sqrt(np.sum(W * W, axis=1, dtype=np.float64))
        alphas[:, j], betas[:, j] = alpha, beta
        scale = np.maximum(scale, np.maximum(np.abs(alpha), beta))
        if j == steps - 1:
            break
        done = active[beta[active] <= np.sqrt(np.finfo(dtype).eps) * scale[active]]
        lengths[done] = j + 1
        active = np.setdiff1d(active, done)
        if active.size == 0:
            break
        V_prev, V = V, np.zeros_like(V)
        V[active] = W[active] / beta[active, None].astype(dtype)
    return alphas, betas, lengths


# -- plot -------------------------------------------------------------------------


def plot_spectral_density(result, ax=None, path=None, log=True, title=None):
    """Plot a spectral density (matplotlib, an optional extra: ``pip install hvp[examples]``).

    Parameters
    ----------
    result : DensityResult or (grid, density)
        As returned by :func:`spectral_density`; grid and density (G,).
    ax : matplotlib Axes or None
        Draw into it; None makes a new figure (without pyplot, so no display is needed).
    path : str or path-like or None
        Save the figure there (PNG, PDF, … by the suffix).
    log : bool
        Logarithmic density axis (the bulk and the outliers differ by orders of magnitude).
    title : str or None

    Returns
    -------
    matplotlib Axes
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("plot_spectral_density needs matplotlib, an optional dependency: "
                          "pip install matplotlib (or pip install 'hvp[examples]')") from None
    grid, density = (np.asarray(a, dtype=np.float64) for a in result)
    if ax is None:
        ax = Figure(figsize=(6, 4), layout="constrained").subplots()
    if log:
        floor = max(density.max() * 1e-12, np.finfo(np.float64).tiny)
        ax.semilogy(grid, np.maximum(density, floor))
        ax.set_ylim(bottom=max(floor, density.max() * 1e-8))
    else:
        ax.plot(grid, density)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    sigma = getattr(result, "sigma", None)
    if title is not None or sigma is not None:
        ax.set_title(title if title is not None else f"spectral density (Gaussian σ = {sigma:.3g})")
    if path is not None:
        ax.figure.savefig(path, dpi=120)
    return ax
