"""Sliding windows over (N, C, H, W) arrays, shared by convolutions and pooling: their geometry, the
patches as a strided view (unfold) and its adjoint (fold)."""

import numpy as np

from .._checks import describe


def positive_ints(owner, name, value, n, minimum=1):
    values = value if isinstance(value, (tuple, list)) else (value,) * n
    ok = len(values) == n and all(
        isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) and v >= minimum for v in values)
    if not ok:
        what = "a positive integer" if minimum == 1 else "a non-negative integer"
        raise (ValueError if isinstance(value, (int, tuple, list)) else TypeError)(
            f"{owner}: {name} must be {what} or a tuple of {n}, got {describe(value)}")
    return tuple(int(v) for v in values)


def window_geometry(owner, in_size, kernel, stride, padding, dilation):
    """Output sizes of a sliding window over spatial sizes ``in_size``; a ValueError if the window does not fit."""
    out = []
    for axis, (n, k, s, p, d) in enumerate(zip(in_size, kernel, stride, padding, dilation)):
        span = d * (k - 1) + 1
        if n + 2 * p < span:
            raise ValueError(f"{owner}: the kernel spans {span} along spatial axis {axis}, more than the padded "
                             f"input's {n + 2 * p} (input {n} + 2·padding {p})")
        out.append((n + 2 * p - span) // s + 1)
    return tuple(out)


def unfold(I, kernel, stride, padding, dilation, fill=0.0):
    """Patches of I (N, C, H, W): (N, C, H_out, W_out, kH, kW), a strided view of the padded input."""
    (pH, pW), (dH, dW), (sH, sW) = padding, dilation, stride
    if pH or pW:
        padded = np.full(I.shape[:2] + (I.shape[2] + 2 * pH, I.shape[3] + 2 * pW), fill, dtype=I.dtype)
        padded[:, :, pH:pH + I.shape[2], pW:pW + I.shape[3]] = I
        I = padded
    spans = (dH * (kernel[0] - 1) + 1, dW * (kernel[1] - 1) + 1)
    windows = np.lib.stride_tricks.sliding_window_view(I, spans, axis=(2, 3))
    return windows[:, :, ::sH, ::sW, ::dH, ::dW]


def fold(D, in_size, kernel, stride, padding, dilation):
    """Adjoint of :func:`unfold`: D (kH, kW, N, C, H_out, W_out) summed back onto (N, C, H, W).

    The kernel offsets come first so that each one's slab is contiguous."""
    (pH, pW), (dH, dW), (sH, sW) = padding, dilation, stride
    N, C, Ho, Wo = D.shape[2:]
    out = np.zeros((N, C, in_size[0] + 2 * pH, in_size[1] + 2 * pW), dtype=D.dtype)
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            out[:, :, i * dH:i * dH + sH * (Ho - 1) + 1:sH, j * dW:j * dW + sW * (Wo - 1) + 1:sW] += D[i, j]
    return out[:, :, pH:pH + in_size[0], pW:pW + in_size[1]]
