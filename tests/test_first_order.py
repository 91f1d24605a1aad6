"""SGD with momentum and Adam: updates against explicit formulas on an oracle gradient, and the shared interface."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import build_net, logreg_loss_and_grad

import hvp
import optimizers

STEPS = 4


def sgd_reference(theta, grad_fn, lr, momentum, nesterov):
    buf = None
    for _ in range(STEPS):
        g = grad_fn(theta)
        buf = g if buf is None else momentum * buf + g
        theta = theta - lr * (g + momentum * buf if nesterov else buf)
    return theta


def adam_reference(theta, grad_fn, lr, b1, b2, eps):
    m = v = np.zeros_like(theta)
    for t in range(1, STEPS + 1):
        g = grad_fn(theta)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        theta = theta - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    return theta


CASES = {
    "sgd": (optimizers.SGD, {"lr": 0.05, "momentum": 0.0, "nesterov": False}),
    "sgd_momentum": (optimizers.SGD, {"lr": 0.05, "momentum": 0.9, "nesterov": False}),
    "sgd_nesterov": (optimizers.SGD, {"lr": 0.05, "momentum": 0.8, "nesterov": True}),
    "adam": (optimizers.Adam, {"lr": 0.01, "betas": (0.9, 0.999), "eps": 1e-8}),
    "adam_betas": (optimizers.Adam, {"lr": 0.03, "betas": (0.5, 0.9), "eps": 1e-3}),
}


@pytest.mark.parametrize("cls, kwargs", list(CASES.values()), ids=list(CASES))
def test_updates_match_explicit_formulas(logreg, cls, kwargs):
    rng = np.random.default_rng(0)
    theta0 = rng.normal(size=logreg.net.num_params) * 0.1
    opt = cls(logreg.net, logreg.loss, theta0, l2=logreg.l2, **kwargs)
    for _ in range(STEPS):
        assert opt.step(logreg.X, logreg.y)["accepted"]

    def grad_fn(t):
        return logreg_loss_and_grad(t, logreg.X, logreg.y, logreg.l2)[1]

    if cls is optimizers.SGD:
        expected = sgd_reference(theta0, grad_fn, **kwargs)
    else:
        expected = adam_reference(theta0, grad_fn, kwargs["lr"], *kwargs["betas"], kwargs["eps"])
    np.testing.assert_allclose(opt.theta, expected, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("cls, kwargs", list(CASES.values()), ids=list(CASES))
def test_trajectory_matches_torch(logreg, cls, kwargs):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    theta0 = rng.normal(size=logreg.net.num_params) * 0.1
    opt = cls(logreg.net, logreg.loss, theta0, l2=logreg.l2, **kwargs)
    param = torch.tensor(theta0, dtype=torch.float64, requires_grad=True)
    if cls is optimizers.SGD:
        ref = torch.optim.SGD([param], **kwargs)
    else:
        ref = torch.optim.Adam([param], **kwargs)
    for _ in range(STEPS):
        opt.step(logreg.X, logreg.y)
        ref.zero_grad()
        param.grad = torch.tensor(logreg_loss_and_grad(param.detach().numpy(), logreg.X, logreg.y, logreg.l2)[1])
        ref.step()
    np.testing.assert_allclose(opt.theta, param.detach().numpy(), rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("cls, kwargs", [(optimizers.SGD, {"lr": 0.2}), (optimizers.Adam, {"lr": 0.02})],
                         ids=["sgd", "adam"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
def test_loss_falls_on_mlp(cls, kwargs, dtype):
    rng = np.random.default_rng(2)
    net = build_net(("lin:3:8", "tanh", "lin:8:3"))
    X = rng.normal(size=(64, 3)).astype(dtype)
    y = (X[:, 0] > 0).astype(np.int64) + (X[:, 1] > 0.5)
    opt = cls(net, hvp.CrossEntropyLoss(), net.init(seed=0, dtype=dtype), **kwargs)
    res = opt.minimize((X, y), max_iters=100, gtol=0.0)
    assert res.fun < 0.6 * res.history[0]["loss"]
    assert res.x.dtype == dtype and res.nit == 100 and res.nhev == 0


@pytest.mark.parametrize("cls", [optimizers.SGD, optimizers.Adam], ids=["sgd", "adam"])
def test_save_load_resumes_bit_identically(cls, tmp_path):
    rng = np.random.default_rng(3)
    net = build_net(("lin:3:6", "tanh", "lin:6:2"))
    loss = hvp.CrossEntropyLoss()
    X, y = rng.normal(size=(40, 3)), rng.integers(0, 2, size=40)
    batches = [(X[:20], y[:20]), (X[20:], y[20:])]
    theta0 = net.init(seed=1)
    straight = cls(net, loss, theta0, lr=0.05, l2=1e-3)
    straight.minimize(batches, max_iters=10, gtol=0.0)
    first = cls(net, loss, theta0, lr=0.05, l2=1e-3)
    first.minimize(batches, max_iters=5, gtol=0.0)
    first.save(tmp_path / "s.npz")
    resumed = cls.load(tmp_path / "s.npz", net, loss)
    resumed.minimize(batches, max_iters=5, gtol=0.0)
    assert np.array_equal(resumed.theta, straight.theta)
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in straight.history]


@pytest.mark.parametrize("cls", [optimizers.SGD, optimizers.Adam], ids=["sgd", "adam"])
def test_nonfinite_gradient_is_rejected(cls, monkeypatch):
    rng = np.random.default_rng(4)
    net = build_net(("lin:3:4",))
    X, y = rng.normal(size=(8, 3)), rng.integers(0, 4, size=8)
    opt = cls(net, hvp.CrossEntropyLoss(), net.init(seed=0), lr=0.1)
    opt.step(X, y)
    before = (opt.theta.copy(), opt.t)
    monkeypatch.setattr(hvp, "loss_and_grad", lambda *a, **k: (np.nan, np.full(net.num_params, np.nan)))
    record = opt.step(X, y)
    assert not record["accepted"] and np.array_equal(opt.theta, before[0]) and opt.t == before[1]


@pytest.mark.parametrize("cls, kwargs, error, match", [
    (optimizers.SGD, {"lr": 0.0}, ValueError, "lr must be a finite number > 0"),
    (optimizers.SGD, {"momentum": 1.0}, ValueError, r"momentum must lie in \[0, 1\)"),
    (optimizers.SGD, {"nesterov": 1}, TypeError, "nesterov must be True or False"),
    (optimizers.Adam, {"betas": (0.9,)}, TypeError, "betas must be a pair"),
    (optimizers.Adam, {"betas": (0.9, 1.0)}, ValueError, r"betas must lie in \[0, 1\)"),
    (optimizers.Adam, {"eps": -1e-8}, ValueError, "eps must be a finite number > 0"),
    (optimizers.Adam, {"lr": "fast"}, TypeError, "lr must be a real number"),
], ids=["sgd_lr", "sgd_momentum", "sgd_nesterov", "adam_betas_len", "adam_beta2", "adam_eps", "adam_lr_type"])
def test_bad_arguments(cls, kwargs, error, match):
    net = build_net(("lin:3:4",))
    with pytest.raises(error, match=match):
        cls(net, hvp.CrossEntropyLoss(), net.init(), **kwargs)
