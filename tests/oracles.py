"""Reference implementation used as the test oracle.

Everything here is plain float64 numpy written independently of the ``hvp``
package: the only things read from an ``hvp`` network are its layer list
(``net.layers``), each Linear layer's ``in_features`` / ``out_features`` /
``bias`` attributes, and the activation type names with their
``negative_slope`` / ``alpha`` attributes.  Parameter layout, forward pass,
activation formulas, losses, finite differences and the explicit loss Hessian
with respect to the network outputs are all re-derived here.

Loss kinds used throughout the suite:

* ``"ce_labels"`` -- softmax cross-entropy with integer class labels of shape (B,)
* ``"ce_probs"``  -- softmax cross-entropy with probability targets of shape (B, C)
* ``"mse"``       -- squared error with targets of shape (B, C)
* ``"bce"``       -- sigmoid + binary cross-entropy with targets in [0, 1] of shape (B, C)
"""

from __future__ import annotations

import numpy as np

LOSS_KINDS = ("ce_labels", "ce_probs", "mse", "bce")
REDUCTIONS = ("mean", "sum")


# --------------------------------------------------------------------------- layout


def is_linear(layer) -> bool:
    return type(layer).__name__ == "Linear"


def has_bias(layer) -> bool:
    b = layer.bias
    if isinstance(b, (bool, np.bool_)):
        return bool(b)
    return b is not None


def param_shapes(layers) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Per layer, the ordered (name, shape) pairs of its parameters."""
    out = []
    for layer in layers:
        if is_linear(layer):
            m, n = int(layer.in_features), int(layer.out_features)
            entries = [("weight", (m, n))]
            if has_bias(layer):
                entries.append(("bias", (n,)))
            out.append(entries)
        else:
            out.append([])
    return out


def num_params(layers) -> int:
    return sum(int(np.prod(shape)) for entries in param_shapes(layers) for _, shape in entries)


def offsets(layers) -> list[dict[str, tuple[int, int]]]:
    """Per layer, name -> (start, stop) into the flat parameter vector."""
    res = []
    pos = 0
    for entries in param_shapes(layers):
        d = {}
        for name, shape in entries:
            size = int(np.prod(shape))
            d[name] = (pos, pos + size)
            pos += size
        res.append(d)
    return res


def ref_unflatten(layers, theta) -> list[dict[str, np.ndarray]]:
    theta = np.asarray(theta)
    res = []
    for entries, offs in zip(param_shapes(layers), offsets(layers)):
        d = {}
        for name, shape in entries:
            a, b = offs[name]
            d[name] = theta[a:b].reshape(shape)
        res.append(d)
    return res


def weight_mask(layers) -> np.ndarray:
    """Boolean mask over the flat parameter vector: True on weight-matrix entries."""
    mask = np.zeros(num_params(layers), dtype=bool)
    for offs in offsets(layers):
        if "weight" in offs:
            a, b = offs["weight"]
            mask[a:b] = True
    return mask


def input_dim(layers) -> int:
    for layer in layers:
        if is_linear(layer):
            return int(layer.in_features)
    raise ValueError("network has no Linear layer")


def output_dim(layers) -> int:
    for layer in reversed(list(layers)):
        if is_linear(layer):
            return int(layer.out_features)
    raise ValueError("network has no Linear layer")


# --------------------------------------------------------------------------- forward


def _sigmoid(z):
    # 0.5 * (1 + tanh(z/2)) is exact and overflow free
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def activation(layer, z: np.ndarray) -> np.ndarray:
    name = type(layer).__name__
    if name == "ReLU":
        return np.where(z > 0, z, 0.0)
    if name == "LeakyReLU":
        return np.where(z > 0, z, float(layer.negative_slope) * z)
    if name == "Tanh":
        return np.tanh(z)
    if name == "Sigmoid":
        return _sigmoid(z)
    if name == "Softsign":
        return z / (1.0 + np.abs(z))
    if name == "Softplus":
        return np.logaddexp(0.0, z)
    if name == "ELU":
        return np.where(z > 0, z, float(layer.alpha) * np.expm1(np.minimum(z, 0.0)))
    if name == "Identity":
        return z.copy()
    raise NotImplementedError(f"no reference formula for layer type {name}")


def ref_forward(layers, theta, X, return_preactivations: bool = False):
    """Outputs (B, C) in float64; optionally also the inputs of every activation layer."""
    h = np.asarray(X, dtype=np.float64)
    params = ref_unflatten(layers, np.asarray(theta, dtype=np.float64))
    pre = []
    for layer, p in zip(layers, params):
        if is_linear(layer):
            h = h @ p["weight"]
            if "bias" in p:
                h = h + p["bias"]
        else:
            pre.append(h)
            h = activation(layer, h)
    if return_preactivations:
        return h, pre
    return h


def min_abs_preactivation(layers, theta, X) -> float:
    """Smallest nonzero |input| over all activation layers (inf if there is none).

    Exact zeros are left out: they only arise structurally (a bias-free layer fed by inputs that
    a ReLU has zeroed), stay exactly zero under any small change of theta, and have zero
    derivative, so they never put a finite difference across a kink.
    """
    _, pre = ref_forward(layers, theta, X, return_preactivations=True)
    nonzero = [np.abs(z[z != 0]) for z in pre]
    nonzero = [a for a in nonzero if a.size]
    if not nonzero:
        return np.inf
    return float(min(np.min(a) for a in nonzero))


# --------------------------------------------------------------------------- losses


def _log_softmax(O):
    m = np.max(O, axis=1, keepdims=True)
    s = O - m
    return s - np.log(np.sum(np.exp(s), axis=1, keepdims=True))


def target_matrix(y, kind: str, C: int) -> np.ndarray:
    """Targets as a (B, C) float64 matrix (one-hot for labels)."""
    if kind == "ce_labels":
        y = np.asarray(y)
        T = np.zeros((y.shape[0], C))
        T[np.arange(y.shape[0]), y.astype(np.int64)] = 1.0
        return T
    return np.asarray(y, dtype=np.float64)


def ref_output_loss(O, y, kind: str, reduction: str) -> float:
    O = np.asarray(O, dtype=np.float64)
    B, C = O.shape
    if kind in ("ce_labels", "ce_probs"):
        T = target_matrix(y, kind, C)
        per_example = -np.sum(T * _log_softmax(O), axis=1)
        total = float(np.sum(per_example))
        return total / B if reduction == "mean" else total
    if kind == "mse":
        sq = (O - np.asarray(y, dtype=np.float64)) ** 2
        return float(np.mean(sq)) if reduction == "mean" else float(np.sum(sq))
    if kind == "bce":
        Y = np.asarray(y, dtype=np.float64)
        q = _sigmoid(O)
        terms = -(Y * np.log(q) + (1 - Y) * np.log(1 - q))
        return float(np.mean(terms)) if reduction == "mean" else float(np.sum(terms))
    raise ValueError(kind)


def l2_term(layers, theta, l2: float) -> float:
    theta = np.asarray(theta, dtype=np.float64)
    w = theta[weight_mask(layers)]
    return 0.5 * float(l2) * float(np.dot(w, w))


def ref_loss(layers, theta, X, y, kind: str, reduction: str, l2: float = 0.0) -> float:
    O = ref_forward(layers, theta, X)
    return ref_output_loss(O, y, kind, reduction) + l2_term(layers, theta, l2)


def ref_output_hessian(O, y, kind: str, reduction: str) -> np.ndarray:
    """d^2 loss / dO^2 as a dense (B*C, B*C) matrix, outputs flattened C-order."""
    O = np.asarray(O, dtype=np.float64)
    B, C = O.shape
    H = np.zeros((B * C, B * C))
    if kind in ("ce_labels", "ce_probs"):
        T = target_matrix(y, kind, C)
        P = np.exp(_log_softmax(O))
        scale = 1.0 / B if reduction == "mean" else 1.0
        for b in range(B):
            s_b = float(np.sum(T[b]))
            p = P[b]
            block = s_b * (np.diag(p) - np.outer(p, p)) * scale
            H[b * C:(b + 1) * C, b * C:(b + 1) * C] = block
        return H
    if kind == "mse":
        c = 2.0 / (B * C) if reduction == "mean" else 2.0
        return c * np.eye(B * C)
    if kind == "bce":
        q = _sigmoid(O).ravel()
        c = 1.0 / (B * C) if reduction == "mean" else 1.0
        return c * np.diag(q * (1 - q))
    raise ValueError(kind)


# --------------------------------------------------------------------------- finite differences


def _steps(theta, rel_step):
    theta = np.asarray(theta, dtype=np.float64)
    return rel_step * np.maximum(1.0, np.abs(theta))


def fd_gradient(f, theta, rel_step: float = 1e-6) -> np.ndarray:
    """Central-difference gradient of a scalar function f(theta)."""
    theta = np.array(theta, dtype=np.float64)
    h = _steps(theta, rel_step)
    g = np.empty_like(theta)
    for i in range(theta.size):
        tp = theta.copy()
        tm = theta.copy()
        tp[i] += h[i]
        tm[i] -= h[i]
        g[i] = (f(tp) - f(tm)) / (tp[i] - tm[i])
    return g


def fd_jacobian(fun, theta, rel_step: float = 1e-6) -> np.ndarray:
    """Central-difference Jacobian of a vector (or array) valued fun(theta), shape (fun.size, P)."""
    theta = np.array(theta, dtype=np.float64)
    h = _steps(theta, rel_step)
    cols = []
    for i in range(theta.size):
        tp = theta.copy()
        tm = theta.copy()
        tp[i] += h[i]
        tm[i] -= h[i]
        fp = np.asarray(fun(tp), dtype=np.float64).ravel()
        fm = np.asarray(fun(tm), dtype=np.float64).ravel()
        cols.append((fp - fm) / (tp[i] - tm[i]))
    return np.stack(cols, axis=1)


def fd_hessian_from_gradient(grad_fn, theta, rel_step: float = 1e-5) -> np.ndarray:
    """Dense Hessian, column j = central difference of grad_fn along coordinate j."""
    return fd_jacobian(grad_fn, theta, rel_step=rel_step)


def output_jacobian(layers, theta, X, rel_step: float = 1e-6) -> np.ndarray:
    """J = d vec(outputs) / d theta of the reference forward, shape (B*C, P)."""
    return fd_jacobian(lambda t: ref_forward(layers, t, X), theta, rel_step=rel_step)


def dense_matrix(matvec, n: int, dtype=np.float64) -> np.ndarray:
    """Dense matrix of a linear map R^n -> R^m, assembled one unit vector at a time."""
    cols = []
    for j in range(n):
        e = np.zeros(n, dtype=dtype)
        e[j] = 1.0
        cols.append(np.asarray(matvec(e), dtype=np.float64).ravel())
    return np.stack(cols, axis=1)


def ref_ggn(layers, theta, X, y, kind: str, reduction: str, l2: float = 0.0) -> np.ndarray:
    """J^T H_l J + l2 on the weight diagonal, from the FD Jacobian and the explicit H_l."""
    J = output_jacobian(layers, theta, X)
    O = ref_forward(layers, theta, X)
    H_out = ref_output_hessian(O, y, kind, reduction)
    G = J.T @ H_out @ J
    G[np.diag_indices_from(G)] += float(l2) * weight_mask(layers)
    return G
