"""Loss values, gradients, parameter layout and initialisation against the reference."""

from __future__ import annotations

import math

import numpy as np
import oracles
import pytest

import hvp

L2_VALUES = [0.0, 0.3]


# --------------------------------------------------------------------------- loss and gradient


def test_forward_matches_reference(problem):
    out = problem.net.forward(problem.theta, problem.X)
    ref = oracles.ref_forward(problem.layers, problem.theta, problem.X)
    assert out.shape == (problem.B, problem.C)
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("l2", L2_VALUES)
def test_loss_value_matches_reference(problem, l2):
    loss, _ = problem.loss_and_grad(l2=l2)
    np.testing.assert_allclose(loss, problem.ref_loss(l2=l2), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("l2", L2_VALUES)
def test_gradient_matches_central_differences(problem, l2):
    _, grad = problem.loss_and_grad(l2=l2)
    fd = oracles.fd_gradient(lambda t: problem.ref_loss(t, l2=l2), problem.theta)
    assert grad.shape == (problem.P,)
    scale = np.max(np.abs(fd))
    np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-7 * scale)


def test_l2_adds_exactly_its_penalty(make_problem):
    p = make_problem(("lin:3:4", "tanh", "lin:4:2"), "ce_labels", "mean")
    l2 = 0.7
    loss0, grad0 = p.loss_and_grad(l2=0.0)
    loss1, grad1 = p.loss_and_grad(l2=l2)
    mask = p.weight_mask()
    np.testing.assert_allclose(loss1 - loss0, 0.5 * l2 * np.sum(p.theta[mask] ** 2), rtol=1e-10)
    np.testing.assert_allclose(grad1 - grad0, np.where(mask, l2 * p.theta, 0.0), rtol=1e-10, atol=1e-14)


def test_reduction_sum_is_batch_times_mean_for_ce(make_problem):
    spec = ("lin:3:4", "softplus", "lin:4:3")
    pm = make_problem(spec, "ce_labels", "mean", batch=5)
    ps = make_problem(spec, "ce_labels", "sum", batch=5)
    lm, gm = pm.loss_and_grad()
    ls, gs = ps.loss_and_grad()
    np.testing.assert_allclose(ls, 5 * lm, rtol=1e-12)
    np.testing.assert_allclose(gs, 5 * gm, rtol=1e-10, atol=1e-14)


def test_reduction_sum_is_entries_times_mean_for_mse(make_problem):
    spec = ("lin:3:4", "tanh", "lin:4:3")
    pm = make_problem(spec, "mse", "mean", batch=5)
    ps = make_problem(spec, "mse", "sum", batch=5)
    lm, gm = pm.loss_and_grad()
    ls, gs = ps.loss_and_grad()
    # mean MSE averages over all B*C entries, as torch.nn.MSELoss
    np.testing.assert_allclose(ls, 15 * lm, rtol=1e-12)
    np.testing.assert_allclose(gs, 15 * gm, rtol=1e-10, atol=1e-14)


# --------------------------------------------------------------------------- torch loss definitions


def _single_linear_net_with_outputs(O):
    """A Linear(B, C) net and X = I_B, so that the outputs are exactly O."""
    O = np.asarray(O, dtype=np.float64)
    B, C = O.shape
    net = hvp.Sequential(hvp.Linear(B, C, bias=True))
    theta = np.concatenate([O.ravel(), np.zeros(C)])
    return net, theta, np.eye(B)


OUT = np.array([[1.0, 2.0, 3.0], [0.5, -1.0, 0.0], [-2.0, 0.25, 1.5], [0.0, 0.0, 0.0]])
LABELS = np.array([2, 0, 1, 1])
PROBS = np.array([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0], [0.1, 0.1, 0.8], [0.25, 0.5, 0.25]])
MSE_T = np.array([[0.0, 1.0, 2.0], [1.0, 1.0, 1.0], [-1.0, 0.0, 2.0], [0.5, 0.5, -0.5]])


def _torch_ce_labels(x, y, reduction):
    # loss_b = -x[b, y_b] + log(sum_j exp(x[b, j])); mean divides by B
    terms = [-x[b, y[b]] + math.log(sum(math.exp(v) for v in x[b])) for b in range(x.shape[0])]
    return sum(terms) / len(terms) if reduction == "mean" else sum(terms)


def _torch_ce_probs(x, t, reduction):
    # loss_b = -sum_c t[b, c] * log(exp(x[b, c]) / sum_j exp(x[b, j])); mean divides by B
    terms = []
    for b in range(x.shape[0]):
        lse = math.log(sum(math.exp(v) for v in x[b]))
        terms.append(-sum(t[b, c] * (x[b, c] - lse) for c in range(x.shape[1])))
    return sum(terms) / len(terms) if reduction == "mean" else sum(terms)


def _torch_mse(x, t, reduction):
    # mean over every element of the (B, C) array
    terms = [(x[b, c] - t[b, c]) ** 2 for b in range(x.shape[0]) for c in range(x.shape[1])]
    return sum(terms) / len(terms) if reduction == "mean" else sum(terms)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kind", ["ce_labels", "ce_probs", "mse"])
def test_loss_definition_matches_torch_formulas(kind, reduction):
    net, theta, X = _single_linear_net_with_outputs(OUT)
    if kind == "ce_labels":
        loss_obj, y = hvp.CrossEntropyLoss(reduction=reduction), LABELS
        expected = _torch_ce_labels(OUT, LABELS, reduction)
    elif kind == "ce_probs":
        loss_obj, y = hvp.CrossEntropyLoss(reduction=reduction), PROBS
        expected = _torch_ce_probs(OUT, PROBS, reduction)
    else:
        loss_obj, y = hvp.MSELoss(reduction=reduction), MSE_T
        expected = _torch_mse(OUT, MSE_T, reduction)
    loss, _ = hvp.loss_and_grad(net, loss_obj, theta, X, y)
    np.testing.assert_allclose(loss, expected, rtol=1e-13)


def test_loss_definition_hand_values():
    # outputs [1, 2, 3], label 2: log(1 + e^-1 + e^-2)
    net, theta, X = _single_linear_net_with_outputs([[1.0, 2.0, 3.0]])
    loss, _ = hvp.loss_and_grad(net, hvp.CrossEntropyLoss(), theta, X, np.array([2]))
    np.testing.assert_allclose(loss, math.log(1 + math.exp(-1) + math.exp(-2)), rtol=1e-14)
    # outputs all zero: log C per example, for both reductions
    net, theta, X = _single_linear_net_with_outputs(np.zeros((2, 4)))
    loss, _ = hvp.loss_and_grad(net, hvp.CrossEntropyLoss("mean"), theta, X, np.array([0, 3]))
    np.testing.assert_allclose(loss, math.log(4), rtol=1e-14)
    loss, _ = hvp.loss_and_grad(net, hvp.CrossEntropyLoss("sum"), theta, X, np.array([0, 3]))
    np.testing.assert_allclose(loss, 2 * math.log(4), rtol=1e-14)
    # MSE of outputs [[1, 2]] against zeros: mean 2.5, sum 5
    net, theta, X = _single_linear_net_with_outputs([[1.0, 2.0]])
    loss, grad = hvp.loss_and_grad(net, hvp.MSELoss("mean"), theta, X, np.zeros((1, 2)))
    np.testing.assert_allclose(loss, 2.5, rtol=1e-14)
    # d/dO mean((O - 0)^2) = 2 O / 2 = O; weight grad = X^T dO = O; bias grad = O
    np.testing.assert_allclose(grad, [1.0, 2.0, 1.0, 2.0], rtol=1e-14)
    loss, grad = hvp.loss_and_grad(net, hvp.MSELoss("sum"), theta, X, np.zeros((1, 2)))
    np.testing.assert_allclose(loss, 5.0, rtol=1e-14)
    np.testing.assert_allclose(grad, [2.0, 4.0, 2.0, 4.0], rtol=1e-14)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kind", ["ce_labels", "ce_probs", "mse"])
def test_loss_agrees_with_torch_if_available(kind, reduction):
    torch = pytest.importorskip("torch")
    net, theta, X = _single_linear_net_with_outputs(OUT)
    x = torch.tensor(OUT, dtype=torch.float64)
    if kind == "ce_labels":
        loss_obj, y = hvp.CrossEntropyLoss(reduction=reduction), LABELS
        expected = torch.nn.CrossEntropyLoss(reduction=reduction)(x, torch.tensor(LABELS))
    elif kind == "ce_probs":
        loss_obj, y = hvp.CrossEntropyLoss(reduction=reduction), PROBS
        expected = torch.nn.CrossEntropyLoss(reduction=reduction)(x, torch.tensor(PROBS))
    else:
        loss_obj, y = hvp.MSELoss(reduction=reduction), MSE_T
        expected = torch.nn.MSELoss(reduction=reduction)(x, torch.tensor(MSE_T))
    loss, _ = hvp.loss_and_grad(net, loss_obj, theta, X, y)
    np.testing.assert_allclose(loss, float(expected), rtol=1e-13)


# --------------------------------------------------------------------------- extreme logits


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_huge_logits_give_finite_loss_and_gradient(dtype, reduction):
    # outputs = X W with W = [[1e4, -1e4, 0], [-1e4, 1e4, 0]] and X rows e1, e2, e1+e2 (zero logits)
    net = hvp.Sequential(hvp.Linear(2, 3, bias=False))
    W = np.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 0.0]])
    theta = W.ravel().astype(dtype)
    X = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=dtype)
    y = np.array([1, 1, 2])  # first example is confidently wrong by 2e4
    loss_obj = hvp.CrossEntropyLoss(reduction=reduction)
    loss, grad = hvp.loss_and_grad(net, loss_obj, theta, X, y)
    O = X.astype(np.float64) @ W
    expected_loss = oracles.ref_output_loss(O, y, "ce_labels", reduction)
    assert np.isfinite(loss) and np.all(np.isfinite(grad))
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
    # dL/dO = (softmax(O) - onehot(y)) / B for mean; grad W = X^T dL/dO
    E = np.exp(O - O.max(axis=1, keepdims=True))
    dO = E / E.sum(axis=1, keepdims=True) - oracles.target_matrix(y, "ce_labels", 3)
    if reduction == "mean":
        dO /= 3
    np.testing.assert_allclose(grad, (X.astype(np.float64).T @ dO).ravel(), rtol=1e-5, atol=1e-6)
    pt = hvp.linearize(net, loss_obj, theta, X, y)
    v = np.ones(theta.size, dtype=dtype)
    assert np.all(np.isfinite(pt.hvp(v))) and np.all(np.isfinite(pt.ggnvp(v)))


# --------------------------------------------------------------------------- linearization point


@pytest.mark.parametrize("l2", L2_VALUES)
def test_linearization_point_matches_loss_and_grad_and_forward(problem, l2):
    loss, grad = problem.loss_and_grad(l2=l2)
    pt = problem.linearize(l2=l2)
    np.testing.assert_allclose(float(pt.loss), loss, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(pt.grad, grad, rtol=1e-12, atol=1e-15)
    out = problem.net.forward(problem.theta, problem.X)
    np.testing.assert_allclose(pt.outputs, out, rtol=1e-13, atol=1e-15)
    # and independently of the engine:
    np.testing.assert_allclose(pt.outputs, oracles.ref_forward(problem.layers, problem.theta, problem.X),
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(float(pt.loss), problem.ref_loss(l2=l2), rtol=1e-12, atol=1e-14)


def test_loss_is_python_float(make_problem):
    for dtype in (np.float32, np.float64):
        p = make_problem(("lin:3:2",), "mse", "mean", dtype=dtype)
        loss, grad = p.loss_and_grad()
        assert isinstance(loss, float)
        assert grad.dtype == dtype


# --------------------------------------------------------------------------- layout


@pytest.mark.parametrize("spec", [
    ("lin:3:4", "relu", "lin:4:2"),
    ("lin:3:4:nobias", "tanh", "lin:4:3", "sigmoid", "lin:3:2:nobias"),
    ("lin:2:3", "identity", "elu", "lin:3:3"),
], ids=["bias", "mixed-bias", "two-activations"])
def test_unflatten_layout_and_write_through(make_problem, spec):
    p = make_problem(spec)
    net = p.net
    P = net.num_params
    assert P == oracles.num_params(net.layers)
    theta = np.arange(P, dtype=np.float64) + 1.0
    params = net.unflatten(theta)
    assert len(params) == len(net.layers)
    pos = 0
    for layer, d in zip(net.layers, params):
        if not oracles.is_linear(layer):
            assert d == {}
            continue
        m, n = layer.in_features, layer.out_features
        W = d["weight"]
        assert W.shape == (m, n)
        # weight first, C-order
        np.testing.assert_array_equal(W, (np.arange(pos, pos + m * n) + 1.0).reshape(m, n))
        pos += m * n
        if oracles.has_bias(layer):
            b = d["bias"]
            assert b.shape == (n,)
            np.testing.assert_array_equal(b, np.arange(pos, pos + n) + 1.0)
            pos += n
        else:
            assert d.get("bias") is None
    assert pos == P
    # views write through into theta
    for layer, d in zip(net.layers, params):
        if oracles.is_linear(layer):
            assert np.shares_memory(d["weight"], theta)
            d["weight"][0, -1] = -123.0
            if oracles.has_bias(layer):
                d["bias"][-1] = -456.0
    offs = oracles.offsets(net.layers)
    for layer, o in zip(net.layers, offs):
        if oracles.is_linear(layer):
            a, b = o["weight"]
            assert theta[a + layer.out_features - 1] == -123.0
            if "bias" in o:
                assert theta[o["bias"][1] - 1] == -456.0
    assert np.sum(theta == -123.0) == sum(oracles.is_linear(layer) for layer in net.layers)


def test_unflatten_drives_forward(make_problem):
    # setting a layer's weight through the view changes the outputs as O = I W + b predicts
    net = hvp.Sequential(hvp.Linear(2, 3))
    theta = np.zeros(net.num_params)
    d = net.unflatten(theta)[0]
    d["weight"][:] = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
    d["bias"][:] = [0.5, -0.5, 1.0]
    out = net.forward(theta, np.array([[1.0, 10.0]]))
    np.testing.assert_allclose(out, [[41.5, 51.5, 64.0]], rtol=1e-15)


# --------------------------------------------------------------------------- init


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_init_deterministic_fresh_and_typed(make_problem, dtype):
    net = make_problem(("lin:3:4", "tanh", "lin:4:3:nobias", "relu", "lin:3:2")).net
    a = net.init(seed=0, dtype=dtype)
    b = net.init(seed=0, dtype=dtype)
    c = net.init(seed=1, dtype=dtype)
    assert a.shape == (net.num_params,) and a.dtype == dtype
    assert c.dtype == dtype
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert np.all(np.isfinite(a))
    assert not np.shares_memory(a, b)
    a[:] = 99.0
    np.testing.assert_array_equal(net.init(seed=0, dtype=dtype), b)
    # weights are not all zero, so that the network can break symmetry
    mask = oracles.weight_mask(net.layers)
    assert np.count_nonzero(b[mask]) > mask.sum() // 2


def test_init_default_is_float64(make_problem):
    net = make_problem(("lin:3:2",)).net
    theta = net.init()
    assert theta.dtype == np.float64
    np.testing.assert_array_equal(theta, net.init(seed=0))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_ce_soft_targets_rounded_to_float32_gradient(make_problem, reduction):
    # each example's term is -sum_c t_bc log softmax(O_b)_c; rows summing to 1 only to float32's
    # rounding are taken as they are, and the gradient is exactly that of this value
    p = make_problem(("lin:3:4", "tanh", "lin:4:3"), "ce_probs", reduction, batch=3, seed=2)
    p.y = p.y.astype(np.float32)
    loss, grad = p.loss_and_grad()
    np.testing.assert_allclose(loss, p.ref_loss(), rtol=1e-12)
    fd = oracles.fd_gradient(p.ref_loss, p.theta)
    np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-7 * np.max(np.abs(fd)))
