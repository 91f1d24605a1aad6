"""Pooling and flattening: fixed maps without parameters.

Average pooling and flatten are linear, so their tangent rule is the map itself and rule 4 has no
cross terms. Max pooling is piecewise linear: within the piece where the forward pass found its
maxima it copies the input entry at each window's maximum, so its tangent copies the input
tangent from the same place and its backward rule adds each adjoint back there. Ties go to the
first maximum in the window, rows before columns (as PyTorch's CPU kernels); at a tie the map is
not differentiable and the rules give the derivative of that one piece. As each output of max pooling and
Flatten copies one input entry, a diagonal Hessian at their output comes back diagonal (``backward_diagonal``).
"""

import numpy as np

from .. import memory
from .windows import fold, positive_ints, unfold, window_geometry


class _Pool:
    """Shared body of the pooling layers; subclasses set ``spatial`` and ``reduce``."""

    spatial = 2

    def __init__(self, kernel_size, stride=None, padding=0):
        name, n = type(self).__name__, self.spatial
        self.kernel_size = positive_ints(name, "kernel_size", kernel_size, n)
        self.stride = self.kernel_size if stride is None else positive_ints(name, "stride", stride, n)
        self.padding = positive_ints(name, "padding", padding, n, minimum=0)
        if any(2 * p > k for p, k in zip(self.padding, self.kernel_size)):
            raise ValueError(f"{name}: padding must be at most half the kernel size, got padding={self.padding} "
                             f"and kernel_size={self.kernel_size}")
        self._kernel = (1,) * (2 - n) + self.kernel_size
        self._stride = (1,) * (2 - n) + self.stride
        self._padding = (0,) * (2 - n) + self.padding

    def __repr__(self):
        args = [f"kernel_size={self.kernel_size}"]
        args += [] if self.stride == self.kernel_size else [f"stride={self.stride}"]
        args += [] if not any(self.padding) else [f"padding={self.padding}"]
        return f"{type(self).__name__}({', '.join(args)})"

    @property
    def in_shape(self):
        return (None,) * (1 + self.spatial)

    def param_shapes(self):
        return []

    def out_shape(self, in_shape):
        name = repr(self)
        if len(in_shape) != 1 + self.spatial:
            raise ValueError(f"{name} needs inputs of shape (batch, channels, "
                             f"{', '.join('HW'[2 - self.spatial:])}), got per-example shape {in_shape}")
        return in_shape[:1] + window_geometry(name, in_shape[1:], self.kernel_size, self.stride, self.padding,
                                              (1,) * self.spatial)

    def _unfold(self, X, fill=0.0):
        """Windows of X (N, C, [H,] W): a view (N, C, Ho, Wo, kH, kW)."""
        X2 = X if self.spatial == 2 else X[:, :, None, :]
        return unfold(X2, self._kernel, self._stride, self._padding, (1, 1), fill)

    def _windows(self, X, fill=0.0):
        """Windows of X (N, C, [H,] W): (N, C, Ho, Wo, kH·kW), a copy."""
        w = self._unfold(X, fill)
        return w.reshape(w.shape[:4] + (-1,))

    def _taps(self, X, fill=0.0):
        """Views (N, C, Ho, Wo) of X (N, C, [H,] W), one per window offset, in row-major order."""
        windows = self._unfold(X, fill)
        return [windows[..., i, j] for i, j in np.ndindex(*self._kernel)]

    def _out(self, O2):
        """(N, C, Ho, Wo) -> the layer's output layout."""
        return O2 if self.spatial == 2 else O2[:, :, 0, :]

    def _fold(self, D, shape):
        """Adjoint of :meth:`_windows`: D (N, C, Ho, Wo, kH·kW) -> (N, *shape[1:])."""
        in_size = (1,) * (2 - self.spatial) + tuple(shape[2:])
        N = D.shape[0]
        D = np.ascontiguousarray(np.moveaxis(D, -1, 0)).reshape(self._kernel + D.shape[:4])
        out = fold(D, in_size, self._kernel, self._stride, self._padding, (1, 1))
        return out.reshape((N,) + tuple(shape[1:]))

    def _edges_zeroed(self, D2, shape):
        """For windows that tile the input (stride = kernel, no padding): an input-side array (..., C, H, W) for the
        output-side D2 (..., C, Ho, Wo), 0 on the edges no window covers and not yet written elsewhere."""
        (kH, kW), (Ho, Wo) = self._kernel, D2.shape[-2:]
        H, W = (1,) * (2 - self.spatial) + tuple(shape[2:])
        DI = memory.empty(D2.shape[:-2] + (H, W), D2.dtype)
        DI[..., Ho * kH:, :] = 0
        DI[..., :, Wo * kW:] = 0
        return DI

    def _tiled(self, D2, shape):
        """For windows that tile the input: D2 (..., C, Ho, Wo) copied to every entry of its window, the uncovered
        edges 0 -> (..., C, H, W)."""
        DI, (kH, kW), (Ho, Wo) = self._edges_zeroed(D2, shape), self._kernel, D2.shape[-2:]
        H, W = DI.shape[-2:]
        tiles_shape = D2.shape[:-2] + (Ho, kH, Wo, kW)
        exact = (H, W) == (Ho * kH, Wo * kW)
        tiles = DI.reshape(tiles_shape) if exact else memory.empty(tiles_shape, D2.dtype)
        tiles[...] = D2[..., :, None, :, None]
        if not exact:
            DI[..., :Ho * kH, :Wo * kW] = tiles.reshape(D2.shape[:-2] + (Ho * kH, Wo * kW))
        return DI

    def backward_params(self, p, cache, DO, out=None):
        return {}

    def tangent_backward(self, p, cache, dI, dp, DOD, need_input=True, summed=False):
        """No cross terms: the map is linear (average) or linear on the piece the forward pass found (max)."""
        return None, None

    def input_curvature(self, p, cache, DO):
        """None: the map is linear (average), or linear on the piece the forward pass found (max)."""
        return None

    def _flat(self, X):
        """X (..., C, [H,] W) -> (N, C, [H,] W), all leading axes (batch, directions) folded into one."""
        return X.reshape((-1,) + X.shape[X.ndim - 1 - self.spatial:])


class _MaxPool(_Pool):

    def forward(self, p, I):
        """Rule 1: each window's maximum; I (B, C, [H,] W) -> O (B, C, [Ho,] Wo)."""
        taps = self._taps(I, fill=-np.inf)
        O = memory.copy(taps[0])
        for tap in taps[1:]:
            np.maximum(O, tap, out=O)
        # the first window offset that holds the maximum: the count of leading offsets that do not
        run = taps[0] != O
        where = run.astype(np.min_scalar_type(len(taps) - 1))
        for tap in taps[1:-1]:
            run &= tap != O
            where += run
        return self._out(O), {"where": where[..., None], "shape": I.shape}

    def backward_input(self, p, cache, DO):
        """Rule 2: each adjoint added to the input entry where its window's maximum was; DO (..., B or 1, C, …)."""
        shape = cache["shape"]
        lead = DO.shape[:DO.ndim - 2 - self.spatial]
        DO = np.broadcast_to(DO, lead + tuple(shape[:1]) + DO.shape[DO.ndim - 1 - self.spatial:])  # shared columns
        D2 = DO if self.spatial == 2 else DO[..., None, :]  # (..., B, C, Ho, Wo)
        if self._stride == self._kernel and not any(self._padding):  # windows that tile the input
            return self._scatter(cache["where"][..., 0], D2, shape).reshape(lead + tuple(shape))
        D = np.zeros(D2.shape + (int(np.prod(self._kernel)),), dtype=DO.dtype)
        np.put_along_axis(D, np.broadcast_to(cache["where"], D2.shape + (1,)), D2[..., None], axis=-1)
        DI = self._fold(D.reshape((-1,) + D.shape[-4:]), shape)
        return DI.reshape(lead + tuple(shape))

    def _scatter(self, where, D2, shape):
        """Rule 2 for windows that do not overlap: each input entry is written once, by the window offset it sits
        at, with the adjoint where that offset held the maximum and 0 elsewhere (uncovered edges: 0). (One product
        with a one-hot mask of the windows, written in the input's order, was slower: numpy's inner loop then
        runs over the kW entries of a window row.)"""
        DI, (kH, kW), (Ho, Wo) = self._edges_zeroed(D2, shape), self._kernel, D2.shape[-2:]
        for t, (i, j) in enumerate(np.ndindex(kH, kW)):
            np.multiply(D2, where == t, out=DI[..., i:Ho * kH:kH, j:Wo * kW:kW])
        return DI

    def backward_diagonal(self, p, cache, d):
        """``Jᵀ d`` = diag(Jᵀ diag(d) J): each output copies one input entry, so J's entries are 0 or 1, one per row."""
        return self.backward_input(p, cache, d)

    def tangent(self, p, cache, dI, dp):
        """Rule 3: ``Ȯ_k`` = İ_k at each window's maximum; dI (k, B or 1, C, …) -> (k, B, C, …)."""
        if dI is None:
            return None
        dI = np.broadcast_to(dI, dI.shape[:1] + tuple(cache["shape"]))
        taps = self._taps(self._flat(dI))
        taps = [tap.reshape(dI.shape[:2] + tap.shape[1:]) for tap in taps]
        where = cache["where"][..., 0]
        picked = taps[-1]
        for t in range(len(taps) - 2, -1, -1):
            picked = np.where(where == t, taps[t], picked)
        picked = np.ascontiguousarray(picked)
        return picked if self.spatial == 2 else picked[:, :, :, 0, :]


class _AvgPool(_Pool):

    def forward(self, p, I):
        """Rule 1: each window's mean, zero padding counted (``count_include_pad=True``)."""
        return self._mean(I), {"shape": I.shape}

    def _mean(self, X):
        """Window means of X (..., C, …), any leading axes."""
        O = self._out(self._windows(self._flat(X)).mean(axis=-1))
        return O.reshape(X.shape[:X.ndim - 1 - self.spatial] + O.shape[1:])

    def backward_input(self, p, cache, DO):
        """Rule 2: each adjoint spread evenly over its window; DO (..., B, C, …)."""
        flat = self._flat(DO)
        D2 = flat if self.spatial == 2 else flat[:, :, None, :]
        size = int(np.prod(self._kernel))
        D2 = D2 / DO.dtype.type(size)
        shape = (flat.shape[0],) + tuple(cache["shape"][1:])
        if self._stride == self._kernel and not any(self._padding):  # windows that tile the input
            DI = self._tiled(D2, shape).reshape((-1,) + tuple(shape[1:]))
        else:
            DI = self._fold(np.broadcast_to(D2[..., None], D2.shape + (size,)), shape)
        return DI.reshape(DO.shape[:DO.ndim - 1 - self.spatial] + DI.shape[1:])

    def tangent(self, p, cache, dI, dp):
        """Rule 3: the map itself, ``Ȯ_k = avgpool(İ_k)``."""
        return None if dI is None else self._mean(dI)


class MaxPool2d(_MaxPool):
    """Max pooling as ``torch.nn.MaxPool2d(kernel_size, stride=None, padding=0)``: (B, C, H, W) -> (B, C, Ho, Wo).

    ``stride`` defaults to ``kernel_size``; padding (at most half the kernel) never wins a maximum.
    """

    spatial = 2


class MaxPool1d(_MaxPool):
    """Max pooling as ``torch.nn.MaxPool1d``: (B, C, L) -> (B, C, L_out)."""

    spatial = 1


class AvgPool2d(_AvgPool):
    """Average pooling as ``torch.nn.AvgPool2d(kernel_size, stride=None, padding=0)`` (count_include_pad=True)."""

    spatial = 2


class AvgPool1d(_AvgPool):
    """Average pooling as ``torch.nn.AvgPool1d`` (count_include_pad=True): (B, C, L) -> (B, C, L_out)."""

    spatial = 1


class Flatten:
    """All axes but the batch axis into one, in C order, as ``torch.nn.Flatten()``: (B, …) -> (B, F)."""

    def __repr__(self):
        return "Flatten()"

    def param_shapes(self):
        return []

    def out_shape(self, in_shape):
        return (int(np.prod(in_shape)),)

    def forward(self, p, I):
        return I.reshape(I.shape[0], -1), I.shape

    def backward_input(self, p, shape, DO):
        return DO.reshape(DO.shape[:-1] + tuple(shape[1:]))

    def backward_params(self, p, shape, DO, out=None):
        return {}

    def tangent(self, p, shape, dI, dp):
        return None if dI is None else dI.reshape(dI.shape[:2] + (-1,))

    def tangent_backward(self, p, shape, dI, dp, DOD, need_input=True, summed=False):
        return None, None

    def input_curvature(self, p, shape, DO):
        return None

    def backward_diagonal(self, p, shape, d):
        """A permutation: a diagonal stays one, reshaped."""
        return self.backward_input(p, shape, d)

