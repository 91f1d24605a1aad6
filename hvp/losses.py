"""Losses on the network outputs ``O`` (B, C), defined as PyTorch's.

Loss contract: ``check_target(y, O)`` validates and converts the target,
``forward(O, y) -> (value, cache)``, ``backward(cache) -> ∇_O ℓ`` (B, C) and
``hessian_vp(cache, U) -> ∇²_O ℓ [U]`` for U (k, B, C); ``hessian_sqrt(cache)`` and
``sample_hessian_sqrt(cache, M, rng)`` give factors S (K, B, C) with ``∇²ℓ_b = Σ_k S_kb S_kbᵀ``
(exactly, or in expectation), for GGN diagonals. With ``reduction="mean"``
the per-example terms are divided by ``normalizer`` (B for cross-entropy, B·C
for MSE, as ``torch.nn``); with ``"sum"`` they are added.
"""

import numpy as np

from . import memory
from ._checks import check_finite, check_reduction, describe, real_array


def _diagonal_factor(d):
    """S (C, B, C) with ``S_kb = d_bk e_k``: the factor of a diagonal Hessian ``diag(d_b²)``; d (B, C)."""
    C = d.shape[1]
    S = memory.zeros((C,) + d.shape, d.dtype)
    S[np.arange(C), :, np.arange(C)] = d.T
    return S


def _same_shape_target(y, O):
    """Targets of exactly O's shape (B, C), never broadcast, finite; as O's dtype."""
    y = real_array("y", y, O.dtype)
    if y.shape != O.shape:
        raise ValueError(f"y must have the outputs' shape {O.shape}, got shape {y.shape}")
    check_finite("y", y)
    return y


class CrossEntropyLoss:
    """Softmax cross-entropy ``ℓ = Σ_b −Σ_c t_bc log softmax(O_b)_c / N`` (``torch.nn.CrossEntropyLoss``).

    Targets are integer class labels of shape (B,) with values in [0, C), or
    probabilities of shape (B, C): entries >= 0 and rows summing to 1, up to the rounding
    of targets normalized in float32 or float64 (``|Σ_c t_bc − 1| <= 16·C·eps``, eps of the
    coarser of the targets' and the outputs' float dtypes). ``N`` is B for
    ``reduction="mean"``, 1 for "sum". With ``p = softmax(O)`` and ``s_b = Σ_c t_bc``
    (1 for labels, 1 up to that rounding for probabilities):
    ``∇ℓ = (s ⊙ p − t)/N`` and ``∇²ℓ[u] = s ⊙ (p ⊙ u − p ⟨p, u⟩)/N``; the factor s
    keeps them the exact derivatives of the value computed from the targets as given.
    """

    def __init__(self, reduction="mean"):
        self.reduction = check_reduction(reduction)

    def __repr__(self):
        return f"CrossEntropyLoss(reduction={self.reduction!r})"

    def normalizer(self, O):
        return O.shape[0] if self.reduction == "mean" else 1

    def check_target(self, y, O):
        """Labels (B,) of an integer dtype in [0, C), or probabilities (B, C) (as O's dtype).

        Probabilities must be finite and >= 0 with rows summing to 1 within ``16·C·eps``.
        """
        B, C = O.shape
        y = real_array("y", y)
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
        check_finite("y", y)
        if y.min() < 0:
            b, c = np.unravel_index(np.argmin(y), y.shape)
            raise ValueError(f"probability targets y must be >= 0, got y[{b}, {c}] = {float(y[b, c])!r}")
        eps = max(np.finfo(O.dtype).eps, np.finfo(y.dtype).eps if y.dtype.kind == "f" else 0.0)
        tol = 16 * C * eps
        sums = y.sum(axis=1, dtype=np.float64)
        b = np.argmax(np.abs(sums - 1))
        if not abs(sums[b] - 1) <= tol:
            raise ValueError(f"probability targets y must have rows summing to 1 (within {tol:.1e}), "
                             f"got row {b} summing to {float(sums[b])!r} (normalize them in y's dtype: "
                             f"y / y.sum(axis=1, keepdims=True))")
        return y.astype(O.dtype, copy=False)

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

    def _sqrt_weight(self, cache):
        """``√(s_b/N)``: a scalar for labels, (B, 1) for probability targets (rows summing to s_b ≈ 1)."""
        s, N = cache["s"], cache["N"]
        if s is None:
            return cache["p"].dtype.type(np.sqrt(1 / N))
        return np.sqrt(s / s.dtype.type(N))

    def hessian_sqrt(self, cache):
        """Factor S of the Hessian at the outputs with C − 1 columns: ``∇²ℓ_b = Σ_k S_kb S_kbᵀ``.

        ``A = √(s_b/N)(diag √p − p √pᵀ)`` has ``A Aᵀ = s_b (diag p − p pᵀ)/N`` and ``A √p = 0``;
        the Householder reflection Q that swaps ``√p`` and ``e_j`` (j = argmin p_b) makes
        column j of ``AQ`` zero, and the other C − 1 columns are
        ``S_ib = √(s_b/N) √p_bi [e_i − p_b + √p_bj (e_j − p_b)/(1 − √p_bj)]``, i ≠ j.

        Returns
        -------
        S : ndarray, shape (C − 1, B, C), or (1, B, 1) of zeros for C = 1
            Column k of example b is ``S[k, b]``.
        """
        p = cache["p"]
        B, C = p.shape
        if C == 1:
            return np.zeros((1, B, 1), dtype=p.dtype)
        sqrt_p = np.sqrt(p)
        rows, j = np.arange(B), np.argmin(p, axis=1)
        A = memory.empty((C, B, C), p.dtype)
        np.subtract(np.eye(C, dtype=p.dtype)[:, None, :], p, out=A)
        A *= sqrt_p.T[:, :, None]  # A[i, b] = √p_bi (e_i − p_b)
        coef = sqrt_p / (1 - sqrt_p[rows, j])[:, None]  # √p_bi / (1 − √p_bj), √p_bj <= 1/√C
        A += memory.multiply(coef.T[:, :, None], A[j, rows])
        keep = np.arange(C - 1)[:, None]
        keep = keep + (keep >= j)  # the C − 1 indices i ≠ j_b, for every b
        S = memory.empty((C - 1, B, C), p.dtype)
        np.take(A.reshape(C * B, C), (keep * B + rows).reshape(-1), axis=0, out=S.reshape(-1, C))
        S *= self._sqrt_weight(cache)
        return S

    def sample_hessian_sqrt(self, cache, num_samples, rng):
        """Random factor S with ``E[Σ_k S_kb S_kbᵀ] = ∇²ℓ_b`` from labels sampled from the model.

        ``S_kb = √(s_b/(N·M)) (p_b − e_ŷ)`` with ``ŷ ~ Categorical(p_b)`` drawn afresh for each
        of the M columns: ``E[(p − e_ŷ)(p − e_ŷ)ᵀ] = diag p − p pᵀ``. The factor ``√s_b``
        carries the row sum of a probability target (1 up to rounding; 1 for labels).

        Parameters
        ----------
        cache : dict
            From :meth:`forward`.
        num_samples : int
            M, the number of sampled labels per example.
        rng : numpy.random.Generator

        Returns
        -------
        S : ndarray, shape (M, B, C)
        """
        p = cache["p"]
        B, C = p.shape
        cdf = np.cumsum(p, axis=1, dtype=np.float64)
        u = rng.random((num_samples, B)) * cdf[:, -1]
        labels = (u[:, :, None] >= cdf).sum(axis=2)  # smallest c with cdf_c > u
        S = memory.empty((num_samples,) + p.shape, p.dtype)
        S[...] = p
        S[np.arange(num_samples)[:, None], np.arange(B), labels] -= 1
        S *= self._sqrt_weight(cache) * p.dtype.type(np.sqrt(1 / num_samples))
        return S


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
        """Targets of exactly the outputs' shape (B, C), finite (as O's dtype)."""
        return _same_shape_target(y, O)

    def forward(self, O, y):
        r = O - y
        N = self.normalizer(O)
        return float((r * r).sum()) / N, {"r": r, "N": N}

    def backward(self, cache):
        return cache["r"] * cache["r"].dtype.type(2 / cache["N"])

    def hessian_vp(self, cache, U):
        return U * U.dtype.type(2 / cache["N"])

    def hessian_sqrt(self, cache):
        """Factor S of the Hessian at the outputs: ``∇²ℓ_b = 2/N · I = Σ_k S_kb S_kbᵀ``, ``S_kb = √(2/N) e_k``.

        Returns
        -------
        S : ndarray, shape (C, B, C)
            Column k of example b is ``S[k, b]``.
        """
        r = cache["r"]
        return _diagonal_factor(np.full_like(r, np.sqrt(2 / cache["N"])))

    def sample_hessian_sqrt(self, cache, num_samples, rng):
        """Random factor S with ``E[Σ_k S_kb S_kbᵀ] = 2/N · I``: ``S_kb = √(2/(N·M)) z``, ``z ~ N(0, I)``.

        This is ``√(N/M)`` times the loss gradient ``2(O − ŷ)/N`` at targets ``ŷ ~ N(O, I/2)``,
        the Gaussian whose negative log-likelihood is the squared error (up to a constant):
        its variance 1/2 is what makes ``E[S Sᵀ]`` the exact Hessian, so that the
        Monte-Carlo GGN diagonal is unbiased.

        Parameters
        ----------
        cache : dict
            From :meth:`forward`.
        num_samples : int
            M, the number of sampled targets per example.
        rng : numpy.random.Generator

        Returns
        -------
        S : ndarray, shape (M, B, C)
        """
        r = cache["r"]
        z = rng.standard_normal((num_samples,) + r.shape).astype(r.dtype, copy=False)
        return z * r.dtype.type(np.sqrt(2 / (cache["N"] * num_samples)))


class BCEWithLogitsLoss:
    """Sigmoid and binary cross-entropy in one, ``ℓ = Σ_bc [log(1 + e^{O_bc}) − Y_bc O_bc] / N``
    (``torch.nn.BCEWithLogitsLoss``).

    Targets have exactly the outputs' shape (B, C), with entries in [0, 1] (checked; PyTorch
    does not check them). ``N`` is B·C for ``reduction="mean"``, 1 for "sum". With
    ``q = sigmoid(O)``: ``∇ℓ = (q − Y)/N``, ``∇²ℓ[u] = q ⊙ (1 − q) ⊙ u/N`` (diagonal).
    """

    def __init__(self, reduction="mean"):
        self.reduction = check_reduction(reduction)

    def __repr__(self):
        return f"BCEWithLogitsLoss(reduction={self.reduction!r})"

    def normalizer(self, O):
        return O.size if self.reduction == "mean" else 1

    def check_target(self, y, O):
        """Targets of exactly the outputs' shape (B, C), in [0, 1] (as O's dtype)."""
        y = _same_shape_target(y, O)
        if y.min() < 0 or y.max() > 1:
            raise ValueError(f"targets y must lie in [0, 1], got values from {float(y.min())!r} to {float(y.max())!r}")
        return y

    def forward(self, O, y):
        # log(1 + e^O) − y O = max(O, 0) − y O + log(1 + e^−|O|), stable for logits of any size; and
        # q = sigmoid(O) = 1/(1 + e^−|O|) or e^−|O|/(1 + e^−|O|): one exponential for both
        e = np.exp(-np.abs(O))
        value = np.maximum(O, 0)
        value -= y * O
        value += np.log1p(e)
        q = np.where(O >= 0, 1, e)
        q /= 1 + e
        return float(value.sum()) / self.normalizer(O), {"q": q, "y": y, "N": self.normalizer(O)}

    def backward(self, cache):
        return (cache["q"] - cache["y"]) / cache["q"].dtype.type(cache["N"])

    def _hessian_diagonal(self, cache):
        q = cache["q"]
        return q * (1 - q) / q.dtype.type(cache["N"])

    def hessian_vp(self, cache, U):
        return self._hessian_diagonal(cache) * U

    def hessian_sqrt(self, cache):
        """Factor S of the (diagonal) Hessian: ``S_kb = √(q_bk (1 − q_bk)/N) e_k``.

        Returns
        -------
        S : ndarray, shape (C, B, C)
        """
        return _diagonal_factor(np.sqrt(self._hessian_diagonal(cache)))

    def sample_hessian_sqrt(self, cache, num_samples, rng):
        """Random factor with ``E[Σ_k S_kb S_kbᵀ] = ∇²ℓ_b``: ``S_kb = (q_b − ŷ_kb)/√(N·M)``, ŷ ~ Bernoulli(q).

        Returns
        -------
        S : ndarray, shape (M, B, C)
        """
        q = cache["q"]
        sampled = (rng.random((num_samples,) + q.shape) < q).astype(q.dtype)
        return (q - sampled) * q.dtype.type(np.sqrt(1 / (cache["N"] * num_samples)))
