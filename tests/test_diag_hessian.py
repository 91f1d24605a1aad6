"""The exact Hessian diagonal against the dense Hessian and an independent finite-difference oracle.

Oracles: ``np.diag`` of the dense Hessian ``pt.hvp(np.eye(P))`` (itself checked against
finite differences of the gradient in test_curvature_products.py), and second central
differences of the float64 reference loss of tests/oracles.py, which shares no code with hvp.
"""

from __future__ import annotations

import copy

import numpy as np
import oracles
import pytest
from conftest import ARCHS, dense_diagonal, fd_hessian_diagonal

import hvp
from hvp.diag_hessian import diag_hessian

L2_VALUES = pytest.mark.parametrize("l2", [0.0, 0.3], ids=["no-l2", "l2=0.3"])

# Deeper than ARCHS: activations with three or more Linear layers before them (their diagonal
# columns are formed and travel on), and Linear layers with no activation between them.
DEEP_ARCHS = {
    "deep5_tanh-sigmoid-softplus-elu-identity": (
        "lin:3:5", "tanh", "lin:5:4", "sigmoid", "lin:4:4:nobias", "softplus", "lin:4:3", "elu", "lin:3:3",
        "identity", "lin:3:2"),
    "deep5_consecutive-linears_softsign": (
        "lin:3:5", "tanh", "lin:5:4", "lin:4:4", "softsign", "lin:4:3", "lin:3:3:nobias", "lin:3:2"),
    "deep4_double-act_sigmoid-tanh": ("lin:2:4", "softplus", "lin:4:4", "sigmoid", "tanh", "lin:4:3", "lin:3:3"),
}
# σ″ = 0 everywhere: the Hessian diagonal is the Gauss-Newton diagonal.
PIECEWISE_LINEAR_ARCHS = {
    "lin3-2": ("lin:3:2",),
    "relu_3-4-2": ("lin:3:4", "relu", "lin:4:2"),
    "leaky0.1_3-4-3": ("lin:3:4", "leaky:0.1", "lin:4:3"),
    "identity_3-3-2": ("lin:3:3", "identity", "lin:3:2"),
    "relu-deep4_3-5-4-4-2_out-leaky": (
        "lin:3:5", "relu", "lin:5:4:nobias", "relu", "lin:4:4", "leaky", "lin:4:2", "leaky"),
}


def _close(got, want, rtol):
    scale = float(np.max(np.abs(want)))
    assert scale > 0
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale)


# --------------------------------------------------------------------------- the oracle itself


def test_fd_oracle_matches_fd_hessian_of_fd_gradient(make_problem):
    p = make_problem(ARCHS["tanh-sigmoid_3-4-3-2_mixedbias"], "ce_probs", "mean")
    f = lambda t: p.ref_loss(t, l2=0.3)  # noqa: E731
    H = oracles.fd_hessian_from_gradient(lambda t: oracles.fd_gradient(f, t, 1e-4), p.theta, 1e-3)
    _close(fd_hessian_diagonal(f, p.theta), np.diag(H), rtol=1e-5)


# --------------------------------------------------------------------------- every architecture and loss


@L2_VALUES
def test_matches_dense_hessian_diagonal(problem, l2):
    pt = problem.linearize(l2=l2)
    got = diag_hessian(pt)
    assert got.shape == (problem.P,) and got.dtype == problem.dtype
    _close(got, dense_diagonal(pt, problem.P), rtol=1e-11)


@L2_VALUES
def test_matches_fd_of_reference_loss(problem, l2):
    want = fd_hessian_diagonal(lambda t: problem.ref_loss(t, l2=l2), problem.theta)
    _close(diag_hessian(problem.linearize(l2=l2)), want, rtol=1e-5)


@pytest.mark.parametrize("kind", oracles.LOSS_KINDS)
@pytest.mark.parametrize("spec", list(DEEP_ARCHS.values()), ids=list(DEEP_ARCHS))
def test_deep_nets_match_dense_and_fd(make_problem, spec, kind):
    p = make_problem(spec, kind, "mean", batch=5, seed=1)
    pt = p.linearize(l2=0.1)
    got = diag_hessian(pt)
    _close(got, dense_diagonal(pt, p.P), rtol=1e-11)
    _close(got, fd_hessian_diagonal(lambda t: p.ref_loss(t, l2=0.1), p.theta), rtol=1e-5)


def test_l2_adds_to_weight_entries_only(make_problem):
    p = make_problem(ARCHS["deep4_softplus-elu-tanh_out-leaky"], "ce_labels", "mean")
    difference = diag_hessian(p.linearize(l2=0.7)) - diag_hessian(p.linearize(l2=0.0))
    np.testing.assert_allclose(difference, 0.7 * p.weight_mask(), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- float32


@pytest.mark.parametrize("kind", ["ce_labels", "mse"])
@pytest.mark.parametrize("spec", list(ARCHS.values()) + list(DEEP_ARCHS.values()),
                         ids=list(ARCHS) + list(DEEP_ARCHS))
def test_float32_matches_float64(make_problem, spec, kind):
    p32 = make_problem(spec, kind, "mean", dtype=np.float32)
    got = diag_hessian(p32.linearize(l2=0.1))
    assert got.dtype == np.float32
    want = diag_hessian(hvp.linearize(p32.net, p32.loss, p32.theta.astype(np.float64), p32.X.astype(np.float64),
                                      p32.y, l2=0.1))
    _close(got, want, rtol=2e-5)


# --------------------------------------------------------------------------- σ″ = 0: the Gauss-Newton diagonal


@pytest.mark.parametrize("kind", oracles.LOSS_KINDS)
@pytest.mark.parametrize("spec", list(PIECEWISE_LINEAR_ARCHS.values()), ids=list(PIECEWISE_LINEAR_ARCHS))
def test_piecewise_linear_nets_give_diag_ggn(make_problem, spec, kind):
    pt = make_problem(spec, kind, "sum", batch=6).linearize(l2=0.2)
    _close(diag_hessian(pt), pt.diag_ggn(), rtol=1e-14)


def test_smooth_activation_differs_from_diag_ggn(make_problem):
    pt = make_problem(ARCHS["tanh_2-5-3"], "ce_labels", "mean").linearize()
    got, ggn = diag_hessian(pt), pt.diag_ggn()
    assert np.max(np.abs(got - ggn)) > 1e-3 * np.max(np.abs(ggn))


# --------------------------------------------------------------------------- the linearization is left alone


def _arrays(obj, path="pt"):
    """Every array (or scalar) in nested lists and dicts, by path, copied."""
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return {path: copy.deepcopy(obj)}
    return {key: value for k, v in items for key, value in _arrays(v, f"{path}[{k!r}]").items()}


def test_leaves_linearization_unchanged(make_problem):
    p = make_problem(ARCHS["deep4_softplus-elu-tanh_out-leaky"], "ce_probs", "mean", batch=5)
    pt, fresh = p.linearize(l2=0.1), p.linearize(l2=0.1)
    state = _arrays([pt.theta, pt.loss, pt.grad, pt.outputs, pt.adjoints, pt.caches, pt.loss_cache])
    first = diag_hessian(pt)
    after = _arrays([pt.theta, pt.loss, pt.grad, pt.outputs, pt.adjoints, pt.caches, pt.loss_cache])
    for path, value in state.items():  # the caches may have gained σ′ and σ″, computed once
        np.testing.assert_array_equal(after[path], value, err_msg=path)
    V = np.random.default_rng(3).standard_normal((p.P, 4))
    np.testing.assert_array_equal(pt.hvp(V), fresh.hvp(V))
    np.testing.assert_array_equal(pt.ggnvp(V), fresh.ggnvp(V))
    np.testing.assert_array_equal(diag_hessian(pt), first)


# --------------------------------------------------------------------------- layers through the contract alone


class _Wrapped:
    """Duck-typed layer delegating to an hvp layer, but not an instance of any hvp layer class."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __repr__(self):
        return f"_Wrapped({self.inner!r})"


class _FourRulesOnly(_Wrapped):
    """Keeps the four rules of the contract and hides every other rule of the layer it wraps."""

    RULES = ("forward", "backward_input", "backward_params", "tangent", "tangent_backward", "param_shapes",
             "out_shape", "init_bounds", "fan_in")

    def __getattr__(self, name):
        if name not in self.RULES:
            raise AttributeError(name)
        return getattr(self.inner, name)


def _two_examples(net):
    rng = np.random.default_rng(0)
    return hvp.linearize(net, hvp.MSELoss(), net.init(seed=0), rng.standard_normal((2, 3)),
                         rng.standard_normal((2, 3)))


@pytest.mark.parametrize("inner", [hvp.Linear(4, 3), hvp.Tanh()], ids=["with-parameters", "parameter-free"])
def test_layers_keeping_the_contract_need_no_family(inner):
    layers = (hvp.Linear(3, 4), hvp.Tanh(), inner, *([hvp.Linear(4, 3)] if isinstance(inner, hvp.Tanh) else []))
    pt = _two_examples(hvp.Sequential(*layers[:2], _Wrapped(inner), *layers[3:]))
    want = diag_hessian(_two_examples(hvp.Sequential(*layers)))
    _close(diag_hessian(pt), want, rtol=1e-14)
    _close(want, dense_diagonal(pt, pt.theta.size), rtol=1e-12)


@pytest.mark.parametrize("inner", [hvp.Linear(4, 3), hvp.Tanh()], ids=["with-parameters", "parameter-free"])
def test_rejects_layers_without_the_hessian_diagonal_rules(inner):
    net = hvp.Sequential(hvp.Linear(3, 4), hvp.Tanh(), _FourRulesOnly(inner),
                         *([hvp.Linear(4, 3)] if isinstance(inner, hvp.Tanh) else []))
    pt = _two_examples(net)
    with pytest.raises(TypeError, match=r"input_curvature.*layer 2: _FourRulesOnly .* has none"):
        diag_hessian(pt)


def test_rejects_such_a_layer_inside_a_residual_block_naming_both():
    net = hvp.Sequential(hvp.Linear(3, 4), hvp.Residual(hvp.Linear(4, 4), _FourRulesOnly(hvp.Tanh())),
                         hvp.Linear(4, 3))
    with pytest.raises(TypeError, match=r"layer 1 of the block at layer 1: _FourRulesOnly _Wrapped\(Tanh\(\)\) has"):
        diag_hessian(_two_examples(net))
