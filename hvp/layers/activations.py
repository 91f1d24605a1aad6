"""Elementwise activations ``O = σ(I)``, each defined by σ, σ′ and σ″ alone.

A subclass writes three one-line methods; ``y = σ(x)`` is passed to the
derivatives so that they may reuse it. The four rules of the layer contract
(see :mod:`hvp.layers`), on inputs of any shape are derived from them once, in :class:`Elementwise`
(seed 002 §1.1 and §2.1):

- tangent: ``Ȯ = σ′(I) ⊙ İ``
- backward: ``DI = σ′(I) ⊙ DO``
- tangent backward: ``DI_k += σ″(I) ⊙ İ_k ⊙ DOD``, ``DİD_k = σ′(I) ⊙ DOD_k``
  (summed over k for a loss on input tangents: ``DI += σ″(I) ⊙ Σ_k DOD_k ⊙ İ_k``)
- Hessian diagonal: curvature ``σ″(I) ⊙ DO`` at the input, a diagonal d carried back as ``σ′² ⊙ d``

σ′ and σ″ are computed at most once per forward pass and kept in the cache.
A σ″ that is identically zero is returned as the scalar 0, and its terms are
skipped. σ, σ′ and σ″ are evaluated a block of entries at a time into an array of the
pool (:mod:`hvp.memory`), so that their temporaries stay small and in cache.
"""

import numpy as np
from scipy.special import expit

from .. import memory
from .._checks import check_real

BLOCK_BYTES = 1 << 16  # bytes per block of an elementwise evaluation: below glibc's smallest mmap threshold


def _is_zero(a):
    return np.ndim(a) == 0 and a == 0


def _blockwise(fn, x, *more):
    """``fn(x, *more)`` for arrays of x's shape, ``BLOCK_BYTES`` at a time, into a pooled array; a scalar result
    (a constant derivative) is returned as it is."""
    flat = [np.reshape(a, -1) for a in (x, *more)]
    block = BLOCK_BYTES // x.itemsize
    first = fn(*(a[:block] for a in flat))
    if np.ndim(first) == 0:
        return first
    out = memory.empty(x.shape, first.dtype)
    out_flat = out.reshape(-1)
    out_flat[:block] = first
    for start in range(block, out_flat.size, block):
        out_flat[start:start + block] = fn(*(a[start:start + block] for a in flat))
    return out


class Elementwise:
    """Base class: ``O = σ(I)`` applied entry by entry; no parameters."""

    def __repr__(self):
        return f"{type(self).__name__}()"

    def sigma(self, x):
        raise NotImplementedError

    def dsigma(self, x, y):
        raise NotImplementedError

    def d2sigma(self, x, y):
        raise NotImplementedError

    def param_shapes(self):
        return []

    def out_shape(self, in_shape):
        return in_shape

    def forward(self, p, I):
        """Rule 1: ``O = σ(I)``; I (B, n) -> O (B, n)."""
        O = _blockwise(self.sigma, I)
        return O, {"x": I, "y": O}

    def _d1(self, cache):
        if "d1" not in cache:
            cache["d1"] = _blockwise(self.dsigma, cache["x"], cache["y"])
        return cache["d1"]

    def _d2(self, cache):
        if "d2" not in cache:
            cache["d2"] = _blockwise(self.d2sigma, cache["x"], cache["y"])
        return cache["d2"]

    def backward_input(self, p, cache, DO):
        """Rule 2: ``DI = σ′(I) ⊙ DO``; DO (..., B, n)."""
        return memory.multiply(self._d1(cache), DO)

    def backward_params(self, p, cache, DO, out=None):
        return {}

    def tangent(self, p, cache, dI, dp):
        """Rule 3: ``Ȯ_k = σ′(I) ⊙ İ_k``; dI (k, B, n) or None."""
        if dI is None:
            return None
        return memory.multiply(self._d1(cache), dI)

    def tangent_backward(self, p, cache, dI, dp, DOD, need_input=True, summed=False):
        """Rule 4 cross term: ``DI_k = σ″(I) ⊙ İ_k ⊙ DOD``; DOD (B, n) or (k, B, n) -> (k, B, n).

        With ``summed``: ``DI = σ″(I) ⊙ Σ_k DOD_k ⊙ İ_k`` (B, n).
        """
        if dI is None or not need_input:
            return None, None
        d2 = self._d2(cache)
        if _is_zero(d2):
            return None, None
        if not summed:
            DI = memory.multiply(DOD, dI)
            DI *= d2
            return DI, None
        return d2 * (DOD * dI).sum(axis=0), None

    # -- the Hessian diagonal (hvp.diag_hessian) ----------------------------------------------------

    def input_curvature(self, p, cache, DO):
        """``σ″(I) ⊙ DO`` (B, n), the diagonal Hessian of ``DO·σ(I)`` in I; None when σ″ ≡ 0."""
        d2 = self._d2(cache)
        return None if _is_zero(d2) else d2 * DO

    def jacobian_diagonal(self, p, cache):
        """``σ′(I)`` (B, n): the Jacobian is diagonal."""
        return self._d1(cache)

    def backward_diagonal(self, p, cache, d):
        """``σ′² ⊙ d`` = diag(J diag(d) J) for a diagonal d (B, n) at the output."""
        return np.square(self._d1(cache)) * d


class Identity(Elementwise):
    """σ(x) = x."""

    def sigma(self, x):
        return x

    def dsigma(self, x, y):
        return x.dtype.type(1)

    def d2sigma(self, x, y):
        return 0


class ReLU(Elementwise):
    """σ(x) = max(x, 0); σ′(0) = 0 as in PyTorch."""

    def sigma(self, x):
        return np.maximum(x, 0)

    def dsigma(self, x, y):
        return (x > 0).astype(x.dtype)

    def d2sigma(self, x, y):
        return 0


class LeakyReLU(Elementwise):
    """σ(x) = x for x > 0, ``negative_slope``·x otherwise.

    Parameters
    ----------
    negative_slope : float
        A finite real number.
    """

    def __init__(self, negative_slope=0.01):
        self.negative_slope = check_real("negative_slope", negative_slope)

    def __repr__(self):
        return f"LeakyReLU(negative_slope={self.negative_slope})"

    def sigma(self, x):
        return np.where(x > 0, x, x * x.dtype.type(self.negative_slope))

    def dsigma(self, x, y):
        return np.where(x > 0, x.dtype.type(1), x.dtype.type(self.negative_slope))

    def d2sigma(self, x, y):
        return 0


class Tanh(Elementwise):
    """σ(x) = tanh x; σ′ = 1 − y²; σ″ = −2y(1 − y²)."""

    def sigma(self, x):
        return np.tanh(x)

    def dsigma(self, x, y):
        return 1 - y * y

    def d2sigma(self, x, y):
        return -2 * y * (1 - y * y)


class Sigmoid(Elementwise):
    """σ(x) = 1/(1 + e⁻ˣ); σ′ = y(1 − y); σ″ = y(1 − y)(1 − 2y)."""

    def sigma(self, x):
        return expit(x)

    def dsigma(self, x, y):
        return y * (1 - y)

    def d2sigma(self, x, y):
        return y * (1 - y) * (1 - 2 * y)


class Softsign(Elementwise):
    """σ(x) = x/(1 + |x|); σ′ = (1 + |x|)⁻²; σ″ = −2 sign(x)(1 + |x|)⁻³ (seed 002 §1.1)."""

    def sigma(self, x):
        return x / (1 + np.abs(x))

    def dsigma(self, x, y):
        return (1 + np.abs(x)) ** -2

    def d2sigma(self, x, y):
        return -2 * np.sign(x) * (1 + np.abs(x)) ** -3


class Softplus(Elementwise):
    """σ(x) = log(1 + eˣ); σ′ = 1/(1 + e⁻ˣ); σ″ = σ′(1 − σ′)."""

    def sigma(self, x):
        return np.logaddexp(x.dtype.type(0), x)

    def dsigma(self, x, y):
        return expit(x)

    def d2sigma(self, x, y):
        s = expit(x)
        return s * (1 - s)


class ELU(Elementwise):
    """σ(x) = x for x > 0, α(eˣ − 1) otherwise; σ′ = 1 or y + α; σ″ = 0 or y + α.

    Parameters
    ----------
    alpha : float
        α, a finite real number.
    """

    def __init__(self, alpha=1.0):
        self.alpha = check_real("alpha", alpha)

    def __repr__(self):
        return f"ELU(alpha={self.alpha})"

    def sigma(self, x):
        return np.where(x > 0, x, x.dtype.type(self.alpha) * np.expm1(np.minimum(x, 0)))

    def dsigma(self, x, y):
        return np.where(x > 0, x.dtype.type(1), y + x.dtype.type(self.alpha))

    def d2sigma(self, x, y):
        return np.where(x > 0, x.dtype.type(0), y + x.dtype.type(self.alpha))
