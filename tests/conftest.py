"""Shared architectures, loss settings and a problem factory for the test suite.

Architectures are written as a tiny spec: a tuple of tokens, one per layer:

* ``"lin:M:N"`` / ``"lin:M:N:nobias"`` -- ``hvp.Linear(M, N, bias=...)``
* ``"relu"``, ``"tanh"``, ``"sigmoid"``, ``"softsign"``, ``"softplus"``, ``"identity"``
* ``"leaky"`` / ``"leaky:S"`` -- ``hvp.LeakyReLU()`` / ``hvp.LeakyReLU(negative_slope=S)``
* ``"elu"`` / ``"elu:A"`` -- ``hvp.ELU()`` / ``hvp.ELU(alpha=A)``
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))

import oracles  # noqa: E402

import hvp  # noqa: E402

# id -> spec.  Together these cover every activation, 1-4 Linear layers, mixed activations,
# consecutive activations, an activation on the output, and layers with and without bias.
ARCHS: dict[str, tuple[str, ...]] = {
    "lin3-2": ("lin:3:2",),
    "lin4-3_nobias": ("lin:4:3:nobias",),
    "relu_3-4-2": ("lin:3:4", "relu", "lin:4:2"),
    "leaky0.1_3-4-3": ("lin:3:4", "leaky:0.1", "lin:4:3"),
    "tanh_2-5-3": ("lin:2:5", "tanh", "lin:5:3"),
    "sigmoid_3-4-2": ("lin:3:4", "sigmoid", "lin:4:2"),
    "softsign_3-3-2": ("lin:3:3", "softsign", "lin:3:2"),
    "softplus_2-4-3": ("lin:2:4", "softplus", "lin:4:3"),
    "elu0.7_3-4-2": ("lin:3:4", "elu:0.7", "lin:4:2"),
    "identity_3-3-2": ("lin:3:3", "identity", "lin:3:2"),
    "tanh-sigmoid_3-4-3-2_mixedbias": ("lin:3:4", "tanh", "lin:4:3:nobias", "sigmoid", "lin:3:2"),
    "relu-softsign_nobias_3-4-3-2": ("lin:3:4:nobias", "relu", "lin:4:3:nobias", "softsign", "lin:3:2:nobias"),
    "double-act_tanh-sigmoid_2-4-3": ("lin:2:4", "tanh", "sigmoid", "lin:4:3"),
    "deep4_softplus-elu-tanh_out-leaky": (
        "lin:3:4", "softplus", "lin:4:3:nobias", "elu", "lin:3:4", "tanh", "lin:4:2", "leaky",
    ),
}

LOSS_KINDS = oracles.LOSS_KINDS
REDUCTIONS = oracles.REDUCTIONS

KINK_MARGIN = 1e-3


def build_net(spec):
    layers = []
    for tok in spec:
        parts = tok.split(":")
        name = parts[0]
        if name == "lin":
            bias = not (len(parts) > 3 and parts[3] == "nobias")
            layers.append(hvp.Linear(int(parts[1]), int(parts[2]), bias=bias))
        elif name == "relu":
            layers.append(hvp.ReLU())
        elif name == "leaky":
            layers.append(hvp.LeakyReLU() if len(parts) == 1 else hvp.LeakyReLU(negative_slope=float(parts[1])))
        elif name == "tanh":
            layers.append(hvp.Tanh())
        elif name == "sigmoid":
            layers.append(hvp.Sigmoid())
        elif name == "softsign":
            layers.append(hvp.Softsign())
        elif name == "softplus":
            layers.append(hvp.Softplus())
        elif name == "elu":
            layers.append(hvp.ELU() if len(parts) == 1 else hvp.ELU(alpha=float(parts[1])))
        elif name == "identity":
            layers.append(hvp.Identity())
        else:
            raise ValueError(f"unknown layer token {tok!r}")
    return hvp.Sequential(*layers)


def build_loss(kind: str, reduction: str):
    if kind in ("ce_labels", "ce_probs"):
        return hvp.CrossEntropyLoss(reduction=reduction)
    if kind == "mse":
        return hvp.MSELoss(reduction=reduction)
    if kind == "bce":
        return hvp.BCEWithLogitsLoss(reduction=reduction)
    raise ValueError(kind)


def draw_targets(rng, kind: str, B: int, C: int):
    if kind == "ce_labels":
        return rng.integers(0, C, size=B).astype(np.int64)
    if kind == "ce_probs":
        return rng.dirichlet(np.ones(C), size=B)
    if kind == "mse":
        return rng.standard_normal((B, C))
    if kind == "bce":
        return rng.uniform(0, 1, size=(B, C))
    raise ValueError(kind)


@dataclass
class Problem:
    spec: tuple[str, ...]
    kind: str
    reduction: str
    net: Any
    loss: Any
    theta: np.ndarray
    X: np.ndarray
    y: np.ndarray

    @property
    def layers(self):
        return self.net.layers

    @property
    def B(self) -> int:
        return self.X.shape[0]

    @property
    def C(self) -> int:
        return oracles.output_dim(self.net.layers)

    @property
    def P(self) -> int:
        return self.theta.size

    @property
    def dtype(self):
        return self.theta.dtype

    def ref_loss(self, theta=None, l2: float = 0.0) -> float:
        theta = self.theta if theta is None else theta
        return oracles.ref_loss(self.layers, theta, self.X, self.y, self.kind, self.reduction, l2)

    def loss_and_grad(self, theta=None, l2: float = 0.0):
        theta = self.theta if theta is None else theta
        return hvp.loss_and_grad(self.net, self.loss, theta, self.X, self.y, l2=l2)

    def linearize(self, theta=None, l2: float = 0.0):
        theta = self.theta if theta is None else theta
        return hvp.linearize(self.net, self.loss, theta, self.X, self.y, l2=l2)

    def weight_mask(self) -> np.ndarray:
        return oracles.weight_mask(self.layers)


def make_problem(spec, kind: str = "mse", reduction: str = "mean", batch: int = 4, seed: int = 0,
                 dtype=np.float64, theta_scale: float = 0.8) -> Problem:
    """A deterministic problem whose activation inputs stay at least KINK_MARGIN away from 0.

    theta is drawn from our own generator (not ``net.init``) so that pre-activations are O(1)
    and every nonlinearity contributes curvature.  For float32 the float64 draw is rounded once;
    the stored X, y and theta are exactly what the engine sees.
    """
    net = build_net(spec)
    layers = net.layers
    P = oracles.num_params(layers)
    m = oracles.input_dim(layers)
    C = oracles.output_dim(layers)
    rng = np.random.default_rng(seed)
    for _ in range(200):
        theta = rng.standard_normal(P) * theta_scale
        X = rng.standard_normal((batch, m))
        theta = theta.astype(dtype)
        X = X.astype(dtype)
        if oracles.min_abs_preactivation(layers, theta, X) > KINK_MARGIN:
            break
    else:  # pragma: no cover - practically unreachable for these sizes
        raise RuntimeError("could not draw a problem away from activation kinks")
    y = draw_targets(rng, kind, batch, C)
    if kind != "ce_labels":
        y = y.astype(dtype)
    return Problem(tuple(spec), kind, reduction, net, build_loss(kind, reduction), theta, X, y)


@pytest.fixture(scope="session", name="make_problem")
def make_problem_fixture():
    """Factory fixture: ``make_problem(spec, kind, reduction, batch=4, seed=0, dtype=np.float64)``."""
    return make_problem


@pytest.fixture(params=list(ARCHS.values()), ids=list(ARCHS.keys()))
def arch(request):
    return request.param


@pytest.fixture(params=LOSS_KINDS)
def loss_kind(request):
    return request.param


@pytest.fixture(params=REDUCTIONS)
def reduction(request):
    return request.param


@pytest.fixture
def problem(arch, loss_kind, reduction):
    """Every architecture x loss kind x reduction, batch 4, float64."""
    return make_problem(arch, loss_kind, reduction, batch=4, seed=0)


# --------------------------------------------------------------------------- optimizers


def loop_grads(net, loss, theta, X, y) -> np.ndarray:
    """Per-example gradients g_n (B, P), one example at a time through ``hvp.loss_and_grad`` (no L2 term).

    Each is example n's term of the reduced loss: a one-example batch's gradient times 1/B for mean
    reduction (a one-example batch divides by 1 or C, the full batch by B or B·C), 1 for sum.
    """
    B = len(X)
    rows = [hvp.loss_and_grad(net, loss, theta, X[n:n + 1], y[n:n + 1])[1] for n in range(B)]
    return np.stack(rows) * (1.0 / B if loss.reduction == "mean" else 1.0)


def logreg_loss_and_grad(theta, X, y, l2):
    """Oracle for one Linear layer + mean softmax cross-entropy + l2/2‖W‖²; θ = [W (m, C) in C order, b (C,)]."""
    B, m = X.shape
    C = theta.size // (m + 1)
    W, b = theta[:m * C].reshape(m, C), theta[m * C:]
    Z = X @ W + b
    Z = Z - Z.max(axis=1, keepdims=True)
    prob = np.exp(Z) / np.exp(Z).sum(axis=1, keepdims=True)
    value = -np.log(prob[np.arange(B), y]).mean() + 0.5 * l2 * np.sum(W * W)
    D = prob.copy()
    D[np.arange(B), y] -= 1
    D /= B
    return value, np.concatenate([(X.T @ D + l2 * W).ravel(), D.sum(axis=0)])


@dataclass
class LogReg:
    """An ill-conditioned (feature scales 0.1 … 10) L2-regularized multinomial logistic regression."""

    net: Any
    loss: Any
    X: np.ndarray
    y: np.ndarray
    l2: float
    theta_star: np.ndarray  # L-BFGS-B's optimum of the oracle objective
    lbfgs_nit: int

    @staticmethod
    def canonical(theta, C):
        """θ with the biases centred: the loss is constant along b + c·1 (the biases carry no L2)."""
        out = np.array(theta, dtype=np.float64)
        out[-C:] -= out[-C:].mean()
        return out


@pytest.fixture(scope="session")
def logreg():
    import scipy.optimize

    rng = np.random.default_rng(0)
    B, m, C, l2 = 200, 10, 4, 1e-2
    scales = np.logspace(-1, 1, m)
    X = rng.normal(size=(B, m)) * scales
    y = np.argmax(X @ (rng.normal(size=(m, C)) / scales[:, None]) + rng.gumbel(size=(B, C)), axis=1)
    res = scipy.optimize.minimize(logreg_loss_and_grad, np.zeros(m * C + C), args=(X, y, l2), jac=True,
                                  method="L-BFGS-B", options={"gtol": 1e-11, "ftol": 0.0, "maxiter": 20000})
    assert np.linalg.norm(res.jac) < 1e-7, res.message
    return LogReg(hvp.Sequential(hvp.Linear(m, C)), hvp.CrossEntropyLoss(), X, y, l2, res.x, res.nit)


# --------------------------------------------------------------------------- Hessian diagonals


def dense_diagonal(pt, P):
    """``np.diag`` of the dense Hessian ``pt.hvp(np.eye(P))``."""
    return np.diag(pt.hvp(np.eye(P, dtype=pt.theta.dtype)))


def fd_hessian_diagonal(f, theta, rel_step=2e-4):
    """``∂²f/∂θ_i²`` (P,) by second central differences of f, in float64, steps as oracles.fd_gradient's."""
    theta = np.array(theta, dtype=np.float64)
    h = rel_step * np.maximum(1.0, np.abs(theta))
    f0 = f(theta)
    out = np.empty_like(theta)
    for i in range(theta.size):
        tp, tm = theta.copy(), theta.copy()
        tp[i] += h[i]
        tm[i] -= h[i]
        out[i] = (f(tp) - 2 * f0 + f(tm)) / ((tp[i] - theta[i]) * (theta[i] - tm[i]))
    return out


def assert_kfac_trains_and_resumes(net, loss, theta0, X, y, path):
    """Six K-FAC steps lower the loss by 20%, and three steps, a checkpoint, a load and three more steps give
    the same θ bit for bit."""
    import optimizers

    straight = optimizers.KFAC(net, loss, theta0)
    straight.minimize((X, y), max_iters=6, gtol=0)
    first = optimizers.KFAC(net, loss, theta0)
    first.minimize((X, y), max_iters=3, gtol=0)
    first.save(path)
    resumed = optimizers.KFAC.load(path, net, loss)
    resumed.minimize((X, y), max_iters=3, gtol=0)
    np.testing.assert_array_equal(resumed.theta, straight.theta)
    assert straight.history[-1]["trial_loss"] < 0.8 * straight.history[0]["loss"]
