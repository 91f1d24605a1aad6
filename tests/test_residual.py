"""Residual blocks ``O = I + f(I)``: parameters, the four rules through a whole network, nesting, errors.

The oracle is a forward pass written here by hand for one fixed architecture (explicit slices of θ,
explicit skip connections), differentiated by finite differences in float64.
"""

import numpy as np
import oracles
import pytest
from conftest import assert_kfac_trains_and_resumes, loop_grads

import hvp
from hvp.layers.second_order import rules_apart


def block_net():
    """Linear(3,4) tanh [h + (Linear(4,4) sigmoid [a + softplus(Linear(4,4))] Linear(4,4,no bias))] tanh Linear(4,2)."""
    inner = hvp.Residual(hvp.Linear(4, 4), hvp.Softplus())
    block = hvp.Residual(hvp.Linear(4, 4), hvp.Sigmoid(), inner, hvp.Linear(4, 4, bias=False))
    return hvp.Sequential(hvp.Linear(3, 4), hvp.Tanh(), block, hvp.Tanh(), hvp.Linear(4, 2))


def ref_forward(theta, X):
    """The same network from θ's layout as documented: per layer weight (in, out) then bias, in order."""
    sizes = [("W0", (3, 4)), ("b0", (4,)), ("W1", (4, 4)), ("b1", (4,)), ("W2", (4, 4)), ("b2", (4,)),
             ("W3", (4, 4)), ("W4", (4, 2)), ("b4", (2,))]
    p, start = {}, 0
    for name, shape in sizes:
        p[name] = theta[start:start + int(np.prod(shape))].reshape(shape)
        start += int(np.prod(shape))
    assert start == theta.size
    h = np.tanh(X @ p["W0"] + p["b0"])
    a = 1 / (1 + np.exp(-(h @ p["W1"] + p["b1"])))
    a = a + np.logaddexp(0, a @ p["W2"] + p["b2"])  # the nested block
    h = np.tanh(h + a @ p["W3"])
    return h @ p["W4"] + p["b4"]


@pytest.fixture
def case():
    rng = np.random.default_rng(3)
    net = block_net()
    theta = net.init(1)
    X = rng.normal(size=(5, 3))
    y = rng.integers(0, 2, size=5)
    return net, theta, X, y


def weight_mask():
    mask = np.zeros(12 + 4 + 16 + 4 + 16 + 4 + 16 + 8 + 2, dtype=bool)
    for start, stop in ((0, 12), (16, 32), (36, 52), (56, 72), (72, 80)):
        mask[start:stop] = True
    return mask


def test_parameters_are_named_and_laid_out_as_documented(case):
    net, theta, _, _ = case
    block = net.layers[2]
    assert [name for name, _ in block.param_shapes()] == ["0.weight", "0.bias", "2.0.weight", "2.0.bias", "3.weight"]
    views = net.unflatten(theta)[2]
    np.testing.assert_array_equal(views["2.0.bias"], theta[52:56])
    np.testing.assert_array_equal(views["3.weight"], theta[56:72].reshape(4, 4))
    np.testing.assert_array_equal(net.weight_mask(), weight_mask())
    assert net.num_params == weight_mask().size


def test_init_draws_each_layer_within_its_own_bound():
    net = hvp.Sequential(hvp.Linear(3, 64), hvp.Residual(hvp.Linear(64, 64), hvp.Tanh(), hvp.Linear(64, 64)),
                         hvp.Linear(64, 2))
    theta = net.init(0)
    for name, view in net.unflatten(theta)[1].items():
        assert 0.9 / 8 < np.abs(view).max() <= 1 / 8, name  # fan_in 64 inside the block


def test_forward_matches_the_hand_written_network(case):
    net, theta, X, _ = case
    np.testing.assert_allclose(net.forward(theta, X), ref_forward(theta, X), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("l2", [0.0, 0.3], ids=["no_l2", "l2"])
def test_gradient_against_finite_differences(case, l2):
    net, theta, X, y = case
    value, grad = hvp.loss_and_grad(net, hvp.CrossEntropyLoss(), theta, X, y, l2=l2)

    def f(t):
        return oracles.ref_output_loss(ref_forward(t, X), y, "ce_labels", "mean") + 0.5 * l2 * float(
            np.sum(t[weight_mask()] ** 2))

    assert value == pytest.approx(f(theta), rel=1e-13)
    np.testing.assert_allclose(grad, oracles.fd_gradient(f, theta), rtol=1e-6, atol=1e-8)


def test_hvp_ggnvp_jvp_vjp_against_dense_oracles(case):
    net, theta, X, y = case
    loss = hvp.CrossEntropyLoss()
    pt = hvp.linearize(net, loss, theta, X, y)
    P = net.num_params
    V = np.random.default_rng(0).normal(size=(P, 3))
    H = oracles.fd_hessian_from_gradient(lambda t: hvp.loss_and_grad(net, loss, t, X, y)[1], theta)
    np.testing.assert_allclose(pt.hvp(V), H @ V, rtol=1e-5, atol=1e-7)
    J = oracles.fd_jacobian(lambda t: ref_forward(t, X), theta)  # (B·C, P)
    H_out = oracles.ref_output_hessian(ref_forward(theta, X), y, "ce_labels", "mean")
    np.testing.assert_allclose(pt.ggnvp(V), J.T @ H_out @ J @ V, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(pt.jvp(V[:, 0]), (J @ V[:, 0]).reshape(5, 2), rtol=1e-6, atol=1e-9)
    U = np.random.default_rng(1).normal(size=(5, 2))
    np.testing.assert_allclose(pt.vjp(U), J.T @ U.ravel(), rtol=1e-6, atol=1e-9)
    for j in range(3):  # a block of directions = the single products
        np.testing.assert_allclose(pt.hvp(V)[:, j], pt.hvp(V[:, j]), rtol=1e-12, atol=1e-14)


def test_rules_taken_apart_give_the_same_hessian_product(case, monkeypatch):
    """A block's tangent_backward with the gradient's δ (the cross terms of a Hessian product, which reuses the
    adjoints inside f that the gradient's pass kept) against the finite-difference Hessian, where products
    otherwise take the block's own backward_with_cross_terms."""
    net, theta, X, y = case
    loss = hvp.CrossEntropyLoss()
    monkeypatch.setattr(hvp.products, "backward_with_cross_terms", rules_apart)
    pt = hvp.linearize(net, loss, theta, X, y)
    V = np.random.default_rng(0).normal(size=(net.num_params, 2))
    H = oracles.fd_hessian_from_gradient(lambda t: hvp.loss_and_grad(net, loss, t, X, y)[1], theta)
    np.testing.assert_allclose(pt.hvp(V), H @ V, rtol=1e-5, atol=1e-7)


def test_block_must_keep_the_shape():
    with pytest.raises(ValueError, match=r"(?s)layer 1.*Residual.*keep the shape.*\(4,\).*\(5,\)"):
        hvp.Sequential(hvp.Linear(3, 4), hvp.Residual(hvp.Linear(4, 5)), hvp.Linear(5, 2))  # widths known: at once
    net = hvp.Sequential(hvp.Conv1d(2, 3, 1), hvp.Residual(hvp.Conv1d(3, 3, 2)), hvp.Flatten(), hvp.Linear(6, 2))
    with pytest.raises(ValueError, match=r"(?s)layer 1.*Residual.*keep the shape.*\(3, 3\).*\(3, 2\)"):
        net.forward(net.init(0), np.ones((2, 2, 3)))  # lengths known only when inputs come


def test_bad_blocks_are_refused():
    with pytest.raises(ValueError, match="Residual needs at least one layer"):
        hvp.Residual()
    with pytest.raises(TypeError, match=r"layers\[1\].*class Tanh.*hvp\.Tanh\(\)"):
        hvp.Residual(hvp.Linear(2, 2), hvp.Tanh)
    with pytest.raises(TypeError, match=r"layers\[0\].*str"):
        hvp.Residual("conv")


def test_per_example_quantities_match_a_loop_over_examples(case):
    net, theta, X, y = case
    loss = hvp.CrossEntropyLoss()
    pt = hvp.linearize(net, loss, theta, X, y, l2=0.2)  # the L2 term is in no per-example quantity
    per_example = loop_grads(net, loss, theta, X, y)
    np.testing.assert_allclose(pt.batch_grad(), per_example, rtol=1e-12, atol=1e-16)
    np.testing.assert_allclose(pt.sum_grad_squared(), (per_example ** 2).sum(axis=0), rtol=1e-12, atol=1e-18)
    np.testing.assert_allclose(pt.batch_l2(), (per_example ** 2).sum(axis=1), rtol=1e-12, atol=1e-18)
    J = oracles.fd_jacobian(lambda t: ref_forward(t, X), theta)
    H_out = oracles.ref_output_hessian(ref_forward(theta, X), y, "ce_labels", "mean")
    expected = np.diag(J.T @ H_out @ J) + 0.2 * weight_mask()
    np.testing.assert_allclose(pt.diag_ggn(), expected, rtol=1e-6, atol=1e-9)


def test_per_example_quantities_of_a_convolutional_block():
    rng = np.random.default_rng(7)
    block = hvp.Residual(hvp.Conv2d(2, 2, 3, padding=1), hvp.Tanh(), hvp.Conv2d(2, 2, 1))
    net = hvp.Sequential(hvp.Conv2d(1, 2, 2), hvp.Sigmoid(), block, hvp.Flatten(), hvp.Linear(18, 3))
    loss, theta = hvp.MSELoss(), net.init(2)
    X, Y = rng.normal(size=(4, 1, 4, 4)), rng.normal(size=(4, 3))
    pt = hvp.linearize(net, loss, theta, X, Y)
    per_example = loop_grads(net, loss, theta, X, Y)
    np.testing.assert_allclose(pt.batch_grad(), per_example, rtol=1e-12, atol=1e-16)
    np.testing.assert_allclose(pt.variance(), 4 * (per_example ** 2).sum(axis=0) - per_example.sum(axis=0) ** 2,
                               rtol=1e-10, atol=1e-14)
    ggn = np.stack([pt.ggnvp(e) for e in np.eye(net.num_params)], axis=1)
    np.testing.assert_allclose(pt.diag_ggn(), np.diag(ggn), rtol=1e-12, atol=1e-16)


# K-FAC's blocks, in θ's order: layer 0, the block's layers 0, 2.0 (nested) and 3, layer 4
KFAC_BLOCKS = {0: (0, 16), (2, 0): (16, 36), (2, 2, 0): (36, 56), (2, 3): (56, 72), 4: (72, 82)}


@pytest.mark.parametrize("loss_kind", ["ce_labels", "mse"])
def test_kfac_of_one_example_is_the_block_diagonal_of_the_gauss_newton_matrix(loss_kind):
    """For one example each Linear layer's block of the Gauss-Newton matrix is ā āᵀ ⊗ Σ s sᵀ exactly: inside
    residual blocks (nested too) as outside. Oracle: Jᵀ H J from finite differences of the hand-written net."""
    rng = np.random.default_rng(5)
    net, theta, X = block_net(), block_net().init(4), rng.normal(size=(1, 3))
    y = rng.integers(0, 2, size=1) if loss_kind == "ce_labels" else rng.normal(size=(1, 2))
    loss = hvp.CrossEntropyLoss() if loss_kind == "ce_labels" else hvp.MSELoss()
    K = hvp.linearize(net, loss, theta, X, y).kfac(kind="exact")
    assert len(K.factors) == len(KFAC_BLOCKS)
    J = oracles.fd_jacobian(lambda t: ref_forward(t, X), theta)
    ggn = J.T @ oracles.ref_output_hessian(ref_forward(theta, X), y, loss_kind, "mean") @ J
    expected = np.zeros_like(ggn)
    for start, stop in KFAC_BLOCKS.values():
        expected[start:stop, start:stop] = ggn[start:stop, start:stop]
    dense = np.stack([K @ e for e in np.eye(net.num_params)], axis=1)
    np.testing.assert_allclose(dense, expected, rtol=1e-6, atol=1e-8 * np.abs(expected).max())


def test_kfac_input_factors_of_a_batch_are_the_means_of_each_layers_inputs(case):
    """A = mean ā āᵀ with ā each Linear layer's input (and a 1 for a bias), read off the hand-written net."""
    net, theta, X, y = case
    factors = hvp.linearize(net, hvp.CrossEntropyLoss(), theta, X, y).kronecker_factors(kind="exact")
    assert list(factors) == list(KFAC_BLOCKS)
    w = {key: theta[start:stop] for key, (start, stop) in KFAC_BLOCKS.items()}
    h = np.tanh(X @ w[0][:12].reshape(3, 4) + w[0][12:])
    a = 1 / (1 + np.exp(-(h @ w[2, 0][:16].reshape(4, 4) + w[2, 0][16:])))
    a2 = a + np.logaddexp(0, a @ w[2, 2, 0][:16].reshape(4, 4) + w[2, 2, 0][16:])
    h2 = np.tanh(h + a2 @ w[2, 3].reshape(4, 4))
    ones = np.ones((len(X), 1))
    inputs = {0: np.hstack([X, ones]), (2, 0): np.hstack([h, ones]), (2, 2, 0): np.hstack([a, ones]),
              (2, 3): a2, 4: np.hstack([h2, ones])}
    for key, I in inputs.items():
        np.testing.assert_allclose(factors[key][0], I.T @ I / len(X), rtol=1e-12, atol=1e-14)


def test_kfac_optimizer_trains_and_resumes_a_residual_cnn(tmp_path):
    rng = np.random.default_rng(8)
    block = hvp.Residual(hvp.Conv2d(2, 2, 3, padding=1), hvp.Tanh(), hvp.Conv2d(2, 2, 1))
    net = hvp.Sequential(hvp.Conv2d(1, 2, 2), hvp.Sigmoid(), block, hvp.Flatten(), hvp.Linear(18, 3))
    X, y = rng.normal(size=(16, 1, 4, 4)), rng.integers(0, 3, 16)
    assert_kfac_trains_and_resumes(net, hvp.CrossEntropyLoss(), net.init(2), X, y, tmp_path / "k.npz")
