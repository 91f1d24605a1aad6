"""optimizers.KFAC against explicit re-derivations of Martens & Grosse (2015), and the shared interface.

No code is shared with optimizers/kfac.py: A = mean of ā āᵀ (ā = [I, 1]) from a float64 forward pass
written here, the preconditioner inverted with np.linalg on dense np.kron blocks, g a central
difference of oracles.ref_loss, the exact GGN oracles.ref_ggn, α and μ from an explicit 2×2 solve.
G is taken from ``hvp.linearize(...).kfac()``, which tests/test_kfac.py checks against oracles.
"""

from __future__ import annotations

import math

import numpy as np
import oracles
import pytest
import scipy.optimize
from conftest import build_net, logreg_loss_and_grad

import hvp
import optimizers

SMALL = ("lin:3:5", "tanh", "lin:5:3")
MLP = ("lin:3:8", "tanh", "lin:8:3")


def mlp_problem(spec=MLP, seed=0, B=64, dtype=np.float64):
    rng = np.random.default_rng(seed)
    net = build_net(spec)
    X = rng.normal(size=(B, 3)).astype(dtype)
    y = ((X[:, 0] * X[:, 1] > 0).astype(int) + (X[:, 2] > 0.5)).astype(np.int64)
    return net, hvp.CrossEntropyLoss(), net.init(seed=seed, dtype=dtype), X, y


# --------------------------------------------------------------------------- oracles


def layer_blocks(layers, theta, X):
    """Per Linear layer: (start, stop) of its slice W̄ = [W; b] of θ and A = mean ā āᵀ, by our own forward pass."""
    params = oracles.ref_unflatten(layers, np.asarray(theta, dtype=np.float64))
    h, blocks, pos = np.asarray(X, dtype=np.float64), [], 0
    for layer, p in zip(layers, params):
        if not oracles.is_linear(layer):
            h = oracles.activation(layer, h)
            continue
        Abar = np.hstack([h, np.ones((len(h), 1))]) if "bias" in p else h
        size = Abar.shape[1] * p["weight"].shape[1]
        blocks.append((pos, pos + size, Abar.T @ Abar / len(h)))
        pos += size
        h = h @ p["weight"] + p.get("bias", 0.0)
    return blocks


def dense_inverse(blocks, factors, damping, l2, pi):
    """Block diagonal of ((A + π√γ I) ⊗ (G + √γ/π I))⁻¹ (pi) or (A ⊗ G + γI)⁻¹, γ = λ + l2, by np.linalg.inv."""
    P, gamma = blocks[-1][1], damping + l2
    out = np.zeros((P, P))
    for (a, b, _), (A, G) in zip(blocks, factors):
        IA, IG = np.eye(len(A)), np.eye(len(G))
        if pi:
            p = np.sqrt((np.trace(A) / len(A)) / (np.trace(G) / len(G)))
            block = np.kron(A + p * np.sqrt(gamma) * IA, G + np.sqrt(gamma) / p * IG)
        else:
            block = np.kron(A, G) + gamma * np.eye(b - a)
        out[a:b, a:b] = np.linalg.inv(block)
    return out


def batch_factors(net, loss, theta, X, y, l2, kind="exact", seed=0):
    return [(A.astype(np.float64), G.astype(np.float64))
            for A, G in hvp.linearize(net, loss, theta, X, y, l2).kfac(kind=kind, seed=seed).factors]


def averaged(old, new, k, factor_decay):
    """The running average after step k (1-based): ε·old + (1 − ε)·new, ε = min(1 − 1/k, factor_decay)."""
    eps = min(1 - 1 / k, factor_decay)
    return new if old is None else [(eps * A0 + (1 - eps) * A1, eps * G0 + (1 - eps) * G1)
                                    for (A0, G0), (A1, G1) in zip(old, new)]


def close(actual, expected, rtol):
    expected = np.asarray(expected, dtype=np.float64)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * np.abs(expected).max())


# --------------------------------------------------------------------------- 1. one step, re-derived


@pytest.mark.parametrize("pi", [True, False], ids=["pi", "no_pi"])
@pytest.mark.parametrize("momentum", [False, True], ids=["no_momentum", "momentum"])
def test_steps_match_explicit_derivation(momentum, pi):
    net, loss, theta, X, y = mlp_problem(SMALL, seed=1, B=16)
    l2, layers = 0.05, net.layers
    opt = optimizers.KFAC(net, loss, theta, kind="exact", momentum=momentum, damping=0.1, pi=pi, l2=l2,
                          inverse_every=1, gamma_every=2)
    average, previous = None, np.zeros(net.num_params)
    for k in (1, 2, 3):
        damping = opt.damping  # 0.1, then whatever the damping rule made of it
        gamma = damping if opt.proposal_damping is None else opt.proposal_damping  # the proposal's damping
        blocks = layer_blocks(layers, theta, X)
        batch = [(A, G) for (_, _, A), (_, G) in zip(blocks, batch_factors(net, loss, theta, X, y, l2))]
        average = averaged(average, batch, k, 0.95)
        g = oracles.fd_gradient(lambda t: oracles.ref_loss(layers, t, X, y, "ce_labels", "mean", l2), theta)
        C = oracles.ref_ggn(layers, theta, X, y, "ce_labels", "mean", l2) + damping * np.eye(net.num_params)
        best = None  # every second step γ/2, γ, 2γ: the proposal whose step lowers the model most
        candidates = (gamma / 2, gamma, 2 * gamma) if k % 2 == 1 else (gamma,)
        for candidate in candidates:
            proposal = -dense_inverse(blocks, average, candidate, l2, pi) @ g
            V = np.stack([proposal, previous], axis=1) if momentum and k > 1 else proposal[:, None]
            coefficients = np.linalg.solve(V.T @ C @ V, -V.T @ g)  # minimizes ½ xᵀ(VᵀCV)x + (Vᵀg)ᵀx
            if V.shape[1] == 1:  # the 1-D case in closed form: α = −gᵀΔ / ΔᵀCΔ
                assert coefficients[0] == pytest.approx(-(g @ proposal) / (proposal @ C @ proposal), rel=1e-12)
            q = 0.5 * coefficients @ (V.T @ g)
            if best is None or q < best[0]:
                best = (q, candidate, V, coefficients)
        _, chosen, V, coefficients = best
        record = opt.step(X, y)
        assert record["accepted"] and record["damping"] == damping
        assert record["products"] == V.shape[1] + len(candidates) - 1
        assert record["proposal_damping"] == pytest.approx(chosen, rel=1e-12)
        assert record["alpha"] == pytest.approx(coefficients[0], rel=1e-6)
        assert record["mu"] == (pytest.approx(coefficients[1], rel=1e-6) if V.shape[1] == 2 else 0.0)
        close(opt.theta - theta, V @ coefficients, rtol=1e-6)
        q = 0.5 * coefficients @ (V.T @ g)  # M(δ) at the minimizer
        f0, f1 = (oracles.ref_loss(layers, t, X, y, "ce_labels", "mean", l2) for t in (theta, opt.theta))
        assert record["rho"] == pytest.approx((f1 - f0) / q, rel=1e-5)
        theta, previous = opt.theta.copy(), V @ coefficients


# --------------------------------------------------------------------------- 2. exponential averages


@pytest.mark.parametrize("factor_decay", [0.0, 0.6, 0.95], ids=["decay0", "decay0.6", "decay0.95"])
@pytest.mark.parametrize("kind", ["exact", "mc", "empirical"])
def test_factors_are_exponential_averages(kind, factor_decay):
    net, loss, theta0, X, y = mlp_problem(SMALL, seed=2, B=24)
    opt = optimizers.KFAC(net, loss, theta0, kind=kind, factor_decay=factor_decay, damping=1.0, l2=1e-3, seed=7)
    expected = None
    for k in (1, 2, 3, 4):  # ε = 0, 1/2, then min(2/3, decay), min(3/4, decay)
        batch = batch_factors(net, loss, opt.theta, X, y, 1e-3, kind, seed=np.random.default_rng((7, k - 1)))
        for (_, _, A), (A_hvp, _) in zip(layer_blocks(net.layers, opt.theta, X), batch):
            close(A_hvp, A, rtol=1e-12)
        expected = averaged(expected, batch, k, factor_decay)
        assert opt.step(X, y)["accepted"]
        assert len(opt._factors) == len(expected)
        for (A, G), (A_ref, G_ref) in zip(opt._factors.values(), expected):
            close(A, A_ref, rtol=1e-12)
            close(G, G_ref, rtol=1e-12)


# --------------------------------------------------------------------------- 3. convergence


# Measured steps to ‖g‖ <= 1e-7 (none rejected; λ starts at tr(K)/P ≈ 2.8; γ chosen every 5 steps): 54 by
# Nielsen's rule, 105 by Martens & Grosse's (λ·0.95⁵ at most every 5 steps). Bounds with ~30% margin.
@pytest.mark.parametrize("rule, bound", [("nielsen", 70), ("martens-grosse", 137)], ids=["nielsen", "martens-grosse"])
def test_logreg_reaches_lbfgs_optimum(logreg, rule, bound):
    C = logreg.net.out_features
    opt = optimizers.KFAC(logreg.net, logreg.loss, np.zeros(logreg.net.num_params), l2=logreg.l2, damping_rule=rule)
    res = opt.minimize((logreg.X, logreg.y), max_iters=2 * bound, gtol=1e-7)
    assert res.success and res.nit <= bound, (res.message, res.nit)
    value, grad = logreg_loss_and_grad(res.x, logreg.X, logreg.y, logreg.l2)
    assert np.linalg.norm(grad) < 1e-7
    assert value == pytest.approx(logreg_loss_and_grad(logreg.theta_star, logreg.X, logreg.y, logreg.l2)[0],
                                  rel=1e-12)
    np.testing.assert_allclose(logreg.canonical(res.x, C), logreg.canonical(logreg.theta_star, C), atol=1e-5)
    starts = [r["loss"] for r in res.history]
    assert all(b <= a for a, b in zip(starts, starts[1:]))


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("kind", ["exact", "mc", "empirical"])
def test_mlp_loss_halves_within_30_steps(kind, dtype):
    net, loss, theta0, X, y = mlp_problem(dtype=dtype)
    res = optimizers.KFAC(net, loss, theta0, kind=kind, l2=1e-4).minimize((X, y), max_iters=30, gtol=0.0)
    ref = [oracles.ref_loss(net.layers, t, X, y, "ce_labels", "mean", 1e-4) for t in (theta0, res.x)]
    assert ref[1] < 0.5 * ref[0]  # measured: below half within 7 steps, 0.03-0.05 of it after 30, every case
    assert res.x.dtype == dtype and res.nit == 30
    assert all(r["trial_loss"] < r["loss"] for r in res.history if r["accepted"])


@pytest.mark.parametrize("rule", ["nielsen", "martens-grosse"])
def test_damping_rule(rule):
    net, loss, theta0, X, y = mlp_problem(seed=3)
    every = 2
    opt = optimizers.KFAC(net, loss, theta0, damping=0.3, damping_rule=rule, damping_every=every)
    res = opt.minimize((X, y), max_iters=12, gtol=0.0)
    omega = (19 / 20) ** every
    for k, (r, nxt) in enumerate(zip(res.history, res.history[1:] + [{"damping": opt.damping}]), start=1):
        assert r["accepted"] and not r["rounding"]
        if rule == "nielsen":  # every step: λ·max(1/3, 1 − (2ρ − 1)³)
            factor = max(1 / 3, 1 - (2 * r["rho"] - 1) ** 3)
        else:  # every `every` accepted steps: λ·ω if ρ > 3/4, λ/ω if ρ < 1/4
            factor = 1.0 if k % every else omega if r["rho"] > 0.75 else 1 / omega if r["rho"] < 0.25 else 1.0
        assert nxt["damping"] == pytest.approx(r["damping"] * factor, rel=1e-14)
    assert opt.damping < 0.3  # the model was good: λ fell


# --------------------------------------------------------------------------- 4. nothing lost


class FaultyLoss(hvp.CrossEntropyLoss):
    """Cross-entropy gone wrong at trial points: every forward call after the first of a step."""

    def __init__(self):
        super().__init__()
        self.fault, self.calls = None, 0

    def forward(self, O, y):
        value, cache = super().forward(O, y)
        self.calls += 1
        if self.calls > 1 and self.fault == "raise":
            raise RuntimeError("injected fault")
        if self.calls > 1 and self.fault is not None:
            value = {"nan": np.nan, "inf": np.inf, "worse": value + 1.0}[self.fault]
        return value, cache


def snapshot(opt):
    return (opt.theta.copy(), opt._previous.copy(), opt._k, opt._since_refresh, opt._curvature,
            [M.copy() for pair in opt._factors.values() for M in pair])


def assert_same_state(opt, state):
    now = snapshot(opt)
    assert len(now[5]) == len(state[5])  # zip(strict=True) needs Python 3.10
    assert all(np.array_equal(a, b) for a, b in zip([*now[:2], *now[5]], [*state[:2], *state[5]]))
    assert now[2:4] == state[2:4] and now[4] is state[4]


@pytest.mark.parametrize("fault", ["nan", "inf", "worse", "nan_gradient"])
def test_faulty_step_is_rejected_state_unchanged(fault, monkeypatch):
    net, _, theta0, X, y = mlp_problem()
    loss = FaultyLoss()
    opt = optimizers.KFAC(net, loss, theta0, damping=0.5, inverse_every=2)
    assert opt.step(X, y)["accepted"] and opt.step(X, y)["accepted"]  # a momentum vector to keep;
    assert opt._previous.any() and opt._since_refresh == 1  # the rejected steps would refresh the inverse
    state, damping, gamma = snapshot(opt), opt.damping, opt.proposal_damping
    if fault == "nan_gradient":
        real = hvp.linearize

        def nan_gradient(*args, **kwargs):
            pt = real(*args, **kwargs)
            pt.grad.fill(np.nan)
            return pt

        monkeypatch.setattr(hvp, "linearize", nan_gradient)
    else:
        loss.fault = fault
    for r in range(3):
        loss.calls = 0
        assert not opt.step(X, y)["accepted"]
        assert_same_state(opt, state)
        assert opt.damping == pytest.approx(damping * math.prod(1.5 * 2**j for j in range(r + 1)), rel=1e-14)
        assert opt.proposal_damping == gamma  # the direction's damping stays
    monkeypatch.undo()
    loss.fault, loss.calls = None, 0
    assert opt.step(X, y)["accepted"] and not np.array_equal(opt.theta, state[0])  # recovers


def test_exception_mid_step_leaves_state_alone():
    net, _, theta0, X, y = mlp_problem()
    loss = FaultyLoss()
    opt = optimizers.KFAC(net, loss, theta0, kind="mc", inverse_every=2)
    opt.step(X, y), opt.step(X, y)  # the failing step would refresh the inverse
    state, damping, steps = snapshot(opt), opt.damping, len(opt.history)
    loss.fault, loss.calls = "raise", 0
    with pytest.raises(RuntimeError, match="injected fault"):
        opt.step(X, y)
    assert_same_state(opt, state)
    assert opt.damping == damping and len(opt.history) == steps


# --------------------------------------------------------------------------- 5. checkpoints


@pytest.mark.parametrize("kind, rule", [("exact", "nielsen"), ("mc", "martens-grosse")],
                         ids=["exact-nielsen", "mc-martens-grosse"])
def test_save_load_resumes_bit_identically(kind, rule, tmp_path):
    net, loss, theta0, X, y = mlp_problem(B=48)
    batches = [(X[:24], y[:24]), (X[24:], y[24:])]
    kwargs = dict(kind=kind, damping_rule=rule, inverse_every=3, l2=1e-3, damping_every=2)  # λ0 = tr(K)/P
    straight = optimizers.KFAC(net, loss, theta0, **kwargs)
    straight.minimize(batches, max_iters=10, gtol=0.0)
    first = optimizers.KFAC(net, loss, theta0, **kwargs)
    first.minimize(batches, max_iters=5, gtol=0.0)
    path = tmp_path / "kfac.npz"
    first.save(path)
    resumed = optimizers.KFAC.load(path, net, loss)
    resumed.minimize(batches, max_iters=5, gtol=0.0)
    refreshed = [r["inverse_refreshed"] for r in straight.history]
    assert refreshed[4:7] == [False, False, True]  # eigenvectors from before the save serve two steps after it
    assert np.array_equal(resumed.theta, straight.theta) and resumed.damping == straight.damping
    assert np.array_equal(resumed._previous, straight._previous)
    assert len(snapshot(resumed)[5]) == len(snapshot(straight)[5]) and len(resumed.history) == len(straight.history)
    assert all(np.array_equal(a, b) for a, b in zip(snapshot(resumed)[5], snapshot(straight)[5]))
    for a, b in zip(resumed.history, straight.history):
        a, b = dict(a), dict(b)
        a.pop("seconds"), b.pop("seconds")
        np.testing.assert_equal(a, b)
    with pytest.raises(ValueError, match="holds a KFAC optimizer, not a Adam"):
        optimizers.Adam.load(path, net, loss)


# --------------------------------------------------------------------------- 6. interface


def test_minimize_result_and_callback():
    net, loss, theta0, X, y = mlp_problem()
    theta_copy, seen = theta0.copy(), []
    res = optimizers.KFAC(net, loss, theta0).minimize([(X[:32], y[:32]), (X[32:], y[32:])], max_iters=10,
                                                      callback=lambda r: seen.append(r.step) or len(seen) == 3)
    assert isinstance(res, scipy.optimize.OptimizeResult)
    assert res.status == 3 and not res.success and res.nit == 3 == len(res.history) and seen == [0, 1, 2]
    assert np.array_equal(theta0, theta_copy)
    value, grad = hvp.loss_and_grad(net, loss, res.x, X[:32], y[:32])
    assert res.fun == value and np.array_equal(res.jac, grad)
    assert res.nhev == sum(r["products"] for r in res.history) and res.nfev == 2 * res.nit + 1
    assert set(res.history[0]) >= {"loss", "damping", "rho", "alpha", "mu", "accepted", "inverse_refreshed"}


def test_minimize_stops_at_gtol_without_moving():
    net, loss, theta0, X, y = mlp_problem()
    opt = optimizers.KFAC(net, loss, theta0)
    res = opt.minimize((X, y), max_iters=5, gtol=1e6)
    assert res.success and res.nit == 0 and res.history == [] and np.array_equal(res.x, theta0)
    assert opt._factors is None and opt.damping is None


def test_progress_lines(capsys):
    net, loss, theta0, X, y = mlp_problem()
    optimizers.KFAC(net, loss, theta0, progress="lines").minimize((X, y), max_iters=3, gtol=0.0)
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    assert len(lines) == 3 and err == ""
    assert all(s in line for line in lines for s in ("λ", "ρ", "α", "μ", "accepted"))


# --------------------------------------------------------------------------- 7. bad arguments

BAD = {
    "kind": ({"kind": "fisher"}, ValueError, "kind must be one of"),
    "num_samples_zero": ({"kind": "mc", "num_samples": 0}, ValueError, "num_samples must be an int >= 1"),
    "num_samples_float": ({"num_samples": 2.0}, TypeError, "num_samples must be an int"),
    "damping_zero": ({"damping": 0.0}, ValueError, "damping must be a finite number > 0"),
    "damping_str": ({"damping": "1"}, TypeError, "damping must be a real number"),
    "damping_rule": ({"damping_rule": "martens"}, ValueError, "damping_rule must be one of"),
    "damping_every": ({"damping_every": 0}, ValueError, "damping_every must be an int >= 1"),
    "factor_decay_one": ({"factor_decay": 1.0}, ValueError, r"factor_decay must lie in \[0, 1\)"),
    "factor_decay_negative": ({"factor_decay": -0.1}, ValueError, "factor_decay must be a finite number >= 0"),
    "inverse_every": ({"inverse_every": 0}, ValueError, "inverse_every must be an int >= 1"),
    "inverse_every_float": ({"inverse_every": 2.5}, TypeError, "inverse_every must be an int"),
    "pi": ({"pi": 1}, TypeError, "pi must be True or False"),
    "momentum": ({"momentum": "yes"}, TypeError, "momentum must be True or False"),
    "adapt_damping": ({"adapt_damping": None}, TypeError, "adapt_damping must be True or False"),
    "seed": ({"seed": -1}, ValueError, "seed must be an int >= 0"),
    "l2": ({"l2": -1.0}, ValueError, "l2 must be a finite number >= 0"),
    "progress": ({"progress": "verbose"}, ValueError, "progress must be one of"),
}


@pytest.mark.parametrize("kwargs, error, match", list(BAD.values()), ids=list(BAD))
def test_bad_arguments(kwargs, error, match):
    net, loss, theta0, _, _ = mlp_problem()
    with pytest.raises(error, match=match):
        optimizers.KFAC(net, loss, theta0, **kwargs)


def test_bad_net_loss_theta():
    net, loss, theta0, _, _ = mlp_problem()
    with pytest.raises(TypeError, match="net must be an hvp.Sequential"):
        optimizers.KFAC("net", loss, theta0)
    with pytest.raises(TypeError, match="loss must be an hvp loss"):
        optimizers.KFAC(net, lambda O, y: 0.0, theta0)
    with pytest.raises(ValueError, match="theta must have shape"):
        optimizers.KFAC(net, loss, theta0[:-1])
    with pytest.raises(ValueError, match="at least one layer with parameters"):  # refused before KFAC
        hvp.Sequential(hvp.Tanh())
