"""NewtonCG (Martens' Hessian-free recipe), its CG, and the scipy-style newton_cg bridge."""

from __future__ import annotations

import math

import numpy as np
import oracles
import pytest
import scipy.optimize
from conftest import build_net, logreg_loss_and_grad

import hvp
import optimizers
from optimizers import _cg, _damping, hessian_free

MLP = ("lin:3:8", "tanh", "lin:8:3")


def mlp_problem(seed=0, B=64, dtype=np.float64):
    rng = np.random.default_rng(seed)
    net = build_net(MLP)
    X = rng.normal(size=(B, 3)).astype(dtype)
    y = ((X[:, 0] * X[:, 1] > 0).astype(int) + (X[:, 2] > 0.5)).astype(np.int64)
    return net, hvp.CrossEntropyLoss(), net.init(seed=seed, dtype=dtype), X, y


def spd_system(P=40, cond=1e3, seed=0):
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.normal(size=(P, P)))
    A = (Q * np.logspace(0, np.log10(cond), P)) @ Q.T
    return A, rng.normal(size=P)


def phi(A, g, x):
    return 0.5 * x @ A @ x + g @ x


# --------------------------------------------------------------------------- convergence


@pytest.mark.parametrize("curvature", ["ggn", "hessian"])
def test_logreg_reaches_lbfgs_optimum_superlinearly(logreg, curvature):
    C = logreg.net.out_features
    opt = optimizers.NewtonCG(logreg.net, logreg.loss, np.zeros(logreg.net.num_params), curvature=curvature,
                              l2=logreg.l2)
    res = opt.minimize((logreg.X, logreg.y), max_iters=60, gtol=5e-9)
    assert res.success, res.message
    value, grad = logreg_loss_and_grad(res.x, logreg.X, logreg.y, logreg.l2)
    assert np.linalg.norm(grad) < 1e-8
    assert value == pytest.approx(logreg_loss_and_grad(logreg.theta_star, logreg.X, logreg.y, logreg.l2)[0],
                                  rel=1e-12)
    np.testing.assert_allclose(logreg.canonical(res.x, C), logreg.canonical(logreg.theta_star, C), atol=1e-6)
    assert res.nit * 5 < logreg.lbfgs_nit  # far fewer outer iterations than L-BFGS-B
    # Superlinear: in the final phase the contraction ‖g_{k+1}‖/‖g_k‖ itself keeps falling.
    norms = [r["grad_norm"] for r in res.history if r["accepted"]] + [np.linalg.norm(grad)]
    tail = np.array([g for g in norms if g < 1e-3])
    ratios = tail[1:] / tail[:-1]
    assert len(ratios) >= 4
    slope = np.polyfit(np.arange(len(ratios)), np.log(ratios), 1)[0]
    assert slope < -0.1, ratios
    assert ratios[-3:].max() < 0.2, ratios


@pytest.mark.parametrize("curvature", ["ggn", "hessian"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
def test_mlp_loss_falls_across_accepted_steps(curvature, dtype):
    net, loss, theta0, X, y = mlp_problem(dtype=dtype)
    opt = optimizers.NewtonCG(net, loss, theta0, curvature=curvature, l2=1e-4)
    res = opt.minimize((X, y), max_iters=15, gtol=0.0)
    accepted = [r for r in res.history if r["accepted"]]
    assert len(accepted) >= 10
    ref = [oracles.ref_loss(net.layers, r_theta, X, y, "ce_labels", "mean", 1e-4) for r_theta in [theta0, res.x]]
    assert ref[1] < 0.5 * ref[0]
    for r in accepted:
        assert r["trial_loss"] < r["loss"]
    starts = [r["loss"] for r in res.history]
    assert all(b <= a for a, b in zip(starts, starts[1:]))
    assert res.x.dtype == dtype


SWITCHES = {
    "no_preconditioner": {"precondition": False},
    "no_warm_start": {"warm_start": 0.0},
    "no_backtracking": {"backtrack": False},
    "no_line_search": {"line_search": False},
    "no_forcing_rule": {"cg_forcing": False},
    "cg_cap_only": {"cg_progress_tol": None, "cg_forcing": False, "cg_max_iter": 30},
    "fixed_damping": {"adapt_damping": False, "damping": 0.1},
    "curvature_batch_quarter": {"curvature_batch": 0.25},
    "curvature_batch_rows": {"curvature_batch": 10},
    "hessian_all_off": {"curvature": "hessian", "precondition": False, "warm_start": 0.0, "backtrack": False,
                        "line_search": False},
}


@pytest.mark.parametrize("kwargs", list(SWITCHES.values()), ids=list(SWITCHES))
def test_each_switch_still_descends(kwargs):
    net, loss, theta0, X, y = mlp_problem(seed=1)
    opt = optimizers.NewtonCG(net, loss, theta0, **kwargs)
    res = opt.minimize((X, y), max_iters=10, gtol=0.0)
    assert sum(r["accepted"] for r in res.history) >= 5
    assert res.fun < 0.7 * res.history[0]["loss"]
    if kwargs.get("cg_progress_tol", 5e-4) is None:
        assert {r["cg_stop"] for r in res.history} <= {"max_iter", "converged"}


def test_undamped_with_untouched_parameters():
    """λ = 0 and an all-zero input column: Σ g_n² is 0 on that column's weights, the preconditioner still works."""
    net, loss, theta0, X, y = mlp_problem(seed=2)
    X = X.copy()
    X[:, 1] = 0.0
    opt = optimizers.NewtonCG(net, loss, theta0, damping=0.0, adapt_damping=False)
    res = opt.minimize((X, y), max_iters=8, gtol=0.0)
    assert np.isfinite(res.x).all() and sum(r["accepted"] for r in res.history) >= 4
    assert res.fun < 0.8 * res.history[0]["loss"]
    first_rejection = next(r for r in res.history if not r["accepted"])  # the undamped GGN step overshoots here
    assert first_rejection["damping"] == 0.0
    assert res.history[first_rejection["step"] + 1]["damping"] == pytest.approx(first_rejection["grad_norm"])


# --------------------------------------------------------------------------- CG


@pytest.mark.parametrize("precondition", [False, True], ids=["plain", "preconditioned"])
def test_cg_solves_spd_system(precondition):
    A, g = spd_system()
    M = np.diag(A) ** 0.75 if precondition else None
    res = _cg.pcg(lambda v: A @ v, g, precond=M, max_iter=500, progress_tol=None, rtol=1e-12)
    assert res.stop == "converged"
    np.testing.assert_allclose(res.x, np.linalg.solve(A, -g), rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(res.phis[-1], phi(A, g, res.x), rtol=1e-10)
    assert res.products == res.iterations


def test_cg_progress_rule_stops_where_it_first_holds():
    A, g = spd_system(P=300, cond=1e4, seed=1)  # stops near i = 110, where k = ⌈0.1·i⌉ > 10
    res = _cg.pcg(lambda v: A @ v, g, max_iter=300)
    assert res.stop == "progress"
    for _, x, value in res.iterates:  # the φ values CG tracks are the model's
        np.testing.assert_allclose(value, phi(A, g, x), rtol=1e-9)

    def rule(i):  # Martens 2010 §4.4, restated: i > k, φ_i < 0, (φ_i − φ_{i−k})/φ_i < k·5e-4
        k = max(10, math.ceil(0.1 * i))
        return i > k and res.phis[i] < 0 and (res.phis[i] - res.phis[i - k]) / res.phis[i] < k * 5e-4

    assert rule(res.iterations)
    assert not any(rule(i) for i in range(1, res.iterations))
    assert 100 < res.iterations < 300


def test_cg_keeps_iterates_at_martens_schedule():
    A, g = spd_system(P=120, cond=1e5, seed=2)
    res = _cg.pcg(lambda v: A @ v, g, max_iter=60, progress_tol=None, rtol=0.0)
    expected, x = set(), 5.0
    while x <= 60 + 1e-9:  # ⌈5·1.3ʲ⌉: 5, 7, 9, 11, 15, 19, 25, 32, 41, 54
        expected.add(math.ceil(x - 1e-9))
        x *= 1.3
    expected.add(60)
    assert [i for i, _, _ in res.iterates] == sorted(expected)
    assert sorted(expected)[:6] == [5, 7, 9, 11, 15, 19]
    assert res.iterates[-1][0] == res.iterations == 60


def test_cg_negative_curvature_ends_safely():
    rng = np.random.default_rng(3)
    Q, _ = np.linalg.qr(rng.normal(size=(30, 30)))
    A = (Q * np.linspace(-1, 5, 30)) @ Q.T
    g = rng.normal(size=30)
    res = _cg.pcg(lambda v: A @ v, g, max_iter=100)
    assert res.stop == "negative curvature"
    assert np.isfinite(res.x).all() and phi(A, g, res.x) < 0
    # Negative curvature along the very first direction: the steepest-descent direction −M⁻¹g.
    M = np.full(30, 2.0)
    res = _cg.pcg(lambda v: -v, g, precond=M)
    assert res.stop == "negative curvature" and res.iterations == 1
    np.testing.assert_allclose(res.x, -g / M)
    assert g @ res.x < 0


def test_cg_warm_start():
    A, g = spd_system(P=50, cond=1e4, seed=4)
    cold = _cg.pcg(lambda v: A @ v, g, max_iter=500, progress_tol=None, rtol=1e-12)
    near = 0.95 * cold.x
    warm = _cg.pcg(lambda v: A @ v, g, x0=near, max_iter=500, progress_tol=None, rtol=1e-12)
    assert warm.phis[0] == pytest.approx(phi(A, g, near))
    assert warm.products == warm.iterations + 1
    np.testing.assert_allclose(warm.x, cold.x, rtol=1e-8, atol=1e-10)
    bad = _cg.pcg(lambda v: A @ v, g, x0=-cold.x * 3, max_iter=5, progress_tol=None)  # φ(x0) > 0: dropped
    assert bad.phis[0] == 0.0


def test_cg_residual_rule_stops_where_it_first_holds():
    A, g = spd_system(P=80, cond=1e3, seed=6)
    atol = 0.05 * np.linalg.norm(g)
    res = _cg.pcg(lambda v: A @ v, g, max_iter=500, progress_tol=None, atol=atol)
    assert res.stop == "residual"
    assert np.linalg.norm(A @ res.x + g) <= atol  # the residual recomputed from A, not CG's running one
    shorter = _cg.pcg(lambda v: A @ v, g, max_iter=res.iterations - 1, progress_tol=None)
    assert shorter.stop == "max_iter" and np.linalg.norm(A @ shorter.x + g) > atol
    # A warm start that already meets the tolerance costs one product and no iteration.
    e = np.random.default_rng(8).normal(size=80)
    near = np.linalg.solve(A, -g + 0.5 * atol * e / np.linalg.norm(e))  # residual: half the tolerance
    warm = _cg.pcg(lambda v: A @ v, g, x0=near, progress_tol=None, atol=atol)
    assert (warm.stop, warm.iterations, warm.products) == ("residual", 0, 1)


def quadratic_step(A, g, damping, **switches):
    """One hf_step on f(p) = ½ pᵀAp + gᵀp at p = 0 with curvature A; everything but the named switches off."""
    recipe = {**dict(adapt_damping=True, damping_rule="martens", cg_max_iter=200, cg_progress_tol=None,
                     cg_forcing=False, warm_start=0.0, backtrack=False, line_search=False), **switches}
    return hessian_free.hf_step(0.0, g, lambda v: A @ v, lambda p: 0.5 * p @ A @ p + g @ p, damping, None, None,
                                **recipe)


@pytest.mark.parametrize("g_norm", [4.0, 0.25, 1e-4], ids=["large_gradient", "medium", "small"])
def test_forcing_rule_tolerance(g_norm):
    """CG on (A + λI)p = −g stops once ‖(A + λI)p + g‖ <= min(1/2, √‖g‖)·‖g‖ (Nocedal & Wright, Alg. 7.1)."""
    A, g = spd_system(P=60, cond=1e4, seed=7)
    g *= g_norm / np.linalg.norm(g)
    damping = 1e-3
    step, record, _, _ = quadratic_step(A, g, damping, cg_forcing=True)
    tol = min(0.5, np.sqrt(g_norm)) * g_norm
    assert record["cg_stop"] == "residual" and record["accepted"]
    assert np.linalg.norm((A + damping * np.eye(60)) @ step + g) <= tol
    _, full, _, _ = quadratic_step(A, g, damping)
    assert record["cg_iters"] < full["cg_iters"]


def test_negative_curvature_lifts_damping_past_it():
    """H = diag(2, 1, −0.5), g along the negative eigenvector: CG's first direction has dᵀ(H + λI)d = −0.5 + λ < 0.

    The next λ is 3/2·(λ − κ) with κ = −0.5 + λ, i.e. 3/2·0.5, whatever λ was: H + λ'I is positive along d.
    """
    H, g = np.diag([2.0, 1.0, -0.5]), np.array([0.0, 0.0, 1.0])
    for damping in (0.1, 0.3):
        _, record, new_damping, _ = quadratic_step(H, g, damping)
        assert record["cg_stop"] == "negative curvature"
        assert new_damping == pytest.approx(1.5 * 0.5, rel=1e-12)
        assert new_damping - 0.5 > 0
    _, record, new_damping, _ = quadratic_step(H, g, 0.1, adapt_damping=False)  # the rule is part of the adaptation
    assert record["cg_stop"] == "negative curvature" and new_damping == 0.1
    _, record, new_damping, _ = quadratic_step(H, g, 2.0)  # no negative curvature: Martens' rule alone
    assert record["cg_stop"] != "negative curvature"
    assert new_damping == pytest.approx(_damping.update_damping(2.0, record["rho"]))


@pytest.mark.parametrize("rho, factor", [(-1.0, 1.5), (0.1, 1.5), (0.2499, 1.5), (0.25, 1.0), (0.5, 1.0),
                                         (0.75, 1.0), (0.7501, 2 / 3), (3.0, 2 / 3)])
def test_levenberg_marquardt_rule(rho, factor):
    assert _damping.update_damping(2.0, rho) == pytest.approx(2.0 * factor, rel=1e-15)


def test_a_run_of_rejections_raises_damping_ever_faster():
    # 3/2 for one rejection (Martens); the factor doubles with each further rejection in a row.
    lams = [2.0]
    for r in range(5):
        lams.append(_damping.raise_damping(lams[-1], r, g_norm=7.0))
    assert lams == pytest.approx([2.0, 3.0, 9.0, 54.0, 648.0, 15552.0], rel=1e-15)
    assert _damping.raise_damping(0.0, 3, g_norm=7.0) == 7.0  # from 0: the gradient's norm


def test_damping_recovers_in_a_few_rejections_at_extreme_scales():
    # Inputs × 1e4 put the logits of a linear softmax model near ±1e4: λ0 = 1 is far too small,
    # and ρ < 0 until λ has grown by about 10^4. With 3/2 per rejection that took 20 rejections.
    net, loss, _, X, y = mlp_problem()
    net = hvp.Sequential(hvp.Linear(3, 3))
    theta0 = net.init(seed=0)
    X = X * 1e4
    assert np.abs(net.forward(theta0, X)).max() > 1e4
    for curvature in ("ggn", "hessian"):
        opt = optimizers.NewtonCG(net, loss, theta0, curvature=curvature)
        res = opt.minimize((X, y), max_iters=30, gtol=0.0)
        accepted = [r["accepted"] for r in res.history]
        assert res.status != 2, res.message
        assert accepted.index(True) <= 6, accepted
        assert res.fun < 0.1 * res.history[0]["loss"]


def quantized(value, ulps=32):
    """``value`` rounded to a grid of ``ulps`` ulps of 1: f computed with a coarser rounding than float64's.

    Steps whose true decrease is below the grid leave f unchanged or move it by one grid step either way,
    on any machine: the endgame of a Newton method, where ρ is no longer measurable.
    """
    delta = ulps * np.finfo(np.float64).eps
    return float(np.round(value / delta) * delta)


@pytest.mark.parametrize("rule", [True, False], ids=["rounding_rule", "without_the_rule"])
def test_newton_cg_steps_at_rounding_level_are_not_judged_by_rho(rule, monkeypatch):
    A, g = spd_system(P=20, cond=1e3, seed=6)
    if not rule:  # the behaviour before: every step judged by ρ, ending in a run of rejections
        monkeypatch.setattr(_damping, "ROUNDING_ULPS", 0)
    res = optimizers.newton_cg(lambda x: quantized(phi(A, g, x)), np.zeros(20), lambda x: A @ x + g,
                               lambda x, p: A @ p, damping=1e-3, gtol=1e-12, maxiter=60)
    if not rule:
        assert res.status == 2, res.message
        return
    assert res.success, res.message
    np.testing.assert_allclose(res.x, np.linalg.solve(A, -g), rtol=1e-9)
    rounding = [r for r in res.history if r["rounding"]]
    assert rounding and all(r["accepted"] and np.isnan(r["rho"]) for r in rounding)


class QuantizedMSE(hvp.MSELoss):
    """MSE whose value is rounded to a grid of 32 ulps of 1."""

    def forward(self, O, y):
        value, cache = super().forward(O, y)
        return quantized(value), cache


def test_newton_cg_class_steps_at_rounding_level_are_not_judged_by_rho():
    rng = np.random.default_rng(1)
    net = hvp.Sequential(hvp.Linear(4, 3))  # a linear model: the GGN is the Hessian of MSE
    X, Y = rng.normal(size=(50, 4)) * np.array([0.1, 1, 3, 10]), rng.normal(size=(50, 3))
    opt = optimizers.NewtonCG(net, QuantizedMSE(), net.init(seed=0), damping=1e-3)
    res = opt.minimize((X, Y), max_iters=60, gtol=1e-12)
    assert res.success, res.message
    W = np.linalg.lstsq(np.hstack([X, np.ones((50, 1))]), Y, rcond=None)[0]  # [W; b]: θ's layout
    np.testing.assert_allclose(res.x, W.ravel(), rtol=1e-9, atol=1e-12)
    assert any(r["rounding"] and r["accepted"] for r in res.history)


def test_a_step_that_raises_f_beyond_rounding_is_rejected():
    # A predicted decrease at rounding level, but f rises by 1000 ulps: rejected, θ unchanged.
    f0, g = 1.0, np.array([1e-9, 0.0])
    step, record, _, _ = hessian_free.hf_step(
        f0, g, lambda v: v, lambda p: f0 + 1000 * np.spacing(f0), 1e-3, None, None,
        **hessian_free.check_recipe(True, "martens", 10, 5e-4, True, 0.95, True, True))
    assert record["rounding"] and not record["accepted"] and step is None


# --------------------------------------------------------------------------- what a step feeds to CG


def preconditioner_given_to_cg(monkeypatch, precondition, l2, damping):
    """One NewtonCG step on a small problem; the preconditioner it handed to CG, and the problem."""
    net, loss, theta0, X, y = mlp_problem(B=12)
    seen = {}
    real_pcg = hessian_free.pcg

    def spy(matvec, g, x0, precond, *args):
        seen["precond"] = precond
        return real_pcg(matvec, g, x0, precond, *args)

    monkeypatch.setattr(hessian_free, "pcg", spy)
    optimizers.NewtonCG(net, loss, theta0, damping=damping, l2=l2, precondition=precondition).step(X, y)
    return seen["precond"], (net, loss, theta0, X, y)


def test_preconditioner_is_martens_diagonal(monkeypatch):
    l2, damping = 0.3, 0.7
    precond, (net, loss, theta0, X, y) = preconditioner_given_to_cg(monkeypatch, "diag", l2, damping)
    # Σ_n g_n² from an explicit loop: g_n is example n's term of the mean loss, ∇ℓ_n / B.
    sgs = sum((hvp.loss_and_grad(net, loss, theta0, X[n:n + 1], y[n:n + 1])[1] / len(y)) ** 2
              for n in range(len(y)))
    expected = (sgs + l2 * oracles.weight_mask(net.layers) + damping) ** 0.75
    np.testing.assert_allclose(precond, expected, rtol=1e-10)


def test_kfac_preconditioner_is_the_damped_kfac_inverse(monkeypatch):
    l2, damping = 0.3, 0.7
    precond, (net, loss, theta0, X, y) = preconditioner_given_to_cg(monkeypatch, "kfac", l2, damping)
    # K-FAC (tests/test_kfac.py proves its factors and inverse) of the gradient batch; 3 outputs: "exact".
    K = hvp.linearize(net, loss, theta0, X, y, l2).kfac(kind="exact")
    r = np.random.default_rng(0).normal(size=net.num_params)
    np.testing.assert_allclose(precond(r), K.inverse(damping) @ r, rtol=1e-12)


@pytest.mark.parametrize("curvature", ["ggn", "hessian"])
def test_initial_damping_is_the_curvature_along_the_gradient(curvature):
    net, loss, theta0, X, y = mlp_problem(B=12)
    record = optimizers.NewtonCG(net, loss, theta0, curvature=curvature, l2=0.1).step(X, y)
    g = oracles.fd_gradient(lambda t: oracles.ref_loss(net.layers, t, X, y, "ce_labels", "mean", 0.1), theta0)
    if curvature == "ggn":
        B = oracles.ref_ggn(net.layers, theta0, X, y, "ce_labels", "mean", 0.1)
    else:
        B = oracles.fd_hessian_from_gradient(
            lambda t: oracles.fd_gradient(lambda s: oracles.ref_loss(net.layers, s, X, y, "ce_labels", "mean", 0.1),
                                          t, 1e-4), theta0, 1e-3)
    assert record["damping"] == pytest.approx(g @ B @ g / (g @ g), rel=1e-4)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("curvature", ["ggn", "hessian"])
def test_curvature_batch_rotates_and_is_scaled(reduction, curvature):
    net = build_net(("lin:2:3", "tanh", "lin:3:2"))
    loss = hvp.MSELoss(reduction=reduction)
    rng = np.random.default_rng(5)
    B, b, l2 = 10, 4, 0.2
    X, Y = rng.normal(size=(B, 2)), rng.normal(size=(B, 2))
    theta = net.init(seed=3)
    opt = optimizers.NewtonCG(net, loss, theta, curvature=curvature, curvature_batch=b, l2=l2)
    pt = hvp.linearize(net, loss, theta, X, Y, l2)
    starts = []
    for _ in range(4):
        operator, nxt = opt._curvature_operator(pt)
        rows = (opt._offset + np.arange(b)) % B
        starts.append(opt._offset)
        if curvature == "ggn":
            sub = oracles.ref_ggn(net.layers, theta, X[rows], Y[rows], "mse", reduction)
        else:
            sub = oracles.fd_hessian_from_gradient(
                lambda t, rows=rows: oracles.fd_gradient(
                    lambda s: oracles.ref_loss(net.layers, s, X[rows], Y[rows], "mse", reduction), t, 1e-4),
                theta, 1e-3)
        scale = (B / b) if reduction == "sum" else 1.0  # the mean's normalizers cancel B/b
        expected = scale * sub + l2 * np.diag(oracles.weight_mask(net.layers))
        dense = oracles.dense_matrix(operator, net.num_params)
        np.testing.assert_allclose(dense, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())
        opt._offset = nxt
    assert starts == [0, 4, 8, 2]


# --------------------------------------------------------------------------- nothing lost


class FaultyLoss(hvp.CrossEntropyLoss):
    """Cross-entropy whose loss goes wrong at trial points: every forward call after the first of a step."""

    def __init__(self, fault):
        super().__init__()
        self.fault, self.calls = fault, 0

    def forward(self, O, y):
        value, cache = super().forward(O, y)
        self.calls += 1
        if self.calls > 1 and self.fault is not None:
            if self.fault == "raise":
                raise RuntimeError("injected fault")
            value = {"nan": np.nan, "inf": np.inf, "worse": value + 1.0}[self.fault]
        return value, cache


@pytest.mark.parametrize("fault", ["nan", "inf", "worse", "nan_curvature"])
def test_faulty_step_is_rejected_theta_unchanged(fault, monkeypatch):
    net, _, theta0, X, y = mlp_problem()
    loss = FaultyLoss(None if fault == "nan_curvature" else fault)
    opt = optimizers.NewtonCG(net, loss, theta0, damping=0.5)
    if fault == "nan_curvature":
        monkeypatch.setattr(hvp.Linearization, "ggnvp", lambda self, v: np.full_like(v, np.nan))
    before = opt.theta.copy()
    for k in range(3):
        loss.calls = 0
        record = opt.step(X, y)
        assert not record["accepted"]
        assert np.array_equal(opt.theta, before)
        assert opt.damping == pytest.approx(0.5 * math.prod(1.5 * 2**r for r in range(k + 1)))
    monkeypatch.undo()
    loss.fault, loss.calls = None, 0
    assert opt.step(X, y)["accepted"]  # recovers once the fault is gone
    assert not np.array_equal(opt.theta, before)


def test_exception_mid_step_leaves_state_alone():
    net, _, theta0, X, y = mlp_problem()
    loss = FaultyLoss(None)
    opt = optimizers.NewtonCG(net, loss, theta0, curvature_batch=16)
    opt.step(X, y)
    state = (opt.theta.copy(), opt.damping, opt._warm.copy(), opt._offset, len(opt.history))
    loss.fault, loss.calls = "raise", 0
    with pytest.raises(RuntimeError, match="injected fault"):
        opt.step(X, y)
    assert np.array_equal(opt.theta, state[0]) and opt.damping == state[1]
    assert np.array_equal(opt._warm, state[2]) and opt._offset == state[3] and len(opt.history) == state[4]


def test_save_load_resumes_bit_identically(tmp_path):
    net, loss, theta0, X, y = mlp_problem(B=48)
    batches = [(X[:24], y[:24]), (X[24:], y[24:])]
    kwargs = dict(curvature_batch=0.5, l2=1e-3, damping=2.0)
    straight = optimizers.NewtonCG(net, loss, theta0, **kwargs)
    straight.minimize(batches, max_iters=10, gtol=0.0)
    first = optimizers.NewtonCG(net, loss, theta0, **kwargs)
    first.minimize(batches, max_iters=5, gtol=0.0)
    path = tmp_path / "state.npz"
    first.save(path)
    with np.load(path, allow_pickle=False) as f:
        assert all(f[key].dtype != object for key in f.files)
    resumed = optimizers.NewtonCG.load(path, net, loss)
    resumed.minimize(batches, max_iters=5, gtol=0.0)
    assert np.array_equal(resumed.theta, straight.theta) and resumed.theta.dtype == straight.theta.dtype
    assert resumed.damping == straight.damping
    assert len(resumed.history) == 10
    for a, b in zip(resumed.history, straight.history):
        a, b = dict(a), dict(b)
        a.pop("seconds"), b.pop("seconds")
        np.testing.assert_equal(a, b)


def test_load_rejects_another_net_or_optimizer(tmp_path):
    net, loss, theta0, X, y = mlp_problem()
    path = tmp_path / "s.npz"
    optimizers.NewtonCG(net, loss, theta0).save(path)
    with pytest.raises(ValueError, match="saved with net"):
        optimizers.NewtonCG.load(path, build_net(("lin:3:5", "tanh", "lin:5:3")), loss)
    with pytest.raises(ValueError, match="saved with loss"):
        optimizers.NewtonCG.load(path, net, hvp.CrossEntropyLoss(reduction="sum"))
    with pytest.raises(ValueError, match="NewtonCG optimizer, not a Adam"):
        optimizers.Adam.load(path, net, loss)


# --------------------------------------------------------------------------- interface


def test_minimize_result_callback_and_batches():
    net, loss, theta0, X, y = mlp_problem()
    theta_copy = theta0.copy()
    seen = []

    def callback(intermediate):
        seen.append((intermediate.step, intermediate.x.copy(), intermediate.accepted))
        return len(seen) == 3

    opt = optimizers.NewtonCG(net, loss, theta0)
    res = opt.minimize([(X[:32], y[:32]), (X[32:], y[32:])], max_iters=10, callback=callback)
    assert isinstance(res, scipy.optimize.OptimizeResult)
    assert res.status == 3 and not res.success and res.nit == 3 and len(res.history) == 3
    assert [s[0] for s in seen] == [0, 1, 2]
    assert np.array_equal(seen[-1][1], res.x)
    assert np.array_equal(theta0, theta_copy)  # the caller's θ is never written
    value, grad = hvp.loss_and_grad(net, loss, res.x, X[:32], y[:32])  # last batch used: the first, again
    assert res.fun == value and np.array_equal(res.jac, grad)
    assert res.nhev == sum(r["products"] for r in res.history) > 0
    assert res.nfev == sum(r["fevals"] for r in res.history) + 1 >= 2 * res.nit + 1
    assert set(res.history[0]) >= {"loss", "damping", "rho", "cg_iters", "products", "accepted", "seconds"}


def test_minimize_stops_at_gtol_without_moving():
    net, loss, theta0, X, y = mlp_problem()
    opt = optimizers.NewtonCG(net, loss, theta0)
    res = opt.minimize((X, y), max_iters=5, gtol=1e6)
    assert res.success and res.nit == 0 and np.array_equal(res.x, theta0)


@pytest.mark.parametrize("progress", [None, "lines", "bar"])
def test_progress_output(progress, capsys):
    net, loss, theta0, X, y = mlp_problem()
    optimizers.NewtonCG(net, loss, theta0, progress=progress).minimize((X, y), max_iters=3, gtol=0.0)
    out, err = capsys.readouterr()
    if progress is None:
        assert out == err == ""
    elif progress == "lines":
        lines = out.strip().splitlines()
        assert len(lines) == 3 and all("λ" in line and "ρ" in line for line in lines) and err == ""
    else:
        assert "3/3" in err and out == ""


BAD = {
    "curvature": ({"curvature": "fisher"}, ValueError, "curvature must be one of"),
    "damping_negative": ({"damping": -1.0}, ValueError, "damping must be a finite number > 0"),
    "damping_zero_adaptive": ({"damping": 0.0}, ValueError, "damping must be a finite number > 0"),
    "damping_str": ({"damping": "1"}, TypeError, "damping must be a real number"),
    "cg_max_iter": ({"cg_max_iter": 0}, ValueError, "cg_max_iter must be an int >= 1"),
    "cg_max_iter_float": ({"cg_max_iter": 10.0}, TypeError, "cg_max_iter must be an int"),
    "progress_tol": ({"cg_progress_tol": 0.0}, ValueError, "cg_progress_tol must be a finite number > 0"),
    "warm_start": ({"warm_start": 1.5}, ValueError, r"warm_start must lie in \[0, 1\]"),
    "backtrack": ({"backtrack": "yes"}, TypeError, "backtrack must be True or False"),
    "curvature_batch": ({"curvature_batch": 1.5}, ValueError, r"curvature_batch must lie in \(0, 1\]"),
    "curvature_batch_zero": ({"curvature_batch": 0}, ValueError, "curvature_batch must be an int >= 1"),
    "l2": ({"l2": -1.0}, ValueError, "l2 must be a finite number >= 0"),
    "progress": ({"progress": "verbose"}, ValueError, "progress must be one of"),
}


@pytest.mark.parametrize("kwargs, error, match", list(BAD.values()), ids=list(BAD))
def test_bad_arguments(kwargs, error, match):
    net, loss, theta0, _, _ = mlp_problem()
    with pytest.raises(error, match=match):
        optimizers.NewtonCG(net, loss, theta0, **kwargs)


def test_bad_net_loss_theta_data():
    net, loss, theta0, X, y = mlp_problem()
    with pytest.raises(TypeError, match="net must be an hvp.Sequential"):
        optimizers.NewtonCG("net", loss, theta0)
    with pytest.raises(TypeError, match="loss must be an hvp loss"):
        optimizers.NewtonCG(net, lambda O, y: 0.0, theta0)
    with pytest.raises(ValueError, match="theta must have shape"):
        optimizers.NewtonCG(net, loss, theta0[:-1])
    opt = optimizers.NewtonCG(net, loss, theta0)
    with pytest.raises(TypeError, match="data must be a pair"):
        opt.minimize(X)
    with pytest.raises(ValueError, match="X must have 3 features"):
        opt.step(X[:, :2], y)


# --------------------------------------------------------------------------- newton_cg (any objective)


@pytest.mark.parametrize("variant", ["jac_callable", "jac_true", "with_diag"])
def test_newton_cg_rosenbrock(variant):
    x0 = np.array([-1.2, 1.0, -0.5])  # 3-D Rosenbrock: one minimum, at (1, 1, 1)
    kwargs = {}
    fun, jac = scipy.optimize.rosen, scipy.optimize.rosen_der
    if variant == "jac_true":
        fun, jac = (lambda x: (scipy.optimize.rosen(x), scipy.optimize.rosen_der(x))), True
    if variant == "with_diag":
        kwargs["hess_diag"] = lambda x: np.abs(np.diag(scipy.optimize.rosen_hess(x)))
    res = optimizers.newton_cg(fun, x0, jac, scipy.optimize.rosen_hess_prod, gtol=1e-8, maxiter=500, **kwargs)
    assert res.success, res.message
    np.testing.assert_allclose(res.x, np.ones(3), atol=1e-7)
    assert np.linalg.norm(scipy.optimize.rosen_der(res.x)) <= 1e-8
    assert res.nhev == sum(r["products"] for r in res.history)
    assert np.array_equal(x0, [-1.2, 1.0, -0.5])


def test_newton_cg_quadratic_with_args():
    A, g = spd_system(P=20, cond=1e3, seed=6)
    res = optimizers.newton_cg(lambda x, A, g: phi(A, g, x), np.zeros(20), lambda x, A, g: A @ x + g,
                               lambda x, p, A, g: A @ p, args=(A, g), damping=1e-3, gtol=1e-10)
    assert res.success
    np.testing.assert_allclose(res.x, np.linalg.solve(A, -g), rtol=1e-8)
    assert res.nit < 25


def test_newton_cg_rejects_nan_objective():
    calls = {"n": 0}

    def fun(x):
        calls["n"] += 1
        return np.nan if calls["n"] > 1 else float(x @ x)

    res = optimizers.newton_cg(fun, np.ones(3), lambda x: 2 * x, lambda x, p: 2 * p, maxiter=4, max_rejections=3)
    assert res.status == 2 and np.array_equal(res.x, np.ones(3))
    assert [r["damping"] for r in res.history] == pytest.approx([1.0, 1.5, 1.5 * 3])


@pytest.mark.parametrize("kwargs, error, match", [
    ({"fun": 1.0}, TypeError, "fun must be callable"),
    ({"jac": None}, TypeError, "jac must be callable or True"),
    ({"hessp": None}, TypeError, "hessp must be callable"),
    ({"x0": [np.nan, 1.0]}, ValueError, "x0 must be finite"),
    ({"maxiter": -1}, ValueError, "maxiter must be an int >= 0"),
], ids=["fun", "jac", "hessp", "x0", "maxiter"])
def test_newton_cg_bad_arguments(kwargs, error, match):
    args = {"fun": lambda x: float(x @ x), "x0": [1.0, 2.0], "jac": lambda x: 2 * x, "hessp": lambda x, p: 2 * p}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        optimizers.newton_cg(args.pop("fun"), args.pop("x0"), args.pop("jac"), args.pop("hessp"), **args)
