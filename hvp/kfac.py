"""Kronecker-factored curvature (K-FAC, Martens & Grosse 2015) from the engine's own passes.

For a Linear layer ``O = I W + b`` example n's weight gradient is the outer product
``ā_n DO_nᵀ`` of its input with a 1 appended, ``ā_n = [I_n, 1]``, and the adjoint at its output
(seed 002's ``DI2`` for one example). So the layer's block of the Gauss-Newton matrix is
``Σ_n (ā_n ā_nᵀ) ⊗ (Σ_c s_nc s_ncᵀ)``, with ``s_nc`` the columns of a factor of the loss Hessian,
``∇²ℓ_n = Σ_c S_nc S_ncᵀ``, pushed back to the layer's output. K-FAC replaces the sum of
Kronecker products by the Kronecker product of sums (DESIGN.md §6)::

    A = (1/B) Σ_n ā_n ā_nᵀ  (m+1, m+1),      G = Σ_n Σ_c s_nc s_ncᵀ  (n, n),

and the block by ``A ⊗ G``. The layer's slice of θ (weight (m, n) in C order, then bias (n,)) is
the matrix ``W̄ = [W; b]`` (m+1, n) in C order, and ``(A ⊗ G) vec(V) = vec(A V G)``. The columns s:

- ``"exact"``: the loss-Hessian factor columns that ``diag_ggn`` uses (C − 1 for cross-entropy,
  C for MSE and BCE): the type-2 / KFLR factors (Botev, Ritter & Barber 2017);
- ``"mc"``: ``num_samples`` columns from targets sampled from the model, ``E[Σ s sᵀ] = ∇²ℓ_n``
  (Martens & Grosse's Monte-Carlo Fisher), one backward column per sample;
- ``"empirical"``: the gradient's own adjoints, ``G = N Σ_n DO_n DO_nᵀ`` (N the loss's
  normalizer), the factor of the empirical Fisher of :class:`~hvp.EmpiricalFisherOperator`.

The normalization is that of ``pt.ggnvp`` (the loss's 1/N included), and the operator adds
``l2·v`` on weight entries as ``ggnvp`` does. For a single Linear layer under MSE, K-FAC is the GGN.
"""

import numpy as np
from scipy.sparse.linalg import LinearOperator

from . import products
from ._checks import (
    check_batch,
    check_direction,
    check_int,
    check_l2,
    check_loss,
    check_net,
    check_real,
    check_seed,
    check_theta,
    describe,
    is_batch,
)
from .penalty import add_l2, l2_value

KINDS = ("exact", "mc", "empirical")
MAX_EXACT_OUTPUTS = 16


def check_kind(kind, num_samples):
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return check_int("num_samples", num_samples, 1)


def default_kind(num_outputs):
    """The factor kind to use when the user names none: ``"exact"`` up to 16 outputs, else ``"mc"``.

    "exact" costs C − 1 (cross-entropy) or C backward columns, "mc" one per sample; with few
    outputs the exact factor is affordable and free of sampling noise.
    """
    return "exact" if num_outputs <= MAX_EXACT_OUTPUTS else "mc"


def _key(path):
    """A block's key: the layer's index at the top level, its path (i, j, …) inside residual blocks."""
    return path[0] if len(path) == 1 else path


def kronecker_layers(net):
    """K-FAC's blocks in θ's order, ``{key: layer}``: one per layer with parameters, keyed by its index in
    ``net.layers``, or by its path ``(i, j, …)`` inside residual blocks (layer j of the branch of the block at i).
    Each must offer the Kronecker rules of the layer contract."""
    units = {}

    def visit(path, layer):
        if hasattr(layer, "branch"):  # a block O = I + f(I): the blocks of f's layers
            for j, inner in enumerate(layer.layers):
                visit(path + (j,), inner)
        elif layer.param_shapes():
            key = _key(path)
            if not hasattr(layer, "kronecker_factors"):
                raise TypeError(f"K-FAC needs Kronecker factors for every layer with parameters; "
                                f"layer {key} ({describe(layer)}) has none")
            units[key] = layer

    for i, layer in enumerate(net.layers):
        visit((i,), layer)
    return units


def block_views(views, key):
    """The parameter views of K-FAC's block ``key`` among ``net.unflatten(V)``: a layer's own dict, or for a
    path (i, j, …) the entries of layer i's named ``"j.….<name>"``, by ``<name>``."""
    if not isinstance(key, tuple):
        return views[key]
    prefix = "".join(f"{j}." for j in key[1:])
    return {name[len(prefix):]: view for name, view in views[key[0]].items() if name.startswith(prefix)}


def batch_factors(pt, kind="exact", num_samples=1, rng=None):
    """``{block key: (A, G)}`` for one linearization (keys of :func:`kronecker_layers`): A from each layer's
    input, G from backpropagated columns, carried into residual branches by their ``branch`` rule.

    Parameters
    ----------
    pt : Linearization
    kind : {"exact", "mc", "empirical"}
    num_samples : int
        Sampled columns per example for ``"mc"``.
    rng : anything ``numpy.random.default_rng`` takes
        For ``"mc"``.
    """
    units = kronecker_layers(pt.net)
    if kind == "empirical":
        N = pt.theta.dtype.type(np.sqrt(pt.loss_fn.normalizer(pt.outputs)))
        D, adjoints = None, [N * DO[None] for DO in pt.adjoints]
    else:
        S = pt.loss_fn.hessian_sqrt(pt.loss_cache) if kind == "exact" else \
            pt.loss_fn.sample_hessian_sqrt(pt.loss_cache, num_samples, np.random.default_rng(rng))
        D, adjoints = S.astype(pt.theta.dtype, copy=False), None  # (K, B, C): pushed back layer by layer
    factors = {}

    def visit(path, layer, p, cache, D):
        if hasattr(layer, "branch"):
            for j, (inner, q, c, Dj, _) in enumerate(layer.branch(p, cache, D, None)):
                visit(path + (j,), inner, q, c, Dj)
        elif layer.param_shapes():
            factors[_key(path)] = layer.kronecker_factors(cache, D)

    first = min(key[0] if isinstance(key, tuple) else key for key in units)
    for i in reversed(range(first, len(pt.net.layers))):
        layer, p, cache = pt.net.layers[i], pt.params[i], pt.caches[i]
        visit((i,), layer, p, cache, D if adjoints is None else adjoints[i])
        if i > first and adjoints is None:
            D = layer.backward_input(p, cache, D)
    return {key: factors[key] for key in units}


def add_factors(total, factors, a=1.0, g=1.0):
    """``total[key] += (a·A, g·G)`` for each block's pair in ``factors``, in place (a new key starts at zero);
    the weighted sums over batches or shards that K-FAC's data-set factors are. Returns total."""
    for key, (A, G) in factors.items():
        A0, G0 = total.get(key, (0, 0))
        total[key] = (A0 + A.dtype.type(a) * A, G0 + G.dtype.type(g) * G)
    return total


class KroneckerFactored(LinearOperator):
    """Block-diagonal ``⊕_layers A ⊗ G + l2·diag(weight mask)`` as a scipy ``LinearOperator`` (P, P).

    Built by :meth:`hvp.Linearization.kfac` (one batch) or :class:`KFACOperator` (a data set).

    Attributes
    ----------
    factors : list of (A, G)
        One pair per layer with parameters, in order: A (m+1, m+1) (or (m, m) without bias)
        and G (n, n), float arrays in θ's dtype; a grouped convolution gives stacks (groups, ·, ·),
        one Kronecker block per group.
    l2 : float
    """

    def __init__(self, net, factors, l2, dtype):
        super().__init__(dtype=np.dtype(dtype), shape=(net.num_params, net.num_params))
        self.net, self.l2 = net, l2
        self._units = kronecker_layers(net)
        self.factors = [factors[key] for key in self._units]
        self._weight_mask = net.weight_mask()
        self._eigen = None  # eigendecompositions of the factors, computed once, on the first inverse
        self._inverses = {}  # γ -> per layer the damped factors' inverses (pi=True)

    def _blocks(self, V, apply):
        """``apply(j, M)`` on each layer's matrix W̄ of the rows V (k, P); the results as rows (k, P)."""
        views = self.net.unflatten(V)
        out = np.zeros_like(V)
        out_views = self.net.unflatten(out)
        for j, (key, layer) in enumerate(self._units.items()):
            layer.from_kronecker_matrix(apply(j, layer.kronecker_matrix(block_views(views, key))),
                                        block_views(out_views, key))
        return out

    def _rows_product(self, V, apply, l2):
        V = check_direction("V", V, self.shape[0], self.dtype)
        rows = np.ascontiguousarray(V.reshape(V.shape[0], -1).T)
        out = self._blocks(rows, apply)
        return add_l2(out, rows, self._weight_mask, l2, axis=1).T.reshape(V.shape)

    def _matmat(self, V):
        return self._rows_product(V, lambda j, M: self.factors[j][0] @ M @ self.factors[j][1], self.l2)

    def _matvec(self, v):
        return self._matmat(np.reshape(v, (-1, 1)))[:, 0]

    def _adjoint(self):
        return self

    def diagonal(self):
        """The exact diagonal (P,): ``diag(A) ⊗ diag(G)`` per layer, plus l2 on weights."""
        rows = np.zeros((1, self.shape[0]), dtype=self.dtype)
        out = self._blocks(rows, lambda j, M: _diagonal(self.factors[j][0])[..., :, None]
                           * _diagonal(self.factors[j][1])[..., None, :])[0]
        out[self._weight_mask] += self.dtype.type(self.l2)
        return out

    def trace(self):
        """``Σ_layers tr(A)·tr(G) + l2·(number of weights)``."""
        return float(sum(np.sum(_diagonal(A).sum(-1) * _diagonal(G).sum(-1)) for A, G in self.factors)
                     + self.l2 * self._weight_mask.sum())

    def eigen(self):
        """Per layer ``(a, U_A, g, U_G)``: eigenvalues (clipped at 0) and eigenvectors of A and G, cached."""
        if self._eigen is None:
            self._eigen = []
            for A, G in self.factors:  # in float64 whatever θ's dtype: float32 factors lose their small eigenvalues
                a, U_A = np.linalg.eigh(A.astype(np.float64))
                g, U_G = np.linalg.eigh(G.astype(np.float64))
                self._eigen.append((np.maximum(a, 0), U_A, np.maximum(g, 0), U_G))
        return self._eigen

    def inverse(self, damping, pi=True):
        """An approximate inverse of the operator plus ``damping·I``, as a ``LinearOperator`` (P, P).

        With ``γ = damping + l2``, per layer: ``pi=True``, Martens & Grosse's (2015, §6.3) factored
        Tikhonov damping ``((A + π√γ I) ⊗ (G + √γ/π I))⁻¹``, ``π = √((tr A / dim A) / (tr G / dim G))``;
        ``pi=False``, the exact ``(A ⊗ G + γ I)⁻¹``. Both from one eigendecomposition of each factor
        (computed on the first call, reused for every damping): ``A ⊗ G + γ I`` is diagonal in the
        basis ``U_A ⊗ U_G``. With ``l2 = 0`` and ``pi=False`` this is exactly ``(K + damping·I)⁻¹``;
        with ``l2 > 0`` the bias rows get γ too (keeping each block a Kronecker product). With
        ``pi=True`` each product is two matrix products per layer, in θ's dtype, with the damped
        factors' inverses, formed once per damping value (the last four are kept); with
        ``pi=False``, four, with the eigenvectors.

        Parameters
        ----------
        damping : float
            >= 0, with ``damping + l2 > 0``.
        pi : bool

        Returns
        -------
        LinearOperator, shape (P, P)
        """
        gamma = check_real("damping", damping, minimum=0) + self.l2
        if not gamma > 0:
            raise ValueError(f"damping must be > 0 when l2 = 0, got {damping!r}")
        apply = self._factored_inverse(gamma) if pi else self._exact_inverse(gamma)

        def matmat(V):
            return self._rows_product(V, apply, 0.0)

        return LinearOperator(self.shape, matvec=lambda v: matmat(np.reshape(v, (-1, 1)))[:, 0], matmat=matmat,
                              rmatvec=lambda v: matmat(np.reshape(v, (-1, 1)))[:, 0], dtype=self.dtype)

    def _factored_inverse(self, gamma):
        """``M -> (A + π√γ I)⁻¹ M (G + √γ/π I)⁻¹`` per layer: two matrix products in θ's dtype with the
        damped factors' inverses, formed from the eigendecompositions once per γ (the last few γ are kept)."""
        if gamma not in self._inverses:
            if len(self._inverses) >= 4:  # an optimizer tries about three γ at a time
                self._inverses.clear()
            inverses = []
            for (a, U_A, g, U_G), (A, G) in zip(self.eigen(), self.factors):
                mean_a, mean_g = _diagonal(A).mean(-1), _diagonal(G).mean(-1)
                ok = (mean_a > 0) & (mean_g > 0)
                pi_ = np.where(ok, np.sqrt(np.where(ok, mean_a, 1) / np.where(ok, mean_g, 1)), 1.0)[..., None]
                inverses.append(tuple(((U / (d + c)[..., None, :]) @ np.swapaxes(U, -1, -2)).astype(self.dtype)
                                      for d, U, c in ((a, U_A, pi_ * np.sqrt(gamma)), (g, U_G, np.sqrt(gamma) / pi_))))
            self._inverses[gamma] = inverses
        inverses = self._inverses[gamma]
        return lambda j, M: inverses[j][0] @ M @ inverses[j][1]

    def _exact_inverse(self, gamma):
        """``M -> U_A ((U_Aᵀ M U_G) / (a gᵀ + γ)) U_Gᵀ`` per layer: ``(A ⊗ G + γI)⁻¹`` in the factors' eigenbasis."""
        bases = [(U_A.astype(self.dtype), U_G.astype(self.dtype),
                  (1 / (a[..., :, None] * g[..., None, :] + gamma)).astype(self.dtype))
                 for a, U_A, g, U_G in self.eigen()]

        def apply(j, M):
            U_A, U_G, scale = bases[j]
            return U_A @ ((np.swapaxes(U_A, -1, -2) @ M @ U_G) * scale) @ np.swapaxes(U_G, -1, -2)

        return apply

    def __repr__(self):
        return f"<{type(self).__name__} {self.shape[0]}x{self.shape[1]} {self.dtype}: {len(self.factors)} layers>"


class KFACOperator(KroneckerFactored):
    """K-FAC of the loss over a data set, ``⊕_layers A ⊗ G + l2·diag(weight mask)``, a scipy ``LinearOperator``.

    A is the mean over all examples of ``ā ā ᵀ``; G the sum over batches of ``w_b G_b`` with the
    weights of :class:`~hvp.GGNOperator` (``B_b/ΣB`` for mean reduction, 1 for sum), so that for
    ``"exact"`` and ``"empirical"`` the operator over a list of batches equals the one of all the
    data in one batch. See :mod:`hvp.kfac` for the factors.

    Parameters
    ----------
    net : Sequential
    loss : CrossEntropyLoss, MSELoss or BCEWithLogitsLoss
    theta : ndarray, shape (P,), float32 or float64
    data : (X, y) or list of (X, y)
    kind : {"exact", "mc", "empirical"}
    l2 : float
        Weight of ``l2/2 Σ‖W‖²``: adds ``l2·v`` on weight entries.
    num_samples : int
        Sampled targets per example for ``"mc"``.
    seed : int, numpy.random.Generator or None
        For ``"mc"``.

    Attributes
    ----------
    factors : list of (A, G)
    loss : float
        The loss over all the data, L2 term included.
    num_examples : int
    """

    def __init__(self, net, loss, theta, data, kind="exact", l2=0.0, num_samples=1, seed=0):
        check_net(net)
        check_loss(loss)
        theta = check_theta(theta, net.num_params)
        num_samples = check_kind(kind, num_samples)
        l2 = check_l2(l2)
        if is_batch(data):
            data = [data]
        rng = check_seed(seed)
        sums, batches, loss_sum = {}, [], 0.0
        for X, y in (check_batch(i, batch) for i, batch in enumerate(data)):
            pt = products.linearize(net, loss, theta, X, y)
            B = pt.outputs.shape[0]
            weight = B if loss.reduction == "mean" else 1
            add_factors(sums, batch_factors(pt, kind, num_samples, rng), B, weight)
            batches.append(B)
            loss_sum += weight * pt.loss
        if not batches:
            raise ValueError("data holds no batch: expected at least one (X, y) pair")
        N, denominator = sum(batches), (sum(batches) if loss.reduction == "mean" else 1)
        factors = {i: (A / theta.dtype.type(N), G / theta.dtype.type(denominator)) for i, (A, G) in sums.items()}
        super().__init__(net, factors, l2, theta.dtype)
        self.loss = loss_sum / denominator + l2_value(theta, self._weight_mask, l2)
        self.num_examples = N


def _diagonal(M):
    """The diagonal (..., d) of a factor (d, d) or of a stack of them (G, d, d)."""
    return np.diagonal(M, axis1=-2, axis2=-1)
