"""Losses on the network outputs ``O`` (B, C), defined as PyTorch's.

Loss contract: ``check_target(y, O)`` validates and converts the target,
``forward(O, y) -> (value, cache)``, ``backward(cache) -> ∇_O ℓ`` (B, C) and
``hessian_vp(cache, U) -> ∇²_O ℓ [U]`` for U (k, B, C). With ``reduction="mean"``
the per-example terms are divided by ``normalizer`` (B for cross-entropy, B·C
for MSE, as ``torch.nn``); with ``"sum"`` they are added.
"""

import numpy as np

from ._checks import check_finite, check_reduction, describe, real_array


class CrossEntropyLoss:
    """Softmax cross-entropy ``ℓ = Σ_b −Σ_c t_bc log softmax(O_b)_c / N`` (``torch.nn.CrossEntropyLoss``).

    Targets are integer class labels of shape (B,) with values in [0, C), or
    probabilities of shape (B, C). ``N`` is B for ``reduction="mean"``, 1 for "sum".
    With ``s_b = Σ_c t_bc`` (1 for labels) and ``p = softmax(O)``:
    ``∇ℓ = (s ⊙ p − t)/N`` and ``∇²ℓ[u] = s ⊙ (p ⊙ u − p ⟨p, u⟩)/N``.
    """

    def __init__(self, reduction="mean"):
        self.reduction = check_reduction(reduction)

    def __repr__(self):
        return f"CrossEntropyLoss(reduction={self.reduction!r})"

    def normalizer(self, O):
        return O.shape[0] if self.reduction == "mean" else 1

    def check_target(self, y, O):
        """Labels (B,) of an integer dtype in [0, C), or finite probabilities (B, C) (as O's dtype)."""
        B, C = O.shape
        y = np.asarray(y)
        if y.ndim == 1:
            if y.dtype.kind not in "iu":
                raise TypeError(f"class labels y must have an integer dtype, got {describe(y)} "
                                f"(probability targets have shape ({B}, {C}))")
            if y.shape[0] != B:
                raise ValueError(f"y must have {B} labels, one per row of X, got shape {y.shape}")
            if y.min() < 0 or y.max() >= C:
                raise ValueError(f"labels y must lie in [0, {C}), got values from {y.min()} to {y.max()}")
            return y
        if y.shape != (B, C):
            raise ValueError(f"y must be labels of shape ({B},) or probabilities of shape ({B}, {C}), "
                             f"got shape {y.shape}")
        y = real_array("y", y, O.dtype)
        check_finite("y", y)
        return y

    def forward(self, O, y):
        shifted = O - O.max(axis=1, keepdims=True)
        logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        if y.ndim == 1:
            value = -logp[np.arange(len(y)), y].sum()
            s = None
        else:
            value = -(y * logp).sum()
            s = y.sum(axis=1, keepdims=True)
        cache = {"p": np.exp(logp), "y": y, "s": s, "N": self.normalizer(O)}
        return float(value) / cache["N"], cache

    def backward(self, cache):
        p, y, s, N = cache["p"], cache["y"], cache["s"], cache["N"]
        if s is None:
            g = p.copy()
            g[np.arange(len(y)), y] -= 1
        else:
            g = s * p - y
        return g / g.dtype.type(N)

    def hessian_vp(self, cache, U):
        """``s ⊙ (p ⊙ U − p ⟨p, U⟩)/N``; U (..., B, C) -> (..., B, C)."""
        p = cache["p"]
        HU = p * (U - (p * U).sum(axis=-1, keepdims=True))
        if cache["s"] is not None:
            HU *= cache["s"]
        return HU / HU.dtype.type(cache["N"])


class MSELoss:
    """Mean squared error ``ℓ = Σ_bc (O_bc − Y_bc)² / N`` (``torch.nn.MSELoss``).

    Targets have exactly the outputs' shape (B, C), never broadcast. ``N`` is B·C
    for ``reduction="mean"``, 1 for "sum". ``∇ℓ = 2(O − Y)/N``, ``∇²ℓ[u] = 2u/N``.
    """

    def __init__(self, reduction="mean"):
        self.reduction = check_reduction(reduction)

    def __repr__(self):
        return f"MSELoss(reduction={self.reduction!r})"

    def normalizer(self, O):
        return O.size if self.reduction == "mean" else 1

    def check_target(self, y, O):
        y = real_array("y", y, O.dtype)
        if y.shape != O.shape:
            raise ValueError(f"y must have the outputs' shape {O.shape}, got shape {y.shape}")
        check_finite("y", y)
        return y

    def forward(self, O, y):
        r = O - y
        N = self.normalizer(O)
        return float((r * r).sum()) / N, {"r": r, "N": N}

    def backward(self, cache):
        return cache["r"] * cache["r"].dtype.type(2 / cache["N"])

    def hessian_vp(self, cache, U):
        return U * U.dtype.type(2 / cache["N"])
