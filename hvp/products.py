"""Loss, gradient, and curvature products of a network at a point θ.

``linearize`` runs one forward and one backward pass and keeps what the
products need (each layer's input, σ′ and σ″, the adjoints δ = ∂L/∂O of each
layer's output, the loss-Hessian factors), so that every later product costs
one tangent pass and one backward pass and never the forward pass again.
Blocks of k directions travel together along the k axis (DESIGN.md §1).
"""

import numpy as np

from . import kfac, memory, per_example
from ._checks import (
    check_direction,
    check_finite,
    check_inputs,
    check_l2,
    check_loss,
    check_net,
    check_seed,
    check_theta,
    describe,
    real_array,
)
from .diag_hessian import diag_hessian as _diag_hessian
from .layers.second_order import backward_with_cross_terms
from .penalty import add_l2, l2_value


def _prepare(net, loss, theta, X, y, l2):
    check_net(net)
    check_loss(loss)
    theta = check_theta(theta, net.num_params)
    X = check_inputs(X, net, theta.dtype)
    return theta, X, check_l2(l2)


def _backward(net, params, caches, DO):
    """Rule 2 from the outputs to θ: gradient (P,) for DO (B, C), or columns (P, k) for DO (k, B, C)."""
    grad = memory.empty((net.num_params,) + DO.shape[:-2], DO.dtype)
    views = net.unflatten(grad) if DO.ndim == 2 else net.unflatten_columns(grad)
    for i in reversed(range(len(net.layers))):
        layer, p, cache = net.layers[i], params[i], caches[i]
        layer.backward_params(p, cache, DO, out=views[i])
        if i > 0:
            DO = layer.backward_input(p, cache, DO)
    return grad


def _adjoints(net, params, caches, DO):
    """The adjoint ``δ = ∂L/∂O`` at every layer's output: rule 2's input half only, from DO (B, C)."""
    adjoints = [None] * len(net.layers)
    for i in reversed(range(len(net.layers))):
        adjoints[i] = DO
        if i > 0:
            DO = net.layers[i].backward_input(params[i], caches[i], DO)
    return adjoints


def loss_and_grad(net, loss, theta, X, y, l2=0.0):
    """Loss ``L(θ) = ℓ(f(θ, X), y) + l2/2 Σ‖W‖²`` and its gradient.

    Parameters
    ----------
    net : Sequential
    loss : CrossEntropyLoss, MSELoss or BCEWithLogitsLoss
        An instance, such as ``hvp.CrossEntropyLoss()``.
    theta : ndarray, shape (P,), float32 or float64
    X : array_like, shape (B, in_features)
    y : array_like, labels (B,) or targets (B, C)
    l2 : float
        Weight of the penalty ``l2/2 · Σ‖W‖²`` over weight matrices (not biases).

    Returns
    -------
    loss : float
    grad : ndarray, shape (P,), dtype of θ
    """
    theta, X, l2 = _prepare(net, loss, theta, X, y, l2)
    params = net.unflatten(theta)
    O, caches = net.forward_cached(params, X)
    value, loss_cache = loss.forward(O, loss.check_target(y, O))
    grad = _backward(net, params, caches, loss.backward(loss_cache))
    mask = net.weight_mask()
    return value + l2_value(theta, mask, l2), add_l2(grad, theta, mask, l2)


def linearize(net, loss, theta, X, y, l2=0.0):
    """Linearize the loss at θ: one forward and backward pass, cached for products.

    Parameters are as in :func:`loss_and_grad`.

    Returns
    -------
    Linearization
        With ``.loss``, ``.grad`` (P,), ``.outputs`` (B, C) and the products
        ``.hvp``, ``.ggnvp``, ``.jvp``, ``.vjp``.
    """
    theta, X, l2 = _prepare(net, loss, theta, X, y, l2)
    return Linearization(net, loss, memory.copy(theta), X, y, l2)


class Linearization:
    """Everything the products need at one point θ; build it with :func:`linearize`.

    Attributes
    ----------
    loss : float
        ``L(θ)``, L2 penalty included.
    grad : ndarray, shape (P,)
        ``∇L(θ)``, L2 term included; computed when first read (the products need only the adjoints).
    outputs : ndarray, shape (B, C)
        Network outputs ``O = f(θ, X)``.
    inputs, targets : ndarray
        X and y as checked and converted (θ's dtype; labels as integers): the batch itself, not a copy.
    num_examples, num_outputs : int
        B and C.
    """

    def __init__(self, net, loss, theta, X, y, l2):
        self.net, self.loss_fn, self.theta, self.l2 = net, loss, theta, l2
        self.params = net.unflatten(theta)
        self.outputs, self.caches = net.forward_cached(self.params, X)
        self.inputs, self.targets = X, loss.check_target(y, self.outputs)
        self.num_examples, self.num_outputs = self.outputs.shape
        value, self.loss_cache = loss.forward(self.outputs, self.targets)
        self.adjoints = _adjoints(net, self.params, self.caches, loss.backward(self.loss_cache))
        self.weight_mask = net.weight_mask()
        self.loss = value + l2_value(theta, self.weight_mask, l2)
        self._grad = None

    @property
    def grad(self):
        if self._grad is None:
            grad = memory.empty((self.net.num_params,), self.theta.dtype)
            views = self.net.unflatten(grad)
            for layer, p, cache, DO, out in zip(self.net.layers, self.params, self.caches, self.adjoints, views):
                layer.backward_params(p, cache, DO, out=out)
            self._grad = add_l2(grad, self.theta, self.weight_mask, self.l2)
        return self._grad

    # -- directions ---------------------------------------------------------

    def _columns(self, v):
        """v (P,) or (P, k) as C-contiguous columns (P, k) in θ's dtype, and whether it was 1-D."""
        v = np.ascontiguousarray(check_direction("v", v, self.net.num_params, self.theta.dtype))
        return (v[:, None] if v.ndim == 1 else v), v.ndim == 1

    def _tangents(self, V):
        """Rule 3 through the network for columns V (P, k): each layer's input tangent, output tangent (k, B, C)."""
        dps = self.net.unflatten_columns(V)
        inputs, dI = [], None
        for layer, p, cache, dp in zip(self.net.layers, self.params, self.caches, dps):
            inputs.append(dI)
            dI = layer.tangent(p, cache, dI, dp or None)
        return dps, inputs, dI

    def _curvature_product(self, v, exact):
        V, was_vector = self._columns(v)
        dps, tangent_inputs, dO = self._tangents(V)
        RDO = self.loss_fn.hessian_vp(self.loss_cache, dO)
        out = memory.empty(V.shape, V.dtype)
        views = self.net.unflatten_columns(out)
        for i in reversed(range(len(self.net.layers))):  # rule 4's cross terms with DOD = δ at each output
            RDO = backward_with_cross_terms(self.net.layers[i], self.params[i], self.caches[i], tangent_inputs[i],
                                            dps[i] or None, RDO, self.adjoints[i] if exact else None, views[i],
                                            need_input=i > 0)
        add_l2(out, V, self.weight_mask, self.l2)
        return out[:, 0] if was_vector else out

    # -- products -----------------------------------------------------------

    def hvp(self, v):
        """Hessian-vector product ``H v`` of the loss, L2 term included (Pearlmutter's R-operator).

        Parameters
        ----------
        v : array_like, shape (P,) or (P, k)
            One direction, or k directions pushed through together.

        Returns
        -------
        ndarray, shape of ``v``, dtype of θ
        """
        return self._curvature_product(v, exact=True)

    def ggnvp(self, v):
        """Generalized Gauss-Newton product ``(Jᵀ ∇²ℓ J + l2·diag(weight mask)) v``.

        Positive semi-definite for the convex losses here. Same shapes as :meth:`hvp`.
        """
        return self._curvature_product(v, exact=False)

    def jvp(self, v):
        """Output tangents ``J v``, J = ∂O/∂θ.

        Parameters
        ----------
        v : array_like, shape (P,) or (P, k)

        Returns
        -------
        ndarray, shape (B, C) for v (P,), (B, k, C) for v (P, k)
        """
        V, was_vector = self._columns(v)
        dO = self._tangents(V)[2]
        if dO is None:  # no parameter lies before any layer that passes a tangent on
            dO = np.zeros((V.shape[1],) + self.outputs.shape, dtype=V.dtype)
        return dO[0] if was_vector else np.ascontiguousarray(dO.transpose(1, 0, 2))

    def vjp(self, u):
        """``Jᵀ u``, J = ∂O/∂θ (no loss, no L2 term).

        Parameters
        ----------
        u : array_like, shape (B, C), or (B, k, C) for k vectors at once

        Returns
        -------
        ndarray, shape (P,), or (P, k) for u (B, k, C)
        """
        B, C = self.outputs.shape
        u = real_array("u", u, self.theta.dtype)
        if u.ndim not in (2, 3) or u.shape[0] != B or u.shape[-1] != C:
            raise ValueError(f"u must have shape ({B}, {C}) or ({B}, k, {C}), got {describe(u)}")
        check_finite("u", u)
        if u.ndim == 2:
            return _backward(self.net, self.params, self.caches, u)
        return _backward(self.net, self.params, self.caches, np.ascontiguousarray(u.transpose(1, 0, 2)))

    def ggn_quadratic(self, V):
        """``Vᵀ G V`` (k, k) in float64, G the matrix :meth:`ggnvp` multiplies by (L2 term included).

        ``Σ_b (J_b V)ᵀ ∇²ℓ_b (J_b V)`` from one tangent pass and the loss Hessian at the outputs:
        a third of the work of ``Vᵀ ggnvp(V)``, which would also run the backward pass.

        Parameters
        ----------
        V : array_like, shape (P, k)

        Returns
        -------
        ndarray, shape (k, k), float64, symmetric
        """
        V, _ = self._columns(V)  # (P, k)
        dO = self._tangents(V)[2]
        out = np.zeros((V.shape[1],) * 2)
        if dO is not None:
            out += np.einsum("kbc,lbc->kl", dO, self.loss_fn.hessian_vp(self.loss_cache, dO), dtype=np.float64)
        if self.l2:
            W = V[self.weight_mask].astype(np.float64)  # sums of P squares overflow float32
            out += self.l2 * (W.T @ W)
        return 0.5 * (out + out.T)

    def loss_at(self, theta):
        """The loss at another point θ′ on this batch (one forward pass), L2 term included; +inf for NaN/Inf.

        Parameters
        ----------
        theta : ndarray, shape (P,), θ's dtype
            Not checked: the optimizers' trial points.

        Returns
        -------
        float
        """
        with np.errstate(all="ignore"):
            O, _ = self.net.forward_cached(self.net.unflatten(theta), self.inputs)
            value = self.loss_fn.forward(O, self.targets)[0] + l2_value(theta, self.weight_mask, self.l2)
        return value if np.isfinite(value) else np.inf

    # -- per-example quantities (computed in hvp/per_example.py) -------------
    # Convention (as BackPACK's): g_n is example n's term of the loss as reduced (with mean
    # reduction it carries the 1/B, or 1/(B·C) for MSE), Σ_n g_n is the gradient without the
    # L2 term, and the L2 penalty is left out of every per-example quantity.

    def sum_grad_squared(self):
        """Sum of squared per-example gradients ``Σ_n g_n²``, without forming any g_n.

        Per Linear layer ``(I²)ᵀ(DO²)`` for the weight and ``Σ_n DO_n²`` for the bias
        (seed 002 ``DI2²``, ``DI3²``); g_n is example n's term of the loss as reduced
        (with mean reduction it carries the 1/B); no L2 term.

        Returns
        -------
        ndarray, shape (P,), dtype of θ
        """
        return per_example.sum_grad_squared(self)

    def batch_grad(self):
        """Per-example gradients ``g_n``: weight ``I_nᵀ DO_n``, bias ``DO_n``, written into one array.

        g_n is example n's term of the loss as reduced: with mean reduction it carries
        the 1/B (1/(B·C) for MSE) and ``batch_grad().sum(0)`` is the gradient; no L2 term.

        Returns
        -------
        ndarray, shape (B, P), dtype of θ
        """
        return per_example.batch_grad(self)

    def batch_l2(self):
        """Squared norms of the per-example gradients ``‖g_n‖² = Σ_layers ‖I_n‖² ‖DO_n‖² (+ ‖DO_n‖²)``.

        Same g_n as :meth:`batch_grad` (1/B included for mean reduction, no L2 term);
        no (B, P) array is formed.

        Returns
        -------
        ndarray, shape (B,), dtype of θ
        """
        return per_example.batch_l2(self)

    def variance(self):
        """Elementwise variance of the per-example loss gradients ``∇ℓ_n = c·g_n``, 1/B normalization.

        ``c = B`` for mean reduction, 1 for sum, so that ``∇ℓ_n`` is the gradient of
        example n's own loss: ``Var = c²(Σ_n g_n²/B − (g/B)²)`` with ``g = Σ_n g_n`` the
        gradient without the L2 term. For mean reduction this is ``B·Σ_n g_n² − g²``,
        which is BackPACK's ``Variance`` times B². Rounding below 0 is clipped to 0.

        Returns
        -------
        ndarray, shape (P,), dtype of θ
        """
        return per_example.variance(self)

    def diag_ggn(self):
        """Exact diagonal of the matrix :meth:`ggnvp` multiplies by, ``Jᵀ ∇²ℓ J + l2·diag(weight mask)``.

        From a factor ``∇²ℓ_b = Σ_k S_kb S_kbᵀ`` (C − 1 columns for cross-entropy, C for MSE)
        backpropagated together: per Linear layer ``diag_W = (I²)ᵀ Σ_k DO_k²``,
        ``diag_b = Σ_{k,b} DO_k²``. The loss's normalizer (1/B for mean) is included, as
        in :meth:`ggnvp`; so is the L2 term.

        Returns
        -------
        ndarray, shape (P,), dtype of θ
        """
        return per_example.diag_ggn(self)

    def diag_hessian(self):
        """Exact diagonal of the Hessian :meth:`hvp` multiplies by, L2 term included; entries may be negative.

        Backpropagates ``∇²_O L_b = Σ_k c_kb v_kb v_kbᵀ`` (the loss factor of :meth:`diag_ggn` plus each
        activation's ``diag(σ″ ⊙ δ)``, weights of either sign); per Linear layer ``diag_W = (I²)ᵀ Σ_k c_k v_k²``,
        ``diag_b = Σ_{k,b} c_k v_k²`` (BackPACK's ``DiagHessian``); convolutions, pooling and residual blocks by
        their rules of the layer contract (:mod:`hvp.diag_hessian`). On an MLP it costs about :meth:`diag_ggn`;
        an activation's diagonal that must pass a convolution becomes its width in columns, formed in chunks.

        Returns
        -------
        ndarray, shape (P,), dtype of θ
        """
        return _diag_hessian(self)

    def kfac(self, kind="exact", num_samples=1, seed=0):
        """Kronecker-factored curvature (K-FAC): ``⊕_layers A ⊗ G + l2·diag(weight mask)`` (see :mod:`hvp.kfac`).

        ``A = (1/B) Σ_n ā_n ā_nᵀ`` from each Linear layer's input with a 1 appended, ``G`` from
        columns pushed back to its output: the loss-Hessian factor (``"exact"``), targets sampled
        from the model (``"mc"``) or the gradient's adjoints (``"empirical"``). Normalized as
        :meth:`ggnvp`; for one Linear layer under MSE it equals the GGN.

        Parameters
        ----------
        kind : {"exact", "mc", "empirical"}
        num_samples : int
            Sampled targets per example for ``"mc"``.
        seed : int, numpy.random.Generator or None
            For ``"mc"``.

        Returns
        -------
        hvp.kfac.KroneckerFactored
            A scipy ``LinearOperator`` (P, P) with ``.factors``, ``.inverse(damping)``,
            ``.diagonal()`` and ``.trace()``.
        """
        return kfac.KroneckerFactored(self.net, self.kronecker_factors(kind, num_samples, seed), self.l2,
                                      self.theta.dtype)

    def kronecker_factors(self, kind="exact", num_samples=1, seed=0):
        """The factors of :meth:`kfac`, ``{layer index: (A, G)}``; arguments as there (see hvp.kfac)."""
        num_samples = kfac.check_kind(kind, num_samples)
        return kfac.batch_factors(self, kind, num_samples, check_seed(seed))

    def diag_ggn_mc(self, num_samples=1, seed=0):
        """Unbiased Monte-Carlo estimate of :meth:`diag_ggn` from targets sampled from the model.

        Cross-entropy: labels ``ŷ ~ Categorical(softmax(O_b))``; MSE: targets
        ``ŷ ~ N(O_b, I/2)``. Each draw gives one column of a random factor S with
        ``E[S Sᵀ] = ∇²ℓ``; the M columns are averaged. The L2 term is added exactly.

        Parameters
        ----------
        num_samples : int
            Draws per example, M >= 1.
        seed : int >= 0, numpy.random.Generator or None
            Passed to ``numpy.random.default_rng``; the same int seed gives the same estimate.

        Returns
        -------
        ndarray, shape (P,), dtype of θ
        """
        return per_example.diag_ggn_mc(self, num_samples, seed)
