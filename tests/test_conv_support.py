"""What works on networks with convolutions, pooling and flatten beyond the products, and what says it does not."""

import numpy as np
import pytest
from conftest import loop_grads

import hvp


def pooled_mlp():
    """Parameter-free layers before the first Linear one: every per-example quantity applies."""
    return hvp.Sequential(hvp.MaxPool2d(2), hvp.Flatten(), hvp.Linear(4, 3), hvp.Tanh(), hvp.Linear(3, 2))


def test_per_example_quantities_after_pooling_match_a_loop_over_examples():
    rng = np.random.default_rng(0)
    net, loss = pooled_mlp(), hvp.CrossEntropyLoss()
    theta, X, y = net.init(0), rng.normal(size=(5, 1, 4, 4)), rng.integers(0, 2, 5)
    pt = hvp.linearize(net, loss, theta, X, y)
    per_example = loop_grads(net, loss, theta, X, y)
    np.testing.assert_allclose(pt.batch_grad(), per_example, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(pt.sum_grad_squared(), (per_example ** 2).sum(axis=0), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(pt.batch_l2(), (per_example ** 2).sum(axis=1), rtol=1e-12, atol=1e-15)
    dense = np.stack([pt.hvp(e) for e in np.eye(net.num_params)], axis=1)
    np.testing.assert_allclose(pt.diag_hessian(), np.diag(dense), rtol=1e-12, atol=1e-15)


def cnn():
    """Grouped and strided convolutions, pooling, activations between: every per-example piece of a convolution."""
    return hvp.Sequential(hvp.Conv2d(2, 4, 3, padding=1, groups=2), hvp.Tanh(), hvp.MaxPool2d(2),
                          hvp.Conv2d(4, 3, (2, 1), stride=(1, 2)), hvp.Sigmoid(), hvp.Flatten(), hvp.Linear(3, 3))


@pytest.mark.parametrize("kind", ["ce_labels", "mse"])
def test_per_example_quantities_of_a_cnn_match_a_loop_over_examples(kind):
    rng = np.random.default_rng(1)
    net = cnn()
    theta, X = net.init(0), rng.normal(size=(6, 2, 4, 4))
    loss, y = (hvp.CrossEntropyLoss(), rng.integers(0, 3, 6)) if kind == "ce_labels" else (hvp.MSELoss(),
                                                                                           rng.normal(size=(6, 3)))
    pt = hvp.linearize(net, loss, theta, X, y, l2=0.1)  # the L2 term is in no per-example quantity
    per_example = loop_grads(net, loss, theta, X, y)
    np.testing.assert_allclose(pt.batch_grad(), per_example, rtol=1e-12, atol=1e-16)
    np.testing.assert_allclose(pt.sum_grad_squared(), (per_example ** 2).sum(axis=0), rtol=1e-12, atol=1e-18)
    np.testing.assert_allclose(pt.batch_l2(), (per_example ** 2).sum(axis=1), rtol=1e-12, atol=1e-18)
    variance = (6 * per_example).var(axis=0)  # of ∇ℓ_n = B·g_n, example n's own loss (mean reduction)
    np.testing.assert_allclose(pt.variance(), variance, rtol=1e-10, atol=1e-14)  # Σ_n g_n from the squares' pass
    pt.grad  # noqa: B018 (the gradient read first: variance takes it instead)
    np.testing.assert_allclose(pt.variance(), variance, rtol=1e-10, atol=1e-14)
    ggn = np.stack([pt.ggnvp(e) for e in np.eye(net.num_params)], axis=1)
    np.testing.assert_allclose(pt.diag_ggn(), np.diag(ggn), rtol=1e-12, atol=1e-16)


def test_small_blocks_of_examples_give_the_same_squares(monkeypatch):
    rng = np.random.default_rng(2)
    net = cnn()
    pt = hvp.linearize(net, hvp.CrossEntropyLoss(), net.init(0), rng.normal(size=(6, 2, 4, 4)), rng.integers(0, 3, 6))
    def quantities():
        return pt.diag_ggn(), pt.batch_l2(), pt.diag_hessian(), pt.kfac(kind="exact").factors[0][0]

    whole = quantities()
    monkeypatch.setattr(hvp.Conv2d, "PER_EXAMPLE_BYTES", 1)  # one example per block
    monkeypatch.setattr(hvp.Conv2d, "CHUNK_BYTES", 1)  # and per chunk of the taps' loops
    for a, b in zip(whole, quantities()):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-18)


def fd_input_jacobian(net, theta, X, eps=1e-6):
    """∂O_b/∂X_b (B, C, *s) by central differences of the forward pass, one input entry at a time."""
    B, s = X.shape[0], X.shape[1:]
    columns = []
    for j in range(int(np.prod(s))):
        E = np.zeros(s)
        E.flat[j] = eps
        columns.append((net.forward(theta, X + E) - net.forward(theta, X - E)) / (2 * eps))
    return np.stack(columns, axis=-1).reshape((B, -1) + s)


def test_input_jacobian_of_a_cnn_against_finite_differences():
    rng = np.random.default_rng(4)
    net = cnn()
    theta, X = net.init(0), rng.normal(size=(3, 2, 4, 4))
    J = hvp.input_jacobian(net, theta, X)
    assert J.shape == (3, 3, 2, 4, 4)
    np.testing.assert_allclose(J, fd_input_jacobian(net, theta, X), rtol=1e-6, atol=1e-9)
    V = rng.normal(size=(3, 2, 2, 4, 4))  # two directions per example
    _, dO = hvp.input_jvp(net, theta, X, V)
    np.testing.assert_allclose(dO, np.einsum("bcs,bks->bkc", J.reshape(3, 3, -1), V.reshape(3, 2, -1)),
                               rtol=1e-10, atol=1e-12)


def residual_cnn():
    """Convolutions inside nested residual blocks, smooth activations inside and between."""
    inner = hvp.Residual(hvp.Conv2d(3, 3, 1), hvp.Tanh())
    block = hvp.Residual(hvp.Conv2d(3, 3, 3, padding=1), hvp.Softplus(), inner)
    return hvp.Sequential(hvp.Conv2d(2, 3, 3, padding=1), hvp.Tanh(), block, hvp.AvgPool2d(2), hvp.Flatten(),
                          hvp.Linear(12, 3))


@pytest.mark.parametrize("make", [cnn, residual_cnn], ids=["cnn", "residual_cnn"])
def test_jacobian_penalty_gradient_of_a_cnn_against_finite_differences(make):
    """L(θ) = CE + 0.3·mean_b ‖(∂O_b/∂X_b) V‖²: its gradient from rule 4 against differences of L's value,
    the value itself against the penalty built from the finite-difference Jacobian."""
    rng = np.random.default_rng(5)
    net = make()
    theta, X, y = net.init(0), rng.normal(size=(3, 2, 4, 4)), rng.integers(0, 3, 3)
    V = rng.normal(size=(2, 2, 4, 4))  # two directions shared by all examples
    loss = hvp.JacobianPenalty(hvp.CrossEntropyLoss(), 0.3)
    value, grad = hvp.tangent_loss_and_grad(net, loss, theta, X, y, V)
    J = fd_input_jacobian(net, theta, X).reshape(3, 3, -1)
    penalty = np.sum(np.einsum("bcs,ks->bkc", J, V.reshape(2, -1)) ** 2) / 3
    assert value == pytest.approx(hvp.loss_and_grad(net, hvp.CrossEntropyLoss(), theta, X, y)[0] + 0.3 * penalty,
                                  rel=1e-7)

    def f(t):
        return hvp.tangent_loss_and_grad(net, loss, t, X, y, V)[0]

    eps = 1e-6
    fd = np.array([(f(theta + eps * e) - f(theta - eps * e)) / (2 * eps) for e in np.eye(net.num_params)])
    np.testing.assert_allclose(grad, fd, rtol=1e-5, atol=1e-8)


TANGENT_NETS = {
    "conv2d-grouped-pool": cnn,
    "conv1d-strided-avgpool": lambda: hvp.Sequential(hvp.Conv1d(2, 3, 3, stride=2, padding=1), hvp.Softplus(),
                                                     hvp.AvgPool1d(2), hvp.Flatten(), hvp.Linear(3, 3)),
    "conv2d-nested-residual": residual_cnn,
}


@pytest.mark.parametrize("shared", [True, False], ids=["directions-shared", "directions-per-example"])
@pytest.mark.parametrize("name", list(TANGENT_NETS))
def test_tangent_sum_grad_squared_of_a_cnn_matches_a_loop_over_examples(name, shared):
    """With a sum reduction, example b's term of the loss is the loss of example b alone: its gradient from
    tangent_loss_and_grad on that example (checked against finite differences above), squared and summed."""
    rng = np.random.default_rng(6)
    net = TANGENT_NETS[name]()
    X = rng.normal(size=(4, 2, 4, 4)) if name.startswith("conv2d") else rng.normal(size=(4, 2, 6))
    theta, y = net.init(1), rng.integers(0, 3, 4)
    V = rng.normal(size=(2,) + X.shape[1:]) if shared else rng.normal(size=(4, 2) + X.shape[1:])
    loss = hvp.JacobianPenalty(hvp.CrossEntropyLoss(reduction="sum"), 0.4)
    per_example = np.stack([hvp.tangent_loss_and_grad(net, loss, theta, X[b:b + 1], y[b:b + 1],
                                                      V if shared else V[b:b + 1])[1] for b in range(4)])
    got = hvp.tangent_sum_grad_squared(net, loss, theta, X, y, V)
    np.testing.assert_allclose(got, (per_example ** 2).sum(axis=0), rtol=1e-11, atol=1e-14)
    assert np.abs(per_example).sum(axis=0).min() > 0


@pytest.mark.parametrize("X_shape, match", [
    ((2, 4, 4), r"X must be 4-D of shape \(batch, 1, H, W\), got 3-D"),
    ((2, 3, 4, 4), r"X must have 1 channels \(axis 1\)"),
    ((2, 1, 3, 3), r"layer 3 does not fit X of per-example shape \(1, 3, 3\).*Linear\(18, 2.*expects 18.*gives 8"),
    ((2, 1, 1, 4), r"layer 0 does not fit.*kernel spans 2 along spatial axis 0, more than the padded input's 1"),
], ids=["rank", "channels", "linear-width", "kernel-too-large"])
def test_input_shapes_are_checked_layer_by_layer(X_shape, match):
    net = hvp.Sequential(hvp.Conv2d(1, 2, 2), hvp.ReLU(), hvp.Flatten(), hvp.Linear(18, 2))
    with pytest.raises(ValueError, match=match):
        hvp.loss_and_grad(net, hvp.CrossEntropyLoss(), net.init(0), np.ones(X_shape), np.zeros(2, dtype=int))


def test_outputs_must_be_two_dimensional():
    net = hvp.Sequential(hvp.Conv1d(1, 2, 2))
    with pytest.raises(ValueError, match=r"outputs must have shape \(batch, C\).*\(2, 3\).*Flatten"):
        net.forward(net.init(0), np.ones((2, 1, 4)))
