"""Preconditioned conjugate gradient on the quadratic model of a Newton-CG step.

CG minimizes ``φ(x) = ½ xᵀ A x + gᵀ x`` (so ``A x = −g`` at the minimum) with
products ``A d`` only, keeps the value ``φ(x_i)`` of every iterate (it is
``½ x_iᵀ (r_i + g)`` with the residual ``r_i = A x_i + g``, no extra product) and
a copy of the iterates at ``i = ⌈5·1.3ʲ⌉`` for backtracking.
"""

import math
from dataclasses import dataclass, field

import numpy as np


def backtracking_schedule(max_iter, first=5, factor=1.3):
    """CG iterations whose iterate is kept: ``⌈first·factorʲ⌉`` for j = 0, 1, … up to ``max_iter``.

    Martens 2010, "Deep learning via Hessian-free optimization", ICML, §4.6 (CG iteration backtracking).
    """
    kept, j = set(), 0
    while math.ceil(first * factor**j) <= max_iter:
        kept.add(math.ceil(first * factor**j))
        j += 1
    return kept


def progress_stalled(phis, i, tol, min_lookback=10, lookback_fraction=0.1):
    """Martens' relative-progress rule: stop at iteration i once ``(φ_i − φ_{i−k}) / φ_i < k·tol``.

    ``k = max(min_lookback, ⌈lookback_fraction·i⌉)``; the rule applies only for ``i > k`` and ``φ_i < 0``
    (Martens 2010, "Deep learning via Hessian-free optimization", ICML, §4.4). ``phis`` holds φ_0 … φ_i.
    """
    k = max(min_lookback, math.ceil(lookback_fraction * i))
    if i <= k or not phis[i] < 0:
        return False
    return (phis[i] - phis[i - k]) / phis[i] < k * tol


@dataclass
class CGResult:
    """What one CG run found.

    Attributes
    ----------
    x : ndarray, shape (P,)
        The last iterate.
    iterates : list of (int, ndarray (P,), float)
        ``(i, x_i, φ(x_i))`` for the kept iterations, ascending, the last iterate included.
    phis : list of float
        ``φ(x_0), …, φ(x_n)``.
    iterations : int
        n, the number of CG iterations run.
    products : int
        Number of products with A (one more than n after a warm start).
    stop : str
        Why CG stopped: "progress", "residual", "max_iter", "converged", "negative curvature", "nonfinite".
    negative_curvature : float
        After a stop on negative curvature, the Rayleigh quotient ``dᵀAd / dᵀd <= 0`` of the
        direction d that showed it; 0 otherwise.
    """

    x: np.ndarray
    iterates: list = field(default_factory=list)
    phis: list = field(default_factory=list)
    iterations: int = 0
    products: int = 0
    stop: str = ""
    negative_curvature: float = 0.0


def pcg(matvec, g, x0=None, precond=None, max_iter=250, progress_tol=5e-4, atol=0.0, rtol=1e-10):
    """Minimize ``φ(x) = ½ xᵀ A x + gᵀ x`` by preconditioned conjugate gradient.

    Parameters
    ----------
    matvec : callable
        ``matvec(d) -> A d`` for d (P,); A symmetric.
    g : ndarray, shape (P,)
        Linear term (the gradient at the current point).
    x0 : ndarray, shape (P,), or None
        Starting point (a warm start); None starts at 0. A warm start with ``φ(x0) >= 0`` is
        dropped for 0, which is never worse.
    precond : ndarray of shape (P,), callable, or None
        The preconditioner M: a positive diagonal (the residual is scaled by ``1/M``), or a
        callable ``precond(r) -> M⁻¹ r`` for a symmetric positive definite M.
    max_iter : int
        Iteration cap.
    progress_tol : float or None
        ε of Martens' relative-progress rule (:func:`progress_stalled`); None runs to the cap.
    atol : float
        Stop once ``‖r‖₂ <= atol`` (an inexact-Newton forcing rule chosen by the caller); 0: never.
    rtol : float
        Stop once ``‖r‖_{M⁻¹} <= rtol·‖g‖_{M⁻¹}`` (the model is solved to rounding).

    Returns
    -------
    CGResult

    Notes
    -----
    A direction of curvature ``dᵀ A d <= 0`` (possible with the exact Hessian) ends CG
    at the last iterate; if that is still 0, the preconditioned steepest-descent direction
    ``−M⁻¹ g`` is returned, a descent direction for φ.
    """
    solve = precond
    if precond is not None and not callable(precond):
        inv_m = 1 / precond

        def solve(r):
            return inv_m * r
    products = 0
    if x0 is None or not x0.any():
        x, r, phi = np.zeros_like(g), g.copy(), 0.0
    else:
        x = x0.copy()
        r = matvec(x) + g
        products += 1
        phi = 0.5 * float(x @ (r + g))
        if not phi < 0:  # also drops a non-finite warm start
            x, r, phi = np.zeros_like(g), g.copy(), 0.0
    z = r if solve is None else solve(r)
    rz = float(r @ z)
    rz_stop = rtol * rtol * float(g @ (g if solve is None else solve(g)))
    d = -z
    phis, iterates, kept = [phi], [], backtracking_schedule(max_iter)
    stop, i, negative_curvature = "max_iter", 0, 0.0
    if not rz > rz_stop:
        stop = "converged"
    elif atol and float(r @ r) <= atol * atol:  # a warm start may already be good enough
        stop = "residual"
    while stop == "max_iter" and i < max_iter:
        Ad = matvec(d)
        products += 1
        curvature = float(d @ Ad)
        if not np.isfinite(curvature):
            stop = "nonfinite"
            break
        if curvature <= 0:
            stop, negative_curvature = "negative curvature", curvature / float(d @ d)
            if i == 0 and not x.any():
                x = d.copy()
                phis.append(float(g @ d) + 0.5 * curvature)
                i = 1
            break
        alpha = rz / curvature
        x += alpha * d
        r += alpha * Ad
        i += 1
        phis.append(0.5 * float(x @ (r + g)))
        if i in kept:
            iterates.append((i, x.copy(), phis[i]))
        if progress_tol is not None and progress_stalled(phis, i, progress_tol):
            stop = "progress"
            break
        if atol and float(r @ r) <= atol * atol:
            stop = "residual"
            break
        z = r if solve is None else solve(r)
        rz_new = float(r @ z)
        if rz_new <= rz_stop:
            stop = "converged"
            break
        d *= rz_new / rz
        d -= z
        rz = rz_new
    if not iterates or iterates[-1][0] != i:
        iterates.append((i, x.copy(), phis[i]))
    return CGResult(x=x, iterates=iterates, phis=phis, iterations=i, products=products, stop=stop,
                    negative_curvature=negative_curvature)
