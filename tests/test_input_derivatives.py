"""Input tangents, losses on them and their gradients (hvp.input_derivatives), against independent oracles.

Oracles: central differences of the reference forward (tests/oracles.py) in X for the
tangents; for θ-gradients, central differences in θ of the loss value computed from the
reference forward-mode below (analytic σ′ written here, itself checked against differences
in X); for squared per-example gradients, a loop over one-example batches.
"""

from __future__ import annotations

import numpy as np
import oracles
import pytest
from conftest import ARCHS

import hvp
from hvp.layers import dense

# the suite's architectures, and two where a tangent shared by all examples meets an activation late
TANGENT_ARCHS = {**ARCHS, "act-first_tanh-3-4-sigmoid-2": ("tanh", "lin:3:4", "sigmoid", "lin:4:2"),
                 "two-linears_3-4-3-softplus-2": ("lin:3:4", "lin:4:3", "softplus", "lin:3:2")}
ARCH_IDS = list(TANGENT_ARCHS)
FD_STEP = 1e-6


# --------------------------------------------------------------------------- reference forward-mode


def ref_dsigma(layer, z):
    """σ′(z) of an activation layer, from textbook formulas (independent of hvp)."""
    name = type(layer).__name__
    if name == "ReLU":
        return (z > 0).astype(float)
    if name == "LeakyReLU":
        return np.where(z > 0, 1.0, float(layer.negative_slope))
    if name == "Tanh":
        return 1.0 / np.cosh(z) ** 2
    if name == "Sigmoid":
        s = 0.5 * (1.0 + np.tanh(0.5 * z))
        return s * (1.0 - s)
    if name == "Softsign":
        return 1.0 / (1.0 + np.abs(z)) ** 2
    if name == "Softplus":
        return 0.5 * (1.0 + np.tanh(0.5 * z))
    if name == "ELU":
        return np.where(z > 0, 1.0, float(layer.alpha) * np.exp(np.minimum(z, 0.0)))
    if name == "Identity":
        return np.ones_like(z)
    raise NotImplementedError(name)


def ref_tangents(layers, theta, X, D):
    """Outputs (B, C) and input tangents (B, k, C) for per-example directions D (B, k, m), in float64."""
    h = np.asarray(X, dtype=np.float64)
    dh = np.asarray(D, dtype=np.float64)
    for layer, p in zip(layers, oracles.ref_unflatten(layers, np.asarray(theta, dtype=np.float64))):
        if oracles.is_linear(layer):
            h = h @ p["weight"] + p.get("bias", 0.0)
            dh = dh @ p["weight"]
        else:
            dh = ref_dsigma(layer, h)[:, None, :] * dh
            h = oracles.activation(layer, h)
    return h, dh


def fd_tangents(layers, theta, X, D):
    """Central differences of the reference forward in X along per-example directions D (B, k, m)."""
    cols = [(oracles.ref_forward(layers, theta, X + FD_STEP * D[:, j])
             - oracles.ref_forward(layers, theta, X - FD_STEP * D[:, j])) / (2 * FD_STEP) for j in range(D.shape[1])]
    return np.stack(cols, axis=1)


# --------------------------------------------------------------------------- directions and losses

DIRECTION_KINDS = ["one-vector", "k1-shared", "k3-shared", "k1-per-example", "k2-per-example", "jacobian"]
GRAD_DIRECTION_KINDS = ["one-vector", "k3-shared", "k2-per-example", "jacobian"]


def draw_directions(kind, B, m, seed=1):
    """Directions as the public API takes them, and the same as per-example (B, k, m)."""
    rng = np.random.default_rng(seed)
    if kind == "one-vector":
        D = rng.standard_normal(m)
        return D, np.broadcast_to(D, (B, 1, m)).copy()
    if kind.endswith("-shared"):
        D = rng.standard_normal((int(kind[1]), m))
        return D, np.broadcast_to(D, (B,) + D.shape).copy()
    if kind.endswith("-per-example"):
        D = rng.standard_normal((B, int(kind[1]), m))
        return D, D.copy()
    if kind == "jacobian":
        return np.eye(m), np.broadcast_to(np.eye(m), (B, m, m)).copy()
    raise ValueError(kind)


class ResidualLoss:
    """A user loss through the documented interface: ``L = Σ_bc r_bc²/B`` with ``r = Σ_k Ȯ_k − O²``.

    (The residual of ``Σ_k ∂u/∂x_k = u²`` at the sample points.)
    """

    def forward(self, O, dO, target):
        B = O.shape[0]
        r = dO.sum(axis=1) - O * O
        DOD = np.broadcast_to((2 / B * r)[:, None, :], dO.shape)
        return float(np.sum(r * r)) / B, -4 / B * O * r, DOD


def ref_residual_value(O, dO):
    r = dO.sum(axis=1) - O ** 2
    return float(np.sum(r ** 2)) / O.shape[0]


# loss id -> (kind of the base problem's target, reduction)
LOSSES = {
    "sobolev0.7": ("mse", "mean"),
    "penalty-ce_labels-mean": ("ce_labels", "mean"),
    "penalty-ce_probs-sum": ("ce_probs", "sum"),
    "penalty-mse-mean": ("mse", "mean"),
    "residual": ("mse", "mean"),
}
LOSS_IDS = list(LOSSES)
PENALTY_WEIGHT = 0.3


class Case:
    """A network, point, inputs, directions, tangent loss and its target, with the reference loss value."""

    def __init__(self, make_problem, spec, loss_id, direction_kind, batch=4, seed=0):
        kind, reduction = LOSSES[loss_id]
        self.p = make_problem(spec, kind, reduction, batch=batch, seed=seed)
        self.loss_id, self.kind, self.reduction = loss_id, kind, reduction
        B, m, C = self.p.B, self.p.X.shape[1], self.p.C
        self.D, self.D_per_example = draw_directions(direction_kind, B, m)
        self.single = direction_kind == "one-vector"
        k = self.D_per_example.shape[1]
        rng = np.random.default_rng(2)
        if loss_id.startswith("sobolev"):
            self.loss = hvp.SobolevLoss(weight=0.7)
            dY = rng.standard_normal((B, C) if self.single else (B, k, C))
            self.y = (self.p.y, dY)
        elif loss_id.startswith("penalty"):
            self.loss = hvp.JacobianPenalty(self.p.loss, PENALTY_WEIGHT)
            self.y = self.p.y
        else:
            self.loss = ResidualLoss()
            self.y = None

    def ref_value(self, theta, X=None, y=None, D_per_example=None):
        X = self.p.X if X is None else X
        y = self.y if y is None else y
        D = self.D_per_example if D_per_example is None else D_per_example
        O, dO = ref_tangents(self.p.layers, theta, X, D)
        if self.loss_id.startswith("sobolev"):
            Y, dY = y
            return float(np.mean((O - Y) ** 2) + 0.7 * np.mean((dO - dY.reshape(dO.shape)) ** 2))
        if self.loss_id.startswith("penalty"):
            N = O.shape[0] if self.reduction == "mean" else 1
            return oracles.ref_output_loss(O, y, self.kind, self.reduction) + PENALTY_WEIGHT * np.sum(dO ** 2) / N
        return ref_residual_value(O, dO)

    def example(self, n):
        """Target and directions of example n alone."""
        y = None if self.y is None else (tuple(t[n:n + 1] for t in self.y) if isinstance(self.y, tuple)
                                         else self.y[n:n + 1])
        D = self.D[n:n + 1] if self.D.ndim == 3 else self.D
        return y, D

    def per_example_factor(self):
        """Example n's term of the loss as reduced = factor × the loss of the one-example batch."""
        return 1.0 / self.p.B if self.reduction == "mean" else 1.0


def assert_close(got, want, rtol=1e-6, atol=1e-8):
    want = np.asarray(want, dtype=np.float64)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol * max(1.0, float(np.abs(want).max(initial=0.0))))


# --------------------------------------------------------------------------- tangents


@pytest.mark.parametrize("direction_kind", DIRECTION_KINDS)
@pytest.mark.parametrize("spec", TANGENT_ARCHS.values(), ids=ARCH_IDS)
def test_input_jvp_matches_differences_in_X(make_problem, spec, direction_kind):
    p = make_problem(spec, batch=5)
    D, D_per_example = draw_directions(direction_kind, p.B, p.X.shape[1])
    O, dO = hvp.input_jvp(p.net, p.theta, p.X, D)
    want = fd_tangents(p.layers, p.theta, p.X, D_per_example)
    assert O.shape == (p.B, p.C)
    assert_close(O, oracles.ref_forward(p.layers, p.theta, p.X), rtol=1e-12, atol=1e-12)
    if direction_kind == "one-vector":
        assert dO.shape == (p.B, p.C)
        want = want[:, 0]
    else:
        assert dO.shape == (p.B, D_per_example.shape[1], p.C)
    assert_close(dO, want, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("spec", TANGENT_ARCHS.values(), ids=ARCH_IDS)
def test_reference_tangents_match_differences_in_X(make_problem, spec):
    """The forward-mode oracle of the θ-gradient tests is itself right."""
    p = make_problem(spec, batch=5)
    _, D = draw_directions("k2-per-example", p.B, p.X.shape[1])
    assert_close(ref_tangents(p.layers, p.theta, p.X, D)[1], fd_tangents(p.layers, p.theta, p.X, D))


@pytest.mark.parametrize("spec", TANGENT_ARCHS.values(), ids=ARCH_IDS)
def test_input_jacobian_matches_differences_in_X(make_problem, spec):
    p = make_problem(spec, batch=5)
    m = p.X.shape[1]
    want = np.empty((p.B, p.C, m))
    for j in range(m):  # the examples are independent: perturb column j of every row at once
        E = np.zeros_like(p.X)
        E[:, j] = FD_STEP
        want[:, :, j] = (oracles.ref_forward(p.layers, p.theta, p.X + E)
                         - oracles.ref_forward(p.layers, p.theta, p.X - E)) / (2 * FD_STEP)
    J = hvp.input_jacobian(p.net, p.theta, p.X)
    assert J.shape == (p.B, p.C, m)
    assert_close(J, want)


# --------------------------------------------------------------------------- gradients of tangent losses


@pytest.mark.parametrize("direction_kind", GRAD_DIRECTION_KINDS)
@pytest.mark.parametrize("loss_id", LOSS_IDS)
@pytest.mark.parametrize("spec", TANGENT_ARCHS.values(), ids=ARCH_IDS)
def test_tangent_loss_and_grad_matches_differences_in_theta(make_problem, spec, loss_id, direction_kind):
    c = Case(make_problem, spec, loss_id, direction_kind)
    l2 = 0.05 if loss_id == "sobolev0.7" else 0.0
    value, grad = hvp.tangent_loss_and_grad(c.p.net, c.loss, c.p.theta, c.p.X, c.y, c.D, l2=l2)
    l2_value = oracles.l2_term(c.p.layers, c.p.theta, l2)
    assert grad.shape == (c.p.P,) and grad.dtype == np.float64
    assert value == pytest.approx(c.ref_value(c.p.theta) + l2_value, rel=1e-10, abs=1e-12)
    want = oracles.fd_gradient(lambda t: c.ref_value(t) + oracles.l2_term(c.p.layers, t, l2), c.p.theta, FD_STEP)
    assert_close(grad, want, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("kind", ["ce_labels", "mse"])
def test_jacobian_penalty_is_mean_squared_frobenius_norm(make_problem, kind):
    """With identity directions the penalty is weight × mean_b ‖∂O_b/∂X_b‖²_F (Jacobian by differences)."""
    p = make_problem(ARCHS["tanh-sigmoid_3-4-3-2_mixedbias"], kind, "mean", batch=5)
    m = p.X.shape[1]
    frobenius = np.zeros(p.B)
    for j in range(m):
        E = np.zeros_like(p.X)
        E[:, j] = FD_STEP
        dO = (oracles.ref_forward(p.layers, p.theta, p.X + E) - oracles.ref_forward(p.layers, p.theta, p.X - E))
        frobenius += np.sum((dO / (2 * FD_STEP)) ** 2, axis=1)
    value, _ = hvp.tangent_loss_and_grad(p.net, hvp.JacobianPenalty(p.loss, 2.5), p.theta, p.X, p.y, np.eye(m))
    assert value == pytest.approx(p.ref_loss() + 2.5 * frobenius.mean(), rel=1e-8)


@pytest.mark.parametrize("kind", ["ce_labels", "mse"])
def test_zero_penalty_is_the_output_loss(make_problem, kind):
    p = make_problem(ARCHS["softsign_3-3-2"], kind, "mean", batch=5)
    value, grad = hvp.tangent_loss_and_grad(p.net, hvp.JacobianPenalty(p.loss, 0.0), p.theta, p.X, p.y,
                                            np.ones((2, 3)), l2=0.1)
    want_value, want_grad = p.loss_and_grad(l2=0.1)
    assert value == pytest.approx(want_value, rel=1e-12)
    assert_close(grad, want_grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("loss_id", ["sobolev0.7", "penalty-ce_labels-mean"])
def test_float32_follows_float64(make_problem, loss_id):
    c = Case(make_problem, ARCHS["tanh_2-5-3"], loss_id, "k2-per-example")
    value64, grad64 = hvp.tangent_loss_and_grad(c.p.net, c.loss, c.p.theta, c.p.X, c.y, c.D)
    value32, grad32 = hvp.tangent_loss_and_grad(c.p.net, c.loss, c.p.theta.astype(np.float32), c.p.X, c.y, c.D)
    _, dO32 = hvp.input_jvp(c.p.net, c.p.theta.astype(np.float32), c.p.X, c.D)
    assert grad32.dtype == np.float32 and dO32.dtype == np.float32
    assert value32 == pytest.approx(value64, rel=1e-5)
    assert_close(grad32, grad64, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- squared per-example gradients

SGS_DIRECTION_KINDS = ["one-vector", "k3-shared", "k2-per-example", "jacobian"]
SGS_ARCHS = ["tanh-sigmoid_3-4-3-2_mixedbias", "deep4_softplus-elu-tanh_out-leaky", "relu-softsign_nobias_3-4-3-2",
             "lin3-2", "two-linears_3-4-3-softplus-2"]
PATHS = {"pairs": (100, 1 << 22), "pairs-chunked": (100, 8), "per-example": (0, 1 << 22), "per-example-chunked": (0, 8)}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("direction_kind", SGS_DIRECTION_KINDS)
@pytest.mark.parametrize("loss_id", ["sobolev0.7", "penalty-ce_probs-sum", "penalty-mse-mean", "residual"])
@pytest.mark.parametrize("spec", [TANGENT_ARCHS[a] for a in SGS_ARCHS], ids=SGS_ARCHS)
def test_tangent_sum_grad_squared_matches_per_example_loop(make_problem, monkeypatch, spec, loss_id,
                                                           direction_kind, path):
    pairs_max_k, chunk_entries = PATHS[path]
    monkeypatch.setattr(dense, "PAIRS_MAX_K", pairs_max_k)
    monkeypatch.setattr(dense, "CHUNK_ENTRIES", chunk_entries)
    c = Case(make_problem, spec, loss_id, direction_kind, batch=5)
    per_example = np.empty((c.p.B, c.p.P))
    for n in range(c.p.B):
        y, D = c.example(n)
        per_example[n] = c.per_example_factor() * hvp.tangent_loss_and_grad(
            c.p.net, c.loss, c.p.theta, c.p.X[n:n + 1], y, D)[1]
    _, grad = hvp.tangent_loss_and_grad(c.p.net, c.loss, c.p.theta, c.p.X, c.y, c.D)
    assert_close(per_example.sum(axis=0), grad, rtol=1e-10, atol=1e-12)  # the terms are the loss's
    got = hvp.tangent_sum_grad_squared(c.p.net, c.loss, c.p.theta, c.p.X, c.y, c.D)
    assert got.shape == (c.p.P,)
    assert_close(got, np.sum(per_example ** 2, axis=0), rtol=1e-10, atol=1e-13)


# --------------------------------------------------------------------------- bad input

ERRORS = (ValueError, TypeError)
SPEC = ARCHS["tanh_2-5-3"]  # m = 2, C = 3
B, M, C = 4, 2, 3


def says(*groups):
    return "(?is)" + "".join(f"(?=.*(?:{g}))" for g in groups)


@pytest.fixture
def sobolev_case(make_problem):
    return Case(make_problem, SPEC, "sobolev0.7", "k3-shared")


BAD_DIRECTIONS = {
    "vector-too-long": (np.ones(M + 1), ("directions", r"\(2,\)", r"\(3,\)")),
    "shared-wrong-m": (np.ones((3, M + 1)), ("directions", r"\(k, 2\)", r"\(3, 3\)")),
    "shared-k0": (np.ones((0, M)), ("directions", "k >= 1", r"\(0, 2\)")),
    "per-example-wrong-B": (np.ones((B + 1, 2, M)), ("directions", r"\(4, k, 2\)", r"\(5, 2, 2\)")),
    "per-example-wrong-m": (np.ones((B, 2, M + 1)), ("directions", r"\(4, k, 2\)", r"\(4, 2, 3\)")),
    "per-example-k0": (np.ones((B, 0, M)), ("directions", "k >= 1")),
    "4d": (np.ones((B, 1, 1, M)), ("directions", r"\(4, 1, 1, 2\)")),
    "nan": (np.array([[1.0, np.nan]]), ("directions", "nan|finite")),
    "complex": (np.ones((1, M), dtype=complex), ("directions", "real|complex")),
    "strings": (np.array(["a", "b"]), ("directions", "real")),
}


@pytest.mark.parametrize("case", list(BAD_DIRECTIONS))
@pytest.mark.parametrize("entry", ["input_jvp", "tangent_loss_and_grad", "tangent_sum_grad_squared"])
def test_bad_directions(make_problem, entry, case):
    p = make_problem(SPEC, batch=B)
    D, groups = BAD_DIRECTIONS[case]
    with pytest.raises(ERRORS, match=says(*groups)):
        if entry == "input_jvp":
            hvp.input_jvp(p.net, p.theta, p.X, D)
        else:
            loss = hvp.JacobianPenalty(p.loss, 1.0)
            getattr(hvp, entry)(p.net, loss, p.theta, p.X, p.y, D)


def _bad_sobolev_targets(Y, dY):
    nan = dY.copy()
    nan[0, 0, 0] = np.nan
    return {
        "not-a-pair": (Y, ("pair", r"\(Y, dY\)")),
        "triple": ((Y, dY, dY), ("pair",)),
        "Y-wrong-C": ((Y[:, :2], dY), (r"\bY\b", r"\(4, 3\)", r"\(4, 2\)")),
        "Y-wrong-B": ((Y[:3], dY), (r"\bY\b", r"\(4, 3\)", r"\(3, 3\)")),
        "dY-wrong-k": ((Y, dY[:, :2]), ("dY", r"\(4, 3, 3\)", r"\(4, 2, 3\)")),
        "dY-wrong-B": ((Y, dY[:3]), ("dY", r"\(4, 3, 3\)", r"\(3, 3, 3\)")),
        "dY-wrong-C": ((Y, dY[:, :, :2]), ("dY", r"\(4, 3, 3\)", r"\(4, 3, 2\)")),
        "dY-2d-for-k3": ((Y, dY[:, 0]), ("dY", r"\(4, 3, 3\)", r"\(4, 3\)")),
        "dY-nan": ((Y, nan), ("dY", "nan|finite")),
        "Y-strings": ((Y.astype(str), dY), (r"\bY\b", "real")),
    }


@pytest.mark.parametrize("case", list(_bad_sobolev_targets(np.zeros((B, C)), np.zeros((B, 3, C)))))
@pytest.mark.parametrize("entry", ["tangent_loss_and_grad", "tangent_sum_grad_squared"])
def test_bad_sobolev_targets(sobolev_case, entry, case):
    c = sobolev_case
    y, groups = _bad_sobolev_targets(*c.y)[case]
    with pytest.raises(ERRORS, match=says(*groups)):
        getattr(hvp, entry)(c.p.net, c.loss, c.p.theta, c.p.X, y, c.D)


def test_bad_penalty_target(make_problem):
    p = make_problem(SPEC, "ce_labels", batch=B)
    with pytest.raises(ValueError, match=says(r"\by\b", "4", "5")):
        hvp.tangent_loss_and_grad(p.net, hvp.JacobianPenalty(p.loss, 1.0), p.theta, p.X, np.zeros(5, int), np.eye(M))


class WrongShapes:
    def __init__(self, which):
        self.which = which

    def forward(self, O, dO, target):
        DO, DOD = np.zeros_like(O), np.zeros_like(dO)
        if self.which == "DO":
            DO = DO[:, :1]
        else:
            DOD = DOD[:, 0]
        return 0.0, DO, DOD


BAD_LOSSES = {
    "output-loss": (hvp.MSELoss(), TypeError, ("SobolevLoss|JacobianPenalty", "loss_and_grad")),
    "no-forward": (object(), TypeError, ("forward",)),
    "user-DO-shape": (WrongShapes("DO"), ValueError, ("DO", r"\(4, 3\)", r"\(4, 1\)")),
    "user-DOD-shape": (WrongShapes("DOD"), ValueError, ("DOD", r"\(4, 2, 3\)", r"\(4, 3\)")),
}


@pytest.mark.parametrize("case", list(BAD_LOSSES))
@pytest.mark.parametrize("entry", ["tangent_loss_and_grad", "tangent_sum_grad_squared"])
def test_bad_losses(make_problem, entry, case):
    p = make_problem(SPEC, batch=B)
    loss, error, groups = BAD_LOSSES[case]
    with pytest.raises(error, match=says(*groups)):
        getattr(hvp, entry)(p.net, loss, p.theta, p.X, p.y, np.ones((2, M)))


@pytest.mark.parametrize("weight, error", [(-1.0, ValueError), (np.nan, ValueError), ("1", TypeError),
                                           (True, TypeError), (np.ones(2), TypeError)],
                         ids=["negative", "nan", "string", "bool", "array"])
def test_bad_weights(weight, error):
    with pytest.raises(error, match="weight"):
        hvp.SobolevLoss(weight)
    with pytest.raises(error, match="weight"):
        hvp.JacobianPenalty(hvp.MSELoss(), weight)


@pytest.mark.parametrize("base", ["mse", None, hvp.SobolevLoss()], ids=["string", "none", "tangent-loss"])
def test_bad_penalty_base(base):
    with pytest.raises(TypeError, match=says("base_loss", "CrossEntropyLoss|MSELoss")):
        hvp.JacobianPenalty(base, 1.0)


def test_bad_l2_and_theta(sobolev_case):
    c = sobolev_case
    with pytest.raises(ValueError, match="l2"):
        hvp.tangent_loss_and_grad(c.p.net, c.loss, c.p.theta, c.p.X, c.y, c.D, l2=-1.0)
    with pytest.raises(ValueError, match=says("theta", str(c.p.P))):
        hvp.tangent_loss_and_grad(c.p.net, c.loss, c.p.theta[:-1], c.p.X, c.y, c.D)
    with pytest.raises(ValueError, match=says(r"\bX\b", "2")):
        hvp.input_jacobian(c.p.net, c.p.theta, c.p.X[:, :1])


def test_callers_arrays_untouched(make_problem):
    c = Case(make_problem, SPEC, "sobolev0.7", "k2-per-example")
    args = (c.p.theta, c.p.X, c.y[0], c.y[1], c.D)
    before = [a.copy() for a in args]
    hvp.input_jvp(c.p.net, c.p.theta, c.p.X, c.D)
    hvp.input_jacobian(c.p.net, c.p.theta, c.p.X)
    hvp.tangent_loss_and_grad(c.p.net, c.loss, c.p.theta, c.p.X, c.y, c.D, l2=0.1)
    hvp.tangent_sum_grad_squared(c.p.net, c.loss, c.p.theta, c.p.X, c.y, c.D)
    for a, b in zip(args, before):
        np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------- rule 4, summed over k


@pytest.mark.parametrize("shared_DOD", [False, True], ids=["DOD-per-direction", "DOD-shared"])
@pytest.mark.parametrize("layer", [hvp.Linear(3, 4), hvp.Linear(3, 4, bias=False), hvp.Tanh(), hvp.Softsign()],
                         ids=["linear", "linear-nobias", "tanh", "softsign"])
def test_summed_cross_terms_are_sums_of_per_direction_terms(layer, shared_DOD):
    """``tangent_backward(summed=True)`` = Σ_k of the per-direction cross terms (which the HVP tests check)."""
    rng = np.random.default_rng(3)
    k, B = 3, 5
    m = layer.in_features if isinstance(layer, hvp.Linear) else 4
    n = layer.out_shape((m,))[0]
    net_params = {name: rng.standard_normal(s) for name, s in layer.param_shapes()}
    dp = {name: rng.standard_normal(s + (k,)) for name, s in layer.param_shapes()} or None  # directions as columns
    _, cache = layer.forward(net_params, rng.standard_normal((B, m)))
    dI = rng.standard_normal((k, B, m))
    DOD = rng.standard_normal((B, n) if shared_DOD else (k, B, n))
    DI_k, grads_k = layer.tangent_backward(net_params, cache, dI, dp, DOD)
    DI, grads = layer.tangent_backward(net_params, cache, dI, dp, DOD, summed=True)
    assert_close(DI, DI_k.sum(axis=0), rtol=1e-12, atol=1e-14)
    assert set(grads or {}) == set(grads_k or {})
    for name in grads or {}:
        assert_close(grads[name], grads_k[name].sum(axis=-1), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("summed", [False, True], ids=["per-direction", "summed"])
@pytest.mark.parametrize("shared_DOD", [False, True], ids=["DOD-per-direction", "DOD-shared"])
@pytest.mark.parametrize("layer", [hvp.Linear(3, 4), hvp.Tanh(), hvp.ELU()], ids=["linear", "tanh", "elu"])
def test_tangent_shared_by_all_examples_is_broadcast(layer, shared_DOD, summed):
    """A tangent (k, 1, m) acts as the same tangent repeated over the batch, (k, B, m)."""
    rng = np.random.default_rng(4)
    k, B = 3, 5
    m = layer.in_features if isinstance(layer, hvp.Linear) else 4
    n = layer.out_shape((m,))[0]
    p = {name: rng.standard_normal(s) for name, s in layer.param_shapes()}
    _, cache = layer.forward(p, rng.standard_normal((B, m)))
    dI = rng.standard_normal((k, 1, m))
    dI_full = np.repeat(dI, B, axis=1)
    DOD = rng.standard_normal((B, n) if shared_DOD else (k, B, n))
    assert_close(np.broadcast_to(layer.tangent(p, cache, dI, None), (k, B, n)),
                 layer.tangent(p, cache, dI_full, None), rtol=1e-12, atol=1e-14)
    DI, grads = layer.tangent_backward(p, cache, dI, None, DOD, summed=summed)
    DI_full, grads_full = layer.tangent_backward(p, cache, dI_full, None, DOD, summed=summed)
    assert (DI is None) == (DI_full is None) and set(grads or {}) == set(grads_full or {})
    if DI is not None:
        assert_close(DI, DI_full, rtol=1e-12, atol=1e-14)
    for name in grads or {}:
        assert_close(grads[name], grads_full[name], rtol=1e-12, atol=1e-14)
