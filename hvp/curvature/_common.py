"""What the estimators share: results, counting products, probes, checks."""

import sys
import time

import numpy as np
from scipy.sparse.linalg import LinearOperator, aslinearoperator

from .._checks import describe

# -- results ------------------------------------------------------------------


class EigenResult(tuple):
    """``(values, vectors)``; also ``.values`` (k,), ``.vectors`` (P, k), ``.num_matvecs``,
    ``.method``, ``.converged``."""

    def __new__(cls, values, vectors, num_matvecs, method, converged=True):
        self = super().__new__(cls, (values, vectors))
        self.values, self.vectors, self.num_matvecs = values, vectors, num_matvecs
        self.method, self.converged = method, converged
        return self


class TraceResult(tuple):
    """``(estimate, stderr)``; also ``.estimate``, ``.stderr``, ``.num_matvecs``, ``.method``."""

    def __new__(cls, estimate, stderr, num_matvecs, method):
        self = super().__new__(cls, (estimate, stderr))
        self.estimate, self.stderr, self.num_matvecs, self.method = estimate, stderr, num_matvecs, method
        return self


class DensityResult(tuple):
    """``(grid, density)``; also ``.nodes`` and ``.weights`` (num_probes, steps), ``.sigma``,
    ``.num_matvecs``."""

    def __new__(cls, grid, density, nodes, weights, sigma, num_matvecs):
        self = super().__new__(cls, (grid, density))
        self.grid, self.density, self.nodes, self.weights = grid, density, nodes, weights
        self.sigma, self.num_matvecs = sigma, num_matvecs
        return self


# -- plumbing -----------------------------------------------------------------


class _Progress:
    """A one-line progress report on stderr for runs longer than ``after`` seconds, redrawn at most once a second."""

    def __init__(self, label, total, show, after=2.0):
        if show not in (None, True, False):
            raise TypeError(f"progress must be None, True or False, got {describe(show)}")
        self.label, self.total, self.show, self.after = label, total, show, after
        self.start = time.perf_counter()
        self.last = None  # time of the last report

    def update(self, done):
        now = time.perf_counter()
        if self.show is False or (self.show is None and now - self.start < self.after):
            return
        if self.last is None or now - self.last >= 1.0 or done == self.total:
            of = f"/{self.total}" if self.total else ""
            print(f"\r{self.label}: {done}{of} matvecs, {now - self.start:.1f} s", end="", file=sys.stderr, flush=True)
            self.last = now

    def close(self):
        if self.last is not None:
            print(file=sys.stderr, flush=True)


class _Counted(LinearOperator):
    """``op`` that counts the columns it multiplies and reports progress."""

    def __init__(self, op, progress):
        super().__init__(dtype=op.dtype, shape=op.shape)
        self.op, self.progress, self.count = op, progress, 0

    def _matmat(self, X):
        Y = self.op.matmat(X)
        self.count += X.shape[1]
        self.progress.update(self.count)
        return Y

    def _matvec(self, x):
        return self._matmat(np.reshape(x, (-1, 1)))[:, 0]

    def _adjoint(self):
        return self


def _operator(op):
    """``op`` as a square LinearOperator with a float dtype."""
    if not isinstance(op, LinearOperator):
        try:
            op = aslinearoperator(op)
        except TypeError:
            raise TypeError(f"op must be a square LinearOperator or array, got {describe(op)}") from None
    if len(op.shape) != 2 or op.shape[0] != op.shape[1] or op.shape[0] == 0:
        raise ValueError(f"op must be square and non-empty, got shape {op.shape}")
    if op.dtype is None or np.dtype(op.dtype).kind != "f":
        raise TypeError(f"op must have a float dtype, got {op.dtype}")
    return op


def _positive_int(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
    return value


def _apply(counted, V, block_size):
    """``op @ V`` for V (P, m), m columns in blocks of ``block_size``; float64 result."""
    out = np.empty(V.shape, dtype=np.float64)
    for start in range(0, V.shape[1], block_size):
        out[:, start:start + block_size] = counted.matmat(np.asarray(V[:, start:start + block_size], counted.dtype))
    return out


def _rademacher(rng, n, m, dtype):
    """m Rademacher columns (n, m) in ``dtype``, C-contiguous (the layout the products take), drawn one column
    after another: column j is the same however the columns are split into blocks.

    Each column's n random bits are packed n/8 bytes; only those bytes are laid side by side, and unpacking
    them down the first axis gives the (n, m) array in its final layout.
    """
    size = (n + 7) // 8
    packed = np.empty((size, m), dtype=np.uint8)
    for j in range(m):
        packed[:, j] = np.frombuffer(rng.bytes(size), dtype=np.uint8)
    out = np.unpackbits(packed, axis=0, count=n).astype(dtype)
    out *= 2
    out -= 1
    return out


def _orthonormal_basis(Y):
    """Orthonormal columns (P, r) spanning range(Y) (P, s), r <= s, float64.

    Two passes of ``Q ← Q V Λ^(-1/2)`` from the eigendecomposition ``QᵀQ = V Λ Vᵀ`` (a
    Gram–Schmidt done in BLAS-3, several times faster than Householder QR for P ≫ s; the
    second pass restores orthogonality to working precision). Directions of Y with
    singular values below √(s·eps) of the largest carry no reliable information and are
    dropped.
    """
    Q = np.asarray(Y, dtype=np.float64)
    for _ in range(2):
        if Q.shape[1] == 0:
            break
        lam, V = np.linalg.eigh(Q.T @ Q)
        keep = lam > max(lam[-1], 0.0) * Q.shape[1] * np.finfo(np.float64).eps
        Q = Q @ (V[:, keep] / np.sqrt(lam[keep]))
    return Q


def _probe_blocks(counted, rng, m, block_size):
    """(Z, op Z) for m Rademacher probes in blocks of ``block_size`` columns."""
    for start in range(0, m, block_size):
        Z = _rademacher(rng, counted.shape[0], min(block_size, m - start), counted.dtype)
        yield Z, counted.matmat(Z)


# -- eigenvalues -----------------------------------------------------------------


def _order(values, which):
    """Indices sorting ``values`` best first for ``which``."""
    if which == "largest":
        return np.argsort(-values, kind="stable")
    if which == "smallest":
        return np.argsort(values, kind="stable")
    return np.argsort(-np.abs(values), kind="stable")
