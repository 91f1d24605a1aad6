"""Per-example quantities from one linearization: no extra forward or backward pass.

Convention (as BackPACK's). ``g_n`` is example n's term of the loss *as reduced*:
with ``reduction="mean"`` it carries the normalizer (1/B for cross-entropy, 1/(B·C)
for MSE, whose mean runs over all B·C entries), so that ``Σ_n g_n`` is the gradient
without the L2 term. The L2 penalty is not per-example and is left out of every
per-example quantity; :func:`diag_ggn` and :func:`diag_ggn_mc` include it, as
``pt.ggnvp`` does.

A Linear layer ``O = I W + b`` with adjoint ``DO = ∂L/∂O`` (B, n) at its output
(``pt.adjoints[i]``, which already carries the normalizer) has per-example
gradients ``(g_n)_W = I_nᵀ DO_n`` and ``(g_n)_b = DO_n`` (seed 002, DESIGN.md §2), so
``Σ_n (g_n)_W² = (I²)ᵀ (DO²)`` and ``‖(g_n)_W‖² = ‖I_n‖² ‖DO_n‖²`` take one matmul
or less per layer and never form a (B, m, n) array.
"""

import numpy as np

from ._checks import check_int, check_seed, describe
from .layers.activations import Elementwise
from .layers.dense import Linear

BATCH_GRAD_BLOCK_BYTES = 16 << 20  # batch_grad fills its (B, P) result in blocks of rows of about this size


def _linear_indices(pt):
    """Indices of the Linear layers; every parameter of a network lives in one."""
    indices = []
    for i, layer in enumerate(pt.net.layers):
        if isinstance(layer, Linear):
            indices.append(i)
        elif layer.param_shapes():
            raise TypeError(f"per-example quantities support parameters in hvp.Linear layers only, "
                            f"got layer {i}: {describe(layer)}")
    return indices


def _grad_without_l2(pt):
    """``Σ_n g_n`` (P,): the gradient of the loss alone, a fresh array."""
    g = pt.grad.copy()
    if pt.l2:
        l2 = g.dtype.type(pt.l2)
        views = pt.net.unflatten(g)
        for i in _linear_indices(pt):
            views[i]["weight"] -= l2 * pt.params[i]["weight"]
    return g


def _sum_grad_squared(pt, factor=1.0):
    """``factor · Σ_n g_n²`` (P,); the factor scales the (B, n) arrays ``DO²``, not the result."""
    out = np.empty(pt.net.num_params, dtype=pt.theta.dtype)
    views = pt.net.unflatten(out)
    for i in _linear_indices(pt):
        DO2 = np.square(pt.adjoints[i])
        if factor != 1:
            DO2 *= DO2.dtype.type(factor)
        np.matmul(np.square(pt.caches[i]).T, DO2, out=views[i]["weight"])
        if "bias" in views[i]:
            np.sum(DO2, axis=0, out=views[i]["bias"])
    return out


def sum_grad_squared(pt):
    """``Σ_n g_n²`` (P,): weight ``(I²)ᵀ(DO²)``, bias ``Σ_n DO_n²`` (seed 002 ``DI2²``, ``DI3²``)."""
    return _sum_grad_squared(pt)


def batch_grad(pt):
    """``g_n`` (B, P) for every example: weight ``I_nᵀ DO_n``, bias ``DO_n``; one (B, P) array."""
    B = pt.outputs.shape[0]
    out = np.empty((B, pt.net.num_params), dtype=pt.theta.dtype)
    views = pt.net.unflatten(out)  # weight (B, m, n), bias (B, n): views into the rows of out
    linears = _linear_indices(pt)
    rows = max(1, BATCH_GRAD_BLOCK_BYTES // out[0].nbytes)  # blocks of rows written front to back
    for start in range(0, B, rows):
        block = slice(start, start + rows)
        for i in linears:
            I, DO = pt.caches[i][block], pt.adjoints[i][block]
            np.multiply(I[:, :, None], DO[:, None, :], out=views[i]["weight"][block])
            if "bias" in views[i]:
                views[i]["bias"][block] = DO
    return out


def batch_l2(pt):
    """``‖g_n‖²`` (B,): ``Σ_layers ‖I_n‖² ‖DO_n‖² (+ ‖DO_n‖² for a bias)``."""
    out = np.zeros(pt.outputs.shape[0], dtype=pt.theta.dtype)
    for i in _linear_indices(pt):
        I, DO = pt.caches[i], pt.adjoints[i]
        DO_norms = np.einsum("bn,bn->b", DO, DO)
        out += np.einsum("bm,bm->b", I, I) * DO_norms
        if pt.net.layers[i].bias:
            out += DO_norms
    return out


def variance(pt):
    """Elementwise variance (P,) of the per-example loss gradients ``∇ℓ_n = c·g_n`` (1/B normalization).

    ``Var = (c²/B) Σ_n g_n² − (c g/B)²`` with ``g = Σ_n g_n``; ``c = B`` for mean reduction
    (then ``B·Σ_n g_n² − g²``), 1 for sum. Rounding below 0 is clipped to 0.
    """
    B = pt.outputs.shape[0]
    c = B if pt.loss_fn.reduction == "mean" else 1
    out = _sum_grad_squared(pt, factor=c * c / B)
    g = _grad_without_l2(pt) if pt.l2 else pt.grad
    if c != B:
        g = g * g.dtype.type(c / B)
    out -= np.square(g)
    out[out < 0] = 0  # rounding; faster than np.maximum, which checks for NaN
    return out


def _diag_ggn_from_factor(pt, S):
    """``Σ_b Σ_k (J_bᵀ S_kb)²`` (P,) + l2 on weights, for a factor S (K, B, C) of the loss Hessian.

    The K columns travel backward together; per Linear layer ``diag_W = (I²)ᵀ Σ_k DO_k²``
    (the squares summed over k before the one matmul) and ``diag_b = Σ_{k,b} DO_k²``.
    An activation's σ′ is kept aside as a factor of the adjoint, ``DO = σ′ ⊙ D``, so that
    ``Σ_k DO_k² = σ′² ⊙ Σ_k D_k²`` costs (B, n) work and D is scaled only if it travels on.
    """
    out = np.empty(pt.net.num_params, dtype=pt.theta.dtype)
    views = pt.net.unflatten(out)
    linears = _linear_indices(pt)
    D = S.astype(pt.theta.dtype)  # our own copy: scaled in place below
    scale = None  # DO = scale ⊙ D, scale (B, n) or None for 1
    for i in reversed(range(linears[0], len(pt.net.layers))):
        layer, p, cache = pt.net.layers[i], pt.params[i], pt.caches[i]
        if isinstance(layer, Elementwise):
            d1 = layer._d1(cache)
            scale = d1 if scale is None else scale * d1
            continue
        if isinstance(layer, Linear):
            DO2 = np.einsum("kbn,kbn->bn", D, D)
            if scale is not None:
                DO2 *= np.square(scale)
            np.matmul(np.square(cache).T, DO2, out=views[i]["weight"])
            if pt.l2:
                views[i]["weight"] += out.dtype.type(pt.l2)
            if "bias" in views[i]:
                np.sum(DO2, axis=0, out=views[i]["bias"])
        if i > linears[0]:
            if scale is not None:
                D *= scale
                scale = None
            D = layer.backward_input(p, cache, D)
    return out


def diag_ggn(pt):
    """Exact diagonal (P,) of ``Jᵀ ∇²ℓ J + l2·diag(weight mask)``, from ``∇²ℓ_b = Σ_k S_kb S_kbᵀ``."""
    return _diag_ggn_from_factor(pt, pt.loss_fn.hessian_sqrt(pt.loss_cache))


def diag_ggn_mc(pt, num_samples=1, seed=0):
    """Unbiased Monte-Carlo estimate (P,) of :func:`diag_ggn` from targets drawn from the model.

    ``num_samples`` draws per example (an int >= 1); ``seed`` (an int >= 0, a numpy.random.Generator
    or None) for ``numpy.random.default_rng``.
    """
    num_samples = check_int("num_samples", num_samples, 1)
    rng = check_seed(seed)
    return _diag_ggn_from_factor(pt, pt.loss_fn.sample_hessian_sqrt(pt.loss_cache, num_samples, rng))
