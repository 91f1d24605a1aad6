"""Exact diagonal of the Hessian, by backpropagating a factorization of the Hessian in each layer's output.

As BackPACK's ``DiagHessian`` (Dangel, Kunstner & Hennig 2020), per example b: at a layer's
output O, ``∇²_O L_b = Σ_k c_kb v_kb v_kbᵀ`` with real weights c of either sign (BackPACK's
``Σ S⁺S⁺ᵀ − Σ S⁻S⁻ᵀ``, with ``c = ±1`` after taking square roots), started from the loss's
factor (c = 1) and carried backward by

- a Linear layer ``O = I W + b``: ``∇²_I L_b = W ∇²_O L_b Wᵀ``, each column ``v ↦ v Wᵀ``;
- an activation ``O = σ(I)``: ``∇²_I L_b = σ′ ⊙ ∇²_O L_b ⊙ σ′ + diag(σ″ ⊙ δ)``, δ = ∂L/∂O.

A Linear layer reads its diagonal off the one at its output, ``h = Σ_k c_k ⊙ v_k²`` (B, n):
``diag_W = (I²)ᵀ h``, ``diag_b = Σ_b h``, exact because example b's loss depends on W only
through ``O_b = I_b W + b``, which is linear in W.
"""

import numpy as np

from ._checks import describe
from .layers.activations import Elementwise, _is_zero
from .layers.dense import Linear


def _unsupported(i, layer):
    return TypeError(f"diag_hessian supports hvp.Linear layers and elementwise activations only, "
                     f"got layer {i}: {describe(layer)}")


def _weighted_squares(V, c):
    """``Σ_k c_kb V_kb²`` (B, n) for columns V (K, B, n) with weights c (K, B), or all 1 for c None."""
    if c is None:
        return np.einsum("kbn,kbn->bn", V, V)
    return np.einsum("kb,kbn,kbn->bn", c, V, V)


def diag_hessian(pt):
    """Exact diagonal of the Hessian of the loss, L2 term included: ``diag(H)`` (P,), never forming H.

    ``diag(∇²_O L_b)`` is backpropagated as ``Σ_k c_kb v_kb v_kbᵀ``: columns ``v ↦ v Wᵀ``
    through Linear layers, ``v ↦ σ′ ⊙ v`` through activations, each of which adds the
    diagonal ``σ″ ⊙ δ`` (n columns ``e_j``, weights ``c_bj = (σ″ ⊙ δ)_bj`` of either sign);
    per Linear layer ``diag_W = (I²)ᵀ Σ_k c_k v_k²``, ``diag_b = Σ_b Σ_k c_k v_k²``, plus
    ``l2`` on weight entries, as in ``pt.hvp``.

    Parameters
    ----------
    pt : Linearization
        From :func:`hvp.linearize`; left as it was (σ″ is computed once and kept in its caches).

    Returns
    -------
    ndarray, shape (P,), dtype of θ
        Equal to ``np.diag(pt.hvp(np.eye(P)))`` up to rounding; entries may be negative.

    Notes
    -----
    Cost. Columns backpropagated: C − 1 (cross-entropy) or C (MSE, BCE) from the loss, as
    :meth:`~hvp.Linearization.diag_ggn`, plus, for each activation with σ″ ≠ 0 (not ReLU,
    LeakyReLU, Identity) that has three or more Linear layers before it, its width n. The
    diagonal columns of an activation are never formed over the next two Linear layers
    below it: at the output of the first they add ``σ″ ⊙ δ`` itself, at the output of the
    second ``σ′² ⊙ ((σ″ ⊙ δ)(W²)ᵀ)``, one (B, n)·(n, m) product. Further down they become n
    dense columns of shape (B, m), n·B·m numbers of memory, each costing ``B·m·m′``
    multiply-adds per Linear layer they pass (as the C columns from the loss). So with at
    most two hidden layers (784-512-256-10) no activation column is formed and the cost is
    that of ``diag_ggn`` plus one such product per hidden layer after the first.
    """
    dtype = pt.theta.dtype
    out = np.empty(pt.net.num_params, dtype=dtype)
    views = pt.net.unflatten(out)
    layers = pt.net.layers
    for i, layer in enumerate(layers):
        if layer.param_shapes() and not isinstance(layer, Linear):
            raise _unsupported(i, layer)
    first = next(i for i, layer in enumerate(layers) if isinstance(layer, Linear))
    # At the current layer's output, per example:  ∇²L = scale ⊙ (Σ_blocks Σ_k c_k v_k v_kᵀ
    #   + W_r diag(r) W_rᵀ) ⊙ scale + diag(d): blocks of dense columns (V (K, B, n), c (K, B) or None
    #   for 1), an activation's diagonal r (B, n′) from beyond the last Linear layer (weight W_r (n, n′)),
    #   the σ′ met since that layer (scale (B, n) or None for 1), and the diagonal d (B, n) added since.
    blocks = [(pt.loss_fn.hessian_sqrt(pt.loss_cache).astype(dtype), None)]
    scale = d = r = W_r = None
    for i in reversed(range(first, len(layers))):
        layer, p, cache = layers[i], pt.params[i], pt.caches[i]
        if isinstance(layer, Elementwise):
            d1, d2 = layer._d1(cache), layer._d2(cache)
            scale = d1 if scale is None else scale * d1
            if d is not None:
                d = d * np.square(d1)
            if not _is_zero(d2):
                residual = d2 * pt.adjoints[i]
                d = residual if d is None else d + residual
            continue
        if not isinstance(layer, Linear):
            raise _unsupported(i, layer)
        h = _weighted_squares(*blocks[0])  # the diagonal of ∇²_O L, (B, n)
        for V, c in blocks[1:]:
            h += _weighted_squares(V, c)
        if r is not None:
            h += r @ np.square(W_r).T
        if scale is not None:
            h *= np.square(scale)
        if d is not None:
            h += d
        np.matmul(np.square(cache).T, h, out=views[i]["weight"])
        if pt.l2:
            views[i]["weight"] += dtype.type(pt.l2)
        if "bias" in views[i]:
            np.sum(h, axis=0, out=views[i]["bias"])
        if i == first:
            break
        if scale is not None:
            for V, _ in blocks:
                V *= scale  # our own arrays: the loss factor's copy, or backward_input's results
        if r is not None:  # W_r's columns, scaled per example, become dense columns (n′, B, n)
            n_r, (B, n) = r.shape[1], h.shape
            columns = np.broadcast_to(W_r.T[:, None, :] * (1 if scale is None else scale), (n_r, B, n))
            blocks.append((columns, np.ascontiguousarray(r.T)))
        blocks = [(layer.backward_input(p, cache, V), c) for V, c in blocks]
        r, W_r, scale, d = d, p["weight"], None, None
    return out
