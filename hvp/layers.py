"""Layers and the four derivative rules every layer implements.

Layer contract (DESIGN.md §1, seed 002). Arrays are batch first. For a layer
with inputs of width ``m`` and outputs of width ``n``:

======================  ==========================  ==============================
rule                    method                      shapes
======================  ==========================  ==============================
1 forward               ``forward(p, I)``           I (B, m) -> O (B, n), cache
2 backward              ``backward_input(p, c, DO)``  DO (B, ..., n) -> DI (B, ..., m)
                        ``backward_params(p, c, DO)`` DO (B, n) -> dict like ``p``;
                                                    DO (B, k, n) -> dict with a
                                                    trailing k axis
3 tangent               ``tangent(p, c, dI, dp)``   dI (B, k, m) or None,
                                                    dp dict with trailing k axis
                                                    or None -> dO (B, k, n) or None
4 tangent backward      ``tangent_backward(p, c,    dI (B, k, m) or None, dp, DOD
                        dI, dp, DOD)``              (B, n) -> (DI_k (B, k, m) or
                                                    None, dict with trailing k)
======================  ==========================  ==============================

``p`` is the layer's dict of parameter views (``net.unflatten``), ``c`` the
cache returned by ``forward``. ``None`` stands for a tangent that is zero, so
no work is spent on it. ``dp`` holds a direction in parameter space with the
direction axis last, as the columns of a ``(P, k)`` block are laid out
(``"weight"`` (m, n, k), ``"bias"`` (n, k)).

Rule 4 is written in its per-direction form: for a scalar ``T_k`` that depends
on ``O`` and ``Ȯ_k`` with ``∂T_k/∂Ȯ_k = DOD``, the adjoints are
``backward(DO_k)`` plus the terms returned by ``tangent_backward``; the adjoint
of the input tangent is ``backward_input(DOD)``. These extra terms are the
``σ″`` and ``Ẇ``/``İ`` cross terms that the Gauss-Newton product drops.
"""

import numpy as np


class Linear:
    """Affine layer ``O = I W + b``.

    Parameters
    ----------
    in_features, out_features : int
        Widths ``m`` and ``n``: ``W`` has shape (m, n), ``b`` shape (n,).
    bias : bool
        Whether the layer has the bias ``b``.
    """

    def __init__(self, in_features, out_features, bias=True):
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"Linear: {name} must be a positive integer, got {value!r}")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.bias = bool(bias)

    def __repr__(self):
        return f"Linear({self.in_features}, {self.out_features}, bias={self.bias})"

    def param_shapes(self):
        """Named parameter shapes in their order in θ: weight (m, n), then bias (n,)."""
        shapes = [("weight", (self.in_features, self.out_features))]
        if self.bias:
            shapes.append(("bias", (self.out_features,)))
        return shapes

    def out_width(self, in_width):
        return self.out_features

    def forward(self, p, I):
        """Rule 1: ``O = I W + b``; I (B, m) -> O (B, n)."""
        O = I @ p["weight"]
        if self.bias:
            O += p["bias"]
        return O, I

    def backward_input(self, p, I, DO):
        """Rule 2: ``DI = DO Wᵀ``; DO (B, ..., n) -> DI (B, ..., m)."""
        W = p["weight"]
        return (DO.reshape(-1, W.shape[1]) @ W.T).reshape(DO.shape[:-1] + (W.shape[0],))

    def backward_params(self, p, I, DO):
        """Rule 2: ``DW = Iᵀ DO``, ``Db = Σ_b DO``; with DO (B, k, n): per direction.

        Returns weight (m, n) and bias (n,), or (m, n, k) and (n, k) for DO (B, k, n).
        """
        if DO.ndim == 2:
            grads = {"weight": I.T @ DO}
            if self.bias:
                grads["bias"] = DO.sum(axis=0)
            return grads
        B, k, n = DO.shape
        # 'bm,bkn->mnk': the k axis folds into the columns of one matmul.
        grads = {"weight": (I.T @ DO.reshape(B, k * n)).reshape(-1, k, n).transpose(0, 2, 1)}
        if self.bias:
            grads["bias"] = DO.sum(axis=0).T
        return grads

    def tangent(self, p, I, dI, dp):
        """Rule 3: ``Ȯ = İ W + I Ẇ + ḃ``; dI (B, k, m), Ẇ (m, n, k) -> dO (B, k, n)."""
        W = p["weight"]
        m, n = W.shape
        dO = None
        if dI is not None:
            B, k, _ = dI.shape
            dO = (dI.reshape(B * k, m) @ W).reshape(B, k, n)
        if dp is not None:
            k = dp["weight"].shape[2]
            # 'bm,mnk->bkn'
            from_params = (I @ dp["weight"].reshape(m, n * k)).reshape(-1, n, k)
            if self.bias:
                from_params += dp["bias"]
            from_params = from_params.transpose(0, 2, 1)
            dO = from_params if dO is None else dO + from_params
        return dO

    def tangent_backward(self, p, I, dI, dp, DOD):
        """Rule 4 cross terms: ``DI_k = DOD Ẇ_kᵀ``, ``DW_k = İ_kᵀ DOD``; DOD (B, n).

        Returns DI_k (B, k, m) or None, and the weight term (m, n, k) (the bias
        has no cross term).
        """
        m, n = p["weight"].shape
        DI = grads = None
        if dp is not None:
            dW = dp["weight"]
            k = dW.shape[2]
            # 'bn,mnk->bkm'
            DI = (DOD @ dW.transpose(1, 2, 0).reshape(n, k * m)).reshape(-1, k, m)
        if dI is not None:
            B, k, _ = dI.shape
            # 'bkm,bn->mnk'
            dW = (dI.reshape(B, k * m).T @ DOD).reshape(k, m, n).transpose(1, 2, 0)
            grads = {"weight": dW}
        return DI, grads
