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

from ._checks import describe
from .layers import Linear


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
        g[pt.weight_mask] -= pt.theta.dtype.type(pt.l2) * pt.theta[pt.weight_mask]
    return g


def sum_grad_squared(pt):
    """``Σ_n g_n²`` (P,): weight ``(I²)ᵀ(DO²)``, bias ``Σ_n DO_n²`` (seed 002 ``DI2²``, ``DI3²``)."""
    out = np.empty(pt.net.num_params, dtype=pt.theta.dtype)
    views = pt.net.unflatten(out)
    for i in _linear_indices(pt):
        DO2 = np.square(pt.adjoints[i])
        np.matmul(np.square(pt.caches[i]).T, DO2, out=views[i]["weight"])
        if "bias" in views[i]:
            np.sum(DO2, axis=0, out=views[i]["bias"])
    return out


def batch_grad(pt):
    """``g_n`` (B, P) for every example: weight ``I_nᵀ DO_n``, bias ``DO_n``; one (B, P) array."""
    B = pt.outputs.shape[0]
    out = np.empty((B, pt.net.num_params), dtype=pt.theta.dtype)
    views = pt.net.unflatten(out)  # weight (B, m, n), bias (B, n): views into the rows of out
    for i in _linear_indices(pt):
        I, DO = pt.caches[i], pt.adjoints[i]
        np.multiply(I[:, :, None], DO[:, None, :], out=views[i]["weight"])
        if "bias" in views[i]:
            views[i]["bias"][...] = DO
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

    ``c = B`` for mean reduction (then it is ``B·Σ_n g_n² − g²``), 1 for sum; clipped at 0.
    """
    B = pt.outputs.shape[0]
    c = B if pt.loss_fn.reduction == "mean" else 1
    out = sum_grad_squared(pt)
    out *= out.dtype.type(c * c / B)
    g = _grad_without_l2(pt)
    g *= g.dtype.type(c / B)
    out -= np.square(g, out=g)
    return np.maximum(out, 0, out=out)


def _diag_ggn_from_factor(pt, S):
    """``Σ_b Σ_k (J_bᵀ S_kb)²`` (P,) + l2 on weights, for a factor S (K, B, C) of the loss Hessian.

    The K columns travel backward together; per Linear layer ``diag_W = (I²)ᵀ Σ_k DO_k²``
    (the squares summed over k before the one matmul) and ``diag_b = Σ_{k,b} DO_k²``.
    """
    out = np.empty(pt.net.num_params, dtype=pt.theta.dtype)
    views = pt.net.unflatten(out)
    linears = _linear_indices(pt)
    DO = S.astype(pt.theta.dtype, copy=False)
    for i in reversed(range(linears[0], len(pt.net.layers))):
        layer, p, cache = pt.net.layers[i], pt.params[i], pt.caches[i]
        if i in linears:
            DO2 = np.einsum("kbn,kbn->bn", DO, DO)
            np.matmul(np.square(cache).T, DO2, out=views[i]["weight"])
            if "bias" in views[i]:
                np.sum(DO2, axis=0, out=views[i]["bias"])
        if i > linears[0]:
            DO = layer.backward_input(p, cache, DO)
    if pt.l2:
        out[pt.weight_mask] += out.dtype.type(pt.l2)
    return out


def diag_ggn(pt):
    """Exact diagonal (P,) of ``Jᵀ ∇²ℓ J + l2·diag(weight mask)``, from ``∇²ℓ_b = Σ_k S_kb S_kbᵀ``."""
    return _diag_ggn_from_factor(pt, pt.loss_fn.hessian_sqrt(pt.loss_cache))


def diag_ggn_mc(pt, num_samples=1, seed=0):
    """Unbiased Monte-Carlo estimate (P,) of :func:`diag_ggn` from targets drawn from the model.

    ``num_samples`` draws per example (an int >= 1); ``seed`` for ``numpy.random.default_rng``.
    """
    if isinstance(num_samples, (bool, np.bool_)) or not isinstance(num_samples, (int, np.integer)):
        raise TypeError(f"num_samples must be an int >= 1, got {describe(num_samples)}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be an int >= 1, got {num_samples}")
    rng = np.random.default_rng(seed)
    return _diag_ggn_from_factor(pt, pt.loss_fn.sample_hessian_sqrt(pt.loss_cache, int(num_samples), rng))
