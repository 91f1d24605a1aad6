"""Trace and diagonal: Hutchinson, Hutch++ and XTrace estimators."""


import numpy as np

from .._checks import check_seed
from ._common import (
    TraceResult,
    _apply,
    _choice,
    _Counted,
    _operator,
    _orthonormal_basis,
    _positive_int,
    _probe_blocks,
    _Progress,
    _rademacher,
)


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
            samples = np.concatenate([np.einsum("ij,ij->j", Z, AZ, dtype=np.float64)
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
            total += np.einsum("ij,ij->i", Z, AZ, dtype=np.float64)
    finally:
        counted.progress.close()
    return total / m


# -- spectral density -------------------------------------------------------------
