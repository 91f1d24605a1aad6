"""Bad inputs raise clear errors; callers' arrays are never modified."""

from __future__ import annotations

import math

import numpy as np
import pytest

import hvp
from hvp._checks import all_finite

# Base problem: m = 2 inputs, hidden 4, C = 3 outputs, B = 5 examples, P = 2*4 + 4 + 4*3 + 3 = 27.
SPEC = ("lin:2:4", "tanh", "lin:4:3")
M, C, B, P = 2, 3, 5, 27
ERRORS = (ValueError, TypeError)
ENTRIES = ["loss_and_grad", "linearize"]

THETA = r"theta|parameter"
XNAME = r"\bX\b|input"
YNAME = r"\by\b|target|label"
VNAME = r"\bv\b|vector|direction"
UNAME = r"\bu\b|cotangent|output"


def says(*groups: str) -> str:
    """Regex requiring every alternative group somewhere in the message (any order, any case)."""
    return "(?is)" + "".join(f"(?=.*(?:{g}))" for g in groups)


def num(n) -> str:
    return rf"(?<![\d.]){n}(?![\d.])"


@pytest.fixture(params=["ce_labels", "ce_probs", "mse"])
def base(request, make_problem):
    p = make_problem(SPEC, request.param, "mean", batch=B, seed=0)
    assert (p.P, p.B, p.C) == (P, B, C)
    return p


def call(entry, p, theta=None, X=None, y=None):
    theta = p.theta if theta is None else theta
    X = p.X if X is None else X
    y = p.y if y is None else y
    if entry == "loss_and_grad":
        return hvp.loss_and_grad(p.net, p.loss, theta, X, y)
    return hvp.linearize(p.net, p.loss, theta, X, y)


# --------------------------------------------------------------------------- theta


def _bad_thetas(theta):
    t_nan = theta.copy()
    t_nan[3] = np.nan
    t_inf = theta.copy()
    t_inf[-1] = -np.inf
    return {
        "too-long": (np.concatenate([theta, [0.5]]), (THETA, num(P), num(P + 1))),
        "too-short": (theta[:-1].copy(), (THETA, num(P), num(P - 1))),
        "2d": (theta.reshape(P, 1).copy(), (THETA,)),
        "int": (np.arange(P), (THETA, "int", "float")),
        "complex": (theta.astype(np.complex128), (THETA, "complex", "float")),
        "object": (theta.astype(object), (THETA, "object", "float")),
        "nan": (t_nan, (THETA, "nan|finite")),
        "inf": (t_inf, (THETA, "inf|finite")),
    }


BAD_THETA_IDS = ["too-long", "too-short", "2d", "int", "complex", "object", "nan", "inf"]


@pytest.mark.parametrize("case", BAD_THETA_IDS)
@pytest.mark.parametrize("entry", ENTRIES)
def test_bad_theta(base, entry, case):
    theta, groups = _bad_thetas(base.theta)[case]
    with pytest.raises(ERRORS, match=says(*groups)):
        call(entry, base, theta=theta)


@pytest.mark.parametrize("case", BAD_THETA_IDS)
def test_bad_theta_forward(make_problem, case):
    p = make_problem(SPEC, batch=B)
    theta, groups = _bad_thetas(p.theta)[case]
    with pytest.raises(ERRORS, match=says(*groups)):
        p.net.forward(theta, p.X)


# --------------------------------------------------------------------------- X


def _bad_X(X):
    x_nan = X.copy()
    x_nan[1, 0] = np.nan
    x_inf = X.copy()
    x_inf[0, 1] = np.inf
    return {
        "features": (np.ones((B, M + 4)), (XNAME, num(M), num(M + 4))),
        "ndim1": (X[0].copy(), (XNAME, r"dim|2-?d|shape|matrix")),
        "ndim3": (X[:, :, None].copy(), (XNAME, r"dim|2-?d|shape|matrix")),
        "nan": (x_nan, (XNAME, "nan|finite")),
        "inf": (x_inf, (XNAME, "inf|finite")),
    }


BAD_X_IDS = ["features", "ndim1", "ndim3", "nan", "inf"]


@pytest.mark.parametrize("case", BAD_X_IDS)
@pytest.mark.parametrize("entry", ENTRIES)
def test_bad_X(base, entry, case):
    X, groups = _bad_X(base.X)[case]
    with pytest.raises(ERRORS, match=says(*groups)):
        call(entry, base, X=X)


@pytest.mark.parametrize("case", BAD_X_IDS)
def test_bad_X_forward(make_problem, case):
    p = make_problem(SPEC, batch=B)
    X, groups = _bad_X(p.X)[case]
    with pytest.raises(ERRORS, match=says(*groups)):
        p.net.forward(p.theta, X)


@pytest.mark.parametrize("entry", ENTRIES)
def test_empty_batch(base, entry):
    X = np.zeros((0, M))
    y = base.y[:0].copy()
    with pytest.raises(ERRORS, match=says(r"empty|batch|(?<!\d)0(?!\d)|at least|no example")):
        call(entry, base, X=X, y=y)


# --------------------------------------------------------------------------- y


BAD_Y = {
    "ce_labels": {
        "too-long": (np.array([0, 1, 2, 0, 1, 2]), (YNAME, num(B), num(B + 1))),
        "too-short": (np.array([0, 1, 2, 0]), (YNAME, num(B), num(B - 1))),
        "too-big": (np.array([0, 1, 5, 2, 0]), (YNAME + "|class", num(5), num(C))),
        "equal-C": (np.array([0, 1, 3, 2, 0]), (YNAME + "|class", num(C))),
        "negative": (np.array([0, -1, 2, 2, 0]), (YNAME + "|class", "-1")),
        "float-labels": (np.array([0.0, 1.0, 2.0, 1.0, 0.0]), ("int", "float")),
        "column": (np.array([[0], [1], [2], [1], [0]]), (YNAME, r"shape|dim|1-?d")),
    },
    "ce_probs": {
        "wrong-C": (np.full((B, C + 1), 0.25), (YNAME, num(C), num(C + 1))),
        "wrong-B": (np.full((B + 1, C), 1 / 3), (YNAME, num(B), num(B + 1))),
        "one-row": (np.full((1, C), 1 / 3), (YNAME, num(B))),
        "3d": (np.full((B, C, 1), 1 / 3), (YNAME, r"shape|dim")),
    },
    "mse": {
        "wrong-C": (np.zeros((B, C + 1)), (YNAME, num(C), num(C + 1))),
        "wrong-B": (np.zeros((B + 1, C)), (YNAME, num(B), num(B + 1))),
        "one-row": (np.zeros((1, C)), (YNAME, num(B))),
        "one-col": (np.zeros((B, 1)), (YNAME, num(C))),
        "flat": (np.zeros(B * C), (YNAME, r"shape|dim|2-?d")),
    },
}

Y_CASES = [(kind, case) for kind, cases in BAD_Y.items() for case in cases]


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("kind,case", Y_CASES, ids=[f"{k}-{c}" for k, c in Y_CASES])
def test_bad_y(make_problem, entry, kind, case):
    p = make_problem(SPEC, kind, "mean", batch=B)
    y, groups = BAD_Y[kind][case]
    with pytest.raises(ERRORS, match=says(*groups)):
        call(entry, p, y=y)


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("shape", [(B,), (1, 1), (1, B), (B, 1, 1)], ids=["flat", "1x1", "1xB", "3d"])
def test_mse_single_output_never_broadcasts(make_problem, entry, shape):
    p = make_problem(("lin:2:3", "sigmoid", "lin:3:1"), "mse", "mean", batch=B)
    assert p.y.shape == (B, 1)
    y = np.zeros(shape)
    with pytest.raises(ERRORS, match=says(YNAME)):
        call(entry, p, y=y)


@pytest.mark.parametrize("bad", ["avg", "elementwise", "batchmean"])
@pytest.mark.parametrize("cls", ["CrossEntropyLoss", "MSELoss"])
def test_unknown_reduction(cls, bad):
    with pytest.raises(ERRORS, match=says("reduction", bad, "mean")):
        getattr(hvp, cls)(reduction=bad)


@pytest.mark.parametrize("cls", ["CrossEntropyLoss", "MSELoss"])
def test_non_string_reduction(cls):
    with pytest.raises(ERRORS, match=says("reduction")):
        getattr(hvp, cls)(reduction=None)


# --------------------------------------------------------------------------- directions


BAD_V = {
    "too-long": (lambda: np.ones(P + 1), (VNAME, num(P), num(P + 1))),
    "too-short": (lambda: np.ones(P - 1), (VNAME, num(P), num(P - 1))),
    "block-too-long": (lambda: np.ones((P + 1, 2)), (VNAME, num(P), num(P + 1))),
    "block-transposed": (lambda: np.ones((2, P)), (VNAME, num(P))),
    "3d": (lambda: np.ones((P, 2, 1)), (VNAME, r"dim|shape|1-?d|2-?d")),
}


@pytest.mark.parametrize("case", list(BAD_V))
@pytest.mark.parametrize("op", ["hvp", "ggnvp", "jvp"])
def test_bad_direction(base, op, case):
    pt = base.linearize()
    make_v, groups = BAD_V[case]
    with pytest.raises(ERRORS, match=says(*groups)):
        getattr(pt, op)(make_v())


@pytest.mark.parametrize("shape", [(B, C + 1), (B + 1, C), (C,), (1, C), (B * C,)],
                         ids=["wrong-C", "wrong-B", "flat-C", "one-row", "flat-BC"])
def test_bad_vjp_cotangent(base, shape):
    pt = base.linearize()
    with pytest.raises(ERRORS, match=says(UNAME)):
        pt.vjp(np.ones(shape))


# --------------------------------------------------------------------------- callers' arrays


def _all_calls(p, theta, X, y, v, V, U):
    """Every public entry point, each followed by a yield so the caller can check the inputs."""
    p.net.forward(theta, X)
    yield "forward"
    hvp.loss_and_grad(p.net, p.loss, theta, X, y, l2=0.1)
    yield "loss_and_grad"
    pt = hvp.linearize(p.net, p.loss, theta, X, y, l2=0.1)
    yield "linearize"
    for op in ("hvp", "ggnvp", "jvp"):
        getattr(pt, op)(v)
        yield op
        getattr(pt, op)(V)
        yield op + "-block"
    pt.vjp(U)
    yield "vjp"


def _inputs(p):
    rng = np.random.default_rng(3)
    return dict(theta=p.theta, X=p.X, y=p.y, v=rng.standard_normal(P), V=rng.standard_normal((P, 3)),
                U=rng.standard_normal((B, C)))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", ["ce_labels", "ce_probs", "mse"])
def test_callers_arrays_not_modified(make_problem, kind, dtype):
    p = make_problem(SPEC, kind, "mean", batch=B, dtype=dtype)
    originals = _inputs(p)
    copies = {k: a.copy() for k, a in originals.items()}
    for step in _all_calls(p, **copies):
        for k in originals:
            assert copies[k].dtype == originals[k].dtype, (step, k)
            np.testing.assert_array_equal(copies[k], originals[k], err_msg=f"{k} modified by {step}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", ["ce_labels", "ce_probs", "mse"])
def test_read_only_arrays_accepted(make_problem, kind, dtype):
    p = make_problem(SPEC, kind, "mean", batch=B, dtype=dtype)
    originals = _inputs(p)
    frozen = {}
    for k, a in originals.items():
        c = a.copy()
        c.flags.writeable = False
        frozen[k] = c
    for _ in _all_calls(p, **frozen):
        pass
    for k in originals:
        np.testing.assert_array_equal(frozen[k], originals[k])


def test_results_do_not_alias_theta(make_problem):
    p = make_problem(SPEC, "mse", "mean", batch=B)
    theta = p.theta.copy()
    _, grad = hvp.loss_and_grad(p.net, p.loss, theta, p.X, p.y, l2=0.5)
    pt = hvp.linearize(p.net, p.loss, theta, p.X, p.y, l2=0.5)
    for out in (grad, pt.grad, pt.hvp(np.ones(P)), pt.ggnvp(np.ones(P))):
        assert not np.shares_memory(out, theta)
    np.testing.assert_array_equal(theta, p.theta)


# --------------------------------------------------------------------------- the finiteness test itself

FINITE_CASES = {
    "normal": lambda a: a,
    "squares-overflow": lambda a: np.full_like(a, np.finfo(a.dtype).max / 2),
    "nan-first": lambda a: _put(a, 0, np.nan),
    "nan-last": lambda a: _put(a, -1, np.nan),
    "inf": lambda a: _put(a, a.size // 2, np.inf),
    "minus-inf": lambda a: _put(a, 1, -np.inf),
    "overflow-and-nan": lambda a: _put(np.full_like(a, np.finfo(a.dtype).max / 2), 3, np.nan),
    "overflow-and-inf": lambda a: _put(np.full_like(a, np.finfo(a.dtype).max), 2, -np.inf),
    "tiny": lambda a: np.full_like(a, np.finfo(a.dtype).tiny / 4),
}
LAYOUTS = {
    "vector": lambda a: a.reshape(-1),
    "matrix": lambda a: a.reshape(6, -1),
    "fortran": lambda a: np.asfortranarray(a.reshape(6, -1)),
    "strided": lambda a: a.reshape(6, -1)[:, ::2],
}


def _put(a, i, value):
    a = a.copy()
    a.flat[i] = value
    return a


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", FINITE_CASES)
def test_all_finite_agrees_with_an_entry_by_entry_loop(dtype, layout, case):
    base = np.random.default_rng(0).standard_normal(6 * 40).astype(dtype)
    a = LAYOUTS[layout](FINITE_CASES[case](base))
    want = all(math.isfinite(float(x)) for x in a.flat)
    assert all_finite(a) is want
    if layout != "strided":  # the strided view skips some of the entries set to NaN or Inf
        assert want == (case in ("normal", "squares-overflow", "tiny"))
