"""Curvature of the loss over a whole data set, as ``scipy.sparse.linalg.LinearOperator``.

``data`` is one ``(X, y)`` pair or a re-iterable of ``(X, y)`` batches (a list, or an
object whose ``__iter__`` starts over each time). The operator is the curvature of the
loss of all the data taken as one batch: with ``reduction="mean"`` batch b enters with
weight ``B_b / Σ B`` (its share of the examples), with ``"sum"`` with weight 1, so that

    ``M = Σ_b w_b M_b + l2 · diag(weight mask)``

equals the operator of the concatenated data exactly. Each batch is linearized once
(``hvp.linearize``) and kept; with ``cache=False`` it is linearized again at every
product instead, holding one batch at a time. ``matmat`` pushes all columns of a
(P, k) block through each batch together (block products, DESIGN.md §1).

The three operators are symmetric, shape (P, P), dtype of θ, and work as they are
with ``scipy.sparse.linalg.eigsh``, ``cg`` and ``minres``.
"""

import numpy as np
from scipy.sparse.linalg import LinearOperator

from ._checks import (
    check_batch,
    check_bool,
    check_direction,
    check_l2,
    check_loss,
    check_net,
    check_theta,
    describe,
    is_batch,
)
from .penalty import add_l2, l2_value
from .products import linearize


def check_dataset_problem(net, loss, theta):
    """The network, a loss with reduction "mean" or "sum" (data-set curvature weighs batches by it), and θ."""
    check_net(net)
    check_loss(loss)
    if getattr(loss, "reduction", None) not in ("mean", "sum"):
        raise TypeError(f"loss must be an hvp loss with reduction 'mean' or 'sum', got {describe(loss)}")
    return check_theta(theta, net.num_params)


class SymmetricOperator(LinearOperator):
    """A symmetric (P, P) operator whose products check their argument, so that a wrong shape or a NaN
    is reported by name rather than as scipy's "dimension mismatch"; subclasses define ``_matmat``."""

    def matvec(self, x):
        return super().matvec(check_direction("v", x, self.shape[0], self.dtype))

    def matmat(self, X):
        V = check_direction("V", X, self.shape[0], self.dtype)
        if V.ndim != 2:
            raise ValueError(f"V must have shape ({self.shape[0]}, k) with k >= 1, got shape {V.shape}")
        return super().matmat(V)

    def dot(self, x):
        if not (isinstance(x, LinearOperator) or np.isscalar(x)):
            x = check_direction("v", x, self.shape[0], self.dtype)
        return super().dot(x)

    def _matvec(self, v):
        return self._matmat(np.reshape(v, (-1, 1)))[:, 0]

    def _adjoint(self):
        return self


class _DatasetCurvature(SymmetricOperator):
    """Shared machinery: per-batch linearizations, weights, block products."""

    def __init__(self, net, loss, theta, data, l2=0.0, cache=True):
        theta = check_dataset_problem(net, loss, theta)
        super().__init__(dtype=theta.dtype, shape=(net.num_params, net.num_params))
        self.net, self.loss_fn, self.theta = net, loss, theta.copy()
        self.l2 = check_l2(l2)
        self.cache = check_bool("cache", cache)
        if is_batch(data):
            data = [data]
        elif not hasattr(data, "__iter__"):
            raise TypeError(f"data must be an (X, y) pair or an iterable of (X, y) batches, got {describe(data)}")
        elif not self.cache and iter(data) is data:
            raise TypeError("with cache=False, data must be re-iterable (a list, or an object whose __iter__ "
                            f"starts over each time), got a one-shot iterator {describe(data)}")
        self._data = data
        self._weight_mask = net.weight_mask()
        self._linearizations = []
        self.batch_sizes = []
        loss_sum, grad_sum = 0.0, np.zeros(net.num_params, dtype=theta.dtype)
        for i, batch in enumerate(data):
            X, y = check_batch(i, batch)
            pt = linearize(net, loss, self.theta, X, y)
            factor = self._batch_factor(pt)
            loss_sum += factor * pt.loss
            grad_sum += theta.dtype.type(factor) * pt.grad
            self.batch_sizes.append(pt.outputs.shape[0])
            if self.cache:
                self._linearizations.append(pt)
        if not self.batch_sizes:
            raise ValueError("data holds no batch: expected at least one (X, y) pair")
        self.num_examples = sum(self.batch_sizes)
        self._denominator = self.num_examples if loss.reduction == "mean" else 1
        #: Loss over all the data, L2 penalty included.
        self.loss = loss_sum / self._denominator + l2_value(self.theta, self._weight_mask, self.l2)
        #: Gradient over all the data (P,), L2 term included.
        self.grad = add_l2(grad_sum / theta.dtype.type(self._denominator), self.theta, self._weight_mask, self.l2)

    def _batch_factor(self, pt):
        """``B_b`` for mean reduction, 1 for sum; the weight is this over its sum (or 1)."""
        return pt.outputs.shape[0] if self.loss_fn.reduction == "mean" else 1

    def _weighted_linearizations(self):
        """(w_b, linearization of batch b) for every batch, cached or computed afresh."""
        if self.cache:
            batches = self._linearizations
        else:
            batches = (linearize(self.net, self.loss_fn, self.theta, *check_batch(i, batch))
                       for i, batch in enumerate(self._data))
        count = 0
        for pt in batches:
            count += pt.outputs.shape[0]
            yield self.dtype.type(self._batch_factor(pt) / self._denominator), pt
        if count != self.num_examples:
            raise RuntimeError(f"data gave {count} examples on this pass but {self.num_examples} when the "
                               f"operator was built: it must yield the same batches each time")

    def _batch_product(self, pt, V):
        raise NotImplementedError

    def _matmat(self, V):
        V = check_direction("V", V, self.shape[0], self.dtype)
        out = None
        for w, pt in self._weighted_linearizations():
            product = self._batch_product(pt, V)
            if w != 1:
                product *= w
            if out is None:
                out = product
            else:
                out += product
        return add_l2(out, V, self._weight_mask, self.l2)

    def __repr__(self):
        return (f"<{type(self).__name__} {self.shape[0]}x{self.shape[1]} {self.dtype}: "
                f"{self.num_examples} examples in {len(self.batch_sizes)} batches, l2={self.l2}, cache={self.cache}>")


class HessianOperator(_DatasetCurvature):
    """Hessian ``H = ∇²L(θ)`` of the loss over a data set, as a scipy ``LinearOperator``.

    ``L(θ) = ℓ(f(θ, X), y) + l2/2 Σ‖W‖²`` with X, y all of ``data`` taken as one batch;
    ``H v = Σ_b w_b H_b v + l2·mask ⊙ v`` with ``w_b = B_b/ΣB`` (mean) or 1 (sum).
    Symmetric, indefinite in general.

    Parameters
    ----------
    net : Sequential
    loss : CrossEntropyLoss, MSELoss or BCEWithLogitsLoss
        An instance, such as ``hvp.CrossEntropyLoss()``.
    theta : ndarray, shape (P,), float32 or float64
        The point; copied. Sets the operator's dtype.
    data : (X, y) or iterable of (X, y)
        X an array (B_b, in_features), y labels (B_b,) or targets (B_b, C). An iterable
        must be re-iterable when ``cache=False`` (a list, or a loader whose ``__iter__``
        starts over) and yield the same batches each time.
    l2 : float
        Weight of the penalty ``l2/2 Σ‖W‖²`` on weight matrices.
    cache : bool
        Keep each batch's linearization (one forward/backward pass per batch, ever);
        ``False`` recomputes them at every product to hold one batch at a time.

    Attributes
    ----------
    loss : float
        ``L(θ)`` over all the data, L2 term included.
    grad : ndarray, shape (P,)
        ``∇L(θ)`` over all the data, L2 term included.
    num_examples : int
    batch_sizes : list of int

    Examples
    --------
    >>> H = hvp.HessianOperator(net, hvp.CrossEntropyLoss(), theta, [(X1, y1), (X2, y2)])
    >>> top = scipy.sparse.linalg.eigsh(H, k=5, which="LA", return_eigenvectors=False)
    """

    def _batch_product(self, pt, V):
        return pt.hvp(V)


class GGNOperator(_DatasetCurvature):
    """Generalized Gauss-Newton ``G = Jᵀ ∇²ℓ J + l2·diag(mask)`` over a data set (Schraudolph 2002).

    Positive semi-definite for the convex losses here (the matrix for CG and Newton-CG).
    ``G v = Σ_b w_b G_b v + l2·mask ⊙ v`` with ``w_b = B_b/ΣB`` (mean) or 1 (sum).
    Parameters and attributes as :class:`HessianOperator`.
    """

    def _batch_product(self, pt, V):
        return pt.ggnvp(V)


class EmpiricalFisherOperator(_DatasetCurvature):
    """Empirical Fisher (uncentered gradient covariance) over a data set.

    Scaling — the same factor as the loss:

        ``F = (1/N) Σ_n ∇ℓ_n ∇ℓ_nᵀ + l2·diag(mask)``

    with ``ℓ_n`` the *unreduced* loss of example n and N the loss's normalizer over all
    the data (``loss.normalizer``): N = ΣB for cross-entropy with ``reduction="mean"``,
    N = ΣB·C for MSE and BCE-with-logits with ``"mean"`` (whose mean runs over all
    entries, as in ``torch.nn``), N = 1 for ``"sum"``. So F scales like the Hessian and
    the GGN (for mean reduction all three are averages over examples) and matches
    curvlinops' ``EFLinearOperator``. In terms of
    BackPACK's per-example gradients ``g_n = ∇(ℓ_n/N)`` (``BatchGrad``, also
    ``pt.batch_grad()``), ``F = N Σ_n g_n g_nᵀ``: with mean reduction, ``Σ_n g_n g_nᵀ`` as
    assembled from BackPACK is smaller by the factor N. The L2 term is the penalty's exact
    Hessian, as in :class:`GGNOperator`.

    Product without per-example gradients: with ``D`` the output adjoint ``∂L_b/∂O`` (B, C),
    row n being ``∇_O ℓ_n / N_b``, ``F_b v = Jᵀ(N_b D ⊙ ⟨D_n, (J v)_n⟩)`` — one jvp and one vjp.

    Parameters and attributes as :class:`HessianOperator`.
    """

    def _batch_product(self, pt, V):
        return empirical_fisher_product(pt, V)


def empirical_fisher_product(pt, V):
    """One batch's ``F_b V`` (P, k) for V (P, k), no L2 term: ``Jᵀ(N_b D ⊙ ⟨D_n, (J V)_n⟩)``, one jvp and one vjp.

    D (B, C) is the output adjoint ``∂L_b/∂O``, row n being ``∇_O ℓ_n / N_b``, N_b the loss's normalizer.
    """
    D = pt.adjoints[-1]
    JV = pt.jvp(V)  # (B, k, C)
    scale = pt.theta.dtype.type(pt.loss_fn.normalizer(pt.outputs))
    coefficients = np.einsum("bkc,bc->bk", JV, D) * scale
    return pt.vjp(coefficients[:, :, None] * D[:, None, :])
