"""Bad inputs across the whole public API: the right error, naming the argument, nothing modified.

Each case is one call with one bad argument, every other argument good. It must raise the
expected error type at that very call, with a message that names the argument (and, where it
helps, what was expected and what came), and leave every array the caller passed unchanged.

A case is ``id: (error, groups, build)``. ``groups`` are regular expressions that must all
occur in the message, in any order. ``build(c)`` gives the call from the good arguments in
the fixture ``c``; it is written with :func:`call` or :func:`using`, where a lambda (and only
a lambda) stands for a value taken from ``c``, e.g. ``call(hvp.input_jvp, lambda c: c.net, …)``.
"""

from __future__ import annotations

from types import FunctionType, SimpleNamespace

import numpy as np
import pytest

import hvp
import optimizers
from hvp import curvature

# m = 2 inputs, hidden 4, C = 3 outputs, B = 5 examples, P = 2·4 + 4 + 4·3 + 3 = 27; K shared directions.
SPEC = ("lin:2:4", "tanh", "lin:4:3")
M, C, B, P, K = 2, 3, 5, 27, 2
RAGGED = [[1.0, 2.0], [3.0]]


def says(*groups):
    """Regex requiring every group somewhere in the message (any order, any case)."""
    return "(?is)" + "".join(f"(?=.*(?:{g}))" for g in groups)


def with_nan(a):
    a = np.array(a, dtype=np.float64)
    a.flat[0] = np.nan
    return a


@pytest.fixture
def c(make_problem):
    """Good arguments for every entry point; fresh arrays for each test."""
    p = make_problem(SPEC, "ce_labels", "mean", batch=B, seed=0)
    rng = np.random.default_rng(1)
    ns = SimpleNamespace(net=p.net, theta=p.theta, X=p.X, labels=p.y, ce=p.loss, mse=hvp.MSELoss(),
                         bce=hvp.BCEWithLogitsLoss())
    ns.probs = rng.dirichlet(np.ones(C), size=B)
    ns.targets = rng.standard_normal((B, C))
    ns.bce_targets = rng.uniform(size=(B, C))
    ns.v = rng.standard_normal(P)
    ns.U = rng.standard_normal((B, C))
    ns.D = rng.standard_normal((K, M))
    ns.sobolev = hvp.SobolevLoss(0.5)
    ns.sobolev_y = (rng.standard_normal((B, C)), rng.standard_normal((B, K, C)))
    ns.pt = hvp.linearize(p.net, p.loss, p.theta, p.X, p.y)
    A = rng.standard_normal((6, 6))
    ns.A = A + A.T  # a symmetric matrix for the estimators
    # good keyword arguments of the entry points
    ns.base = {"net": p.net, "loss": p.loss, "theta": p.theta, "X": p.X, "y": p.y}
    ns.tangent = {"net": p.net, "loss": ns.sobolev, "theta": p.theta, "X": p.X, "y": ns.sobolev_y, "directions": ns.D}
    ns.operator = {"net": p.net, "loss": p.loss, "theta": p.theta, "data": (p.X, p.y)}
    ns.scipy = {"net": p.net, "loss": p.loss, "X": p.X, "y": p.y}
    ns.opt = {"net": p.net, "loss": p.loss, "theta0": p.theta}
    ns.newton = {"fun": lambda x: float(x @ x), "x0": np.array([1.0, 2.0]), "jac": lambda x: 2 * x,
                 "hessp": lambda x, p: 2 * p}
    return ns


def _value(v, c):
    """``v(c)`` for a lambda (a value from the fixture), else v itself: a function or class stays itself."""
    return v(c) if isinstance(v, FunctionType) and v.__name__ == "<lambda>" else v


def call(f, *args, **kwargs):
    """build: ``f(*args, **kwargs)``, lambdas among f and the arguments taken from the fixture."""
    return lambda c: (_value(f, c), tuple(_value(a, c) for a in args), {k: _value(v, c) for k, v in kwargs.items()})


def using(base, f, **changes):
    """build: f with the good keyword arguments ``c.<base>``, some of them changed."""
    return lambda c: (_value(f, c), (), {**getattr(c, base), **{k: _value(v, c) for k, v in changes.items()}})


def _arrays(obj):
    """Every numpy array in nested tuples, lists and dicts."""
    if isinstance(obj, np.ndarray):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _arrays(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _arrays(item)


CASES = {}


def add(prefix, cases):
    for name, case in cases.items():
        assert f"{prefix}-{name}" not in CASES, name
        CASES[f"{prefix}-{name}"] = case


NUM_P, NUM_P1 = rf"\b{P}\b", rf"\b{P - 1}\b"

# -- layers and the network ---------------------------------------------------------------

add("Linear", {
    "in_features-float": (TypeError, ("in_features", r"2\.0"), call(hvp.Linear, 2.0, 3)),
    "in_features-zero": (ValueError, ("in_features", "positive", r"\b0\b"), call(hvp.Linear, 0, 3)),
    "out_features-negative": (ValueError, ("out_features", "-1"), call(hvp.Linear, 2, -1)),
    "out_features-bool": (TypeError, ("out_features", "bool"), call(hvp.Linear, 2, True)),
    "out_features-str": (TypeError, ("out_features", "str"), call(hvp.Linear, 2, "3")),
    "bias-str": (TypeError, ("bias", "True or False", "'no'"), call(hvp.Linear, 2, 3, bias="no")),
    "bias-None": (TypeError, ("bias", "None"), call(hvp.Linear, 2, 3, bias=None)),
})

for _cls, _arg in ((hvp.LeakyReLU, "negative_slope"), (hvp.ELU, "alpha")):
    add(_cls.__name__, {
        "nan": (ValueError, (_arg, "finite", "nan"), call(_cls, float("nan"))),
        "inf": (ValueError, (_arg, "finite", "inf"), call(_cls, -np.inf)),
        "str": (TypeError, (_arg, "real number", "'a'"), call(_cls, "a")),
        "bool": (TypeError, (_arg, "real number", "bool"), call(_cls, True)),
        "array": (TypeError, (_arg, "real number", "shape"), call(_cls, np.array([0.1]))),
        "complex": (TypeError, (_arg, "real number", "complex"), call(_cls, 1 + 1j)),
        "keyword": (TypeError, (_arg, "real number", "None"), call(_cls, **{_arg: None})),
    })

for _cls in (hvp.Identity, hvp.ReLU, hvp.Tanh, hvp.Sigmoid, hvp.Softsign, hvp.Softplus):
    add(_cls.__name__, {"argument": (TypeError, (_cls.__name__, "argument"), call(_cls, 0.5))})

add("Sequential", {
    "no-layers": (ValueError, ("at least one layer",), call(hvp.Sequential)),
    "class-activation": (TypeError, (r"layers\[1\]", "class Tanh", r"hvp\.Tanh\(\)"),
                         call(hvp.Sequential, lambda c: hvp.Linear(4, 5), hvp.Tanh)),
    "class-Linear": (TypeError, (r"layers\[0\]", "class Linear", r"hvp\.Linear\(in_features, out_features\)"),
                     call(hvp.Sequential, hvp.Linear, lambda c: hvp.Tanh())),
    "class-last": (TypeError, (r"layers\[2\]", "class Sigmoid", r"hvp\.Sigmoid\(\)"),
                   call(hvp.Sequential, lambda c: hvp.Linear(4, 5), lambda c: hvp.Tanh(), hvp.Sigmoid)),
    "str-layer": (TypeError, (r"layers\[1\]", "'tanh'"), call(hvp.Sequential, lambda c: hvp.Linear(4, 5), "tanh")),
    "list-of-layers": (TypeError, (r"layers\[0\]", r"\*layers"), call(hvp.Sequential, lambda c: [hvp.Linear(4, 5)])),
    "no-parameters": (ValueError, ("at least one layer with parameters", "hvp.Linear"),
                      call(hvp.Sequential, lambda c: hvp.Tanh())),
    "widths-mismatch": (ValueError, ("layer 2", r"\b4\b", r"\b5\b"),
                        call(hvp.Sequential, lambda c: hvp.Linear(2, 5), lambda c: hvp.Tanh(),
                             lambda c: hvp.Linear(4, 3))),
})

add("init", {
    "seed-negative": (ValueError, ("seed", "int >= 0", "Generator", "-1"), call(lambda c: c.net.init, seed=-1)),
    "seed-float": (TypeError, ("seed", "int >= 0", "1.5"), call(lambda c: c.net.init, seed=1.5)),
    "seed-str": (TypeError, ("seed", "'a'"), call(lambda c: c.net.init, seed="a")),
    "seed-bool": (TypeError, ("seed", "bool"), call(lambda c: c.net.init, seed=True)),
    "dtype-int": (TypeError, ("dtype", "float32 or float64", "int32"), call(lambda c: c.net.init, dtype=np.int32)),
    "dtype-unknown": (TypeError, ("dtype", "float32 or float64", "banana"), call(lambda c: c.net.init, dtype="banana")),
})

add("forward", {
    "theta-list": (TypeError, ("theta", "numpy array", "list"),
                   call(lambda c: c.net.forward, lambda c: list(c.theta), lambda c: c.X)),
    "theta-short": (ValueError, ("theta", NUM_P, NUM_P1), call(lambda c: c.net.forward, lambda c: c.theta[:-1],
                                                               lambda c: c.X)),
    "X-ragged": (ValueError, (r"\bX\b", "rectangular"), call(lambda c: c.net.forward, lambda c: c.theta, RAGGED)),
    "X-wrong-width": (ValueError, (r"\bX\b", rf"\b{M}\b"), call(lambda c: c.net.forward, lambda c: c.theta,
                                                                 lambda c: c.X[:, :1])),
})

add("unflatten", {
    "theta-list": (TypeError, ("theta", "list"), call(lambda c: c.net.unflatten, lambda c: list(c.theta))),
    "theta-short": (ValueError, ("theta", rf"\({P},\)", rf"\({P - 1},\)"),
                    call(lambda c: c.net.unflatten, lambda c: c.theta[:-1])),
})

add("unflatten_columns", {
    "V-list": (TypeError, (r"\bV\b", "list"), call(lambda c: c.net.unflatten_columns, lambda c: [list(c.theta)])),
    "V-1d": (ValueError, (r"\bV\b", rf"\({P}, k\)", rf"\({P},\)"),
             call(lambda c: c.net.unflatten_columns, lambda c: c.theta)),
    "V-rows": (ValueError, (r"\bV\b", rf"\({P}, k\)", rf"\(2, {P}\)"),
               call(lambda c: c.net.unflatten_columns, lambda c: np.stack([c.theta, c.theta]))),
    "V-not-contiguous": (ValueError, (r"\bV\b", "C-contiguous"),
                         call(lambda c: c.net.unflatten_columns, lambda c: np.stack([c.theta, c.theta]).T)),
})

# -- losses and their targets -------------------------------------------------------------------

for _cls in (hvp.CrossEntropyLoss, hvp.MSELoss, hvp.BCEWithLogitsLoss):
    add(_cls.__name__, {
        "reduction-unknown": (ValueError, ("reduction", "'mean' or 'sum'", "'none'"), call(_cls, reduction="none")),
        "reduction-None": (TypeError, ("reduction", "None"), call(_cls, reduction=None)),
        "reduction-list": (TypeError, ("reduction", "list"), call(_cls, reduction=["mean"])),
    })


def _edit(name, index, value):
    """A lambda: a copy of ``c.<name>`` with ``[index] = value``."""
    def edited(c):
        a = getattr(c, name).copy()
        a[index] = value
        return a
    return lambda c: edited(c)


def targets(loss, y):
    return using("base", hvp.loss_and_grad, loss=lambda c: getattr(c, loss), y=y)


add("targets", {
    "ce-labels-float": (TypeError, (r"\by\b", "integer", "float64"), targets("ce", lambda c: c.labels.astype(float))),
    "ce-labels-bool": (TypeError, (r"\by\b", "bool"), targets("ce", lambda c: c.labels > 0)),
    "ce-labels-too-big": (ValueError, (r"\by\b", rf"\[0, {C}\)", r"\b7\b"), targets("ce", _edit("labels", 2, 7))),
    "ce-labels-negative": (ValueError, (r"\by\b", "-1"), targets("ce", _edit("labels", 1, -1))),
    "ce-labels-too-few": (ValueError, (r"\by\b", rf"\b{B}\b", r"\(3,\)"), targets("ce", lambda c: c.labels[:3])),
    "ce-labels-ragged": (ValueError, (r"\by\b", "rectangular"), targets("ce", [[0, 1], [2]])),
    "ce-labels-str": (TypeError, (r"\by\b", "real"), targets("ce", lambda c: c.labels.astype(str))),
    "ce-probs-row-sum": (ValueError, (r"\by\b", "sum", "row 2", r"1\.5\b"), targets("ce", _edit("probs", 2, 0.5))),
    "ce-probs-row-sum-1e-9-off": (ValueError, (r"\by\b", "sum", "row 4"),
                                  targets("ce", lambda c: c.probs + np.outer(np.arange(B) == 4, [1e-9, 0, 0]))),
    "ce-probs-scaled": (ValueError, (r"\by\b", "sum"), targets("ce", lambda c: 2 * c.probs)),
    "ce-probs-negative": (ValueError, (r"\by\b", ">= 0", r"y\[1, 1\]", r"-0\.5"),
                          targets("ce", _edit("probs", 1, [1.5, -0.5, 0.0]))),
    "ce-probs-nan": (ValueError, (r"\by\b", "finite"), targets("ce", lambda c: with_nan(c.probs))),
    "ce-probs-wrong-C": (ValueError, (r"\by\b", rf"\({B}, {C}\)", rf"\({B}, {C + 1}\)"),
                         targets("ce", lambda c: np.full((B, C + 1), 1 / (C + 1)))),
    "ce-probs-complex": (TypeError, (r"\by\b", "real", "complex"), targets("ce", lambda c: c.probs.astype(complex))),
    "ce-probs-float32-logits": (ValueError, (r"\by\b", "sum"),
                                targets("ce", lambda c: np.abs(c.targets).astype(np.float32))),
    "mse-wrong-shape": (ValueError, (r"\by\b", rf"\({B}, {C}\)", rf"\({B}, 1\)"),
                        targets("mse", lambda c: c.targets[:, :1])),
    "mse-flat": (ValueError, (r"\by\b", "shape"), targets("mse", lambda c: c.targets.ravel())),
    "mse-nan": (ValueError, (r"\by\b", "finite"), targets("mse", lambda c: with_nan(c.targets))),
    "mse-ragged": (ValueError, (r"\by\b", "rectangular"), targets("mse", [[0.0, 1.0, 2.0], [1.0]])),
    "mse-str": (TypeError, (r"\by\b", "real"), targets("mse", lambda c: c.targets.astype(str))),
    "mse-labels": (ValueError, (r"\by\b", "shape"), targets("mse", lambda c: c.labels)),
    "bce-above-1": (ValueError, (r"\by\b", r"\[0, 1\]", r"1\.5"), targets("bce", _edit("bce_targets", (1, 2), 1.5))),
    "bce-negative": (ValueError, (r"\by\b", r"\[0, 1\]", r"-0\.25"),
                     targets("bce", _edit("bce_targets", (0, 0), -0.25))),
    "bce-wrong-shape": (ValueError, (r"\by\b", rf"\({B}, {C}\)"), targets("bce", lambda c: c.bce_targets[:-1])),
    "bce-nan": (ValueError, (r"\by\b", "finite"), targets("bce", lambda c: with_nan(c.bce_targets))),
    "bce-labels": (ValueError, (r"\by\b", "shape"), targets("bce", lambda c: c.labels)),
})

# -- loss_and_grad and linearize ----------------------------------------------------------------

for _f in (hvp.loss_and_grad, hvp.linearize):
    add(_f.__name__, {
        "net-str": (TypeError, ("net", "hvp.Sequential", "str 'net'"), using("base", _f, net="net")),
        "net-class": (TypeError, ("net", "class Sequential", r"hvp\.Sequential\(\*layers\)"),
                      using("base", _f, net=hvp.Sequential)),
        "net-layer": (TypeError, ("net", "hvp.Sequential", r"Linear\(2, 4"),
                      using("base", _f, net=lambda c: c.net.layers[0])),
        "loss-str": (TypeError, ("loss", "hvp loss instance", "str 'ce'"), using("base", _f, loss="ce")),
        "loss-class": (TypeError, ("loss", "class CrossEntropyLoss", r"call it: hvp\.CrossEntropyLoss\(\)"),
                       using("base", _f, loss=hvp.CrossEntropyLoss)),
        "loss-class-MSE": (TypeError, ("loss", "class MSELoss", r"hvp\.MSELoss\(\)"),
                           using("base", _f, loss=hvp.MSELoss)),
        "loss-tangent-loss": (TypeError, ("loss", "SobolevLoss"), using("base", _f, loss=lambda c: c.sobolev)),
        "loss-function": (TypeError, ("loss", "function"), using("base", _f, loss=lambda c: lambda O, y: 0.0)),
        "theta-list": (TypeError, ("theta", "numpy array"), using("base", _f, theta=lambda c: list(c.theta))),
        "theta-int": (TypeError, ("theta", "float32 or float64", "int"),
                      using("base", _f, theta=lambda c: np.arange(P))),
        "theta-short": (ValueError, ("theta", NUM_P, NUM_P1), using("base", _f, theta=lambda c: c.theta[:-1])),
        "theta-nan": (ValueError, ("theta", "finite"), using("base", _f, theta=lambda c: with_nan(c.theta))),
        "X-ragged": (ValueError, (r"\bX\b", "rectangular"), using("base", _f, X=RAGGED)),
        "X-wrong-width": (ValueError, (r"\bX\b", rf"\b{M}\b", rf"\({B}, 3\)"),
                          using("base", _f, X=lambda c: np.ones((B, 3)))),
        "X-1d": (ValueError, (r"\bX\b", "2-D"), using("base", _f, X=lambda c: c.X[0])),
        "X-empty": (ValueError, (r"\bX\b", "empty"), using("base", _f, X=lambda c: c.X[:0], y=lambda c: c.labels[:0])),
        "X-nan": (ValueError, (r"\bX\b", "finite"), using("base", _f, X=lambda c: with_nan(c.X))),
        "X-complex": (TypeError, (r"\bX\b", "real"), using("base", _f, X=lambda c: c.X.astype(complex))),
        "X-str": (TypeError, (r"\bX\b", "real"), using("base", _f, X=lambda c: c.X.astype(str))),
        "y-wrong-length": (ValueError, (r"\by\b", rf"\b{B}\b"), using("base", _f, y=lambda c: c.labels[:-1])),
        "l2-negative": (ValueError, ("l2", ">= 0", "-1"), using("base", _f, l2=-1.0)),
        "l2-nan": (ValueError, ("l2", "finite"), using("base", _f, l2=float("nan"))),
        "l2-str": (TypeError, ("l2", "real number"), using("base", _f, l2="0.1")),
        "l2-bool": (TypeError, ("l2", "bool"), using("base", _f, l2=True)),
        "l2-array": (TypeError, ("l2", "real number"), using("base", _f, l2=lambda c: np.array([0.1]))),
    })

# -- products at a linearization ------------------------------------------------------------------


def at_pt(name):
    return lambda c: getattr(c.pt, name)


for _name in ("hvp", "ggnvp", "jvp"):
    _method = at_pt(_name)
    add(f"pt.{_name}", {
        "v-short": (ValueError, (r"\bv\b", rf"\({P},\)", rf"\({P - 1},\)"), call(_method, lambda c: c.v[:-1])),
        "v-transposed-block": (ValueError, (r"\bv\b", rf"\({P}, k\)", rf"\(2, {P}\)"),
                               call(_method, lambda c: np.ones((2, P)))),
        "v-3d": (ValueError, (r"\bv\b", rf"\({P}, 2, 1\)"), call(_method, lambda c: np.ones((P, 2, 1)))),
        "v-k0": (ValueError, (r"\bv\b", "k >= 1"), call(_method, lambda c: np.ones((P, 0)))),
        "v-nan": (ValueError, (r"\bv\b", "finite", "1 NaN"), call(_method, lambda c: with_nan(c.v))),
        "v-inf": (ValueError, (r"\bv\b", "finite"), call(_method, lambda c: np.full(P, np.inf))),
        "v-complex": (TypeError, (r"\bv\b", "real", "complex"), call(_method, lambda c: c.v.astype(complex))),
        "v-bool": (TypeError, (r"\bv\b", "real", "bool"), call(_method, lambda c: c.v > 0)),
        "v-str": (TypeError, (r"\bv\b", "real"), call(_method, lambda c: c.v.astype(str))),
        "v-ragged": (ValueError, (r"\bv\b", "rectangular"), call(_method, RAGGED)),
        "v-None": (TypeError, (r"\bv\b", "real"), call(_method, None)),
    })

add("pt.vjp", {
    "u-wrong-C": (ValueError, (r"\bu\b", rf"\({B}, {C}\)", rf"\({B}, {C + 1}\)"),
                  call(at_pt("vjp"), lambda c: np.ones((B, C + 1)))),
    "u-wrong-B": (ValueError, (r"\bu\b", rf"\({B}, {C}\)"), call(at_pt("vjp"), lambda c: c.U[:-1])),
    "u-flat": (ValueError, (r"\bu\b", rf"\({B * C},\)"), call(at_pt("vjp"), lambda c: c.U.ravel())),
    "u-block-wrong-C": (ValueError, (r"\bu\b", rf"\({B}, k, {C}\)"),
                        call(at_pt("vjp"), lambda c: np.ones((B, 2, C + 1)))),
    "u-nan": (ValueError, (r"\bu\b", "finite"), call(at_pt("vjp"), lambda c: with_nan(c.U))),
    "u-complex": (TypeError, (r"\bu\b", "real"), call(at_pt("vjp"), lambda c: c.U.astype(complex))),
    "u-ragged": (ValueError, (r"\bu\b", "rectangular"), call(at_pt("vjp"), [[1.0, 2.0, 3.0], [1.0]])),
})

add("pt.diag_ggn_mc", {
    "num_samples-zero": (ValueError, ("num_samples", ">= 1", r"\b0\b"), call(at_pt("diag_ggn_mc"), num_samples=0)),
    "num_samples-float": (TypeError, ("num_samples", "1.5"), call(at_pt("diag_ggn_mc"), num_samples=1.5)),
    "num_samples-bool": (TypeError, ("num_samples", "bool"), call(at_pt("diag_ggn_mc"), num_samples=True)),
    "seed-negative": (ValueError, ("seed", "int >= 0", "-3"), call(at_pt("diag_ggn_mc"), seed=-3)),
    "seed-str": (TypeError, ("seed", "'x'"), call(at_pt("diag_ggn_mc"), seed="x")),
    "seed-float": (TypeError, ("seed", "0.5"), call(at_pt("diag_ggn_mc"), seed=0.5)),
})

# -- derivatives with respect to the inputs -------------------------------------------------------


def input_jvp(**changes):
    args = {"net": lambda c: c.net, "theta": lambda c: c.theta, "X": lambda c: c.X, "directions": lambda c: c.D}
    return call(hvp.input_jvp, **{**args, **changes})


add("input_jvp", {
    "net-str": (TypeError, ("net", "hvp.Sequential"), input_jvp(net="net")),
    "net-class": (TypeError, ("net", "class Sequential"), input_jvp(net=hvp.Sequential)),
    "theta-short": (ValueError, ("theta", NUM_P), input_jvp(theta=lambda c: c.theta[:-1])),
    "X-ragged": (ValueError, (r"\bX\b", "rectangular"), input_jvp(X=RAGGED)),
    "directions-ragged": (ValueError, ("directions", "rectangular"), input_jvp(directions=RAGGED)),
    "directions-wrong-m": (ValueError, ("directions", r"\(k, 2\)", r"\(2, 3\)"),
                           input_jvp(directions=lambda c: np.ones((2, 3)))),
    "directions-wrong-B": (ValueError, ("directions", rf"\({B}, k, {M}\)", rf"\({B + 1}, 1, {M}\)"),
                           input_jvp(directions=lambda c: np.ones((B + 1, 1, M)))),
    "directions-nan": (ValueError, ("directions", "finite"), input_jvp(directions=lambda c: with_nan(c.D))),
    "directions-complex": (TypeError, ("directions", "real"), input_jvp(directions=lambda c: c.D.astype(complex))),
})

add("input_jacobian", {
    "net-str": (TypeError, ("net", "hvp.Sequential"), call(hvp.input_jacobian, "net", lambda c: c.theta,
                                                            lambda c: c.X)),
    "net-class": (TypeError, ("net", "class Sequential"), call(hvp.input_jacobian, hvp.Sequential, lambda c: c.theta,
                                                                lambda c: c.X)),
    "theta-list": (TypeError, ("theta", "numpy array"), call(hvp.input_jacobian, lambda c: c.net,
                                                             lambda c: list(c.theta), lambda c: c.X)),
    "X-wrong-width": (ValueError, (r"\bX\b", rf"\b{M}\b"), call(hvp.input_jacobian, lambda c: c.net,
                                                                 lambda c: c.theta, lambda c: c.X[:, :1])),
    "X-nan": (ValueError, (r"\bX\b", "finite"), call(hvp.input_jacobian, lambda c: c.net, lambda c: c.theta,
                                                      lambda c: with_nan(c.X))),
})

for _f in (hvp.tangent_loss_and_grad, hvp.tangent_sum_grad_squared):
    add(_f.__name__, {
        "net-str": (TypeError, ("net", "hvp.Sequential"), using("tangent", _f, net="net")),
        "loss-class": (TypeError, ("loss", "class SobolevLoss", r"hvp\.SobolevLoss\(\)"),
                       using("tangent", _f, loss=hvp.SobolevLoss)),
        "loss-class-penalty": (TypeError, ("loss", "class JacobianPenalty",
                                           r"hvp\.JacobianPenalty\(base_loss, weight\)"),
                               using("tangent", _f, loss=hvp.JacobianPenalty)),
        "loss-output-loss": (TypeError, ("loss", "SobolevLoss", "loss_and_grad"), using("tangent", _f,
                                                                                        loss=lambda c: c.ce)),
        "loss-str": (TypeError, ("loss", "forward"), using("tangent", _f, loss="sobolev")),
        "theta-short": (ValueError, ("theta", NUM_P), using("tangent", _f, theta=lambda c: c.theta[:-1])),
        "X-ragged": (ValueError, (r"\bX\b", "rectangular"), using("tangent", _f, X=RAGGED)),
        "y-not-a-pair": (TypeError, ("pair", r"\(Y, dY\)"), using("tangent", _f, y=lambda c: c.sobolev_y[0])),
        "y-Y-ragged": (ValueError, (r"\bY\b", "rectangular"), using("tangent", _f,
                                                                    y=lambda c: (RAGGED, c.sobolev_y[1]))),
        "y-dY-wrong-k": (ValueError, ("dY", rf"\({B}, {K}, {C}\)"),
                         using("tangent", _f, y=lambda c: (c.sobolev_y[0], c.sobolev_y[1][:, :1]))),
        "y-dY-nan": (ValueError, ("dY", "finite"),
                     using("tangent", _f, y=lambda c: (c.sobolev_y[0], with_nan(c.sobolev_y[1])))),
        "directions-ragged": (ValueError, ("directions", "rectangular"), using("tangent", _f, directions=RAGGED)),
        "directions-nan": (ValueError, ("directions", "finite"), using("tangent", _f,
                                                                       directions=lambda c: with_nan(c.D))),
    })

add("tangent_loss_and_grad", {
    "l2-negative": (ValueError, ("l2", ">= 0"), using("tangent", hvp.tangent_loss_and_grad, l2=-0.5)),
    "penalty-labels-too-few": (ValueError, (r"\by\b", rf"\b{B}\b"),
                               using("tangent", hvp.tangent_loss_and_grad,
                                     loss=lambda c: hvp.JacobianPenalty(c.ce, 1.0), y=lambda c: c.labels[:3])),
})

add("SobolevLoss", {
    "weight-negative": (ValueError, ("weight", ">= 0", "-1"), call(hvp.SobolevLoss, -1.0)),
    "weight-nan": (ValueError, ("weight", "finite"), call(hvp.SobolevLoss, float("nan"))),
    "weight-str": (TypeError, ("weight", "real number"), call(hvp.SobolevLoss, "1")),
    "weight-bool": (TypeError, ("weight", "bool"), call(hvp.SobolevLoss, True)),
})

add("JacobianPenalty", {
    "base_loss-class": (TypeError, ("base_loss", "class CrossEntropyLoss", r"call it: hvp\.CrossEntropyLoss\(\)"),
                        call(hvp.JacobianPenalty, hvp.CrossEntropyLoss, 1.0)),
    "base_loss-str": (TypeError, ("base_loss", "CrossEntropyLoss"), call(hvp.JacobianPenalty, "ce", 1.0)),
    "base_loss-tangent-loss": (TypeError, ("base_loss",), call(hvp.JacobianPenalty, lambda c: c.sobolev, 1.0)),
    "weight-negative": (ValueError, ("weight", ">= 0"), call(hvp.JacobianPenalty, lambda c: c.ce, -2.0)),
    "weight-array": (TypeError, ("weight", "real number"), call(hvp.JacobianPenalty, lambda c: c.ce,
                                                                lambda c: np.ones(2))),
})

# -- curvature operators over a data set -------------------------------------------------------------

for _cls in (hvp.HessianOperator, hvp.GGNOperator, hvp.EmpiricalFisherOperator):
    def _product(method, v, cls=_cls):
        return call(lambda c: getattr(cls(**c.operator), method), v)

    add(_cls.__name__, {
        "net-str": (TypeError, ("net", "hvp.Sequential", "str"), using("operator", _cls, net="net")),
        "net-class": (TypeError, ("net", "class Sequential"), using("operator", _cls, net=hvp.Sequential)),
        "loss-str": (TypeError, ("loss", "hvp loss"), using("operator", _cls, loss="cross-entropy")),
        "loss-class": (TypeError, ("loss", "class CrossEntropyLoss", r"hvp\.CrossEntropyLoss\(\)"),
                       using("operator", _cls, loss=hvp.CrossEntropyLoss)),
        "loss-tangent-loss": (TypeError, ("loss", "SobolevLoss"), using("operator", _cls, loss=lambda c: c.sobolev)),
        "theta-short": (ValueError, ("theta", NUM_P), using("operator", _cls, theta=lambda c: c.theta[:-1])),
        "theta-float16": (TypeError, ("theta", "float32 or float64", "float16"),
                          using("operator", _cls, theta=lambda c: c.theta.astype(np.float16))),
        "data-int": (TypeError, ("data", r"\(X, y\)", "int"), using("operator", _cls, data=3)),
        "data-empty": (ValueError, ("data", "no batch"), using("operator", _cls, data=[])),
        "data-X-alone": (TypeError, ("data", "batch 0"), using("operator", _cls, data=lambda c: [c.X])),
        "data-second-batch-bad": (TypeError, ("data", "batch 1"),
                                  using("operator", _cls, data=lambda c: [(c.X, c.labels), c.X])),
        "data-y-wrong-length": (ValueError, (r"\by\b", rf"\b{B}\b"),
                                using("operator", _cls, data=lambda c: (c.X, c.labels[:-1]))),
        "data-X-nan": (ValueError, (r"\bX\b", "finite"),
                       using("operator", _cls, data=lambda c: [(c.X, c.labels), (with_nan(c.X), c.labels)])),
        "data-X-ragged": (ValueError, (r"\bX\b", "rectangular"),
                          using("operator", _cls, data=lambda c: [(RAGGED, c.labels[:2])])),
        "data-probs-unnormalized": (ValueError, (r"\by\b", "sum"),
                                    using("operator", _cls, data=lambda c: (c.X, 3 * c.probs))),
        "l2-negative": (ValueError, ("l2", ">= 0"), using("operator", _cls, l2=-1.0)),
        "cache-str": (TypeError, ("cache", "True or False"), using("operator", _cls, cache="no")),
        "matvec-short": (ValueError, (r"\bv\b", rf"\({P},\)", rf"\({P - 1},\)"),
                         _product("matvec", lambda c: c.v[:-1])),
        "matmul-short": (ValueError, (r"\bv\b", rf"\({P},\)"), _product("__matmul__", lambda c: c.v[:-1])),
        "matvec-nan": (ValueError, (r"\bv\b", "finite"), _product("matvec", lambda c: with_nan(c.v))),
        "matvec-ragged": (ValueError, (r"\bv\b", "rectangular"), _product("matvec", RAGGED)),
        "matvec-complex": (TypeError, (r"\bv\b", "real"), _product("matvec", lambda c: c.v.astype(complex))),
        "matmat-1d": (ValueError, (r"\bV\b", rf"\({P}, k\)"), _product("matmat", lambda c: c.v)),
        "matmat-nan": (ValueError, (r"\bV\b", "finite"), _product("matmat", lambda c: with_nan(np.ones((P, 2))))),
    })

# -- randomized estimators (hvp.curvature) ----------------------------------------------------------


def estimator(f, **kwargs):
    return call(f, **{"op": lambda c: c.A, **kwargs})


add("eigenvalues", {
    "op-str": (TypeError, (r"\bop\b", "LinearOperator"), estimator(curvature.eigenvalues, op="H")),
    "op-not-square": (ValueError, (r"\bop\b", "square", r"\(3, 4\)"),
                      estimator(curvature.eigenvalues, op=lambda c: np.ones((3, 4)))),
    "op-int": (TypeError, (r"\bop\b", "float", "int"), estimator(curvature.eigenvalues,
                                                                  op=lambda c: np.eye(4, dtype=int))),
    "k-zero": (ValueError, (r"\bk\b", ">= 1"), estimator(curvature.eigenvalues, k=0)),
    "k-size": (ValueError, (r"\bk\b", r"\b6\b"), estimator(curvature.eigenvalues, k=6)),
    "k-size-hessian-operator": (ValueError, (r"\bk\b", NUM_P),
                                estimator(curvature.eigenvalues, op=lambda c: hvp.HessianOperator(**c.operator), k=P)),
    "which": (ValueError, ("which", "largest", "'big'"), estimator(curvature.eigenvalues, which="big")),
    "method": (ValueError, ("method", "lanczos", "'qr'"), estimator(curvature.eigenvalues, method="qr")),
    "tol-negative": (ValueError, ("tol", ">= 0"), estimator(curvature.eigenvalues, tol=-1.0)),
    "block_size-below-k": (ValueError, ("block_size", r"\b3\b"),
                           estimator(curvature.eigenvalues, k=3, method="power", block_size=2)),
    "maxiter-negative-lanczos": (ValueError, ("maxiter",), estimator(curvature.eigenvalues, maxiter=-1)),
    "maxiter-negative-power": (ValueError, ("maxiter",), estimator(curvature.eigenvalues, maxiter=-1,
                                                                   method="power")),
    "seed-negative": (ValueError, (r"\bseed\b",), estimator(curvature.eigenvalues, seed=-1)),
    "progress-str": (TypeError, ("progress",), estimator(curvature.eigenvalues, progress="yes")),
})

add("trace", {
    "num_matvecs-one": (ValueError, ("num_matvecs", ">= 2"), estimator(curvature.trace, num_matvecs=1)),
    "num_matvecs-hutchpp-three": (ValueError, ("num_matvecs", ">= 4"),
                                  estimator(curvature.trace, num_matvecs=3, method="hutch++")),
    "method": (ValueError, ("method", "hutchinson", "'exact'"), estimator(curvature.trace, method="exact")),
    "block_size-zero": (ValueError, ("block_size", ">= 1"), estimator(curvature.trace, block_size=0)),
    "op-ragged": (TypeError, (r"\bop\b",), estimator(curvature.trace, op=RAGGED)),
    "seed-str": (TypeError, (r"\bseed\b",), estimator(curvature.trace, seed="a")),
})

add("diagonal", {
    "num_matvecs-zero": (ValueError, ("num_matvecs", ">= 1"), estimator(curvature.diagonal, num_matvecs=0)),
    "block_size-negative": (ValueError, ("block_size", ">= 1"), estimator(curvature.diagonal, block_size=-4)),
    "op-not-square": (ValueError, (r"\bop\b", "square"), estimator(curvature.diagonal, op=lambda c: np.ones((2, 3)))),
})

add("spectral_density", {
    "sigma-zero": (ValueError, ("sigma", "> 0"), estimator(curvature.spectral_density, sigma=0.0)),
    "sigma-nan": (ValueError, ("sigma", "> 0"), estimator(curvature.spectral_density, sigma=np.nan)),
    "grid-one-point": (ValueError, ("grid", ">= 2"), estimator(curvature.spectral_density, grid=1)),
    "grid-2d": (ValueError, ("grid", "1-D"), estimator(curvature.spectral_density, grid=lambda c: np.ones((2, 2)))),
    "grid-nan": (ValueError, ("grid", "finite"), estimator(curvature.spectral_density,
                                                           grid=lambda c: with_nan(np.ones(4)))),
    "grid-ragged": (ValueError, ("grid",), estimator(curvature.spectral_density, grid=RAGGED)),
    "num_probes-zero": (ValueError, ("num_probes", ">= 1"), estimator(curvature.spectral_density, num_probes=0)),
    "lanczos_steps-zero": (ValueError, ("lanczos_steps", ">= 1"),
                           estimator(curvature.spectral_density, lanczos_steps=0)),
    "reorthogonalize-str": (TypeError, ("reorthogonalize",),
                            estimator(curvature.spectral_density, reorthogonalize="no")),
})

# -- scipy.optimize bridge ---------------------------------------------------------------------------------

add("scipy_objective", {
    "net-str": (TypeError, ("net", "hvp.Sequential"), using("scipy", hvp.scipy_objective, net="net")),
    "net-class": (TypeError, ("net", "class Sequential"), using("scipy", hvp.scipy_objective, net=hvp.Sequential)),
    "loss-str": (TypeError, ("loss", "hvp loss"), using("scipy", hvp.scipy_objective, loss="mse")),
    "loss-class": (TypeError, ("loss", "class CrossEntropyLoss", r"hvp\.CrossEntropyLoss\(\)"),
                   using("scipy", hvp.scipy_objective, loss=hvp.CrossEntropyLoss)),
    "X-ragged": (ValueError, (r"\bX\b", "rectangular"), using("scipy", hvp.scipy_objective, X=RAGGED)),
    "X-nan": (ValueError, (r"\bX\b", "finite"), using("scipy", hvp.scipy_objective, X=lambda c: with_nan(c.X))),
    "y-out-of-range": (ValueError, (r"\by\b", r"\[0, 3\)"), using("scipy", hvp.scipy_objective,
                                                                 y=lambda c: c.labels + 3)),
    "y-unnormalized-probs": (ValueError, (r"\by\b", "sum"), using("scipy", hvp.scipy_objective,
                                                                 y=lambda c: c.probs + 0.1)),
    "l2-negative": (ValueError, ("l2", ">= 0"), using("scipy", hvp.scipy_objective, l2=-1.0)),
    "curvature": (ValueError, ("curvature", "hessian", "'fisher'"), using("scipy", hvp.scipy_objective,
                                                                          curvature="fisher")),
    "fun-theta-short": (ValueError, ("theta", NUM_P), call(lambda c: hvp.scipy_objective(**c.scipy)[0],
                                                           lambda c: c.theta[:-1])),
    "jac-theta-int": (TypeError, ("theta", "float32 or float64"), call(lambda c: hvp.scipy_objective(**c.scipy)[1],
                                                                       lambda c: np.arange(P))),
})

# -- optimizers ------------------------------------------------------------------------------------------

for _cls in (optimizers.NewtonCG, optimizers.SGD, optimizers.Adam):
    def _method(name, cls=_cls, **kwargs):
        return call(lambda c: getattr(cls(**c.opt), name), **kwargs)

    def _minimize(cls=_cls, **kwargs):
        return _method("minimize", cls, **{"data": lambda c: (c.X, c.labels), **kwargs})

    add(_cls.__name__, {
        "net-str": (TypeError, ("net", "hvp.Sequential", "str 'net'"), using("opt", _cls, net="net")),
        "net-class": (TypeError, ("net", "class Sequential"), using("opt", _cls, net=hvp.Sequential)),
        "loss-class": (TypeError, ("loss", "class CrossEntropyLoss", r"call it: hvp\.CrossEntropyLoss\(\)"),
                       using("opt", _cls, loss=hvp.CrossEntropyLoss)),
        "loss-str": (TypeError, ("loss", "hvp loss"), using("opt", _cls, loss="ce")),
        "theta0-list": (TypeError, ("theta", "numpy array"), using("opt", _cls, theta0=lambda c: list(c.theta))),
        "theta0-short": (ValueError, ("theta", NUM_P), using("opt", _cls, theta0=lambda c: c.theta[:-1])),
        "theta0-nan": (ValueError, ("theta", "finite"), using("opt", _cls, theta0=lambda c: with_nan(c.theta))),
        "l2-negative": (ValueError, ("l2", ">= 0"), using("opt", _cls, l2=-0.1)),
        "progress": (ValueError, ("progress", "'verbose'"), using("opt", _cls, progress="verbose")),
        "minimize-data-X-alone": (TypeError, ("data", "pair"), _minimize(data=lambda c: c.X)),
        "minimize-data-empty": (TypeError, ("data", "pair"), _minimize(data=[])),
        "minimize-data-y-wrong-length": (ValueError, (r"\by\b", rf"\b{B}\b"),
                                         _minimize(data=lambda c: (c.X, c.labels[:-1]))),
        "minimize-data-X-object": (TypeError, (r"\bX\b", "real numbers", "object"),
                                   _minimize(data=lambda c: (np.array(RAGGED, dtype=object), c.labels))),
        "minimize-max_iters-negative": (ValueError, ("max_iters", ">= 0"), _minimize(max_iters=-1)),
        "minimize-gtol-str": (TypeError, ("gtol", "real number"), _minimize(gtol="small")),
        "minimize-callback": (TypeError, ("callback", "callable"), _minimize(callback=3)),
        "minimize-max_rejections-zero": (ValueError, ("max_rejections", ">= 1"), _minimize(max_rejections=0)),
        "step-X-wrong-width": (ValueError, (r"\bX\b", rf"\b{M}\b"),
                               _method("step", X=lambda c: c.X[:, :1], y=lambda c: c.labels)),
        "step-X-ragged": (ValueError, (r"\bX\b", "rectangular"), _method("step", X=RAGGED, y=lambda c: c.labels[:2])),
        "step-y-probs-unnormalized": (ValueError, (r"\by\b", "sum"),
                                      _method("step", X=lambda c: c.X, y=lambda c: 2 * c.probs)),
        "step-y-float-labels": (TypeError, (r"\by\b", "integer"),
                                _method("step", X=lambda c: c.X, y=lambda c: c.labels.astype(float))),
    })

add("NewtonCG", {
    "curvature": (ValueError, ("curvature", "'fisher'"), using("opt", optimizers.NewtonCG, curvature="fisher")),
    "damping-negative": (ValueError, ("damping", "> 0"), using("opt", optimizers.NewtonCG, damping=-1.0)),
    "cg_max_iter-zero": (ValueError, ("cg_max_iter", ">= 1"), using("opt", optimizers.NewtonCG, cg_max_iter=0)),
    "warm_start-above-1": (ValueError, ("warm_start", r"\[0, 1\]"), using("opt", optimizers.NewtonCG, warm_start=2.0)),
    "backtrack-str": (TypeError, ("backtrack", "True or False"), using("opt", optimizers.NewtonCG, backtrack="yes")),
    "curvature_batch-fraction-above-1": (ValueError, ("curvature_batch", r"\(0, 1\]"),
                                         using("opt", optimizers.NewtonCG, curvature_batch=1.5)),
    "curvature_batch-str": (TypeError, ("curvature_batch",), using("opt", optimizers.NewtonCG, curvature_batch="half")),
})

add("SGD", {
    "lr-zero": (ValueError, ("lr", "> 0"), using("opt", optimizers.SGD, lr=0.0)),
    "momentum-one": (ValueError, ("momentum", r"\[0, 1\)"), using("opt", optimizers.SGD, momentum=1.0)),
    "nesterov-int": (TypeError, ("nesterov", "True or False"), using("opt", optimizers.SGD, nesterov=1)),
})

add("Adam", {
    "lr-str": (TypeError, ("lr", "real number"), using("opt", optimizers.Adam, lr="fast")),
    "betas-one": (TypeError, ("betas", "pair"), using("opt", optimizers.Adam, betas=(0.9,))),
    "betas-beta2-one": (ValueError, ("betas", r"\[0, 1\)"), using("opt", optimizers.Adam, betas=(0.9, 1.0))),
    "eps-negative": (ValueError, ("eps", "> 0"), using("opt", optimizers.Adam, eps=-1e-8)),
})

add("newton_cg", {
    "fun-not-callable": (TypeError, ("fun", "callable"), using("newton", optimizers.newton_cg, fun=1.0)),
    "jac-None": (TypeError, ("jac", "callable or True"), using("newton", optimizers.newton_cg, jac=None)),
    "hessp-None": (TypeError, ("hessp", "callable"), using("newton", optimizers.newton_cg, hessp=None)),
    "hess_diag-not-callable": (TypeError, ("hess_diag", "callable"),
                               using("newton", optimizers.newton_cg, hess_diag=lambda c: np.ones(2))),
    "callback-not-callable": (TypeError, ("callback", "callable"), using("newton", optimizers.newton_cg,
                                                                         callback="print")),
    "x0-nan": (ValueError, ("x0", "finite"), using("newton", optimizers.newton_cg,
                                                   x0=lambda c: np.array([np.nan, 1.0]))),
    "x0-ragged": (ValueError, ("x0",), using("newton", optimizers.newton_cg, x0=RAGGED)),
    "x0-complex": (TypeError, ("x0",), using("newton", optimizers.newton_cg, x0=lambda c: np.array([1 + 1j, 2.0]))),
    "x0-empty": (ValueError, ("x0",), using("newton", optimizers.newton_cg, x0=lambda c: np.zeros(0))),
    "args-not-a-tuple": (TypeError, ("args",), using("newton", optimizers.newton_cg, args=3)),
    "maxiter-negative": (ValueError, ("maxiter", ">= 0"), using("newton", optimizers.newton_cg, maxiter=-1)),
    "damping-negative": (ValueError, ("damping", "> 0"), using("newton", optimizers.newton_cg, damping=-1.0)),
    "gtol-negative": (ValueError, ("gtol", ">= 0"), using("newton", optimizers.newton_cg, gtol=-1e-5)),
    "max_rejections-zero": (ValueError, ("max_rejections", ">= 1"), using("newton", optimizers.newton_cg,
                                                                          max_rejections=0)),
    "cg_progress_tol-zero": (ValueError, ("cg_progress_tol", "> 0"), using("newton", optimizers.newton_cg,
                                                                           cg_progress_tol=0.0)),
})

add("reuse_freed_memory", {
    "max_block-zero": (ValueError, ("max_block",), call(hvp.reuse_freed_memory, max_block=0)),
    "keep-bool": (TypeError, ("keep", "int"), call(hvp.reuse_freed_memory, keep=True)),
})

def _params():
    for name, case in CASES.items():
        yield pytest.param(case, id=name)


@pytest.mark.filterwarnings("ignore:Casting complex values to real")
@pytest.mark.parametrize("case", list(_params()))
def test_bad_input(c, case):
    error, groups, build = case
    function, args, kwargs = build(c)
    arrays = list(_arrays((args, kwargs)))
    copies = [a.copy() for a in arrays]
    with pytest.raises(error, match=says(*groups)):
        function(*args, **kwargs)
    for a, before in zip(arrays, copies):
        assert a.dtype == before.dtype and a.shape == before.shape
        assert np.array_equal(a, before, equal_nan=a.dtype.kind in "fc"), "the caller's array was modified"


# -- checkpoints
# Bad files given to NewtonCG.load, Adam.load and SGD.load (empty, truncated, foreign, pickled, misshapen
# state, ragged history, ...) are the cases of tests/test_checkpoints.py, which builds them from real saves.
