"""Exact diagonal of the Hessian, by backpropagating a factorization of the Hessian in each layer's output.

As BackPACK's ``DiagHessian`` (Dangel, Kunstner & Hennig 2020), per example b, at a layer's output O:
``∇²_O L_b = Σ_k c_kb v_kb v_kbᵀ + diag(d_b)``, columns v with real weights c of either sign (BackPACK's
``Σ S⁺S⁺ᵀ − Σ S⁻S⁻ᵀ``) and a diagonal d. A layer ``O = g(I)`` passes it on as
``∇²_I L_b = J_bᵀ ∇²_O L_b J_b + Σ_j δ_bj ∇²_I O_bj`` (J_b = ∂O_b/∂I_b, δ = ∂L/∂O), so that

- columns go back one by one, ``v ↦ v J`` (rule 2, ``backward_input``); an activation's σ′ travels with
  them as a factor until they meet another layer;
- a layer adds its own curvature ``Σ_j δ_j ∇²_I O_j``: ``diag(σ″ ⊙ δ)`` for an activation, zero for layers
  linear in I (Linear, convolution, pooling, Flatten); a residual block ``O = I + f(I)`` adds that of f's
  activations, carried back through f's earlier layers;
- a diagonal stays one through layers each of whose outputs copy one input entry (activations, max
  pooling, Flatten), and becomes columns ``e_j`` with weights ``c_bj = d_bj`` before any other layer.

A layer with parameters θ, its output linear in θ, reads its diagonal off the factor at its output:
``Σ_{k,b} c_kb (∂O_b/∂θ ᵀ v_kb)²`` (squared per-example gradients, weighted) plus ``Σ_b diag(J_θbᵀ diag(d_b) J_θb)``
(``(I²)ᵀ d`` for Linear, which needs only the diagonal of ∇²_O L: summed over every term, it is read once).
The terms are linear in where they start (the loss's factor at the outputs, each layer's curvature), so each
is carried on its own, in chunks of columns. Everything goes through the layer contract (:mod:`hvp.layers`).
"""

import numpy as np

from ._checks import describe
from .layers.dense import weighted_squares

COLUMN_BYTES = 64 << 20  # columns are carried in chunks of about this many bytes when dense (K·B·width)


def _accumulate(views, rule, *args, **kwargs):
    """Add what ``rule(*args, out, **kwargs)`` writes into fresh arrays shaped as the parameter views ``views``."""
    part = {name: np.empty_like(view) for name, view in views.items()}
    rule(*args, part, **kwargs)
    for name, view in views.items():
        view += part[name]


def _plus(a, b):
    return b if a is None else a if b is None else a + b


class _Chain:
    """Layers walked backward: the network's, or the branch f of a residual block at position ``at`` of ``parent``.

    ``steps[i] = (layer, p, cache, DO, views)``: parameters, cache, the adjoint δ at the layer's output, and its
    views into the result ({} without parameters). ``children[i]``: the chain of the branch of a block at i.
    ``first``: the first layer with parameters (len(steps) if none). ``width``: the largest per-example size.
    """

    def __init__(self, steps, where="", parent=None, at=0):
        self.steps, self.parent, self.at = steps, parent, at
        self.first = next((i for i, step in enumerate(steps) if step[4]), len(steps))
        self.children, self.width = {}, max(step[3][0].size for step in steps)
        for i, (layer, p, cache, DO, views) in enumerate(steps):
            name = f"layer {i}{where}: {describe(layer)}"
            if hasattr(layer, "branch"):
                child = _Chain(layer.branch(p, cache, DO, views), f" of the block at layer {i}{where}", self, i)
                self.children[i], self.width = child, max(self.width, child.width)
            elif not hasattr(layer, "input_curvature"):
                raise TypeError(f"diag_hessian needs each layer's curvature in its input (input_curvature, "
                                f"hvp.layers' contract); {name} has none")
            rule = "diagonal_squares" if getattr(layer, "output_diagonal_only", False) else "grad_squares"
            if views and not hasattr(layer, rule):
                raise TypeError(f"diag_hessian needs {rule} of a layer with parameters; {name} has none")

    def needs(self, position):
        """Whether columns at ``position`` (the input of layer ``position``) reach a layer with parameters."""
        return self.first < position or (self.parent is not None and self.parent.needs(self.at))


class _Walk:
    """The backward walk: columns carried in chunks of ``chunk`` (K ≤ chunk), curvature terms started per layer."""

    def __init__(self, pt, out):
        views = pt.net.unflatten(out)
        self.top = _Chain(list(zip(pt.net.layers, pt.params, pt.caches, pt.adjoints, views)))
        self.B, width = pt.outputs.shape[0], max(self.top.width, pt.inputs[0].size)
        self.chunk = max(1, COLUMN_BYTES // (self.B * width * out.itemsize))
        self.diagonals = {}  # (chain, i) -> the diagonal summed at a layer that reads only that, and its step

    def read_diagonal(self, chain, i, h):
        """Layer i's parameters read the diagonal term h (B, …) at its output: at once, or, for a layer that
        reads only the diagonal of ∇²_O L (``output_diagonal_only``), summed with the others for one read."""
        layer, p, cache, _, views = chain.steps[i]
        if not getattr(layer, "output_diagonal_only", False):
            _accumulate(views, layer.diagonal_squares, p, cache, h)
        elif (id(chain), i) in self.diagonals:
            self.diagonals[id(chain), i][1] += h
        else:
            self.diagonals[id(chain), i] = [chain.steps[i], h.copy()]

    def finish(self):
        """The summed diagonals' reads, one per layer."""
        for (layer, p, cache, _, views), h in self.diagonals.values():
            _accumulate(views, layer.diagonal_squares, p, cache, h)

    def carry(self, chain, position, V, weights, scale=None):
        """Carry columns V (K, B or 1, …) at ``position`` of ``chain``, weights (K, B) or None for 1, and a factor
        ``scale`` (B, …) or None, down to the last layer with parameters; each adds ``Σ_{k,b} w_kb g_kb²``."""
        while True:
            for i in reversed(range(position)):
                if not chain.needs(i + 1):
                    return
                layer, p, cache, _, views = chain.steps[i]
                s = layer.jacobian_diagonal(p, cache) if hasattr(layer, "jacobian_diagonal") else None
                if s is not None:  # σ′ kept aside, applied to the squares where the columns stop
                    scale = s if scale is None else scale * s
                    continue
                if getattr(layer, "output_diagonal_only", False):
                    self.read_diagonal(chain, i, weighted_squares(V, weights, scale, self.B))
                elif views:
                    _accumulate(views, layer.grad_squares, p, cache, V, scale=scale, weights=weights)
                if not chain.needs(i):
                    return
                if scale is not None:
                    V, scale = V * scale, None
                V = layer.backward_input(p, cache, V)
            if chain.parent is None:
                return
            chain, position = chain.parent, chain.at  # out of a branch's input: the block's input

    def flush(self, chain, i, d, through):
        """Carry a diagonal d (B, …) at layer i's output as columns ``e_j`` (K, 1, …) with weights ``d_bj``, chunk
        by chunk: through layer i if ``through`` (its parameters have read d), else from its output."""
        position = i if through else i + 1
        if not chain.needs(position):
            return
        layer, p, cache = chain.steps[i][:3]
        B, shape = d.shape[0], d.shape[1:]
        d = d.reshape(B, -1)
        columns = np.flatnonzero(np.any(d != 0, axis=0))
        for start in range(0, len(columns), self.chunk):
            js = columns[start:start + self.chunk]
            E = np.zeros((len(js), 1, d.shape[1]), dtype=d.dtype)
            E[np.arange(len(js)), 0, js] = 1
            E = E.reshape((len(js), 1) + shape)
            V = layer.backward_input(p, cache, E) if through else E
            self.carry(chain, position, V, np.ascontiguousarray(d[:, js].T))

    def curvature(self, chain):
        """Start every layer's own curvature in ``chain`` and carry it down; returns the diagonal (B, …) or None
        left at the chain's input (activations at the start of a residual branch)."""
        d = None  # the diagonal at the current layer's output
        for i in reversed(range(len(chain.steps))):
            if not chain.needs(i + 1):
                return None
            layer, p, cache, DO, views = chain.steps[i]
            if d is not None:
                read = bool(views) and hasattr(layer, "diagonal_squares")
                if read:
                    self.read_diagonal(chain, i, d)
                if (read or not views) and hasattr(layer, "backward_diagonal"):
                    d = layer.backward_diagonal(p, cache, d)
                else:
                    self.flush(chain, i, d, through=read)
                    d = None
            if i in chain.children:
                d = _plus(d, self.curvature(chain.children[i]))
            else:
                d = _plus(d, layer.input_curvature(p, cache, DO))
        return d


def diag_hessian(pt):
    """Exact diagonal of the Hessian of the loss, L2 term included: ``diag(H)`` (P,), never forming H.

    ``∇²_O L_b = Σ_k c_kb v_kb v_kbᵀ + diag(d_b)`` is carried backward from the loss's factor (C − 1 or C
    columns (B, C), c = 1) and from each layer's own curvature (``σ″ ⊙ δ`` of an activation, inside residual
    branches too); each layer with parameters adds ``Σ_{k,b} c_kb g_kb²`` of the per-example gradients g_kb
    its columns give, and ``(I²)ᵀ d`` (Linear) or ``dᵀ unfold(I)²`` (convolution) for a diagonal d at its
    output; plus ``l2`` on weight entries, as in ``pt.hvp``.

    Parameters
    ----------
    pt : Linearization
        From :func:`hvp.linearize`; left as it was (σ′ and σ″ are computed once and kept in its caches).

    Returns
    -------
    ndarray, shape (P,), dtype of θ
        Equal to ``np.diag(pt.hvp(np.eye(P)))`` up to rounding; entries may be negative.

    Raises
    ------
    TypeError
        Naming a layer without the rules it needs (``input_curvature``; with parameters ``grad_squares``, or
        ``diagonal_squares`` where ``output_diagonal_only``).

    Notes
    -----
    Cost. The loss's K = C − 1 or C columns (K, B, *s) pass every layer, as in
    :meth:`~hvp.Linearization.diag_ggn`; each Linear layer then costs one ``(I²)ᵀ h`` product in all. An
    activation with σ″ ≠ 0 (not ReLU, LeakyReLU, Identity) on a feature map of shape s, n = prod(s) entries,
    adds (B, *s) work down to the first layer that does not keep a diagonal (activations, max pooling and
    Flatten keep it); a Linear or convolution layer there reads it at the cost of one gradient, ``(I²)ᵀ d``
    or ``dᵀ unfold(I)²``. Below that layer the diagonal becomes n columns ``e_j`` of shape (1, *s′), shared by
    every example until an activation or max pooling makes them (B, *s″): up to n·B·m numbers at a layer
    input of m entries, each column costing what one example's adjoint costs in a backward pass, and each
    convolution below forms n·B per-example gradients. For an MLP, no dense columns are formed above an
    activation's third Linear layer below it (the first reads d, the second one (B, n)·(n, m) product of
    shared columns). For a feature map after a convolution, n = C·H·W is large: columns travel in chunks of
    K columns with ``K·B·width·itemsize ≤ COLUMN_BYTES`` (64 MiB; width the largest per-example array in the
    network), and memory stays a few chunks whatever n. A residual block is passed by its columns as
    ``v + f's backward of v``; the curvature of f's activations is carried through f's earlier layers.
    """
    dtype = pt.theta.dtype
    out = np.zeros(pt.net.num_params, dtype=dtype)
    walk = _Walk(pt, out)
    S = pt.loss_fn.hessian_sqrt(pt.loss_cache).astype(dtype, copy=False)  # (K, B, C)
    for start in range(0, len(S), walk.chunk):
        walk.carry(walk.top, len(walk.top.steps), S[start:start + walk.chunk], None)
    walk.curvature(walk.top)
    walk.finish()
    if pt.l2:
        out[pt.weight_mask] += dtype.type(pt.l2)
    return out
