"""Derivatives of the network with respect to its inputs, and losses on them (seed 002 §2).

Directions ``İ_k`` (k of them) given at the input, with Ẇ = 0, travel forward by
rule 3 as tangents: the output tangent ``Ȯ_k = (∂O/∂X) İ_k`` is the directional
derivative of the outputs along ``İ_k`` (Jacobian-vector product in input space).
A loss ``L(O, Ȯ)`` on outputs and their tangents is differentiated by rule 4
with the cross terms summed over the k directions (seed 002 §2, DESIGN.md §1):

- elementwise σ: ``DI = σ′ ⊙ DO + σ″ ⊙ Σ_k DOD_k ⊙ İ_k``, ``DİD_k = σ′ ⊙ DOD_k``
- Linear: ``DI = DO Wᵀ``, ``DİD_k = DOD_k Wᵀ``, ``DW = Iᵀ DO + Σ_k İ_kᵀ DOD_k``, ``Db = Σ_b DO``

Directions (public shapes, batch first): one direction (m,) for every example,
k directions (k, m) shared by all examples, or (B, k, m), k per example (for inputs
of another per-example shape s, such as images (C, H, W), s takes the place of m). Output
tangents come back as (B, k, C), or (B, C) for one (m,) direction (as ``pt.jvp``).
A single direction per example is written (B, 1, m).

Loss interface. A loss on outputs and tangents is any object with the method

    ``forward(O, dO, target) -> (value, DO, DOD)``

taking the outputs O (B, C), their tangents dO (B, k, C) (always 3-D here, also
for one (m,) direction) and the caller's ``target`` unchanged, and returning the
value L (a real number), ``DO = ∂L/∂O`` (B, C) and ``DOD = ∂L/∂Ȯ`` (B, k, C). It
validates its own target and never writes into O or dO (dO may be a read-only
view). For :func:`tangent_sum_grad_squared` L must be a sum
of per-example terms ``ℓ_b(O_b, Ȯ_b)``, so that row b of DO and DOD belongs to
example b (true for both built-ins, :class:`SobolevLoss` and :class:`JacobianPenalty`).
"""

import numpy as np

from ._checks import (
    check_finite,
    check_inputs,
    check_instance,
    check_l2,
    check_net,
    check_nonnegative,
    check_theta,
    describe,
    real_array,
)
from .losses import BCEWithLogitsLoss, CrossEntropyLoss, MSELoss
from .penalty import add_l2, l2_value

# tangent_sum_grad_squared: with k directions, up to this k the (k+1)(k+2)/2 products of
# pairs run as large matmuls; beyond it, per-example gradients in chunks are cheaper.


# -- validation ---------------------------------------------------------------


def _input_tangents(directions, X_shape, dtype):
    """Directions as input tangents, a fresh array, and whether one direction of X's per-example shape came.

    Per-example directions give (k, B, *s); shared ones (k, 1, *s), a tangent shared by all
    examples that the layers broadcast (see :mod:`hvp.layers`); s = X's per-example shape.
    """
    B, s = X_shape[0], tuple(X_shape[1:])
    D = real_array("directions", directions, dtype)
    n = len(s)
    if not (D.shape == s or (D.ndim == n + 1 and D.shape[0] >= 1 and D.shape[1:] == s)
            or (D.ndim == n + 2 and D.shape[0] == B and D.shape[1] >= 1 and D.shape[2:] == s)):
        shape = ", ".join(map(str, s))
        raise ValueError(f"directions must have shape ({shape}{',' if n == 1 else ''}), (k, {shape}) shared by all "
                         f"examples or ({B}, k, {shape}) per example, with k >= 1, for X of shape {tuple(X_shape)}; "
                         f"got shape {D.shape}")
    check_finite("directions", D)
    if D.ndim == n + 2:
        return np.ascontiguousarray(np.swapaxes(D, 0, 1)), False
    return D.reshape((-1, 1) + s).copy(), D.ndim == n


def _check_tangent_loss(loss):
    check_instance("loss", loss, "a loss on outputs and tangents, such as hvp.SobolevLoss(weight) or "
                                 "hvp.JacobianPenalty(base_loss, weight)")
    if isinstance(loss, (CrossEntropyLoss, MSELoss, BCEWithLogitsLoss)):
        raise TypeError(f"expected a loss on outputs and tangents, such as hvp.SobolevLoss(weight) or "
                        f"hvp.JacobianPenalty(base_loss, weight), got {loss!r}, a loss on outputs alone "
                        f"(use hvp.loss_and_grad for it, or hvp.JacobianPenalty({loss!r}, weight))")
    if not callable(getattr(loss, "forward", None)):
        raise TypeError(f"expected a loss with a method forward(O, dO, target) -> (value, DO, DOD), "
                        f"got {describe(loss)}")


def _loss_adjoints(loss, O, dO, target):
    """The loss at (O, Ȯ) with its adjoints: value, DO (B, C), DOD (k, B, C) in O's dtype."""
    value, DO, DOD = loss.forward(O, dO.transpose(1, 0, 2), target)
    if not np.isscalar(value) and np.ndim(value) != 0:
        raise TypeError(f"loss.forward must return a real number as its value, got {describe(value)}")
    DO = real_array("DO returned by loss.forward", DO, O.dtype)
    DOD = real_array("DOD returned by loss.forward", DOD, O.dtype)
    B, C = O.shape
    if DO.shape != (B, C):
        raise ValueError(f"loss.forward must return DO = ∂L/∂O of the outputs' shape {(B, C)}, got shape {DO.shape}")
    if DOD.shape != (B, dO.shape[0], C):
        raise ValueError(f"loss.forward must return DOD = ∂L/∂Ȯ of the tangents' shape {(B, dO.shape[0], C)}, "
                         f"got shape {DOD.shape}")
    return float(value), DO, np.ascontiguousarray(DOD.transpose(1, 0, 2))


def _prepare(net, theta, X, directions):
    check_net(net)
    theta = check_theta(theta, net.num_params)
    X = check_inputs(X, net, theta.dtype)
    dX, single = _input_tangents(directions, X.shape, theta.dtype)
    return theta, net.unflatten(theta), X, dX, single


# -- the two passes -------------------------------------------------------------


def _forward(net, params, X, dX):
    """Rules 1 and 3 with Ẇ = 0: outputs (B, C), each layer's cache and input tangent (k, B or 1, ·),
    and the output tangents (k, B, C) (a read-only broadcast when shared by all examples)."""
    caches, tangent_inputs = [], []
    O, dO = X, dX
    for layer, p in zip(net.layers, params):
        tangent_inputs.append(dO)
        O, cache = layer.forward(p, O)
        dO = layer.tangent(p, cache, dO, None)
        caches.append(cache)
    return O, caches, tangent_inputs, np.broadcast_to(dO, dO.shape[:1] + O.shape)


def _backward(net, params, caches, tangent_inputs, DO, DOD):
    """Rule 4 from ``DO = ∂L/∂O`` (B, C) and ``DOD = ∂L/∂Ȯ`` (k, B, C) down to θ.

    Returns the gradient (P,) and the pair (DO_i, DOD_i) of adjoints at every layer's output.
    """
    grad = np.empty(net.num_params, dtype=DO.dtype)
    views = net.unflatten(grad)
    adjoints = [None] * len(net.layers)
    for i in reversed(range(len(net.layers))):
        layer, p, cache = net.layers[i], params[i], caches[i]
        adjoints[i] = DO, DOD
        layer.backward_params(p, cache, DO, out=views[i])
        DI_cross, cross_grads = layer.tangent_backward(p, cache, tangent_inputs[i], None, DOD,
                                                       need_input=i > 0, summed=True)
        for name, g in (cross_grads or {}).items():
            views[i][name] += g
        if i > 0:
            DO = layer.backward_input(p, cache, DO)
            if DI_cross is not None:
                DO += DI_cross
            DOD = layer.backward_input(p, cache, DOD)
    return grad, adjoints


# -- public functions -------------------------------------------------------------


def input_jvp(net, theta, X, directions):
    """Outputs and their directional derivatives along directions in input space.

    ``Ȯ_bk = (∂O_b/∂X_b) İ_bk``: rule 3 with Ẇ = 0 and İ = the directions at the input.

    Parameters
    ----------
    net : Sequential
    theta : ndarray, shape (P,), float32 or float64
    X : array_like, shape (B, m), or (B, *s) for a network on images or sequences
    directions : array_like, shape (m,), (k, m) or (B, k, m) (s for m with other inputs)
        One direction or k directions shared by all examples, or k directions per example.

    Returns
    -------
    outputs : ndarray, shape (B, C)
    tangents : ndarray, shape (B, C) for directions (m,), else (B, k, C); dtype of θ
    """
    _, params, X, dX, single = _prepare(net, theta, X, directions)
    O, _, _, dO = _forward(net, params, X, dX)
    return O, (dO[0] if single else np.ascontiguousarray(dO.transpose(1, 0, 2)))


def input_jacobian(net, theta, X):
    """Jacobian of each example's outputs with respect to its inputs, ``J_bcj = ∂O_bc/∂X_bj``.

    The m unit vectors pushed through as k = m directions in one pass.

    Parameters
    ----------
    net : Sequential
    theta : ndarray, shape (P,), float32 or float64
    X : array_like, shape (B, m), or (B, *s)

    Returns
    -------
    ndarray, shape (B, C, m), or (B, C, *s); dtype of θ
    """
    check_net(net)
    theta = check_theta(theta, net.num_params)
    X = check_inputs(X, net, theta.dtype)
    s = X.shape[1:]
    m = int(np.prod(s))
    _, dO = input_jvp(net, theta, X, np.eye(m, dtype=theta.dtype).reshape((m,) + s))
    return np.ascontiguousarray(dO.transpose(0, 2, 1)).reshape(dO.shape[:1] + dO.shape[2:] + s)


def tangent_loss_and_grad(net, loss, theta, X, y, directions, l2=0.0):
    """Loss on outputs and their input tangents, ``L(θ) = ℓ(O, Ȯ, y) + l2/2 Σ‖W‖²``, and its gradient.

    ``Ȯ`` as in :func:`input_jvp`; the gradient by rule 4 (σ″ terms included, see the module).

    Parameters
    ----------
    net : Sequential
    loss : SobolevLoss, JacobianPenalty or any object with ``forward(O, dO, target) -> (value, DO, DOD)``
    theta : ndarray, shape (P,), float32 or float64
    X : array_like, shape (B, m)
    y : the loss's target, e.g. ``(Y (B, C), dY (B, k, C))`` for SobolevLoss
    directions : array_like, shape (m,), (k, m) or (B, k, m)
    l2 : float
        Weight of the penalty ``l2/2 · Σ‖W‖²`` over weight matrices (not biases).

    Returns
    -------
    loss : float
    grad : ndarray, shape (P,), dtype of θ
    """
    check_net(net)
    _check_tangent_loss(loss)
    l2 = check_l2(l2)
    theta, params, X, dX, _ = _prepare(net, theta, X, directions)
    O, caches, tangent_inputs, dO = _forward(net, params, X, dX)
    value, DO, DOD = _loss_adjoints(loss, O, dO, y)
    grad, _ = _backward(net, params, caches, tangent_inputs, DO, DOD)
    mask = net.weight_mask()
    return value + l2_value(theta, mask, l2), add_l2(grad, theta, mask, l2)


def tangent_sum_grad_squared(net, loss, theta, X, y, directions):
    """``Σ_b g_b²`` (P,): per-example gradients of a loss on outputs and tangents, squared and summed.

    ``g_b`` is example b's term of the loss as reduced (mean reductions carry their
    normalizer, ``Σ_b g_b`` is the gradient); the L2 penalty is left out. The loss must be
    a sum of per-example terms. Each layer with parameters gives its part by the contract's rule
    ``tangent_grad_squares``: per Linear layer, with ``A = [I; İ_1..İ_k]`` and ``C = [DO; DOD_1..DOD_k]``
    (seed 002's ``DI2²`` with the sum over z), ``(g_b)_W = Σ_z A_zbᵀ C_zb``,
    ``Σ_b (g_b)_W² = Σ_{z,z'} (A_z ⊙ A_z')ᵀ (C_z ⊙ C_z')``, ``Σ_b (g_b)_b² = Σ_b DO_b²``; a convolution
    forms the per-example sums over output positions a block of examples at a time.

    Parameters are as in :func:`tangent_loss_and_grad` (without ``l2``).

    Returns
    -------
    ndarray, shape (P,), dtype of θ
    """
    check_net(net)
    _check_tangent_loss(loss)
    for i, layer in enumerate(net.layers):
        if layer.param_shapes() and not hasattr(layer, "tangent_grad_squares"):
            raise TypeError(f"tangent_sum_grad_squared needs the rule tangent_grad_squares of the layer contract "
                            f"(Linear, convolution and Residual layers give it); layer {i} ({describe(layer)}) "
                            "has none")
    _, params, X, dX, _ = _prepare(net, theta, X, directions)
    O, caches, tangent_inputs, dO = _forward(net, params, X, dX)
    _, DO, DOD = _loss_adjoints(loss, O, dO, y)
    _, adjoints = _backward(net, params, caches, tangent_inputs, DO, DOD)
    out = np.empty(net.num_params, dtype=DO.dtype)
    views = net.unflatten(out)
    for i, layer in enumerate(net.layers):
        if layer.param_shapes():
            layer.tangent_grad_squares(params[i], caches[i], tangent_inputs[i], *adjoints[i], views[i])
    return out


# -- built-in losses ----------------------------------------------------------------


class SobolevLoss:
    """Squared error on values and on directional derivatives (Sobolev training).

    ``L = Σ_bc (O_bc − Y_bc)²/(B·C) + weight · Σ_bkc (Ȯ_bkc − Ẏ_bkc)²/(B·k·C)``: the mean over
    the B·C values plus ``weight`` times the mean over the B·k·C directional derivatives
    (each a ``torch.nn.MSELoss``). ``∂L/∂O = 2(O − Y)/(B·C)``, ``∂L/∂Ȯ = 2·weight·(Ȯ − Ẏ)/(B·k·C)``.

    The target is a pair ``(Y, dY)``: values Y (B, C) and the target function's
    directional derivatives dY (B, k, C) along the same directions (dY (B, C) when k = 1).

    Parameters
    ----------
    weight : float >= 0
    """

    def __init__(self, weight=1.0):
        self.weight = check_nonnegative("weight", weight)

    def __repr__(self):
        return f"SobolevLoss(weight={self.weight})"

    def check_target(self, target, O, dO):
        """``(Y, dY)`` as arrays of O's dtype, Y (B, C) and dY (B, k, C); raises on any mismatch."""
        B, k, C = dO.shape
        if not isinstance(target, (tuple, list)) or len(target) != 2:
            raise TypeError(f"SobolevLoss takes the target pair (Y, dY): values Y of shape {(B, C)} and "
                            f"directional derivatives dY of shape {(B, k, C)}, got {describe(target)}")
        Y = real_array("Y (target values)", target[0], O.dtype)
        if Y.shape != (B, C):
            raise ValueError(f"target values Y must have the outputs' shape {(B, C)}, got shape {Y.shape}")
        dY = real_array("dY (target directional derivatives)", target[1], O.dtype)
        if k == 1 and dY.shape == (B, C):
            dY = dY[:, None, :]
        if dY.shape != (B, k, C):
            raise ValueError(f"target derivatives dY must have the tangents' shape (B, k, C) = {(B, k, C)} "
                             f"for {k} direction(s), got shape {dY.shape}")
        check_finite("Y (target values)", Y)
        check_finite("dY (target directional derivatives)", dY)
        return Y, dY

    def forward(self, O, dO, target):
        """Value, ``∂L/∂O`` (B, C) and ``∂L/∂Ȯ`` (B, k, C) for O (B, C), dO (B, k, C)."""
        Y, dY = self.check_target(target, O, dO)
        B, k, C = dO.shape
        r, dr = O - Y, dO - dY
        value = float(np.vdot(r, r)) / (B * C) + self.weight * float(np.einsum("bkc,bkc->", dr, dr)) / (B * k * C)
        return value, r * O.dtype.type(2 / (B * C)), dr * O.dtype.type(2 * self.weight / (B * k * C))


class JacobianPenalty:
    """A loss on the outputs plus a penalty on their directional derivatives.

    ``L = ℓ(O, y) + weight · Σ_bkc Ȯ_bkc² / N``: ℓ the base loss, N = B when its reduction
    is "mean" (the mean over examples of ``‖Ȯ_b‖² = Σ_kc Ȯ_bkc²``), 1 for "sum".
    ``∂L/∂O = ∇ℓ``, ``∂L/∂Ȯ = 2·weight·Ȯ/N``. With the m unit vectors as directions
    (k = m, as :func:`input_jacobian`) ``‖Ȯ_b‖² = ‖∂O_b/∂X_b‖²_F``: the penalty is ``weight``
    times the mean squared Frobenius norm of the input Jacobian, which k random directions
    with ``E[v vᵀ] = I/k`` (standard normal entries divided by √k) estimate without bias.

    The target is the base loss's target y.

    Parameters
    ----------
    base_loss : CrossEntropyLoss or MSELoss
    weight : float >= 0
    """

    def __init__(self, base_loss, weight):
        check_instance("base_loss", base_loss, "a loss on outputs such as hvp.CrossEntropyLoss() or hvp.MSELoss()")
        if not all(hasattr(base_loss, name) for name in ("check_target", "forward", "backward", "reduction")):
            raise TypeError(f"base_loss must be a loss on outputs such as hvp.CrossEntropyLoss() or hvp.MSELoss(), "
                            f"got {describe(base_loss)}")
        self.base_loss = base_loss
        self.weight = check_nonnegative("weight", weight)

    def __repr__(self):
        return f"JacobianPenalty({self.base_loss!r}, weight={self.weight})"

    def forward(self, O, dO, y):
        """Value, ``∂L/∂O`` (B, C) and ``∂L/∂Ȯ`` (B, k, C) for O (B, C), dO (B, k, C)."""
        value, cache = self.base_loss.forward(O, self.base_loss.check_target(y, O))
        N = O.shape[0] if self.base_loss.reduction == "mean" else 1
        value += self.weight * float(np.einsum("bkc,bkc->", dO, dO)) / N
        return value, self.base_loss.backward(cache), dO * O.dtype.type(2 * self.weight / N)
