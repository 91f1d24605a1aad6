"""The exact Hessian diagonal of convolutional and residual networks, against two oracles.

Oracles: ``np.diag`` of the dense Hessian ``pt.hvp(np.eye(P))`` (its products are checked against
finite differences and torch in test_conv.py and test_residual.py), and second central differences
of a float64 loss from a forward pass written here with loops over kernel offsets and windows,
which shares no code with hvp (only layer attributes are read). Memory chunking is checked by
giving the columns a budget of one byte: one column per chunk, the same diagonal.
"""

from __future__ import annotations

import functools

import numpy as np
import oracles
import pytest
from conftest import build_loss, dense_diagonal, draw_targets, fd_hessian_diagonal

import hvp
from hvp import diag_hessian as diag_hessian_module

# id -> (layers, per-example input shape). Together: Conv1d and Conv2d with stride, padding, dilation, groups
# and no bias; tanh, sigmoid, softplus (σ″ ≠ 0) and ReLU; max pooling with overlapping, padded windows and
# average pooling; activations after max pooling and Flatten (their diagonals pass back as diagonals); two
# convolutions in a row; Flatten then an MLP; residual blocks, nested, one opening with an activation; an
# activation on the network's input.
NETS = {
    "conv2d-pad_tanh_maxpool_softplus": (
        lambda: hvp.Sequential(hvp.Conv2d(2, 3, 3, padding=1), hvp.Tanh(), hvp.MaxPool2d(2), hvp.Softplus(),
                               hvp.Flatten(), hvp.Linear(12, 3)),
        (2, 4, 4)),
    "conv2d-stride-groups-nobias_sigmoid_conv_softplus_avgpool": (
        lambda: hvp.Sequential(hvp.Conv2d(2, 4, 3, stride=2, padding=1, groups=2, bias=False), hvp.Sigmoid(),
                               hvp.Conv2d(4, 2, 2), hvp.Softplus(), hvp.AvgPool2d(2, stride=1, padding=1),
                               hvp.Flatten(), hvp.Linear(18, 3)),
        (2, 5, 5)),
    "conv2d-dilation_relu_conv-conv_tanh_maxpool-overlap_flatten_sigmoid": (
        lambda: hvp.Sequential(hvp.Conv2d(1, 3, 3, dilation=2, padding=2), hvp.ReLU(),
                               hvp.Conv2d(3, 2, (2, 3), stride=(2, 1), padding=(0, 1)), hvp.Conv2d(2, 2, 1),
                               hvp.Tanh(), hvp.MaxPool2d(3, stride=1, padding=1), hvp.Flatten(), hvp.Sigmoid(),
                               hvp.Linear(16, 3)),
        (1, 5, 4)),
    "conv1d-dilation_tanh_maxpool1d_conv1d-groups_tanh": (
        lambda: hvp.Sequential(hvp.Conv1d(2, 4, 3, dilation=2, padding=2), hvp.Tanh(),
                               hvp.MaxPool1d(3, stride=2, padding=1), hvp.Conv1d(4, 2, 2, groups=2), hvp.Tanh(),
                               hvp.Flatten(), hvp.Linear(6, 3)),
        (2, 7)),
    "conv1d-stride-nobias_softplus_avgpool1d_mlp-sigmoid": (
        lambda: hvp.Sequential(hvp.Conv1d(3, 4, 2, stride=2, bias=False), hvp.Softplus(), hvp.AvgPool1d(2),
                               hvp.Flatten(), hvp.Linear(8, 4), hvp.Sigmoid(), hvp.Linear(4, 3)),
        (3, 8)),
    "residual-nested_conv_tanh-sigmoid": (
        lambda: hvp.Sequential(hvp.Conv2d(1, 2, 3, padding=1), hvp.Tanh(),
                               hvp.Residual(hvp.Conv2d(2, 2, 3, padding=1), hvp.Sigmoid(),
                                            hvp.Residual(hvp.Tanh(), hvp.Conv2d(2, 2, 1)),
                                            hvp.Conv2d(2, 2, 3, padding=1, groups=2)),
                               hvp.Tanh(), hvp.AvgPool2d(2), hvp.Flatten(), hvp.Linear(8, 3)),
        (1, 4, 4)),
    "residual-opens-with-activation_mlp": (
        lambda: hvp.Sequential(hvp.Tanh(), hvp.Linear(3, 4), hvp.Residual(hvp.Softplus(), hvp.Linear(4, 4),
                                                                         hvp.Tanh()),
                               hvp.Residual(hvp.Linear(4, 4), hvp.ReLU(), hvp.Linear(4, 4, bias=False)),
                               hvp.Sigmoid(), hvp.Linear(4, 3)),
        (3,)),
    "relu-only_conv2d_maxpool_residual": (
        lambda: hvp.Sequential(hvp.Conv2d(2, 3, 2), hvp.ReLU(), hvp.MaxPool2d(2, stride=1),
                               hvp.Residual(hvp.Conv2d(3, 3, 1), hvp.ReLU()), hvp.Flatten(), hvp.Linear(12, 3)),
        (2, 4, 4)),
}
LOSSES = ["ce_labels", "ce_probs", "mse", "bce"]
BATCH = 3


@functools.cache
def problem(name, kind):
    """(net, loss, θ, X, y); θ ~ 0.6·N(0, 1) so that every activation bends; the same θ and X for every loss."""
    build, shape = NETS[name]
    net = build()
    rng = np.random.default_rng(sum(map(ord, name)))
    theta, X = 0.6 * rng.standard_normal(net.num_params), rng.standard_normal((BATCH, *shape))
    y = draw_targets(np.random.default_rng(1), kind, BATCH, 3)
    return net, build_loss(kind, "mean"), theta, X, y


def linearize(name, kind, l2=0.0, dtype=np.float64):
    net, loss, theta, X, y = problem(name, kind)
    y = y if kind == "ce_labels" else y.astype(dtype)
    return hvp.linearize(net, loss, theta.astype(dtype), X.astype(dtype), y, l2=l2)


def assert_close(got, want, rtol):
    scale = float(np.max(np.abs(want)))
    assert scale > 0, "the reference is zero: the comparison could not fail"
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale)


# =========================================================================== against the dense Hessian


@pytest.mark.parametrize("l2", [0.0, 0.3], ids=["no-l2", "l2=0.3"])
@pytest.mark.parametrize("kind", LOSSES)
@pytest.mark.parametrize("name", list(NETS))
def test_matches_dense_hessian_diagonal(name, kind, l2):
    pt = linearize(name, kind, l2)
    got = pt.diag_hessian()
    assert got.shape == (pt.theta.size,) and got.dtype == np.float64
    assert_close(got, dense_diagonal(pt, pt.theta.size), rtol=1e-11)


@pytest.mark.parametrize("name", [n for n in NETS if not n.startswith("relu")])
def test_smooth_activations_make_it_differ_from_diag_ggn(name):
    pt = linearize(name, "ce_labels")
    got, ggn = pt.diag_hessian(), pt.diag_ggn()
    assert np.max(np.abs(got - ggn)) > 1e-3 * np.max(np.abs(ggn))


@pytest.mark.parametrize("kind", LOSSES)
def test_piecewise_linear_net_gives_diag_ggn(kind):
    pt = linearize("relu-only_conv2d_maxpool_residual", kind, l2=0.2)
    assert_close(pt.diag_hessian(), pt.diag_ggn(), rtol=1e-13)


def test_float32_matches_float64():
    name = "residual-nested_conv_tanh-sigmoid"
    got = linearize(name, "ce_labels", 0.1, np.float32).diag_hessian()
    assert got.dtype == np.float32
    assert_close(got, linearize(name, "ce_labels", 0.1).diag_hessian(), rtol=1e-4)


# =========================================================================== against finite differences


def _as2d(v, one_d, height):
    """A layer's per-axis tuple in two dimensions: ``(height, v)`` for a 1-D layer (inputs of height 1)."""
    return (height, v[0]) if one_d else tuple(v)


def _conv(X, W, b, layer):
    """Convolution by a sum over kernel offsets of shifted input slices; X (B, C, [H,] W)."""
    one_d = X.ndim == 3
    X, W = (X[:, :, None], W[:, :, None]) if one_d else (X, W)
    (sh, sw), (ph, pw), (dh, dw) = (_as2d(v, one_d, n) for v, n in ((layer.stride, 1), (layer.padding, 0),
                                                                    (layer.dilation, 1)))
    B, C, H, Wd = X.shape
    O, Cg, kh, kw = W.shape
    Xp = np.zeros((B, C, H + 2 * ph, Wd + 2 * pw))
    Xp[:, :, ph:ph + H, pw:pw + Wd] = X
    Ho, Wo = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (Wd + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    out = np.zeros((B, O, Ho, Wo)) + (0.0 if b is None else b[:, None, None])
    Og = O // layer.groups
    for i in range(kh):
        for j in range(kw):
            patch = Xp[:, :, i * dh:i * dh + sh * (Ho - 1) + 1:sh, j * dw:j * dw + sw * (Wo - 1) + 1:sw]
            for g in range(layer.groups):
                out[:, g * Og:(g + 1) * Og] += np.einsum("bchw,oc->bohw", patch[:, g * Cg:(g + 1) * Cg],
                                                         W[g * Og:(g + 1) * Og, :, i, j])
    return out[:, :, 0] if one_d else out


def _pool(X, layer, gaps):
    """Max (first maximum wins; each window's gap to its runner-up into ``gaps``) or mean (zero padding counted)."""
    one_d = X.ndim == 3
    X = X[:, :, None] if one_d else X
    (kh, kw), (sh, sw), (ph, pw) = (_as2d(v, one_d, n) for v, n in ((layer.kernel_size, 1), (layer.stride, 1),
                                                                    (layer.padding, 0)))
    B, C, H, W = X.shape
    is_max = type(layer).__name__.startswith("Max")
    Xp = np.full((B, C, H + 2 * ph, W + 2 * pw), -np.inf if is_max else 0.0)
    Xp[:, :, ph:ph + H, pw:pw + W] = X
    Ho, Wo = (H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1
    windows = np.stack([Xp[:, :, i:i + sh * (Ho - 1) + 1:sh, j:j + sw * (Wo - 1) + 1:sw]
                        for i in range(kh) for j in range(kw)], axis=-1)
    if is_max:
        top2 = np.sort(windows, axis=-1)[..., -2:]
        gaps.append(np.min(top2[..., 1] - top2[..., 0]))
        out = windows.max(axis=-1)
    else:
        out = windows.mean(axis=-1)
    return out[:, :, 0] if one_d else out


def ref_forward(layers, theta, X, gaps):
    """Outputs of the layers on X, and how much of θ (float64, the layers' parameters in order) they used."""
    h, pos = X, 0

    def take(shape):
        nonlocal pos
        size = int(np.prod(shape))
        pos += size
        return theta[pos - size:pos].reshape(shape)

    for layer in layers:
        name = type(layer).__name__
        if name == "Residual":
            inner, used = ref_forward(layer.layers, theta[pos:], h, gaps)
            h, pos = h + inner, pos + used
        elif name in ("Conv1d", "Conv2d"):
            W = take((layer.out_channels, layer.in_channels // layer.groups) + tuple(layer.kernel_size))
            h = _conv(h, W, take((layer.out_channels,)) if layer.bias else None, layer)
        elif name == "Linear":
            W = take((layer.in_features, layer.out_features))
            h = h @ W + (take((layer.out_features,)) if layer.bias else 0.0)
        elif "Pool" in name:
            h = _pool(h, layer, gaps)
        elif name == "Flatten":
            h = h.reshape(len(h), -1)
        else:
            h = oracles.activation(layer, h)
    return h, pos


def ref_loss(name, kind, theta, l2, gaps):
    net, _, _, X, y = problem(name, kind)
    O, used = ref_forward(net.layers, theta, X, gaps)
    assert used == theta.size
    weights = theta[net.weight_mask()]  # the penalty's entries: the one thing read from hvp's layout
    return oracles.ref_output_loss(O, y, kind, "mean") + 0.5 * l2 * weights @ weights


FD_CASES = [("conv1d-dilation_tanh_maxpool1d_conv1d-groups_tanh", "ce_labels", 0.0),
            ("conv2d-dilation_relu_conv-conv_tanh_maxpool-overlap_flatten_sigmoid", "mse", 0.0),
            ("conv2d-stride-groups-nobias_sigmoid_conv_softplus_avgpool", "bce", 0.3),
            ("residual-nested_conv_tanh-sigmoid", "mse", 0.3),
            ("residual-opens-with-activation_mlp", "ce_probs", 0.0)]


@pytest.mark.parametrize("name, kind, l2", FD_CASES, ids=[f"{n}-{k}-l2={l2}" for n, k, l2 in FD_CASES])
def test_matches_second_differences_of_a_loop_reference_loss(name, kind, l2):
    net, _, theta, X, _ = problem(name, kind)
    gaps = []
    assert ref_loss(name, kind, theta, l2, gaps) == pytest.approx(linearize(name, kind, l2).loss, rel=1e-12)
    assert min(gaps, default=1.0) > 1e-2, "max pooling too close to a tie for finite differences"
    want = fd_hessian_diagonal(lambda t: ref_loss(name, kind, t, l2, []), theta)
    assert_close(linearize(name, kind, l2).diag_hessian(), want, rtol=1e-5)


# =========================================================================== chunks of columns


@pytest.fixture
def chunk_sizes(monkeypatch):
    """The number of columns in every chunk carried, appended by a spy on the walk's ``carry``."""
    sizes, carry = [], diag_hessian_module._Walk.carry

    def spy(self, chain, position, V, *args, **kwargs):
        sizes.append(len(V))
        return carry(self, chain, position, V, *args, **kwargs)

    monkeypatch.setattr(diag_hessian_module._Walk, "carry", spy)
    return sizes


@pytest.mark.parametrize("name", ["residual-nested_conv_tanh-sigmoid",
                                  "conv1d-dilation_tanh_maxpool1d_conv1d-groups_tanh"])
def test_one_column_per_chunk_gives_the_same_diagonal(name, monkeypatch, chunk_sizes):
    pt = linearize(name, "ce_labels", 0.1)
    whole = pt.diag_hessian()
    columns = sum(chunk_sizes)
    assert max(chunk_sizes) > 1
    chunk_sizes.clear()
    monkeypatch.setattr(diag_hessian_module, "COLUMN_BYTES", 1)
    np.testing.assert_allclose(pt.diag_hessian(), whole, rtol=1e-12, atol=1e-15 * np.max(np.abs(whole)))
    assert chunk_sizes == [1] * columns


def test_chunks_are_sized_by_the_byte_budget(monkeypatch, chunk_sizes):
    """K·B·width·itemsize ≤ COLUMN_BYTES, width the largest per-example array (here 2·7·7 = 98 entries)."""
    net = hvp.Sequential(hvp.Conv2d(2, 2, 1), hvp.Conv2d(2, 2, 3, padding=1), hvp.Tanh(), hvp.Conv2d(2, 1, 3),
                         hvp.Flatten(), hvp.Linear(25, 2))
    rng = np.random.default_rng(0)
    pt = hvp.linearize(net, hvp.CrossEntropyLoss(), net.init(0), rng.standard_normal((4, 2, 7, 7)), np.arange(4) % 2)
    whole = pt.diag_hessian()
    chunk_sizes.clear()
    monkeypatch.setattr(diag_hessian_module, "COLUMN_BYTES", 5 * 4 * 98 * 8)
    np.testing.assert_allclose(pt.diag_hessian(), whole, rtol=1e-12)
    assert chunk_sizes[1:] == [5] * 19 + [3]  # the loss's 2 columns, then the tanh's 98 at the convolution's output
