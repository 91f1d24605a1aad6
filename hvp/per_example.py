"""Per-example quantities from one linearization: no extra forward or backward pass.

Convention (as BackPACK's). ``g_n`` is example n's term of the loss *as reduced*:
with ``reduction="mean"`` it carries the normalizer (1/B for cross-entropy, 1/(B·C)
for MSE, whose mean runs over all B·C entries), so that ``Σ_n g_n`` is the gradient
without the L2 term. The L2 penalty is not per-example and is left out of every
per-example quantity; :func:`diag_ggn` and :func:`diag_ggn_mc` include it, as
``pt.ggnvp`` does.

Each layer with parameters gives its own pieces through the layer contract (:mod:`hvp.layers`):
``batch_grad``, ``grad_squares`` and ``batch_l2``, from its cache and the adjoint ``DO = ∂L/∂O``
at its output (``pt.adjoints[i]``, which already carries the normalizer). A Linear layer
``O = I W + b`` has per-example gradients ``(g_n)_W = I_nᵀ DO_n`` and ``(g_n)_b = DO_n`` (seed 002,
DESIGN.md §2), so ``Σ_n (g_n)_W² = (I²)ᵀ (DO²)`` and ``‖(g_n)_W‖² = ‖I_n‖² ‖DO_n‖²`` take one matmul
or less and never form a (B, m, n) array; a convolution sums over output positions, so its
squares do not factor and it forms per-example gradients a block of examples at a time.
"""

import numpy as np

from . import memory
from ._checks import check_int, check_seed, describe
from .layers.activations import Elementwise

BATCH_GRAD_BLOCK_BYTES = 16 << 20  # batch_grad fills its (B, P) result in blocks of rows of about this size
PER_EXAMPLE_RULES = ("batch_grad", "grad_squares", "batch_l2")


def _param_layers(pt):
    """Indices of the layers with parameters; each must give the per-example pieces of the layer contract."""
    indices = []
    for i, layer in enumerate(pt.net.layers):
        if layer.param_shapes():
            if not all(hasattr(layer, rule) for rule in PER_EXAMPLE_RULES):
                raise TypeError(f"per-example quantities need the per-example rules of the layer contract "
                                f"(Linear, convolution and Residual layers give them); layer {i} ({describe(layer)}) "
                                "has none")
            indices.append(i)
    return indices


def _grad_without_l2(pt):
    """``Σ_n g_n`` (P,): the gradient of the loss alone, a fresh array."""
    g = memory.copy(pt.grad)
    if pt.l2:
        g[pt.weight_mask] -= g.dtype.type(pt.l2) * pt.theta[pt.weight_mask]
    return g


def sum_grad_squared(pt, sums=None):
    """``Σ_n g_n²`` (P,): for a Linear layer weight ``(I²)ᵀ(DO²)``, bias ``Σ_n DO_n²`` (seed 002 ``DI2²``, ``DI3²``).

    With ``sums`` (P,), ``Σ_n g_n`` is written there too: a convolution sums the g_n it forms anyway."""
    out = memory.empty((pt.net.num_params,), pt.theta.dtype)
    views = pt.net.unflatten(out)
    sum_views = [None] * len(views) if sums is None else pt.net.unflatten(sums)
    for i in _param_layers(pt):
        pt.net.layers[i].grad_squares(pt.params[i], pt.caches[i], pt.adjoints[i][None], views[i], sums=sum_views[i])
    return out


def batch_grad(pt):
    """``g_n`` (B, P) for every example; one (B, P) array, filled a block of examples at a time."""
    B = pt.outputs.shape[0]
    out = memory.empty((B, pt.net.num_params), pt.theta.dtype)
    views = pt.net.unflatten(out)  # e.g. weight (B, m, n), bias (B, n): views into the rows of out
    layers = _param_layers(pt)
    rows = max(1, BATCH_GRAD_BLOCK_BYTES // out[0].nbytes)  # blocks of rows written front to back
    for start in range(0, B, rows):
        block = slice(start, start + rows)
        for i in layers:
            block_views = {name: view[block] for name, view in views[i].items()}
            pt.net.layers[i].batch_grad(pt.params[i], pt.caches[i], pt.adjoints[i], block_views, block)
    return out


def batch_l2(pt):
    """``‖g_n‖²`` (B,), summed over the layers' per-example squared norms."""
    out = np.zeros(pt.outputs.shape[0], dtype=pt.theta.dtype)
    for i in _param_layers(pt):
        out += pt.net.layers[i].batch_l2(pt.params[i], pt.caches[i], pt.adjoints[i])
    return out


def variance(pt):
    """Elementwise variance (P,) of the per-example loss gradients ``∇ℓ_n = c·g_n`` (1/B normalization).

    ``Var = (c²/B) Σ_n g_n² − (c g/B)²`` with ``g = Σ_n g_n``; ``c = B`` for mean reduction
    (then ``B·Σ_n g_n² − g²``), 1 for sum. Rounding below 0 is clipped to 0.
    """
    B = pt.outputs.shape[0]
    c = B if pt.loss_fn.reduction == "mean" else 1
    if pt._grad is None:  # Σ_n g_n from the same pass
        g = memory.empty((pt.net.num_params,), pt.theta.dtype)
        out = sum_grad_squared(pt, sums=g)
    else:
        out = sum_grad_squared(pt)
        g = _grad_without_l2(pt) if pt.l2 else pt.grad
    out *= out.dtype.type(c * c / B)
    if c != B:
        g = g * g.dtype.type(c / B)
    out -= np.square(g, out=memory.empty(g.shape, g.dtype))
    out[out < 0] = 0  # rounding; faster than np.maximum, which checks for NaN
    return out


def _diag_ggn_from_factor(pt, S):
    """``Σ_b Σ_k (J_bᵀ S_kb)²`` (P,) + l2 on weights, for a factor S (K, B, C) of the loss Hessian.

    The K columns travel backward together, and each layer with parameters turns them into its
    ``Σ_{k,b}`` of squared per-example gradients (``grad_squares``; for a Linear layer the squares
    summed over k before one matmul). An activation's σ′ is kept aside as a factor of the adjoint,
    ``DO = σ′ ⊙ D``, so that a Linear layer's ``Σ_k DO_k² = σ′² ⊙ Σ_k D_k²`` costs (B, n) work and D
    is scaled only if it travels on.
    """
    out = memory.empty((pt.net.num_params,), pt.theta.dtype)
    views = pt.net.unflatten(out)
    layers = _param_layers(pt)
    D = S.astype(pt.theta.dtype, copy=False)  # a fresh factor, ours to scale in place below
    scale = None  # DO = scale ⊙ D, scale (B, …) or None for 1
    for i in reversed(range(layers[0], len(pt.net.layers))):
        layer, p, cache = pt.net.layers[i], pt.params[i], pt.caches[i]
        if isinstance(layer, Elementwise):
            d1 = layer._d1(cache)
            scale = d1 if scale is None else memory.multiply(scale, d1)
            continue
        DI = layer.grad_squares(p, cache, D, views[i], scale, need_input=i > layers[0]) if i in layers else None
        if DI is not None:  # formed on the way (a residual block)
            D, scale = DI, None
        elif i > layers[0]:
            if scale is not None:
                D *= scale
                scale = None
            D = layer.backward_input(p, cache, D)
    if pt.l2:
        out[pt.weight_mask] += out.dtype.type(pt.l2)
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
