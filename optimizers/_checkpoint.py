"""Checkpoints: an optimizer's state in one ``.npz`` file, written atomically, read without pickle.

:func:`write` puts the arrays in a temporary file in the target's folder and renames it over the
target (``os.replace``), so that an interrupted save leaves the previous checkpoint whole.
:func:`read` checks the file before numpy parses it (a zip archive, not an ``.npy`` file or random
bytes) and turns every failure into a ``ValueError`` that names the file and the problem; the
``state_*`` checks (:func:`vector`, :func:`scalar`) raise ``ValueError`` for the caller to prefix.
"""

import json
import os
import tempfile
import zipfile

import numpy as np

from hvp._checks import describe

ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a zip archive with entries, an empty one
NPY_MAGIC = b"\x93NUMPY"
REQUIRED = ("theta", "config", "kind", "net", "loss", "history_keys")


def write(path, arrays):
    """Write ``arrays`` (name -> array) to ``path`` as an uncompressed ``.npz``, atomically.

    Parameters
    ----------
    path : str or path-like
        Written exactly (no ``.npz`` suffix is added).
    arrays : dict of str to ndarray
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def read(path):
    """The arrays of a checkpoint written by :func:`write`, checked to hold what every optimizer saves.

    Raises
    ------
    ValueError
        Naming ``path``: an empty, truncated or corrupt file, an ``.npy`` file, something that is
        not a zip archive, pickled object arrays, missing keys, a config that is not a JSON object,
        or a history whose columns differ in length.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        head = f.read(8)
    if not head:
        raise ValueError(f"{path} is empty: expected an .npz checkpoint written by save()")
    if head.startswith(NPY_MAGIC):
        raise ValueError(f"{path} is an .npy array file, not an .npz checkpoint written by save()")
    if not head.startswith(ZIP_MAGIC):
        raise ValueError(f"{path} is not an .npz checkpoint (not a zip archive): expected a file written by save()")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {key: f[key] for key in f.files}
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise ValueError(f"{path} is truncated or corrupt: {e}") from None
    except ValueError as e:  # numpy's words for object arrays point at allow_pickle, which is never an option here
        problem = "holds pickled object arrays, which are never loaded" if "pickle" in str(e) else str(e)
        raise ValueError(f"{path} is not a checkpoint written by save(): it {problem}") from None
    missing = [key for key in REQUIRED if key not in arrays]
    if missing:
        raise ValueError(f"{path} is not an optimizer checkpoint: it lacks {', '.join(missing)} "
                         f"(keys found: {', '.join(sorted(arrays)) or 'none'})")
    for key in ("config", "kind", "net", "loss"):
        if arrays[key].shape != () or arrays[key].dtype.kind != "U":
            raise ValueError(f"{path}: {key} must be a text scalar, got {describe(arrays[key])}")
    try:
        config = json.loads(str(arrays["config"]))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: config is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: config must be a JSON object of settings, got {type(config).__name__}")
    arrays["config"] = config
    keys = arrays["history_keys"]
    if keys.ndim != 1 or (keys.size and keys.dtype.kind != "U"):
        raise ValueError(f"{path}: history_keys must be a 1-D array of names, got {describe(keys)}")
    columns = {}
    for key in map(str, keys):
        column = arrays.get("history_" + key)
        if column is None:
            raise ValueError(f"{path}: the history lacks its column {key!r}")
        if column.ndim != 1:
            raise ValueError(f"{path}: history column {key!r} must be 1-D, got {describe(column)}")
        columns[key] = column
    lengths = {len(column) for column in columns.values()}
    if len(lengths) > 1:
        raise ValueError(f"{path}: the history is ragged: its columns have lengths {sorted(lengths)}")
    arrays["history"] = [dict(zip(columns, row)) for row in zip(*(c.tolist() for c in columns.values()))]
    return arrays


def vector(arrays, name, size, dtype, allow_empty=False, nonnegative=False):
    """``state_<name>``: a finite float vector of length ``size`` (or 0 with ``allow_empty``), as ``dtype``."""
    a = _get(arrays, name)
    sizes = (size, 0) if allow_empty else (size,)
    if a.ndim != 1 or a.shape[0] not in sizes or a.dtype.kind not in "iuf":
        expected = " or ".join(f"({n},)" for n in sizes)
        raise ValueError(f"state {name} must be a real vector of shape {expected}, got {describe(a)}")
    if not np.isfinite(a).all() or (nonnegative and (a < 0).any()):
        raise ValueError(f"state {name} must hold finite{' non-negative' if nonnegative else ''} numbers")
    return a.astype(dtype)


def matrix(arrays, name, dtype):
    """``state_<name>``: a finite square float matrix, or a stack of them (G, d, d), as ``dtype``."""
    a = _get(arrays, name)
    if a.ndim not in (2, 3) or a.shape[-1] != a.shape[-2] or a.dtype.kind != "f" or not np.isfinite(a).all():
        raise ValueError(f"state {name} must be a finite square matrix or a stack of them, got {describe(a)}")
    return a.astype(dtype)


def scalar(arrays, name, integer=False, minimum=0):
    """``state_<name>``: a finite number (an integer with ``integer``) >= ``minimum``."""
    a = _get(arrays, name)
    if a.shape != () or a.dtype.kind not in ("iu" if integer else "iuf"):
        kind = "an integer" if integer else "a number"
        raise ValueError(f"state {name} must be {kind}, got {describe(a)}")
    value = a.item()
    if not np.isfinite(value) or value < minimum:
        raise ValueError(f"state {name} must be a finite number >= {minimum}, got {value!r}")
    return int(value) if integer else float(value)


def optional(value):
    """A state number that may be unset (None) as an array: the number, or an empty array for None."""
    return np.zeros(0) if value is None else np.asarray(value)


def optional_scalar(arrays, name):
    """``state_<name>`` saved by :func:`optional`: None for an empty array, else as :func:`scalar`."""
    if name in arrays and arrays[name].shape == (0,):
        return None
    return scalar(arrays, name)


def _get(arrays, name):
    if name not in arrays:
        raise ValueError(f"state {name} is missing")
    return arrays[name]
