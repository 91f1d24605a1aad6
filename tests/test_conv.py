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
    "avg2d_k2x3_tiles": ("AvgPool2d", dict(kernel_size=(2, 3)), (2, 2, 4, 6)),
    "avg2d_k2_odd": ("AvgPool2d", dict(kernel_size=2), (2, 2, 5, 7)),
    "avg2d_k3_s2_p1": ("AvgPool2d", dict(kernel_size=3, stride=2, padding=1), (2, 2, 7, 6)),
    "avg2d_k3x2_s2x1_p1x0": ("AvgPool2d", dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 0)), (2, 2, 6, 5)),
    "max1d_k2_odd": ("MaxPool1d", dict(kernel_size=2), (2, 2, 7)),
    "max1d_k3_s2_p1": ("MaxPool1d", dict(kernel_size=3, stride=2, padding=1), (2, 3, 7)),
    "avg1d_k3_s2_p1": ("AvgPool1d", dict(kernel_size=3, stride=2, padding=1), (2, 3, 7)),
    "avg1d_k4_s3_p2": ("AvgPool1d", dict(kernel_size=4, stride=3, padding=2), (2, 2, 6)),
    "avg1d_k3_tiles": ("AvgPool1d", dict(kernel_size=3), (2, 2, 9)),
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
        """Parameter directions as the layer contract takes them: columns, weight (O, C/G, *kernel, k), bias (O, k)."""
        d = {"weight": np.moveaxis(self.dW[ks], 0, -1)}
        if self.bias:
            d["bias"] = self.db[ks].T
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

    @functools.cache  # noqa: B019 - one instance per case, kept for the session
    def J_input_at_weight(self, k):
        """d/dI of conv_ref(I, Ẇ_k) without bias (a linear map of I)."""
        return fd_jacobian(lambda X: self.ref(X, self.dW[k]), self.X)

    @functools.cache  # noqa: B019
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
        # distinct values at least 0.03 apart (then shuffled): no window is near a tie
        self.X = (rng.permutation(int(np.prod(x_shape))).reshape(x_shape) - 30) * 0.05 + rng.uniform(0, 0.02, x_shape)
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


@functools.cache
def conv_case(case_id) -> ConvCase:
    return ConvCase(case_id)


@functools.cache
def pool_case(case_id) -> PoolCase:
    return PoolCase(case_id)


CONV_IDS = list(CONV_CASES)
POOL_IDS = list(POOL_CASES)


def _directions(case, dI, dp, k=K):
    """The first k tangent directions as argument triples (İ_j, Ẇ_j, ḃ_j) of a ConvCase's reference."""
    return [(None if dI is None else dI[j], None if dp is None else dp["weight"][..., j],
             None if dp is None or not case.bias else dp["bias"][..., j]) for j in range(k)]


@pytest.fixture(params=["default_chunks", "one_example_per_chunk"])
def chunking(request, monkeypatch):
    """The convolution's taps loop over chunks of examples: also run each rule one example per chunk."""
    if request.param == "one_example_per_chunk":
        for cls in (hvp.Conv1d, hvp.Conv2d):
            monkeypatch.setattr(cls, "CHUNK_BYTES", 1)


# =========================================================================== references checked against torch


@pytest.mark.parametrize("case_id", CONV_IDS)
def test_reference_conv_matches_torch(case_id):
    """The loop oracle itself agrees with torch's convolution (so that the oracle is not wrong in hvp's way)."""
    torch = pytest.importorskip("torch")
    c = conv_case(case_id)
    conv = torch.nn.functional.conv2d if c.dim == 2 else torch.nn.functional.conv1d
    args = {key: value for key, value in c.kw.items() if key != "bias"}
    want = conv(torch.from_numpy(c.X), torch.from_numpy(c.W), None if c.b is None else torch.from_numpy(c.b),
                **args).numpy()
    assert_close(c.O, want, rtol=1e-12)


@pytest.mark.parametrize("case_id", POOL_IDS)
def test_reference_pool_matches_torch(case_id):
    torch = pytest.importorskip("torch")
    c = pool_case(case_id)
    module = getattr(torch.nn, c.name)(**c.kw)  # AvgPool: count_include_pad=True is torch's default
    assert_close(c.O, module(torch.from_numpy(c.X)).numpy(), rtol=1e-12)


# =========================================================================== rule 1: forward


@pytest.mark.parametrize("case_id", CONV_IDS)
def test_conv_forward_matches_reference(case_id, chunking):
    c = conv_case(case_id)
    O, _ = c.layer.forward(c.p, c.X)
    assert c.layer.out_shape(c.X.shape[1:]) == c.O.shape[1:]
    assert_close(O, c.O, rtol=1e-12)


@pytest.mark.parametrize("case_id", POOL_IDS)
def test_pool_forward_matches_reference(case_id):
    c = pool_case(case_id)
    O, _ = c.layer.forward({}, c.X)
    assert c.layer.out_shape(c.X.shape[1:]) == c.O.shape[1:]
    assert_close(O, c.O, rtol=1e-14)


def test_flatten_rules_are_c_order_reshapes():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((3, 2, 4, 5))
    layer = hvp.Flatten()
    O, cache = layer.forward({}, X)
    assert layer.out_shape((2, 4, 5)) == (40,)
    want = np.array([[X[n, c, i, j] for c in range(2) for i in range(4) for j in range(5)] for n in range(3)])
    np.testing.assert_array_equal(O, want)
    DO = rng.standard_normal((K, 3, 40))
    DI = layer.backward_input({}, cache, DO)
    for j in range(K):  # the adjoint of a permutation-free reshape puts each entry back where it came from
        np.testing.assert_array_equal(layer.forward({}, DI[j])[0], DO[j])
    dI = rng.standard_normal((K, 3, 2, 4, 5))
    dO = layer.tangent({}, cache, dI, None)
    for j in range(K):
        np.testing.assert_array_equal(dO[j], layer.forward({}, dI[j])[0])
    assert layer.tangent({}, cache, None, None) is None
    assert layer.backward_params({}, cache, DO[0]) == {}
    assert layer.tangent_backward({}, cache, dI, None, DO) == (None, None)


# =========================================================================== rule 3: tangent

WHICH = ["input_and_params", "params_only", "input_only"]


@pytest.mark.parametrize("which", WHICH)
@pytest.mark.parametrize("k", [1, 2], ids=["k1", "k2"])
@pytest.mark.parametrize("case_id", CONV_IDS)
def test_conv_tangent_matches_fd(case_id, k, which, chunking):
    c = conv_case(case_id)
    _, cache = c.layer.forward(c.p, c.X)
    dI = None if which == "params_only" else c.dX[:k]
    dp = None if which == "input_only" else c.dp(slice(0, k))
    dO = c.layer.tangent(c.p, cache, dI, dp)
    assert dO.shape == (k,) + c.O.shape
    for j, dirs in enumerate(_directions(c, dI, dp, k)):
        assert_close(dO[j], fd_directional(c.ref, (c.X, c.W, c.b), dirs))


@pytest.mark.parametrize("with_params", [False, True], ids=["dp_none", "with_dp"])
@pytest.mark.parametrize("case_id", CONV_IDS)
def test_conv_tangent_shared_input_tangent(case_id, with_params, chunking):
    """dI (k, 1, C, …): the same tangent for every example gives the result of dI broadcast to the batch."""
    c = conv_case(case_id)
    _, cache = c.layer.forward(c.p, c.X)
    dp = c.dp() if with_params else None
    full = np.ascontiguousarray(np.broadcast_to(c.dX_shared, (K,) + c.X.shape))
    shared = c.layer.tangent(c.p, cache, c.dX_shared, dp)
    assert shared.shape[0] == K and shared.shape[1] in (1, c.X.shape[0]) and shared.shape[2:] == c.O.shape[1:]
    expanded = c.layer.tangent(c.p, cache, full, dp)
    np.testing.assert_allclose(np.broadcast_to(shared, expanded.shape), expanded, rtol=1e-12,
                               atol=1e-12 * _scale(expanded))
    for j, dirs in enumerate(_directions(c, full, dp)):
        assert_close(np.broadcast_to(shared[j], c.O.shape), fd_directional(c.ref, (c.X, c.W, c.b), dirs))


@pytest.mark.parametrize("k", [1, 2], ids=["k1", "k2"])
@pytest.mark.parametrize("case_id", POOL_IDS)
def test_pool_tangent_matches_fd(case_id, k):
    c = pool_case(case_id)
    _, cache = c.layer.forward({}, c.X)
    dO = c.layer.tangent({}, cache, c.dX[:k], None)
    assert dO.shape == (k,) + c.O.shape
    for j in range(k):
        assert_close(dO[j], fd_directional(c.ref, (c.X,), (c.dX[j],)))
    assert c.layer.tangent({}, cache, None, None) is None


@pytest.mark.parametrize("case_id", POOL_IDS)
def test_pool_tangent_shared_input_tangent(case_id):
    c = pool_case(case_id)
    _, cache = c.layer.forward({}, c.X)
    shared = c.layer.tangent({}, cache, c.dX_shared, None)
    assert shared.shape[0] == K and shared.shape[1] in (1, c.X.shape[0]) and shared.shape[2:] == c.O.shape[1:]
    for j in range(K):
        want = fd_directional(c.ref, (c.X,), (np.broadcast_to(c.dX_shared[j], c.X.shape),))
        assert_close(np.broadcast_to(shared[j], c.O.shape), want)


# =========================================================================== rule 2: backward


@pytest.mark.parametrize("case_id", CONV_IDS)
def test_conv_backward_is_transpose_of_dense_jacobian(case_id):
    c = conv_case(case_id)
    _, cache = c.layer.forward(c.p, c.X)
    DO = c.DO[0]
    assert_close(c.layer.backward_input(c.p, cache, DO), adjoint(c.J_input, DO, c.X.shape))
    grads = c.layer.backward_params(c.p, cache, DO)
    assert set(grads) == ({"weight", "bias"} if c.bias else {"weight"})
    assert_close(grads["weight"], adjoint(c.J_weight, DO, c.W.shape))
    if c.bias:
        assert_close(grads["bias"], adjoint(c.J_bias, DO, c.b.shape))


@pytest.mark.parametrize("case_id", CONV_IDS)
def test_conv_backward_with_direction_axis(case_id, chunking):
    """DO (k, B, …) gives per-direction adjoints, equal to k separate calls and to the dense oracle."""
    c = conv_case(case_id)
    _, cache = c.layer.forward(c.p, c.X)
    DI = c.layer.backward_input(c.p, cache, c.DO)
    grads = c.layer.backward_params(c.p, cache, c.DO)
    assert DI.shape == (K,) + c.X.shape and grads["weight"].shape == c.W.shape + (K,)  # parameters as columns
    for j in range(K):
        one = c.layer.backward_params(c.p, cache, c.DO[j])
        np.testing.assert_allclose(DI[j], c.layer.backward_input(c.p, cache, c.DO[j]), rtol=1e-12,
                                   atol=1e-13 * _scale(DI))
        assert_close(DI[j], adjoint(c.J_input, c.DO[j], c.X.shape))
        assert_close(grads["weight"][..., j], adjoint(c.J_weight, c.DO[j], c.W.shape))
        np.testing.assert_allclose(grads["weight"][..., j], one["weight"], rtol=1e-12,
                                   atol=1e-13 * _scale(one["weight"]))
        if c.bias:
            assert grads["bias"].shape == c.b.shape + (K,)
            assert_close(grads["bias"][..., j], adjoint(c.J_bias, c.DO[j], c.b.shape))
            np.testing.assert_allclose(grads["bias"][..., j], one["bias"], rtol=1e-12,
                                       atol=1e-13 * _scale(one["bias"]))


@pytest.mark.parametrize("case_id", POOL_IDS)
def test_pool_backward_is_transpose_of_dense_jacobian(case_id):
    c = pool_case(case_id)
    _, cache = c.layer.forward({}, c.X)
    assert_close(c.layer.backward_input({}, cache, c.DO[0]), adjoint(c.J_input, c.DO[0], c.X.shape))
    DI = c.layer.backward_input({}, cache, c.DO)
    assert DI.shape == (K,) + c.X.shape
    for j in range(K):
        assert_close(DI[j], adjoint(c.J_input, c.DO[j], c.X.shape))
    assert c.layer.backward_params({}, cache, c.DO[0]) == {}


# =========================================================================== rule 4: tangent_backward


@pytest.mark.parametrize("summed", [False, True], ids=["per_direction", "summed"])
@pytest.mark.parametrize("dod", ["DOD_shared", "DOD_per_direction"])
@pytest.mark.parametrize("which", WHICH + ["no_need_input"])
@pytest.mark.parametrize("case_id", CONV_IDS)
def test_conv_tangent_backward_matches_fd(case_id, which, dod, summed, chunking):
    """DI_k = ∂/∂I ⟨DOD_k, conv(I, Ẇ_k)⟩, DW_k = ∂/∂W ⟨DOD_k, conv(İ_k, W)⟩; summed: their sums over k."""
    c = conv_case(case_id)
    _, cache = c.layer.forward(c.p, c.X)
    DOD = c.DO[0] if dod == "DOD_shared" else c.DO
    DODs = [DOD if dod == "DOD_shared" else DOD[j] for j in range(K)]
    dI = None if which == "params_only" else c.dX
    dp = None if which == "input_only" else c.dp()
    need_input = which != "no_need_input"
    DI, grads = c.layer.tangent_backward(c.p, cache, dI, dp, DOD, need_input=need_input, summed=summed)
    if dp is None or not need_input:
        assert DI is None
    else:
        want = [adjoint(c.J_input_at_weight(j), DODs[j], c.X.shape) for j in range(K)]
        assert_close(DI, sum(want) if summed else np.stack(want))
    if dI is None:
        assert grads is None
    else:
        assert set(grads) == {"weight"}  # the bias has no cross term
        want = [adjoint(c.J_weight_at_input(j), DODs[j], c.W.shape) for j in range(K)]
        assert_close(grads["weight"], sum(want) if summed else np.stack(want, axis=-1))


@pytest.mark.parametrize("summed", [False, True], ids=["per_direction", "summed"])
@pytest.mark.parametrize("dod", ["DOD_shared", "DOD_per_direction"])
@pytest.mark.parametrize("case_id", CONV_IDS)
def test_conv_tangent_backward_shared_input_tangent(case_id, dod, summed, chunking):
    c = conv_case(case_id)
    _, cache = c.layer.forward(c.p, c.X)
    DOD = c.DO[0] if dod == "DOD_shared" else c.DO
    DODs = [DOD if dod == "DOD_shared" else DOD[j] for j in range(K)]
    DI, grads = c.layer.tangent_backward(c.p, cache, c.dX_shared, None, DOD, summed=summed)
    assert DI is None
    want = [adjoint(c.J_weight_at_input(j, shared=True), DODs[j], c.W.shape) for j in range(K)]
    assert_close(grads["weight"], sum(want) if summed else np.stack(want, axis=-1))
    full = np.ascontiguousarray(np.broadcast_to(c.dX_shared, (K,) + c.X.shape))
    _, grads_full = c.layer.tangent_backward(c.p, cache, full, None, DOD, summed=summed)
    np.testing.assert_allclose(grads["weight"], grads_full["weight"], rtol=1e-12, atol=1e-12 * _scale(want[0]))


@pytest.mark.parametrize("summed", [False, True], ids=["per_direction", "summed"])
@pytest.mark.parametrize("case_id", POOL_IDS + ["Flatten"])
def test_parameter_free_layers_have_no_cross_terms(case_id, summed):
    if case_id == "Flatten":
        layer, X = hvp.Flatten(), np.random.default_rng(0).standard_normal((2, 3, 4, 5))
        dX = np.ones((K,) + X.shape)
    else:
        c = pool_case(case_id)
        layer, X, dX = c.layer, c.X, c.dX
    O, cache = layer.forward({}, X)
    assert layer.tangent_backward({}, cache, dX, None, np.ones((K,) + O.shape), summed=summed) == (None, None)
    assert layer.tangent_backward({}, cache, dX, None, np.ones(O.shape), summed=summed) == (None, None)


# =========================================================================== max pooling ties


def test_maxpool2d_ties_go_to_the_first_maximum_in_row_major_order():
    X = np.array([[[[1., 3., 2., 2.],
                    [3., 0., 2., 2.],
                    [0., 0., -1., -4.],
                    [5., 5., -1., -2.]]]])
    # windows of MaxPool2d(2): maxima 3 at (0,1) and (1,0); four 2s; 5 at (3,0) and (3,1); -1 at (2,2) and (3,2)
    first = {(0, 0): (0, 1), (0, 1): (0, 2), (1, 0): (3, 0), (1, 1): (2, 2)}
    layer = hvp.MaxPool2d(2)
    O, cache = layer.forward({}, X)
    np.testing.assert_array_equal(O, [[[[3., 2.], [5., -1.]]]])
    DO = np.array([[[[10., 20.], [30., 40.]]]])
    want = np.zeros_like(X)
    for (i, j), (r, s) in first.items():
        want[0, 0, r, s] = DO[0, 0, i, j]
    np.testing.assert_array_equal(ref_maxpool2d_backward(X, DO, 2), want)  # the loop oracle agrees
    np.testing.assert_array_equal(layer.backward_input({}, cache, DO), want)
    np.testing.assert_array_equal(layer.backward_input({}, cache, np.stack([DO, -DO])), np.stack([want, -want]))
    dI = np.random.default_rng(0).standard_normal((K,) + X.shape)
    dO = layer.tangent({}, cache, dI, None)
    for j in range(K):
        for (i, jj), (r, s) in first.items():
            assert dO[j, 0, 0, i, jj] == dI[j, 0, 0, r, s]


@pytest.mark.parametrize("spatial", [1, 2], ids=["1d", "2d"])
def test_maxpool_ties_with_overlapping_padded_windows(spatial):
    """A constant input (every window a tie), overlapping windows and padding: the explicit loop decides."""
    X = np.full((2, 2, 4, 5), 0.5) if spatial == 2 else np.full((2, 2, 6), 0.5)
    layer = hvp.MaxPool2d(3, stride=1, padding=1) if spatial == 2 else hvp.MaxPool1d(3, stride=1, padding=1)
    O, cache = layer.forward({}, X)
    rng = np.random.default_rng(3)
    DO = rng.standard_normal(O.shape)
    X2, DO2 = (X, DO) if spatial == 2 else (X[:, :, None, :], DO[:, :, None, :])
    want = ref_maxpool2d_backward(X2, DO2, (3, 3) if spatial == 2 else (1, 3), 1,
                                  (1, 1) if spatial == 2 else (0, 1))
    want = want if spatial == 2 else want[:, :, 0, :]
    np.testing.assert_allclose(layer.backward_input({}, cache, DO), want, rtol=1e-14, atol=1e-14)
    dI = rng.standard_normal((1,) + X.shape)
    dO = layer.tangent({}, cache, dI, None)[0]
    # the tangent is the transpose of the backward rule: ⟨DO, Ȯ⟩ = ⟨DI, İ⟩
    np.testing.assert_allclose(np.sum(DO * dO), np.sum(want * dI[0]), rtol=1e-12)
    _, where = _ref_pool2d(X2, (3, 3) if spatial == 2 else (1, 3), 1, (1, 1) if spatial == 2 else (0, 1), "max")
    dI2 = dI[0] if spatial == 2 else dI[0][:, :, None, :]
    dO2 = dO if spatial == 2 else dO[:, :, None, :]
    for n, ch, i, j in np.ndindex(*dO2.shape):
        r, s = where[n, ch, i, j]
        assert dO2[n, ch, i, j] == dI2[n, ch, r, s]


def test_maxpool_ties_agree_with_torch():
    torch = pytest.importorskip("torch")
    X = np.round(np.random.default_rng(5).standard_normal((2, 3, 5, 6)))  # many ties among small integers
    layer = hvp.MaxPool2d(3, stride=2, padding=1)
    O, cache = layer.forward({}, X)
    DO = np.random.default_rng(6).standard_normal(O.shape)
    Xt = torch.from_numpy(X).requires_grad_(True)
    Ot = torch.nn.functional.max_pool2d(Xt, 3, stride=2, padding=1)
    (grad,) = torch.autograd.grad(Ot, Xt, torch.from_numpy(DO))
    np.testing.assert_array_equal(O, Ot.detach().numpy())
    np.testing.assert_allclose(layer.backward_input({}, cache, DO), grad.numpy(), rtol=1e-14, atol=1e-14)


# =========================================================================== whole networks


def ref_param_shapes(layer):
    """(name, shape) of a layer's parameters in θ, re-derived from its public attributes."""
    name = type(layer).__name__
    if name in ("Conv1d", "Conv2d"):
        dim = 2 if name == "Conv2d" else 1
        shapes = [("weight", (layer.out_channels, layer.in_channels // layer.groups) + _pair(layer.kernel_size, dim))]
        return shapes + ([("bias", (layer.out_channels,))] if layer.bias else [])
    if name == "Linear":
        return [("weight", (layer.in_features, layer.out_features))] + (
            [("bias", (layer.out_features,))] if layer.bias else [])
    return []


def ref_net_forward(layers, theta, X, pool_inputs=None):
    """Outputs (B, C) of a conv network from the loop references; ``pool_inputs`` collects each max pool's input."""
    theta = np.asarray(theta, dtype=np.float64)
    h, pos = np.asarray(X, dtype=np.float64), 0
    for layer in layers:
        name, p = type(layer).__name__, {}
        for pname, shape in ref_param_shapes(layer):
            size = int(np.prod(shape))
            p[pname] = theta[pos:pos + size].reshape(shape)
            pos += size
        if name in ("Conv2d", "Conv1d"):
            conv = ref_conv2d if name == "Conv2d" else ref_conv1d
            h = conv(h, p["weight"], p.get("bias"), layer.stride, layer.padding, layer.dilation, layer.groups)
        elif name in ("MaxPool2d", "MaxPool1d", "AvgPool2d", "AvgPool1d"):
            if pool_inputs is not None and name.startswith("Max"):
                pool_inputs.append((h, layer))
            pool = {"MaxPool2d": ref_maxpool2d, "MaxPool1d": ref_maxpool1d,
                    "AvgPool2d": ref_avgpool2d, "AvgPool1d": ref_avgpool1d}[name]
            h = pool(h, layer.kernel_size, layer.stride, layer.padding)
        elif name == "Flatten":
            h = h.reshape(h.shape[0], -1)
        elif name == "Linear":
            h = h @ p["weight"] + p.get("bias", 0.0)
        else:
            h = oracles.activation(layer, h)
    assert pos == theta.size
    return h


NETS = {
    "cnn2d": (lambda: hvp.Sequential(hvp.Conv2d(2, 3, 3, padding=1, stride=2), hvp.Tanh(), hvp.MaxPool2d(2),
                                     hvp.Conv2d(3, 4, (2, 1)), hvp.Sigmoid(), hvp.AvgPool2d(1), hvp.Flatten(),
                                     hvp.Linear(8, 5)),
              (3, 2, 8, 9)),
    "cnn1d_groups_dilation": (lambda: hvp.Sequential(
        hvp.Conv1d(4, 6, 3, padding=2, dilation=2, groups=2), hvp.Softplus(), hvp.MaxPool1d(3, stride=2, padding=1),
        hvp.Conv1d(6, 2, 2, stride=2, groups=2, bias=False), hvp.Tanh(), hvp.AvgPool1d(2, stride=1, padding=1),
        hvp.Flatten(), hvp.Linear(6, 3)),
        (3, 4, 7)),
}
NET_LOSSES = {"ce_labels": hvp.CrossEntropyLoss, "mse": hvp.MSELoss}
POOL_MARGIN = 1e-2  # max-pool windows at least this far from a tie, so that every FD step stays on one piece


class NetProblem:
    def __init__(self, name, kind):
        build, x_shape = NETS[name]
        self.net, self.kind, self.loss = build(), kind, NET_LOSSES[kind]()
        self.P = sum(int(np.prod(s)) for layer in self.net.layers for _, s in ref_param_shapes(layer))
        assert self.P == self.net.num_params
        rng = np.random.default_rng(sum(map(ord, name)))
        for _ in range(500):
            self.theta = rng.standard_normal(self.P) * 0.6
            self.X = rng.standard_normal(x_shape)
            pools = []
            self.O = ref_net_forward(self.net.layers, self.theta, self.X, pools)
            if min(maxpool_gap(h, lay.kernel_size, lay.stride, lay.padding) for h, lay in pools) > POOL_MARGIN:
                break
        else:  # pragma: no cover
            raise RuntimeError("no draw keeps max pooling away from ties")
        B, C = self.O.shape
        self.y = rng.integers(0, C, size=B) if kind == "ce_labels" else rng.standard_normal((B, C))
        self.V = rng.standard_normal((self.P, 3))

    def ref_loss(self, theta):
        return oracles.ref_output_loss(ref_net_forward(self.net.layers, theta, self.X), self.y, self.kind, "mean")

    def linearize(self):
        return hvp.linearize(self.net, self.loss, self.theta, self.X, self.y)


@functools.cache
def net_problem(name, kind) -> NetProblem:
    return NetProblem(name, kind)


@functools.cache
def net_jacobian(name):
    """J = d vec(outputs) / dθ of the reference network, (B·C, P), one central difference per column."""
    p = net_problem(name, "mse")  # the same θ and X for every loss
    return oracles.fd_jacobian(lambda t: ref_net_forward(p.net.layers, t, p.X), p.theta)


NET_IDS = list(NETS)
net_params = pytest.mark.parametrize("name, kind", [(n, k) for n in NET_IDS for k in NET_LOSSES],
                                     ids=[f"{n}-{k}" for n in NET_IDS for k in NET_LOSSES])


def test_net_problems_share_theta_and_inputs_across_losses():
    for name in NET_IDS:
        a, b = net_problem(name, "mse"), net_problem(name, "ce_labels")
        np.testing.assert_array_equal(a.theta, b.theta)
        np.testing.assert_array_equal(a.X, b.X)


@net_params
def test_net_forward_and_loss_match_reference(name, kind):
    p = net_problem(name, kind)
    assert p.net.output_shape(p.X.shape[1:]) == p.O.shape[1:]
    assert_close(p.net.forward(p.theta, p.X), p.O, rtol=1e-12)
    loss, _ = hvp.loss_and_grad(p.net, p.loss, p.theta, p.X, p.y)
    np.testing.assert_allclose(loss, p.ref_loss(p.theta), rtol=1e-12)


@net_params
def test_net_gradient_matches_fd_of_reference_loss(name, kind):
    p = net_problem(name, kind)
    _, grad = hvp.loss_and_grad(p.net, p.loss, p.theta, p.X, p.y)
    assert_close(grad, oracles.fd_gradient(p.ref_loss, p.theta), rtol=1e-6)


@net_params
def test_net_hvp_matches_fd_of_gradient(name, kind):
    p = net_problem(name, kind)
    HV = p.linearize().hvp(p.V)
    assert HV.shape == (p.P, 3)
    h = 1e-5
    for j in range(3):
        grad_at = lambda t: hvp.loss_and_grad(p.net, p.loss, t, p.X, p.y)[1]  # noqa: E731
        want = (grad_at(p.theta + h * p.V[:, j]) - grad_at(p.theta - h * p.V[:, j])) / (2 * h)
        assert_close(HV[:, j], want, rtol=1e-6)


@net_params
def test_net_hessian_bilinear_form_matches_second_differences_of_reference_loss(name, kind):
    """uᵀ H v from the reference loss alone: ((u+v)ᵀH(u+v) − (u−v)ᵀH(u−v))/4, each by a second difference."""
    p = net_problem(name, kind)
    HV = p.linearize().hvp(p.V)
    U = p.V / np.linalg.norm(p.V, axis=0)
    HU = HV / np.linalg.norm(p.V, axis=0)
    h, L0 = 1e-3, p.ref_loss(p.theta)

    def quad(w):
        return (p.ref_loss(p.theta + h * w) - 2 * L0 + p.ref_loss(p.theta - h * w)) / h ** 2

    got, want = [], []
    for a in range(3):
        for b in range(a, 3):
            got.append(U[:, a] @ HU[:, b])
            want.append((quad(U[:, a] + U[:, b]) - quad(U[:, a] - U[:, b])) / 4)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * _scale(np.array(want)))


@net_params
def test_net_ggnvp_matches_jt_hl_j(name, kind):
    p = net_problem(name, kind)
    J = net_jacobian(name)
    H_out = oracles.ref_output_hessian(p.O, p.y, p.kind, "mean")
    GV = p.linearize().ggnvp(p.V)
    assert GV.shape == (p.P, 3)
    assert_close(GV, J.T @ H_out @ J @ p.V, rtol=1e-6)


@net_params
def test_net_jvp_and_vjp_match_fd_jacobian(name, kind):
    p = net_problem(name, kind)
    J = net_jacobian(name)
    B, C = p.O.shape
    pt = p.linearize()
    JV = pt.jvp(p.V)
    assert JV.shape == (B, 3, C)
    assert_close(JV, (J @ p.V).reshape(B, C, 3).transpose(0, 2, 1))
    assert_close(pt.jvp(p.V[:, 0]), (J @ p.V[:, 0]).reshape(B, C))
    u = np.random.default_rng(7).standard_normal((B, 2, C))
    assert_close(pt.vjp(u[:, 0]), J.T @ u[:, 0].ravel())
    assert_close(pt.vjp(u), np.stack([J.T @ u[:, j].ravel() for j in range(2)], axis=1))


# --------------------------------------------------------------------------- torch


def _torch_net(net, theta):
    """The same network in torch float64, weights copied from θ (a Linear weight is torch's transposed)."""
    import torch

    modules, pos = [], 0
    for layer in net.layers:
        name = type(layer).__name__
        if name in ("Conv1d", "Conv2d"):
            m = getattr(torch.nn, name)(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
                                        padding=layer.padding, dilation=layer.dilation, groups=layer.groups,
                                        bias=layer.bias)
        elif name == "Linear":
            m = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias)
        elif name in ("MaxPool1d", "MaxPool2d", "AvgPool1d", "AvgPool2d"):
            m = getattr(torch.nn, name)(layer.kernel_size, stride=layer.stride, padding=layer.padding)
        else:
            m = getattr(torch.nn, name)()  # Flatten and the activations share their names
        m = m.double()
        for pname, shape in ref_param_shapes(layer):
            size = int(np.prod(shape))
            value = torch.from_numpy(theta[pos:pos + size].reshape(shape).copy())
            with torch.no_grad():
                getattr(m, pname).copy_(value.T if name == "Linear" and pname == "weight" else value)
            pos += size
        modules.append(m)
    return torch.nn.Sequential(*modules)


def _torch_flat(net, tensors):
    """Per-parameter torch tensors (module order) as one vector in θ's layout."""
    out, i = [], 0
    for layer in net.layers:
        for pname, _ in ref_param_shapes(layer):
            t = tensors[i].detach().numpy()
            out.append((t.T if type(layer).__name__ == "Linear" and pname == "weight" else t).ravel())
            i += 1
    return np.concatenate(out)


@net_params
def test_net_matches_torch_double_backward(name, kind):
    torch = pytest.importorskip("torch")
    p = net_problem(name, kind)
    tnet = _torch_net(p.net, p.theta)
    params = list(tnet.parameters())
    assert sum(t.numel() for t in params) == p.P
    O = tnet(torch.from_numpy(p.X))
    if kind == "ce_labels":
        loss = torch.nn.functional.cross_entropy(O, torch.from_numpy(p.y).long())
    else:
        loss = torch.nn.functional.mse_loss(O, torch.from_numpy(p.y))
    grads = torch.autograd.grad(loss, params, create_graph=True)
    v = p.V[:, 0]
    v_parts, i = [], 0
    for layer in p.net.layers:  # v in torch's parameter shapes
        for pname, shape in ref_param_shapes(layer):
            size = int(np.prod(shape))
            part = v[i:i + size].reshape(shape)
            v_parts.append(torch.from_numpy(np.ascontiguousarray(part.T if type(layer).__name__ == "Linear"
                                                                 and pname == "weight" else part)))
            i += size
    Hv = torch.autograd.grad(sum((g * w).sum() for g, w in zip(grads, v_parts)), params)

    pt = p.linearize()
    assert_close(pt.outputs, O.detach().numpy(), rtol=1e-10)
    np.testing.assert_allclose(pt.loss, loss.item(), rtol=1e-10)
    assert_close(pt.grad, _torch_flat(p.net, grads), rtol=1e-10)
    assert_close(pt.hvp(v), _torch_flat(p.net, Hv), rtol=1e-10)


# =========================================================================== bad input


@pytest.mark.parametrize("make, match", [
    (lambda: hvp.Conv2d(4, 6, 3, groups=3), r"groups=3 must divide in_channels"),
    (lambda: hvp.Conv2d(4, 6, 3, groups=4), r"groups=4 must divide out_channels"),
    (lambda: hvp.Conv1d(3, 6, 3, groups=2), r"groups=2 must divide in_channels"),
], ids=["groups_not_dividing_in", "groups_not_dividing_out", "conv1d_groups_not_dividing_in"])
def test_groups_must_divide_channels(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_kernel_larger_than_padded_input_fails_at_the_first_call():
    net = hvp.Sequential(hvp.Conv2d(1, 2, 5, padding=1), hvp.Flatten(), hvp.Linear(8, 2))  # fine at construction
    theta = net.init(0)
    with pytest.raises(ValueError, match=r"layer 0 .*Conv2d.*kernel spans 5.*padded input's 4"):
        hvp.loss_and_grad(net, hvp.MSELoss(), theta, np.zeros((2, 1, 2, 2)), np.zeros((2, 2)))
    net1 = hvp.Sequential(hvp.Conv1d(2, 3, 3, dilation=2), hvp.Flatten(), hvp.Linear(3, 2))
    with pytest.raises(ValueError, match=r"Conv1d.*kernel spans 5"):
        net1.forward(net1.init(0), np.zeros((2, 2, 4)))


def test_wrong_input_rank_and_channels():
    net = hvp.Sequential(hvp.Conv2d(2, 3, 3), hvp.Flatten(), hvp.Linear(3 * 6 * 7, 2))
    theta = net.init(0)
    with pytest.raises(ValueError, match=r"4-D"):
        hvp.loss_and_grad(net, hvp.MSELoss(), theta, np.zeros((3, 8, 9)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match=r"2 channels"):
        net.forward(theta, np.zeros((3, 3, 8, 9)))
    net1 = hvp.Sequential(hvp.Conv1d(2, 3, 3), hvp.Flatten(), hvp.Linear(9, 2))
    with pytest.raises(ValueError, match=r"3-D"):
        net1.forward(net1.init(0), np.zeros((3, 2, 5, 5)))


def test_linear_after_conv_without_flatten_suggests_flatten():
    net = hvp.Sequential(hvp.Conv2d(2, 3, 3), hvp.Linear(7, 2))
    with pytest.raises(ValueError, match=r"Flatten"):
        net.forward(net.init(0), np.zeros((3, 2, 8, 9)))


@pytest.mark.parametrize("make, error, match", [
    (lambda: hvp.Conv2d(2, 3, 3, padding="same"), ValueError, r"padding.*string"),
    (lambda: hvp.Conv1d(2, 3, 3, padding="valid"), ValueError, r"padding.*string"),
    (lambda: hvp.Conv2d(2, 3, 0), ValueError, r"kernel_size"),
    (lambda: hvp.Conv2d(2, 3, (2, 0)), ValueError, r"kernel_size"),
    (lambda: hvp.Conv2d(2, 3, 2.5), TypeError, r"kernel_size"),
    (lambda: hvp.MaxPool2d(2, padding=2), ValueError, r"padding.*half the kernel"),
    (lambda: hvp.MaxPool1d(3, padding=2), ValueError, r"padding.*half the kernel"),
    (lambda: hvp.Sequential(hvp.Conv2d, hvp.Flatten(), hvp.Linear(2, 2)), TypeError, r"class Conv2d"),
], ids=["string_padding_2d", "string_padding_1d", "kernel_size_0", "kernel_size_tuple_with_0", "kernel_size_2.5",
        "maxpool2d_padding_over_half_kernel", "maxpool1d_padding_over_half_kernel", "class_not_instance"])
def test_bad_layer_arguments(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize("name", NET_IDS)
def test_inputs_are_not_modified(name):
    p = net_problem(name, "ce_labels")
    theta, X, y, V = (np.array(a) for a in (p.theta, p.X, p.y, p.V))
    p.net.forward(theta, X)
    hvp.loss_and_grad(p.net, p.loss, theta, X, y)
    pt = hvp.linearize(p.net, p.loss, theta, X, y, l2=0.1)
    u = np.ones_like(pt.outputs)
    for product in (pt.hvp, pt.ggnvp, pt.jvp):
        product(V)
        product(V[:, 0])
    pt.vjp(u)
    for a, b in ((theta, p.theta), (X, p.X), (y, p.y), (V, p.V), (u, np.ones_like(u))):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("case_id", ["2d_in4_out6_g2_p1", "1d_in4_out6_k2_s2_p1_d2_g2"])
def test_conv_layer_rules_do_not_modify_their_arguments(case_id):
    c = conv_case(case_id)
    X, W, b, dX, DO = (np.array(a) for a in (c.X, c.W, c.b if c.bias else 0.0, c.dX, c.DO))
    p = {"weight": W, "bias": b}
    dp = {name: np.array(a) for name, a in c.dp().items()}
    dW, db = dp["weight"], dp.get("bias", np.array(0.0))
    _, cache = c.layer.forward(p, X)
    c.layer.backward_input(p, cache, DO)
    c.layer.backward_params(p, cache, DO)
    c.layer.tangent(p, cache, dX, dp)
    c.layer.tangent_backward(p, cache, dX, dp, DO, summed=True)
    c.layer.tangent_backward(p, cache, dX, dp, DO[0])
    for a, want in ((X, c.X), (W, c.W), (b, c.b if c.bias else 0.0), (dX, c.dX), (dW, np.moveaxis(c.dW, 0, -1)),
                    (db, c.db.T if c.bias else 0.0), (DO, c.DO)):
        np.testing.assert_array_equal(a, want)
