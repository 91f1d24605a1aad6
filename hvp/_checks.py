"""Input validation: every message says what was expected and what came.

This module imports nothing else of hvp (every module imports it): a network and a loss are
recognized by their attributes.
"""

import inspect
import numbers

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
NET_ATTRIBUTES = ("layers", "num_params", "unflatten", "forward_cached")
LOSS_METHODS = ("check_target", "forward", "backward", "hessian_vp")


def describe(a):
    """Short description of an argument for error messages."""
    if isinstance(a, np.ndarray):
        return f"an array of shape {a.shape} and dtype {a.dtype}"
    if isinstance(a, type):
        return f"the class {a.__name__}"
    text = repr(a)
    return (text if text.startswith(type(a).__name__) else f"{type(a).__name__} {text}")[:120]


def call_hint(cls):
    """How to make an instance of ``cls``, e.g. ``hvp.Tanh()`` or ``hvp.Linear(in_features, out_features)``."""
    try:
        params = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):
        params = []
    args = [("*" if p.kind is p.VAR_POSITIONAL else "") + p.name for p in params
            if p.kind is p.VAR_POSITIONAL or (p.default is p.empty and p.kind is not p.VAR_KEYWORD)]
    prefix = "hvp." if cls.__module__.split(".")[0] == "hvp" else ""
    return f"{prefix}{cls.__name__}({', '.join(args)})"


def check_instance(name, value, expected):
    """Raise a TypeError naming ``name`` if ``value`` is a class where an instance belongs (hvp.Tanh for hvp.Tanh())."""
    if isinstance(value, type):
        raise TypeError(f"{name} must be {expected}, got {describe(value)} (call it: {call_hint(value)})")
    return value


def check_net(net):
    """``net``: an hvp.Sequential (an object with its attributes ``layers``, ``num_params``, … )."""
    expected = "an hvp.Sequential"
    check_instance("net", net, expected)
    if not all(hasattr(net, name) for name in NET_ATTRIBUTES):
        raise TypeError(f"net must be {expected}, got {describe(net)}")
    return net


def check_loss(loss, name="loss"):
    """``loss``: an instance of an hvp loss on the outputs, such as hvp.CrossEntropyLoss()."""
    expected = "an hvp loss instance such as hvp.CrossEntropyLoss()"
    check_instance(name, loss, expected)
    if not all(callable(getattr(loss, method, None)) for method in LOSS_METHODS):
        raise TypeError(f"{name} must be {expected}, got {describe(loss)}")
    return loss


def check_seed(seed, name="seed"):
    """``numpy.random.default_rng(seed)`` for seed None, an int >= 0 or a numpy.random.Generator.

    A SeedSequence or BitGenerator, which ``default_rng`` also takes, is accepted too.
    """
    expected = "an int >= 0, None or a numpy.random.Generator"
    if not (seed is None or isinstance(seed, (np.random.Generator, np.random.SeedSequence, np.random.BitGenerator))):
        if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
            raise TypeError(f"{name} must be {expected}, got {describe(seed)}")
        if seed < 0:
            raise ValueError(f"{name} must be {expected}, got {seed}")
    return np.random.default_rng(seed)


def real_array(name, a, dtype=None):
    """``a`` as an array of real numbers (converted to ``dtype`` if given), never a copy if it fits.

    Raises TypeError for complex, object, string or boolean data, ValueError for a ragged
    nested sequence.
    """
    try:
        arr = np.asarray(a)
    except ValueError:  # numpy >= 1.24 on a ragged nested sequence
        raise ValueError(f"{name} must be a rectangular array of real numbers, got a ragged nested sequence "
                         f"{describe(a)}") from None
    if arr.dtype.kind not in "iuf":
        raise TypeError(f"{name} must hold real numbers, got {describe(a)}")
    return arr if dtype is None else arr.astype(dtype, copy=False)


def all_finite(a):
    """Whether every entry of the array ``a`` is finite.

    For a contiguous float32 or float64 array, first ``Σ a²`` in one BLAS dot, one read of ``a`` and no boolean
    array: NaN and ±Inf make the sum NaN or +Inf, so a finite sum proves every entry finite. Only a sum that is
    not finite (a NaN or Inf, or large finite entries whose squares overflow) leads to the test entry by entry.
    """
    if a.dtype in FLOAT_DTYPES and a.size and (a.flags.c_contiguous or a.flags.f_contiguous):
        flat = a.ravel(order="K")
        with np.errstate(over="ignore", invalid="ignore"):
            if np.isfinite(np.dot(flat, flat)):
                return True
    return bool(np.isfinite(a).all())


def check_finite(name, a):
    if not all_finite(a):
        bad = np.count_nonzero(~np.isfinite(a))
        raise ValueError(f"{name} must be finite, got {bad} NaN or Inf entries in {describe(a)}")


def check_theta(theta, num_params):
    """θ: a float32 or float64 array of shape (num_params,) with finite entries."""
    if not isinstance(theta, np.ndarray):
        raise TypeError(f"theta must be a numpy array of float32 or float64, got {describe(theta)}")
    if theta.dtype not in FLOAT_DTYPES:
        raise TypeError(f"theta must have dtype float32 or float64, got dtype {theta.dtype}")
    if theta.shape != (num_params,):
        raise ValueError(f"theta must have shape ({num_params},) for this network, got shape {theta.shape}")
    check_finite("theta", theta)
    return theta


def check_inputs(X, net, dtype):
    """X: shape (B, *net.in_shape) with B >= 1, finite, fitting every layer; returned converted to ``dtype``."""
    X = real_array("X", X, dtype)
    shape = net.in_shape
    if shape is not None:
        names = {2: ("C", "L"), 3: ("C", "H", "W")}.get(len(shape), ("?",) * len(shape))
        want = "(batch, " + ", ".join(name if n is None else str(n) for name, n in zip(names, shape)) + ")"
        if X.ndim != 1 + len(shape):
            raise ValueError(f"X must be {1 + len(shape)}-D of shape {want}, got {X.ndim}-D shape {X.shape}")
        if shape[0] is not None and X.shape[1] != shape[0]:
            what = "features (columns)" if len(shape) == 1 else "channels (axis 1)"
            raise ValueError(f"X must have {shape[0]} {what}, got shape {X.shape}")
    elif X.ndim < 2:
        raise ValueError(f"X must be at least 2-D, (batch, …), got {X.ndim}-D shape {X.shape}")
    if X.shape[0] == 0:
        raise ValueError(f"X is an empty batch: expected at least one row, got shape {X.shape}")
    check_finite("X", X)
    net.output_shape(X.shape[1:])
    return X


def check_real(name, value, minimum=None):
    """A finite real number (not a bool), ``>= minimum`` if given, as a float."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {describe(value)}")
    if not np.isfinite(value) or (minimum is not None and value < minimum):
        bound = "" if minimum is None else f" >= {minimum:g}"
        raise ValueError(f"{name} must be a finite number{bound}, got {value!r}")
    return float(value)


def check_nonnegative(name, value):
    """A finite real number >= 0 (a penalty weight), as a float."""
    return check_real(name, value, minimum=0)


def check_l2(l2):
    return check_nonnegative("l2", l2)


def check_reduction(reduction):
    if not isinstance(reduction, str):
        raise TypeError(f"reduction must be 'mean' or 'sum', got {describe(reduction)}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    return reduction


def check_direction(name, v, num_params, dtype):
    """A direction block: shape (P,) or (P, k) with k >= 1, finite; returned as ``dtype``."""
    v = real_array(name, v, dtype)
    if v.ndim not in (1, 2) or v.shape[0] != num_params or (v.ndim == 2 and v.shape[1] == 0):
        raise ValueError(f"{name} must have shape ({num_params},) or ({num_params}, k) with k >= 1, "
                         f"got shape {v.shape}")
    check_finite(name, v)
    return v


def check_int(name, value, minimum):
    """An int (not a bool) >= ``minimum``, as an int."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int >= {minimum}, got {describe(value)}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return int(value)


def is_batch(data):
    """Whether ``data`` is one (X, y) pair rather than a collection of them."""
    return isinstance(data, (tuple, list)) and len(data) == 2 and hasattr(data[0], "shape")


def check_batch(i, batch):
    """Batch i of a data set: an (X, y) pair (its arrays are checked where they are used)."""
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise TypeError(f"data must be an (X, y) pair or an iterable of (X, y) batches; "
                        f"batch {i} is {describe(batch)}")
    return batch


def check_bool(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {describe(value)}")
    return bool(value)
