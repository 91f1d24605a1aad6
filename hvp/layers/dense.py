"""Dense layers: ``O = I W + b`` on inputs (B, m); the reference for the contract in :mod:`hvp.layers`."""

import numpy as np

from .. import memory
from .._checks import check_bool, describe

PAIRS_MAX_K = 8
SMALL_BATCH = 32  # up to this batch, rule 4 on k > 1 directions runs one small product per input unit
CHUNK_ENTRIES = 1 << 22  # entries of the largest temporary array of tangent_grad_squares


class Linear:
    """Affine layer ``O = I W + b``.

    Parameters
    ----------
    in_features, out_features : int
        Widths ``m`` and ``n``: ``W`` has shape (m, n), ``b`` shape (n,).
    bias : bool
        Whether the layer has the bias ``b``.
    """

    output_diagonal_only = True  # the Hessian diagonal: W_mn and b_n reach only the output entry n of each example

    def __init__(self, in_features, out_features, bias=True):
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"Linear: {name} must be a positive integer, got {describe(value)}")
            if value < 1:
                raise ValueError(f"Linear: {name} must be a positive integer, got {value!r}")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.bias = check_bool("bias", bias)

    def __repr__(self):
        return f"Linear({self.in_features}, {self.out_features}, bias={self.bias})"

    def param_shapes(self):
        """Named parameter shapes in their order in θ: weight (m, n), then bias (n,)."""
        shapes = [("weight", (self.in_features, self.out_features))]
        if self.bias:
            shapes.append(("bias", (self.out_features,)))
        return shapes

    @property
    def fan_in(self):
        return self.in_features

    def init_bounds(self):
        """PyTorch's default initialization: every parameter ~ U(−1/√fan_in, 1/√fan_in)."""
        return [1 / np.sqrt(self.fan_in)] * len(self.param_shapes())

    @property
    def in_shape(self):
        return (self.in_features,)

    def out_shape(self, in_shape):
        if len(in_shape) != 1:
            raise ValueError(f"{self!r} needs inputs of shape (batch, {self.in_features}), got per-example shape "
                             f"{in_shape} (put hvp.Flatten() before it)")
        if in_shape[0] != self.in_features:
            raise ValueError(f"{self!r} expects {self.in_features} inputs, but the layer before it gives {in_shape[0]}")
        return (self.out_features,)

    def forward(self, p, I):
        """Rule 1: ``O = I W + b``; I (B, m) -> O (B, n)."""
        O = memory.matmul(I, p["weight"])
        if self.bias:
            O += p["bias"]
        return O, I

    def backward_input(self, p, I, DO):
        """Rule 2: ``DI = DO Wᵀ``; DO (..., B, n) -> DI (..., B, m)."""
        W = p["weight"]
        return memory.matmul(DO.reshape(-1, W.shape[1]), W.T).reshape(DO.shape[:-1] + (W.shape[0],))

    def backward_params(self, p, I, DO, out=None):
        """Rule 2: ``DW = Iᵀ DO``, ``Db = Σ_b DO``, written into ``out`` if given.

        DO (B, n) gives weight (m, n) and bias (n,); DO (k, B, n) gives one gradient per direction, as
        columns: weight (m, n, k) = ``Iᵀ [DO_1 … DO_k]`` in one matrix product (into ``out``'s view, which
        is C-contiguous as :meth:`Sequential.unflatten_columns` gives it), bias (n, k).
        """
        out = {} if out is None else out
        if DO.ndim == 2:
            out["weight"] = np.matmul(I.T, DO, out=out.get("weight"))
            if self.bias:
                out["bias"] = np.sum(DO, axis=0, out=out.get("bias"))
            return out
        (k, B, n), m = DO.shape, self.in_features
        weight = out.get("weight")
        weight = memory.empty((m, n, k), DO.dtype) if weight is None else weight
        np.matmul(I.T, _k_last(DO).reshape(B, n * k), out=weight.reshape(m, n * k))
        out["weight"] = weight
        if self.bias:
            bias = np.sum(DO, axis=1).T
            if out.get("bias") is None:
                out["bias"] = bias
            else:
                out["bias"][...] = bias
        return out

    def tangent(self, p, I, dI, dp):
        """Rule 3: ``Ȯ_k = İ_k W + I Ẇ_k + ḃ_k``; dI (k, B, m), Ẇ (m, n, k) -> dO (k, B, n).

        ``I [Ẇ_1 … Ẇ_k]`` is one matrix product on the columns as they come."""
        W = p["weight"]
        m, n = W.shape
        dO = None if dI is None else memory.matmul(dI.reshape(-1, m), W).reshape(dI.shape[:-1] + (n,))
        if dp is not None:
            k = dp["weight"].shape[-1]
            from_params = _k_first(memory.matmul(I, dp["weight"].reshape(m, n * k)).reshape(-1, n, k))
            if self.bias:
                from_params += dp["bias"].T[:, None, :]
            if dO is None:
                dO = from_params
            else:
                dO += from_params
        return dO

    def kronecker_factors(self, I, D):
        """K-FAC's factors: ``A = (1/B) Σ_b ā_b ā_bᵀ``, ā = [I, 1]; ``G = Σ_{k,b} D_kb D_kbᵀ`` for D (K, B, n)."""
        B, m = I.shape
        A = memory.empty((m + self.bias,) * 2, I.dtype)
        np.matmul(I.T, I, out=A[:m, :m])
        if self.bias:
            A[m, :m] = A[:m, m] = I.sum(axis=0)
            A[m, m] = B
        A /= I.dtype.type(B)
        D = D.reshape(-1, D.shape[-1])
        return A, memory.matmul(D.T, D)

    def kronecker_matrix(self, p):
        """The parameters as K-FAC's matrix ``W̄ = [W; b]`` (..., m+1, n) (W without a bias)."""
        if not self.bias:
            return p["weight"]
        return np.concatenate([p["weight"], p["bias"][..., None, :]], axis=-2)

    def from_kronecker_matrix(self, M, out):
        """Write ``W̄`` (..., m+1, n) into the parameter views ``out``."""
        out["weight"][...] = M[..., :self.in_features, :]
        if self.bias:
            out["bias"][...] = M[..., self.in_features, :]

    def batch_grad(self, p, I, DO, out, rows=slice(None)):
        """Per-example gradients of the examples ``rows``: ``(g_b)_W = I_bᵀ DO_b`` (b, m, n), ``(g_b)_b = DO_b``."""
        I, DO = I[rows], DO[rows]
        np.multiply(I[:, :, None], DO[:, None, :], out=out["weight"])
        if self.bias:
            out["bias"][...] = DO

    def grad_squares(self, p, I, D, out, scale=None, weights=None, need_input=False, sums=None):
        """``Σ_{k,b} w_kb (g_kb)²`` for adjoints ``DO_k = scale ⊙ D_k``, D (K, B or 1, n), w (K, B) or None for 1:
        weight ``(I²)ᵀ Σ_k w_k DO_k²``, bias ``Σ_{k,b} w_k DO_k²`` — one matmul; the σ′ factor ``scale`` (B, n) is
        applied to the squares, and columns shared by every example (D (K, 1, n)) cost one (B, K)·(K, n) product.
        ``sums`` (views like ``out``, or None) receive ``Σ_{k,b} w_kb g_kb``: rule 2 on ``Σ_k w_k DO_k``.
        Returns None (``need_input``: the caller carries D back)."""
        self.diagonal_squares(p, I, weighted_squares(D, weights, scale, I.shape[0]), out)
        if sums is not None:
            if weights is not None:
                DO = np.einsum("kb,kbn->bn", weights, D)
            else:
                DO = D[0] if D.shape[0] == 1 else D.sum(axis=0)
            DO = np.broadcast_to(DO, (I.shape[0], DO.shape[-1]))
            self.backward_params(p, I, DO if scale is None else DO * scale, out=sums)

    def diagonal_squares(self, p, I, d, out):
        """``Σ_b diag(J_bᵀ diag(d_b) J_b)`` for a diagonal d (B, n) at the output: weight ``(I²)ᵀ d``, bias ``Σ d``."""
        np.matmul(np.square(I, out=memory.empty(I.shape, I.dtype)).T, d, out=out["weight"])
        if self.bias:
            np.sum(d, axis=0, out=out["bias"])

    def input_curvature(self, p, I, DO):
        """None: O is linear in I."""
        return None

    def tangent_grad_squares(self, p, I, dI, DO, DOD, out):
        """``Σ_b g_b²`` for example b's gradient by rules 2 and 4, ``(g_b)_W = I_bᵀ DO_b + Σ_k İ_kbᵀ DOD_kb``,
        ``(g_b)_b = DO_b``; dI (k, B or 1, m) or None, DO (B, n), DOD (k, B, n)."""
        A, C = I[None], DO[None]
        if dI is not None:
            A = np.concatenate([A, np.broadcast_to(dI, dI.shape[:1] + I.shape)])
            C = np.concatenate([C, DOD])
        out["weight"][...] = _sum_squared_outer_sums(A, C)
        if self.bias:
            np.einsum("bn,bn->n", DO, DO, out=out["bias"])

    def batch_l2(self, p, I, DO):
        """``‖g_b‖²`` (B,): ``‖I_b‖² ‖DO_b‖² (+ ‖DO_b‖² for the bias)``."""
        DO_norms = np.einsum("bn,bn->b", DO, DO)
        norms = np.einsum("bm,bm->b", I, I) * DO_norms
        return norms + DO_norms if self.bias else norms

    def tangent_backward(self, p, I, dI, dp, DOD, need_input=True, summed=False):
        """Rule 4 cross terms: ``DI_k = DOD Ẇ_kᵀ``, ``DW_k = İ_kᵀ DOD``; DOD (B, n) or (k, B, n), Ẇ (m, n, k).

        Returns DI_k (k, B, m) (None when zero or not ``need_input``) and
        ``{"weight": (m, n, k)}`` (None when İ is zero; the bias has no cross term).
        With ``summed``: ``DI = Σ_k DOD_k Ẇ_kᵀ`` (B, m) and ``{"weight": Σ_k İ_kᵀ DOD_k}`` (m, n),
        the k axis folded into the batch for one matmul.
        """
        DI = grads = None
        k = dp["weight"].shape[-1] if dp is not None else dI.shape[0] if dI is not None else 1
        small = k > 1 and DOD.ndim == 2 and DOD.shape[0] <= SMALL_BATCH  # one DOD for all directions, few examples
        if dp is not None and need_input:
            if small:  # per input unit i: DI[:, :, i]ᵀ = DOD Ẇ[i] (B, k), reading the columns in place
                DI = memory.copy(memory.matmul(DOD, dp["weight"]).transpose(2, 1, 0))
            else:  # the directions as rows, then k products of full size
                DI = memory.matmul(DOD, _k_first(dp["weight"]).transpose(0, 2, 1))
            if summed:
                DI = DI.sum(axis=0)
        if dI is not None:
            if dI.shape[-2] == 1 and DOD.shape[-2] != 1:  # a tangent shared by all examples
                DOD = DOD.sum(axis=-2, keepdims=True)
            if not summed and small:  # per input unit i: DW[i] = DODᵀ İ[:, :, i]ᵀ (n, k), written as columns
                grads = {"weight": memory.matmul(DOD.T, memory.copy(dI.transpose(2, 1, 0)))}
            elif not summed:
                grads = {"weight": np.moveaxis(memory.matmul(dI.transpose(0, 2, 1), DOD), 0, -1)}
            elif DOD.ndim == 2:
                grads = {"weight": dI.sum(axis=0).T @ DOD}
            else:
                grads = {"weight": dI.reshape(-1, dI.shape[-1]).T @ DOD.reshape(-1, DOD.shape[-1])}
        return DI, grads


def _k_first(a):
    """A C-contiguous copy (k, …) of an array (…, k) from the pool; a reshape for k = 1."""
    return memory.copy(np.moveaxis(a, -1, 0)) if a.shape[-1] > 1 else a.reshape((1,) + a.shape[:-1])


def _k_last(a):
    """A C-contiguous copy (…, k) of an array (k, …) from the pool; a reshape for k = 1."""
    return memory.copy(np.moveaxis(a, 0, -1)) if a.shape[0] > 1 else a.reshape(a.shape[1:] + (1,))


def _sum_squared_outer_sums(A, C):
    """``Σ_b (Σ_z A_zbᵀ C_zb)²`` (m, n) for A (Z, B, m), C (Z, B, n), never all B products at once.

    Small Z: ``Σ_{z<=z'} c_zz' (A_z ⊙ A_z')ᵀ (C_z ⊙ C_z')`` (c = 2 off the diagonal), the pairs
    stacked along the batch into few large matmuls: Z(Z+1)/2 · B·m·n multiply-adds. Large Z:
    the per-example sums ``A_bᵀ C_b`` (m, n) for a chunk of examples, squared: Z · B·m·n.
    """
    Z, B, m = A.shape
    n = C.shape[2]
    out = np.zeros((m, n), dtype=A.dtype)
    if Z - 1 <= PAIRS_MAX_K:
        first, second = np.triu_indices(Z)
        step = max(1, CHUNK_ENTRIES // (B * (m + n)))
        for s in range(0, len(first), step):
            z1, z2 = first[s:s + step], second[s:s + step]
            AA = A[z1] * A[z2]
            CC = C[z1] * C[z2]
            CC[z1 != z2] *= 2
            out += AA.reshape(-1, m).T @ CC.reshape(-1, n)
        return out
    A_b = np.ascontiguousarray(A.transpose(1, 2, 0))  # (B, m, Z)
    C_b = np.ascontiguousarray(C.transpose(1, 0, 2))  # (B, Z, n)
    step = max(1, CHUNK_ENTRIES // (m * n))
    for s in range(0, B, step):
        G = np.matmul(A_b[s:s + step], C_b[s:s + step])
        out += np.einsum("bmn,bmn->mn", G, G)
    return out


def weighted_squares(V, weights, scale, B):
    """``Σ_k w_kb (scale ⊙ V_kb)²`` (B, …): the diagonal of ``Σ_k w_k DO_k DO_kᵀ`` for columns V (K, B or 1, …),
    weights (K, B) or None for 1 and a factor ``scale`` (B, …) or None; one (B, K)·(K, n) product for shared V."""
    K, shape = V.shape[0], V.shape[2:]
    flat = V.reshape(K, V.shape[1], -1)
    if flat.shape[1] == 1:
        squares = np.square(flat[:, 0])  # (K, n)
        h = np.ascontiguousarray(weights.T) @ squares if weights is not None else np.tile(squares.sum(axis=0), (B, 1))
    else:
        h = memory.empty(flat.shape[1:], flat.dtype)
        if weights is None:
            np.einsum("kbn,kbn->bn", flat, flat, out=h)
        else:
            np.einsum("kb,kbn,kbn->bn", weights, flat, flat, out=h)
    h = h.reshape((B,) + shape)
    if scale is not None:
        h *= scale
        h *= scale
    return h
