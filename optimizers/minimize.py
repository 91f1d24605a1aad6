"""Martens' Newton-CG recipe for any objective with a Hessian-vector product, scipy-style.

:func:`newton_cg` runs :func:`optimizers.hessian_free.hf_step` — the same step as
:class:`~optimizers.NewtonCG` — on ``fun``, ``jac`` and ``hessp`` as ``scipy.optimize.minimize``
takes them, and returns an ``OptimizeResult``.
"""

import time

import numpy as np
from scipy.optimize import OptimizeResult

from hvp._checks import check_bool, check_finite, check_int, describe, real_array

from ._base import check_positive
from .hessian_free import check_recipe, diagonal_preconditioner, hf_step


def newton_cg(fun, x0, jac, hessp, args=(), *, hess_diag=None, damping=1.0, adapt_damping=True, damping_rule="martens",
              precondition=True,
              cg_max_iter=250, cg_progress_tol=5e-4, cg_forcing=True, warm_start=0.95, backtrack=True,
              line_search=True, gtol=1e-5, maxiter=100, max_rejections=20, callback=None):
    """Minimize ``fun`` by Martens' damped Newton-CG, given gradient and Hessian-vector products.

    Parameters
    ----------
    fun : callable
        ``fun(x, *args) -> float`` (or ``(float, gradient)`` with ``jac=True``).
    x0 : array_like, shape (n,)
        Start (copied, as float64).
    jac : callable or True
        ``jac(x, *args) -> (n,)``; True if ``fun`` returns the gradient too.
    hessp : callable
        ``hessp(x, p, *args) -> (n,)``: the curvature (Hessian, or a Gauss-Newton matrix) times p.
    args : tuple
        Extra arguments of fun, jac, hessp, hess_diag.
    hess_diag : callable or None
        ``hess_diag(x, *args) -> (n,)``, a nonnegative diagonal for the preconditioner
        ``(hess_diag + λ)^0.75`` (e.g. Σ_n g_n²); None: no preconditioner.
    damping, adapt_damping, damping_rule, cg_max_iter, cg_progress_tol, cg_forcing, warm_start, backtrack, line_search
        As for :class:`NewtonCG`.
    precondition : bool
        Use ``hess_diag`` for the preconditioner.
    gtol : float
        Stop once ``‖∇f(x)‖₂ <= gtol``.
    maxiter : int
        Most outer iterations (accepted or rejected steps).
    max_rejections : int
        Stop after this many rejected steps in a row.
    callback : callable or None
        ``callback(intermediate_result)`` after each step with an OptimizeResult holding ``x`` and
        the step's record; returning True stops.

    Returns
    -------
    scipy.optimize.OptimizeResult
        ``x``, ``fun``, ``jac``, ``nit``, ``nfev``, ``njev``, ``nhev``, ``status``, ``success``,
        ``message``, ``history`` (as :attr:`NewtonCG.history`).
    """
    if not callable(fun):
        raise TypeError(f"fun must be callable, got {describe(fun)}")
    if not (jac is True or callable(jac)):
        raise TypeError(f"jac must be callable or True, got {describe(jac)}")
    for name, f in (("hessp", hessp), ("hess_diag", hess_diag), ("callback", callback)):
        if f is not None and not callable(f):
            raise TypeError(f"{name} must be callable, got {describe(f)}")
    if hessp is None:
        raise TypeError("hessp must be callable: hessp(x, p, *args) -> the curvature times p")
    x = real_array("x0", x0, np.float64).ravel().copy()
    if x.size == 0:
        raise ValueError(f"x0 must hold at least one number, got {describe(x0)}")
    check_finite("x0", x)
    if not isinstance(args, tuple):
        raise TypeError(f"args must be a tuple of extra arguments, got {describe(args)}")
    precondition = check_bool("precondition", precondition)
    recipe = check_recipe(adapt_damping, damping_rule, cg_max_iter, cg_progress_tol, cg_forcing, warm_start,
                          backtrack, line_search)
    damping = check_positive("damping", damping, allow_zero=not adapt_damping)
    gtol = check_positive("gtol", gtol, allow_zero=True)
    maxiter = check_int("maxiter", maxiter, 0)
    max_rejections = check_int("max_rejections", max_rejections, 1)
    counts = {"nfev": 0, "njev": 0, "nhev": 0}

    def value_and_grad(x):
        counts["nfev"] += 1
        counts["njev"] += 1
        f, g = fun(x, *args) if jac is True else (fun(x, *args), jac(x, *args))
        return float(f), np.asarray(g, dtype=np.float64).ravel()

    def value(x):
        counts["nfev"] += 1
        return float(fun(x, *args)[0] if jac is True else fun(x, *args))

    history, warm, rejected = [], None, 0
    status, message = 1, "maximum number of iterations reached"
    f0, g = value_and_grad(x)
    for it in range(maxiter + 1):
        if np.linalg.norm(g) <= gtol:
            status, message = 0, f"gradient norm <= gtol = {gtol:g}"
            break
        if it == maxiter:
            break
        start = time.perf_counter()
        preconditioner = None
        if precondition and hess_diag is not None:
            preconditioner = diagonal_preconditioner(np.asarray(hess_diag(x, *args), dtype=np.float64).ravel())

        def curvature(v, x=x):
            counts["nhev"] += 1
            return np.asarray(hessp(x, v, *args), dtype=np.float64).ravel()

        step, record, damping, warm = hf_step(f0, g, curvature, lambda p, x=x: value(x + p), damping, warm,
                                              preconditioner,
                                              rejected, **recipe)
        if step is not None:
            x = x + step
            f0, g = value_and_grad(x)
        record.update(seconds=time.perf_counter() - start, step=it)
        history.append(record)
        rejected = 0 if record["accepted"] else rejected + 1
        if callback is not None and callback(OptimizeResult(x=x.copy(), **record)) is True:
            status, message = 3, "stopped by the callback"
            break
        if rejected >= max_rejections:
            status, message = 2, f"{rejected} rejected steps in a row"
            break
    return OptimizeResult(x=x, fun=f0, jac=g, nit=len(history), status=status, success=status == 0,
                          message=message, history=history, **counts)
