"""Input validation: every message says what was expected and what came."""

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def describe(a):
    """Short description of an argument for error messages."""
    if isinstance(a, np.ndarray):
        return f"an array of shape {a.shape} and dtype {a.dtype}"
    return f"{type(a).__name__} {a!r}"[:120]


def real_array(name, a, dtype=None):
    """``a`` as an array of real numbers (converted to ``dtype`` if given), never a copy if it fits.

    Raises TypeError for complex, object, string or boolean data.
    """
    arr = np.asarray(a)
    if arr.dtype.kind not in "iuf":
        raise TypeError(f"{name} must hold real numbers, got {describe(a)}")
    return arr if dtype is None else arr.astype(dtype, copy=False)


def check_finite(name, a):
    if not np.isfinite(a).all():
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


def check_inputs(X, in_features, dtype):
    """X: shape (B, in_features) with B >= 1, finite; returned converted to ``dtype``."""
    X = real_array("X", X, dtype)
    if X.ndim != 2:
        raise ValueError(f"X must be 2-D of shape (batch, {in_features}), got {X.ndim}-D shape {X.shape}")
    if X.shape[1] != in_features:
        raise ValueError(f"X must have {in_features} features (columns), got shape {X.shape}")
    if X.shape[0] == 0:
        raise ValueError(f"X is an empty batch: expected at least one row, got shape {X.shape}")
    check_finite("X", X)
    return X


def check_nonnegative(name, value):
    """A finite real number >= 0 (a penalty weight), as a float."""
    if isinstance(value, (bool, np.bool_)) or not np.isscalar(value) or not np.isreal(value):
        raise TypeError(f"{name} must be a real number, got {describe(value)}")
    if not np.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_l2(l2):
    return check_nonnegative("l2", l2)


def check_reduction(reduction):
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
