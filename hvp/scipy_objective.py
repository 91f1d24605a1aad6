"""A network's loss as ``fun, jac, hessp`` for ``scipy.optimize.minimize``."""

import numpy as np

from ._checks import all_finite, check_inputs, check_l2, check_loss, check_net
from .products import linearize

CURVATURES = ("hessian", "ggn")


def scipy_objective(net, loss, X, y, l2=0.0, curvature="hessian"):
    """``fun, jac, hessp`` of ``L(θ) = ℓ(f(θ, X), y) + l2/2·Σ‖W‖²`` for ``scipy.optimize.minimize``.

    The three functions share one linearization per θ: the first call at a new θ runs one
    forward and one backward pass (:func:`hvp.linearize`); every further call at the same θ
    (``jac``, any number of ``hessp``) reuses it. The two latest points are kept, so that a
    trust-region method that rejects a trial point goes back to the current one for free.
    Works with the methods "Newton-CG", "trust-ncg", "trust-krylov" (and any method that takes ``jac``).

    Parameters
    ----------
    net : Sequential
    loss : CrossEntropyLoss, MSELoss or BCEWithLogitsLoss
        An instance, such as ``hvp.CrossEntropyLoss()``.
    X : array_like, shape (B, in_features)
    y : array_like, labels (B,) or targets (B, C)
    l2 : float
        Weight of the penalty ``l2/2·Σ‖W‖²`` over weight matrices.
    curvature : {"hessian", "ggn"}
        What ``hessp`` multiplies by: the Hessian ``∇²L`` or the Gauss-Newton matrix
        ``Jᵀ∇²ℓJ + l2·diag(weight mask)``.

    Returns
    -------
    fun : callable
        ``fun(theta) -> float`` for theta (P,).
    jac : callable
        ``jac(theta) -> ndarray (P,)``, a fresh array.
    hessp : callable
        ``hessp(theta, p) -> ndarray (P,)`` for p (P,).

    Notes
    -----
    A θ or p with NaN or Inf entries gives a NaN value, gradient or product, as a plain numpy
    objective would, rather than an error: scipy's "trust-krylov" can step to such points near
    convergence, and it recovers from a NaN (shrinking its trust region) but not from an exception.

    Examples
    --------
    >>> fun, jac, hessp = hvp.scipy_objective(net, loss, X, y, l2=1e-3)
    >>> res = scipy.optimize.minimize(fun, theta0, jac=jac, hessp=hessp, method="trust-ncg")
    """
    check_net(net)
    check_loss(loss)
    if curvature not in CURVATURES:
        raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}")
    X = check_inputs(X, net, np.float64).copy()  # private copies: later edits by the caller don't leak in
    y = np.array(loss.check_target(y, np.zeros((X.shape[0],) + net.output_shape(X.shape[1:]))), copy=True)
    l2 = check_l2(l2)
    recent = []  # the latest linearizations, newest last

    def at(theta):
        for pt in recent:
            if pt.theta.shape == np.shape(theta) and np.array_equal(pt.theta, theta):
                return pt
        recent.append(linearize(net, loss, np.asarray(theta), X, y, l2))
        del recent[:-2]
        return recent[-1]

    def finite(*arrays):  # scipy's trust-krylov can step to NaN near convergence and recovers from NaN
        return all(all_finite(np.asarray(a)) for a in arrays)

    def fun(theta):
        return at(theta).loss if finite(theta) else np.nan

    def jac(theta):
        return at(theta).grad.copy() if finite(theta) else np.full(np.shape(theta), np.nan)

    def hessp(theta, p):
        if not finite(theta, p):
            return np.full(np.shape(p), np.nan)
        pt = at(theta)
        return pt.hvp(p) if curvature == "hessian" else pt.ggnvp(p)

    return fun, jac, hessp
