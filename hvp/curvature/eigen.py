"""Extreme eigenvalues: Lanczos (ARPACK) or block power iteration."""

import warnings

import numpy as np
from scipy.sparse.linalg import ArpackError, eigsh

from .._checks import check_seed
from ._common import EigenResult, _apply, _choice, _Counted, _operator, _order, _positive_int, _Progress

_ARPACK_WHICH = {"largest": "LA", "smallest": "SA", "magnitude": "LM"}
# Dense factorizations use numpy.linalg: the same BLAS as the products. scipy.linalg links
# its own copy, whose idle threads spin against numpy's on a 2-core machine.


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
