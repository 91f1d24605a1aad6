"""Convolution, pooling and Flatten layers (the four rules) and convolutional networks, against references.

Every oracle here shares no code with hvp: convolution and pooling are re-derived with explicit loops
over output positions, derivatives come from central finite differences of those references in
float64 (dense Jacobians built one column at a time), and the whole-network checks run a reference
forward pass with its own parameter layout. Only layer attributes (channels, kernel sizes, …) are
read from hvp objects.
"""

from __future__ import annotations

import functools

import numpy as np
import oracles
import pytest

import hvp

FD_STEP = 1e-6


def _scale(*arrays) -> float:
    return max(float(np.max(np.abs(a))) for a in arrays)


def assert_close(got, want, rtol=1e-6):
    """Entrywise |got - want| <= rtol·(|want| + max|want|); shapes must agree exactly."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, (got.shape, want.shape)
    scale = _scale(want)
    assert scale > 0, "the reference is identically zero: the comparison could not fail"
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale)


# =========================================================================== references


def _pair(v, n):
    return tuple(int(x) for x in v) if isinstance(v, (tuple, list)) else (int(v),) * n


def ref_conv2d(X, W, b=None, stride=1, padding=0, dilation=1, groups=1):
    """torch.nn.functional.conv2d, by loops over batch, out-channel and output position."""
    X, W = np.asarray(X, dtype=np.float64), np.asarray(W, dtype=np.float64)
    B, C, H, Wd = X.shape
    O, Cg, kH, kW = W.shape
    (sH, sW), (pH, pW), (dH, dW) = _pair(stride, 2), _pair(padding, 2), _pair(dilation, 2)
    assert C == Cg * groups and O % groups == 0
    Xp = np.zeros((B, C, H + 2 * pH, Wd + 2 * pW))
    Xp[:, :, pH:pH + H, pW:pW + Wd] = X
    Ho = (H + 2 * pH - dH * (kH - 1) - 1) // sH + 1
    Wo = (Wd + 2 * pW - dW * (kW - 1) - 1) // sW + 1
    out = np.zeros((B, O, Ho, Wo))
    per_group = O // groups
    for n in range(B):
        for o in range(O):
            g = o // per_group
            for i in range(Ho):
                for j in range(Wo):
                    r, c = i * sH, j * sW
                    patch = Xp[n, g * Cg:(g + 1) * Cg, r:r + dH * (kH - 1) + 1:dH, c:c + dW * (kW - 1) + 1:dW]
                    out[n, o, i, j] = np.sum(patch * W[o]) + (0.0 if b is None else b[o])
    return out


def ref_conv1d(X, W, b=None, stride=1, padding=0, dilation=1, groups=1):
    """torch.nn.functional.conv1d, as ref_conv2d on inputs of height 1."""
    out = ref_conv2d(np.asarray(X)[:, :, None, :], np.asarray(W)[:, :, None, :], b, (1, _pair(stride, 1)[0]),
                     (0, _pair(padding, 1)[0]), (1, _pair(dilation, 1)[0]), groups)
    return out[:, :, 0, :]


def _ref_pool2d(X, kernel, stride, padding, mode):
    """Max (first maximum in row-major window order wins) or mean (zero padding counted) pooling.

    Returns the outputs and, for max, the input position (row, col) each output copies.
    """
    X = np.asarray(X, dtype=np.float64)
    B, C, H, W = X.shape
    kH, kW = _pair(kernel, 2)
    sH, sW = _pair(kernel if stride is None else stride, 2)
    pH, pW = _pair(padding, 2)
    Ho, Wo = (H + 2 * pH - kH) // sH + 1, (W + 2 * pW - kW) // sW + 1
    out = np.zeros((B, C, Ho, Wo))
    where = np.zeros((B, C, Ho, Wo, 2), dtype=np.int64)
    for n in range(B):
        for c in range(C):
            for i in range(Ho):
                for j in range(Wo):
                    best, pos, total = -np.inf, None, 0.0
                    for u in range(kH):
                        for v in range(kW):
                            r, s = i * sH - pH + u, j * sW - pW + v
                            inside = 0 <= r < H and 0 <= s < W
                            value = X[n, c, r, s] if inside else (-np.inf if mode == "max" else 0.0)
                            total += value if mode == "avg" else 0.0
                            if value > best:
                                best, pos = value, (r, s)
                    out[n, c, i, j] = best if mode == "max" else total / (kH * kW)
                    if mode == "max":
                        where[n, c, i, j] = pos
    return out, where


def ref_maxpool2d(X, kernel, stride=None, padding=0):
    return _ref_pool2d(X, kernel, stride, padding, "max")[0]


def ref_avgpool2d(X, kernel, stride=None, padding=0):
    return _ref_pool2d(X, kernel, stride, padding, "avg")[0]


def _as_1d_pool(ref2d):
    def ref1d(X, kernel, stride=None, padding=0):
        s = None if stride is None else (1, _pair(stride, 1)[0])
        return ref2d(np.asarray(X)[:, :, None, :], (1, _pair(kernel, 1)[0]), s, (0, _pair(padding, 1)[0]))[:, :, 0]
    return ref1d


ref_maxpool1d = _as_1d_pool(ref_maxpool2d)
ref_avgpool1d = _as_1d_pool(ref_avgpool2d)


def ref_maxpool2d_backward(X, DO, kernel, stride=None, padding=0):
    """Each adjoint added at its window's first maximum (explicit loop)."""
    _, where = _ref_pool2d(X, kernel, stride, padding, "max")
    DI = np.zeros(np.shape(X))
    for n, c, i, j in np.ndindex(*DO.shape):
        r, s = where[n, c, i, j]
        DI[n, c, r, s] += DO[n, c, i, j]
    return DI


def maxpool_gap(X, kernel, stride=None, padding=0):
    """Smallest gap between the largest and second-largest real entry of any window (inf for 1-entry windows).

    A finite difference of step h stays on one linear piece of max pooling if this exceeds ~2h·max|direction|.
    """
    X = np.asarray(X, dtype=np.float64)
    if X.ndim == 3:
        X, kernel = X[:, :, None, :], (1, _pair(kernel, 1)[0])
        stride = None if stride is None else (1, _pair(stride, 1)[0])
        padding = (0, _pair(padding, 1)[0])
    B, C, H, W = X.shape
    kH, kW = _pair(kernel, 2)
    sH, sW = _pair(kernel if stride is None else stride, 2)
    pH, pW = _pair(padding, 2)
    Ho, Wo = (H + 2 * pH - kH) // sH + 1, (W + 2 * pW - kW) // sW + 1
    gap = np.inf
    for n, c, i, j in np.ndindex(B, C, Ho, Wo):
        r0, s0 = i * sH - pH, j * sW - pW
        win = np.sort(X[n, c, max(r0, 0):min(r0 + kH, H), max(s0, 0):min(s0 + kW, W)].ravel())
        if win.size > 1:
            gap = min(gap, win[-1] - win[-2])
    return gap


# --------------------------------------------------------------------------- finite differences


def fd_directional(f, args, dirs, h=FD_STEP):
    """Central difference of f(*args) along the directions ``dirs`` (None: that argument is held fixed)."""
    plus = [a if d is None else a + h * d for a, d in zip(args, dirs)]
    minus = [a if d is None else a - h * d for a, d in zip(args, dirs)]
    return (f(*plus) - f(*minus)) / (2 * h)


def fd_jacobian(f, x, h=FD_STEP):
    """Dense Jacobian d vec f(x) / d vec x, shape (f(x).size, x.size), one central difference per column."""
    x = np.array(x, dtype=np.float64)
    cols = []
    for idx in np.ndindex(*x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += h
        xm[idx] -= h
        cols.append((np.ravel(f(xp)) - np.ravel(f(xm))) / (2 * h))
    return np.stack(cols, axis=1)


def adjoint(J, D, in_shape):
    """Jᵀ D for one adjoint D of the output's shape: an array of shape ``in_shape``."""
    D = np.asarray(D)
    assert D.size == J.shape[0], (D.shape, J.shape)
    return (J.T @ D.ravel()).reshape(in_shape)


# =========================================================================== layer cases

# id -> (spatial dims, in_channels, out_channels, kernel_size, keyword arguments, input shape)
CONV_CASES = {
    "2d_k3": (2, 2, 3, 3, {}, (2, 2, 5, 6)),
    "2d_k3_s2_p1": (2, 2, 3, 3, dict(stride=2, padding=1), (2, 2, 7, 6)),
    "2d_k2x3_s2x1_p1x0": (2, 3, 2, (2, 3), dict(stride=(2, 1), padding=(1, 0)), (2, 3, 5, 7)),
    "2d_k3_d2_p2": (2, 2, 3, 3, dict(dilation=2, padding=2), (2, 2, 6, 7)),
    "2d_in4_out6_g2_p1": (2, 4, 6, 3, dict(groups=2, padding=1), (2, 4, 5, 5)),
    "2d_depthwise_k3x2_s1x2_d2x1": (2, 4, 4, (3, 2), dict(groups=4, stride=(1, 2), dilation=(2, 1)), (3, 4, 7, 5)),
    "2d_k1_nobias": (2, 3, 2, 1, dict(bias=False), (2, 3, 4, 5)),
    "2d_B1_odd_s3x2_p1x2_d2_g2_nobias": (2, 4, 2, (2, 3), dict(stride=(3, 2), padding=(1, 2), dilation=2, groups=2,
                                                               bias=False), (1, 4, 7, 7)),
    "1d_k3": (1, 2, 3, 3, {}, (2, 2, 7)),
    "1d_in4_out6_k2_s2_p1_d2_g2": (1, 4, 6, 2, dict(stride=2, padding=1, dilation=2, groups=2), (3, 4, 7)),
    "1d_k4_p3_nobias": (1, 3, 2, 4, dict(padding=3, bias=False), (2, 3, 5)),
}

# id -> (layer class name, keyword arguments, input shape)
POOL_CASES = {
    "max2d_k2_odd": ("MaxPool2d", dict(kernel_size=2), (2, 3, 5, 7)),
    "max2d_k3_s2_p1": ("MaxPool2d", dict(kernel_size=3, stride=2, padding=1), (2, 2, 7, 6)),
    "max2d_k2x3_s1x2_p1": ("MaxPool2d", dict(kernel_size=(2, 3), stride=(1, 2), padding=1), (2, 2, 5, 7)),
    "avg2d_k2": ("AvgPool2d", dict(kernel_size=2), (2, 3, 4, 5)),
    "avg2d_k3_s2_p1": ("AvgPool2d", dict(kernel_size=3, stride=2, padding=1), (2, 2, 7, 6)),
    "avg2d_k3x2_s2x1_p1x0": ("AvgPool2d", dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 0)), (2, 2, 6, 5)),
    "max1d_k2_odd": ("MaxPool1d", dict(kernel_size=2), (2, 2, 7)),
    "max1d_k3_s2_p1": ("MaxPool1d", dict(kernel_size=3, stride=2, padding=1), (2, 3, 7)),
    "avg1d_k3_s2_p1": ("AvgPool1d", dict(kernel_size=3, stride=2, padding=1), (2, 3, 7)),
    "avg1d_k4_s3_p2": ("AvgPool1d", dict(kernel_size=4, stride=3, padding=2), (2, 2, 6)),
}

K = 2  # directions in a block


class ConvCase:
    """A convolution layer, its reference, a point (X, W, b) and K directions (İ, Ẇ, ḃ) and adjoints."""

    def __init__(self, case_id):
        dim, cin, cout, kernel, kw, x_shape = CONV_CASES[case_id]
        self.dim, self.kw = dim, kw
        self.bias = kw.get("bias", True)
        self.layer = (hvp.Conv2d if dim == 2 else hvp.Conv1d)(cin, cout, kernel, **kw)
        rng = np.random.default_rng(sum(map(ord, case_id)))
        w_shape = (cout, cin // kw.get("groups", 1)) + _pair(kernel, dim)
        self.X = rng.standard_normal(x_shape)
        self.W = rng.standard_normal(w_shape)
        self.b = rng.standard_normal(cout) if self.bias else None
        self.dX = rng.standard_normal((K,) + x_shape)
        self.dX_shared = rng.standard_normal((K, 1) + x_shape[1:])
        self.dW = rng.standard_normal((K,) + w_shape)
        self.db = rng.standard_normal((K, cout)) if self.bias else None
        self.O = self.ref(self.X, self.W, self.b)
        self.DO = rng.standard_normal((K,) + self.O.shape)

    def ref(self, X, W, b=None):
        conv = ref_conv2d if self.dim == 2 else ref_conv1d
        args = {key: value for key, value in self.kw.items() if key != "bias"}
        return conv(X, W, b, **args)

    @property
    def p(self):
        return {"weight": self.W, "bias": self.b} if self.bias else {"weight": self.W}

    def dp(self, ks=slice(None)):
        d = {"weight": self.dW[ks]}
        if self.bias:
            d["bias"] = self.db[ks]
        return d

    # dense Jacobians by finite differences of the reference, cached per case

    @functools.cached_property
    def J_input(self):
        return fd_jacobian(lambda X: self.ref(X, self.W, self.b), self.X)

    @functools.cached_property
    def J_weight(self):
        return fd_jacobian(lambda W: self.ref(self.X, W, self.b), self.W)

    @functools.cached_property
    def J_bias(self):
        return fd_jacobian(lambda b: self.ref(self.X, self.W, b), self.b)

    @functools.lru_cache(maxsize=None)  # noqa: B019 - one instance per case, kept for the session
    def J_input_at_weight(self, k):
        """d/dI of conv_ref(I, Ẇ_k) without bias (a linear map of I)."""
        return fd_jacobian(lambda X: self.ref(X, self.dW[k]), self.X)

    @functools.lru_cache(maxsize=None)  # noqa: B019
    def J_weight_at_input(self, k, shared=False):
        """d/dW of conv_ref(İ_k, W) without bias, İ_k from dX or (broadcast) dX_shared."""
        dX = np.broadcast_to(self.dX_shared[k], self.X.shape) if shared else self.dX[k]
        return fd_jacobian(lambda W: self.ref(dX, W), self.W)


class PoolCase:
    def __init__(self, case_id):
        name, kw, x_shape = POOL_CASES[case_id]
        self.name, self.kw = name, kw
        self.layer = getattr(hvp, name)(**kw)
        rng = np.random.default_rng(sum(map(ord, case_id)))
        self.X = rng.standard_normal(x_shape)
        if name.startswith("Max"):  # finite differences must stay on one linear piece
            assert maxpool_gap(self.X, kw["kernel_size"], kw.get("stride"), kw.get("padding", 0)) > 1e-3
        self.dX = rng.standard_normal((K,) + x_shape)
        self.dX_shared = rng.standard_normal((K, 1) + x_shape[1:])
        self.O = self.ref(self.X)
        self.DO = rng.standard_normal((K,) + self.O.shape)

    def ref(self, X):
        f = {"MaxPool2d": ref_maxpool2d, "AvgPool2d": ref_avgpool2d,
             "MaxPool1d": ref_maxpool1d, "AvgPool1d": ref_avgpool1d}[self.name]
        return f(X, self.kw["kernel_size"], self.kw.get("stride"), self.kw.get("padding", 0))

    @functools.cached_property
    def J_input(self):
        return fd_jacobian(self.ref, self.X)


@functools.lru_cache(maxsize=None)
def conv_case(case_id) -> ConvCase:
    return ConvCase(case_id)


@functools.lru_cache(maxsize=None)
def pool_case(case_id) -> PoolCase:
    return PoolCase(case_id)


CONV_IDS = list(CONV_CASES)
POOL_IDS = list(POOL_CASES)
