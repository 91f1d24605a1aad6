"""Per-example quantities against explicit per-example loops and dense Gauss-Newton diagonals.

Oracles: per-example gradients from a loop that feeds one example at a time to
``hvp.loss_and_grad`` (itself checked here against central differences of the reference
loss), and GGN diagonals from an explicit finite-difference Jacobian times the loss Hessian
written out in tests/oracles.py.
"""

from __future__ import annotations

import tracemalloc

import conftest
import numpy as np
import oracles
import pytest

import hvp
from hvp import memory, per_example

L2_VALUES = [0.0, 0.3]
QUANTITIES = ["sum_grad_squared", "batch_grad", "batch_l2", "variance", "diag_ggn", "diag_ggn_mc"]


def _share(problem) -> float:
    """Example n's share of the reduced loss relative to the loss of a batch holding only example n.

    With mean reduction a one-example batch divides by 1 (cross-entropy) or C (MSE); the full
    batch divides by B or B·C, so the share is 1/B either way.
    """
    return 1.0 / problem.B if problem.reduction == "mean" else 1.0


def loop_grads(problem) -> np.ndarray:
    """g_n (B, P) of the problem, one example at a time (conftest.loop_grads)."""
    return conftest.loop_grads(problem.net, problem.loss, problem.theta, problem.X, problem.y)


def loop_factor(problem) -> float:
    """c in ∇ℓ_n = c·g_n: B for mean reduction, 1 for sum."""
    return float(problem.B) if problem.reduction == "mean" else 1.0


def _close(got, want, rtol=1e-10):
    scale = float(np.max(np.abs(want)))
    assert scale > 0
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale)


# --------------------------------------------------------------------------- the oracle itself


def test_loop_oracle_matches_finite_differences(problem):
    fd = []
    for n in range(problem.B):
        X, y = problem.X[n:n + 1], problem.y[n:n + 1]
        fd.append(oracles.fd_gradient(lambda t, X=X, y=y: oracles.ref_loss(problem.layers, t, X, y, problem.kind,
                                                                            problem.reduction), problem.theta))
    _close(loop_grads(problem), np.stack(fd) * _share(problem), rtol=1e-6)


# --------------------------------------------------------------------------- first-order quantities


@pytest.mark.parametrize("l2", L2_VALUES)
def test_batch_grad_matches_loop(problem, l2):
    got = problem.linearize(l2=l2).batch_grad()
    assert got.shape == (problem.B, problem.P) and got.dtype == problem.dtype
    _close(got, loop_grads(problem))


@pytest.mark.parametrize("block_rows", [1, 2, 3])
def test_batch_grad_in_blocks_of_rows(make_problem, monkeypatch, block_rows):
    problem = make_problem(("lin:3:4", "tanh", "lin:4:3:nobias", "sigmoid", "lin:3:2"), "ce_labels", "mean", batch=5)
    monkeypatch.setattr(per_example, "BATCH_GRAD_BLOCK_BYTES", block_rows * problem.P * 8)
    _close(problem.linearize().batch_grad(), loop_grads(problem))


@pytest.mark.parametrize("l2", L2_VALUES)
def test_per_example_grads_sum_to_gradient_without_l2(problem, l2):
    pt = problem.linearize(l2=l2)
    grad_no_l2 = problem.loss_and_grad(l2=0.0)[1]
    _close(pt.batch_grad().sum(axis=0), grad_no_l2)
    _close(pt.grad - l2 * problem.theta * problem.weight_mask(), grad_no_l2)


@pytest.mark.parametrize("l2", L2_VALUES)
def test_sum_grad_squared_matches_loop(problem, l2):
    got = problem.linearize(l2=l2).sum_grad_squared()
    assert got.shape == (problem.P,) and got.dtype == problem.dtype
    _close(got, (loop_grads(problem) ** 2).sum(axis=0))


@pytest.mark.parametrize("l2", L2_VALUES)
def test_batch_l2_matches_loop(problem, l2):
    got = problem.linearize(l2=l2).batch_l2()
    assert got.shape == (problem.B,) and got.dtype == problem.dtype
    _close(got, (loop_grads(problem) ** 2).sum(axis=1))


@pytest.mark.parametrize("l2", L2_VALUES)
def test_variance_matches_loop(problem, l2):
    got = problem.linearize(l2=l2).variance()
    assert got.shape == (problem.P,) and got.dtype == problem.dtype
    per_example_loss_grads = loop_factor(problem) * loop_grads(problem)
    want = per_example_loss_grads.var(axis=0)  # 1/B normalization
    assert np.all(got >= 0)
    scale = float(np.max(np.abs(per_example_loss_grads))) ** 2
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12 * scale)


def test_variance_of_identical_examples_is_zero(make_problem):
    problem = make_problem(("lin:3:4", "tanh", "lin:4:2"), "ce_labels", "mean", batch=1)
    X, y = np.repeat(problem.X, 5, axis=0), np.repeat(problem.y, 5)
    pt = hvp.linearize(problem.net, problem.loss, problem.theta, X, y)
    assert np.max(np.abs(pt.variance())) <= 1e-12 * np.max(pt.grad ** 2) * 25


# grad_squares of the layer contract, with adjoints DO_k = scale ⊙ D_k, weights w and the sums variance reads
GRAD_SQUARES_LAYERS = {
    "linear": (lambda: hvp.Linear(3, 2), (3,)),
    "conv": (lambda: hvp.Conv2d(2, 3, (2, 3), stride=(1, 2), padding=1), (2, 3, 4)),
    "residual": (lambda: hvp.Residual(hvp.Conv2d(2, 2, 3, padding=1), hvp.Tanh(), hvp.Conv2d(2, 2, 1)), (2, 3, 3)),
}


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("name", list(GRAD_SQUARES_LAYERS))
def test_grad_squares_and_sums_match_per_example_fd_jacobians(name, weighted):
    rng = np.random.default_rng(5)
    make, shape = GRAD_SQUARES_LAYERS[name]
    net = hvp.Sequential(make())
    B, K = 3, 2
    theta, X = rng.normal(size=net.num_params), rng.normal(size=(B,) + shape)
    O, caches = net.forward_cached(net.unflatten(theta), X)
    D, scale = rng.normal(size=(K,) + O.shape), rng.normal(size=O.shape)
    w = rng.normal(size=(K, B)) if weighted else None
    squares, sums = np.full(net.num_params, np.nan), np.full(net.num_params, np.nan)
    net.layers[0].grad_squares(net.unflatten(theta)[0], caches[0], D, net.unflatten(squares)[0], scale=scale,
                               weights=w, sums=net.unflatten(sums)[0])
    # g_kb = J_bᵀ (scale ⊙ D_k)_b, J_b the finite-difference Jacobian of example b's outputs
    J = oracles.fd_jacobian(lambda t: net.forward_cached(net.unflatten(t), X)[0], theta).reshape(B, -1, net.num_params)
    g = np.einsum("bop,kbo->kbp", J, (scale * D).reshape(K, B, -1))
    w = np.ones((K, B)) if w is None else w
    np.testing.assert_allclose(sums, np.einsum("kb,kbp->p", w, g), rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(squares, np.einsum("kb,kbp->p", w, g ** 2), rtol=1e-7, atol=1e-9)


# --------------------------------------------------------------------------- GGN diagonal


@pytest.mark.parametrize("l2", L2_VALUES)
def test_diag_ggn_matches_fd_jacobian_ggn(problem, l2):
    got = problem.linearize(l2=l2).diag_ggn()
    assert got.shape == (problem.P,) and got.dtype == problem.dtype
    want = np.diag(oracles.ref_ggn(problem.layers, problem.theta, problem.X, problem.y, problem.kind,
                                   problem.reduction, l2=l2))
    _close(got, want, rtol=1e-6)


@pytest.mark.parametrize("l2", L2_VALUES)
def test_diag_ggn_matches_dense_ggnvp(problem, l2):
    pt = problem.linearize(l2=l2)
    _close(pt.diag_ggn(), np.diag(oracles.dense_matrix(pt.ggnvp, problem.P)))


@pytest.mark.parametrize("reduction", oracles.REDUCTIONS)
def test_diag_ggn_with_probability_targets_rounded_to_float32(make_problem, reduction):
    # rows sum to 1 only to float32's rounding; a float64 network takes them as they are
    problem = make_problem(("lin:3:4", "softplus", "lin:4:3"), "ce_probs", reduction, batch=5, seed=3)
    y = problem.y.astype(np.float32)
    pt = hvp.linearize(problem.net, problem.loss, problem.theta, problem.X, y, l2=0.1)
    want = np.diag(oracles.ref_ggn(problem.layers, problem.theta, problem.X, y, "ce_probs", reduction, l2=0.1))
    _close(pt.diag_ggn(), want, rtol=1e-6)


@pytest.mark.parametrize("l2", L2_VALUES)
def test_diag_ggn_mc_is_unbiased(problem, l2):
    """The mean of many independent estimates lies within 6 standard errors of the exact diagonal."""
    pt = problem.linearize(l2=l2)
    exact = pt.diag_ggn()
    runs = np.stack([pt.diag_ggn_mc(num_samples=400, seed=s) for s in range(40)])
    assert runs.dtype == problem.dtype and runs.shape == (40, problem.P)
    mean, stderr = runs.mean(axis=0), runs.std(axis=0, ddof=1) / np.sqrt(len(runs))
    assert np.all(np.abs(mean - exact) <= 6 * stderr + 1e-12 * np.max(np.abs(exact)))


def test_diag_ggn_mc_seed_and_samples(make_problem):
    pt = make_problem(("lin:3:4", "tanh", "lin:4:3"), "ce_labels", "mean", batch=6).linearize()
    np.testing.assert_array_equal(pt.diag_ggn_mc(num_samples=3, seed=7), pt.diag_ggn_mc(num_samples=3, seed=7))
    assert not np.array_equal(pt.diag_ggn_mc(seed=1), pt.diag_ggn_mc(seed=2))


@pytest.mark.parametrize("bad, error", [(0, ValueError), (-2, ValueError), (1.5, TypeError), (True, TypeError),
                                        ("3", TypeError)], ids=["zero", "negative", "float", "bool", "str"])
def test_diag_ggn_mc_rejects_bad_num_samples(make_problem, bad, error):
    pt = make_problem(("lin:3:2",), "mse", "mean").linearize()
    with pytest.raises(error, match="num_samples"):
        pt.diag_ggn_mc(num_samples=bad)


# --------------------------------------------------------------------------- loss Hessian factors


@pytest.mark.parametrize("reduction", oracles.REDUCTIONS)
@pytest.mark.parametrize("kind", oracles.LOSS_KINDS)
def test_hessian_sqrt_factorizes_loss_hessian(make_problem, kind, reduction):
    problem = make_problem(("lin:3:4",), kind, reduction, batch=3)
    pt = problem.linearize()
    S = problem.loss.hessian_sqrt(pt.loss_cache)
    B, C = pt.outputs.shape
    assert S.shape == ((C - 1 if kind.startswith("ce") else C), B, C)
    H = oracles.ref_output_hessian(pt.outputs, problem.y, kind, reduction)
    for b in range(B):
        _close(S[:, b].T @ S[:, b], H[b * C:(b + 1) * C, b * C:(b + 1) * C])


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_ce_hessian_sqrt_at_extreme_logits(dtype):
    O = np.array([[30, 0, -30], [0, 0, 0], [5, 5, -40], [-1e3, 1e3, 0], [1e4, -1e4, 1e4]], dtype=dtype)
    y = np.array([0, 1, 2, 0, 1])
    loss = hvp.CrossEntropyLoss("mean")
    S = loss.hessian_sqrt(loss.forward(O, y)[1])
    assert S.dtype == dtype and np.all(np.isfinite(S))
    H = oracles.ref_output_hessian(O, y, "ce_labels", "mean")
    eps = np.finfo(dtype).eps
    for b in range(len(y)):
        np.testing.assert_allclose(S[:, b].T @ S[:, b], H[3 * b:3 * b + 3, 3 * b:3 * b + 3], atol=20 * eps / len(y))


def test_diag_ggn_of_single_output_cross_entropy_is_the_l2_term(make_problem):
    problem = make_problem(("lin:3:4", "tanh", "lin:4:1"), "ce_labels", "mean", batch=3)
    pt = problem.linearize(l2=0.25)
    np.testing.assert_array_equal(pt.diag_ggn(), 0.25 * problem.weight_mask())


@pytest.mark.parametrize("reduction", oracles.REDUCTIONS)
@pytest.mark.parametrize("kind", oracles.LOSS_KINDS)
def test_sampled_factor_is_unbiased(make_problem, kind, reduction):
    problem = make_problem(("lin:3:3",), kind, reduction, batch=2)
    pt = problem.linearize()
    M = 200_000
    S = problem.loss.sample_hessian_sqrt(pt.loss_cache, M, np.random.default_rng(0))
    B, C = pt.outputs.shape
    assert S.shape == (M, B, C)
    H = oracles.ref_output_hessian(pt.outputs, problem.y, kind, reduction)
    for b in range(B):
        block = H[b * C:(b + 1) * C, b * C:(b + 1) * C]
        np.testing.assert_allclose(S[:, b].T @ S[:, b], block, atol=0.02 * np.max(np.abs(block)))


# --------------------------------------------------------------------------- dtypes, memory, purity


@pytest.mark.parametrize("kind", oracles.LOSS_KINDS)
def test_float32_agrees_with_float64(make_problem, kind):
    spec = ("lin:3:5", "tanh", "lin:5:4", "sigmoid", "lin:4:3")
    p64 = make_problem(spec, kind, "mean", batch=6, dtype=np.float64)
    p32 = make_problem(spec, kind, "mean", batch=6, dtype=np.float32)
    pt32 = p32.linearize(l2=0.1)
    pt64 = hvp.linearize(p64.net, p64.loss, p32.theta.astype(np.float64), p32.X.astype(np.float64),
                         p32.y if kind.startswith("ce") else p32.y.astype(np.float64), l2=0.1)
    for name in QUANTITIES:
        got, want = getattr(pt32, name)(), getattr(pt64, name)()
        assert got.dtype == np.float32, name
        if name != "diag_ggn_mc":  # sampled from float32 vs float64 probabilities
            np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * np.max(np.abs(want)), err_msg=name)


def _peak_bytes(fn):
    """Peak bytes numpy allocates during fn(); hvp's pool of free buffers is emptied first, so that an array it
    would hand out again is allocated, and counted, like any other."""
    memory.release_memory()
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_no_per_example_arrays_in_sums_and_norms(make_problem):
    problem = make_problem(("lin:64:48", "tanh", "lin:48:32", "tanh", "lin:32:5"), "ce_labels", "mean", batch=128)
    pt = problem.linearize()
    largest = problem.B * 64 * 48 * 8  # bytes of the largest (B, m, n) block
    assert _peak_bytes(pt.batch_grad) >= problem.B * problem.P * 8  # tracemalloc sees numpy's arrays
    for name in ("sum_grad_squared", "batch_l2", "variance", "diag_ggn"):
        assert _peak_bytes(getattr(pt, name)) < largest / 4, name


def test_quantities_leave_linearization_unchanged(make_problem):
    problem = make_problem(("lin:3:4", "elu", "lin:4:2"), "mse", "mean", batch=5)
    pt = problem.linearize(l2=0.2)
    before = [pt.grad.copy(), pt.theta.copy(), pt.outputs.copy()] + [a.copy() for a in pt.adjoints]
    first = {name: getattr(pt, name)() for name in QUANTITIES}
    for value in first.values():
        value[...] = np.nan  # results are fresh arrays: writing into them changes nothing
    after = [pt.grad, pt.theta, pt.outputs] + list(pt.adjoints)
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)
    for name in QUANTITIES:
        assert np.all(np.isfinite(getattr(pt, name)())), name


# --------------------------------------------------------------------------- BackPACK's conventions


@pytest.mark.parametrize("kind, reduction", [("ce_labels", "mean"), ("ce_labels", "sum"), ("mse", "mean"),
                                             ("mse", "sum")])
def test_conventions_match_backpack(make_problem, kind, reduction):
    backpack = pytest.importorskip("backpack")
    torch = pytest.importorskip("torch")
    problem = make_problem(("lin:4:5", "tanh", "lin:5:3"), kind, reduction, batch=6)
    pt = problem.linearize()
    modules = []
    for layer, p in zip(problem.layers, problem.net.unflatten(problem.theta)):
        if p:
            linear = torch.nn.Linear(layer.in_features, layer.out_features).double()
            with torch.no_grad():
                linear.weight.copy_(torch.from_numpy(p["weight"].T.copy()))
                linear.bias.copy_(torch.from_numpy(p["bias"].copy()))
            modules.append(linear)
        else:
            modules.append(torch.nn.Tanh())
    model = backpack.extend(torch.nn.Sequential(*modules))
    lossfunc = {"ce_labels": torch.nn.CrossEntropyLoss, "mse": torch.nn.MSELoss}[kind](reduction=reduction)
    lossfunc = backpack.extend(lossfunc)
    extensions = backpack.extensions
    with backpack.backpack(extensions.SumGradSquared(), extensions.BatchGrad(), extensions.BatchL2Grad(),
                           extensions.Variance(), extensions.DiagGGNExact()):
        lossfunc(model(torch.from_numpy(problem.X)), torch.from_numpy(problem.y)).backward()

    def flat(attr):
        parts = []
        for m in model:
            if hasattr(m, "weight"):
                W, b = getattr(m.weight, attr).numpy(), getattr(m.bias, attr).numpy()
                parts += [np.swapaxes(W, -1, -2).reshape(W.shape[:-2] + (-1,)), b]
        return np.concatenate(parts, axis=-1)

    B = problem.B
    batch_l2 = sum(p.batch_l2.numpy() for p in model.parameters())
    _close(pt.sum_grad_squared(), flat("sum_grad_squared"))
    _close(pt.batch_grad(), flat("grad_batch"))
    _close(pt.batch_l2(), batch_l2)
    _close(pt.diag_ggn(), flat("diag_ggn_exact"))
    factor = B**2 if reduction == "mean" else 1.0  # BackPACK's Variance is of g_n, ours of ∇ℓ_n = c·g_n
    _close(pt.variance(), factor * flat("variance"), rtol=1e-8)
