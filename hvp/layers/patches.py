"""The products a convolution is made of, on patches formed a few examples at a time (DESIGN.md §7).

Per example, the patches of the zero-padded input are a matrix U (G, J, L): per group, J = kH·kW·(C/G)
values (taps first, then channels) at each of L output positions. With the weights as W (G, O/G, J) in the
same order, every rule of a convolution is one of three products:

- ``W U``, the convolution itself (forward, and tangents from İ or Ẇ);
- ``fold(Wᵀ D)``, its adjoint in the input: each tap's rows of ``Wᵀ D`` added back onto the input positions
  it read (the input adjoint, and the cross term of rule 4 in the input);
- ``D Uᵀ``, its adjoint in the weights, summed over examples or per example (weight gradients, per-example
  pieces, the cross term of rule 4 in the weights; with U² for the Hessian diagonal).

U is never formed for the whole batch: the products loop over chunks of a few examples (``CHUNK_BYTES``),
so that each chunk's patches are copied from the padded input, used and dropped while in cache; the
linearization keeps only the padded input. With stride 1, tap (i, j) reads a contiguous window of the
padded input flattened per channel, if the output positions are taken on a grid of Ho rows of the padded
width Wp (``shifted``): its Wp − Wo extra columns per row are dropped from outputs and are zero in
output-side adjoints, so that they add nothing. Other strides copy strided windows onto Ho·Wo positions.
A chunk's patches are one copy from a strided view of P with an axis per tap coordinate; with stride 1 its
fold is one sum over such a view of ``Wᵀ D``, as the taps' offsets are linear in their coordinates.
"""

import threading
from collections import namedtuple

import numpy as np

from .. import memory
from ..threads import blas_threads, map_chunks
from .windows import window_geometry

Geometry = namedtuple("Geometry", "H W Hp Wp Ho Wo Wg shifted flat")


class PatchProducts:
    """The three products, for a convolution with attributes ``in_channels``, ``out_channels``, ``groups``,
    ``fan_in``, ``kernel_size``, ``spatial`` and the 2-D geometry ``_kernel``, ``_stride``, ``_padding``,
    ``_dilation`` (a 1-D convolution runs on inputs of height 1).

    Arrays: P (K_P, M, G, C/G, flat) padded inputs, flat per channel (M = 1: shared by every example);
    D (K_D, M, O, [Ho,] Wo) output-side arrays in the layer's layout; a leading K axis of 1 is shared by the
    K of the other operand.
    """

    CHUNK_BYTES = 4 << 20  # a chunk of examples holds about this many bytes of patches and outputs
    PARALLEL_BYTES = 32 << 20  # smaller products run in the calling thread: waking another costs about 0.1 ms

    def _geometry(self, shape):
        """Sizes for inputs of shape (N, C, [H,] W), in two spatial dimensions."""
        (_, kW), (pH, pW), (_, dW) = self._kernel, self._padding, self._dilation
        H, W = (1,) * (2 - self.spatial) + tuple(shape[2:])
        Hp, Wp = H + 2 * pH, W + 2 * pW
        Ho, Wo = window_geometry(repr(self), (H, W), self._kernel, self._stride, self._padding, self._dilation)
        shifted = self._stride == (1, 1)
        return Geometry(H, W, Hp, Wp, Ho, Wo, Wp if shifted else Wo, shifted,
                        Hp * Wp + (dW * (kW - 1) if shifted else 0))

    def _tap_weights(self, W):
        """Weights (K, O, C/G, *kernel) -> (K, G, O/G, J), J = kH·kW·(C/G) in the patches' order (taps first)."""
        G, Cg = self.groups, self.in_channels // self.groups
        W = W.reshape((W.shape[0], G, W.shape[1] // G, Cg, -1))  # W.shape[1]: out_channels, or more (stacked)
        return np.swapaxes(W, -1, -2).reshape(W.shape[:3] + (-1,))

    def _from_tap_weights(self, W):
        """(..., G, O/G, J) in the patches' order -> weights (..., O, C/G, *kernel)."""
        Cg = self.in_channels // self.groups
        W = np.swapaxes(W.reshape(W.shape[:-1] + (-1, Cg)), -1, -2)  # (..., G, O/G, C/G, taps)
        return W.reshape(W.shape[:-4] + (self.out_channels, Cg) + self.kernel_size)

    def _padded(self, X, geo):
        """Inputs (M, C, [H,] W) -> zero-padded and flat per channel, (M, G, C/G, flat)."""
        M, C, (pH, pW) = X.shape[0], self.in_channels, self._padding
        P = memory.zeros((M, C, geo.flat), X.dtype)
        grid = P[:, :, :geo.Hp * geo.Wp].reshape(M, C, geo.Hp, geo.Wp)
        grid[:, :, pH:pH + geo.H, pW:pW + geo.W] = X.reshape(M, C, geo.H, geo.W)
        return P.reshape(M, self.groups, C // self.groups, geo.flat)

    def _window(self, P, geo, i, j, rows):
        """Tap (i, j)'s view of padded P (..., M, G, C/G, flat) for the examples ``rows`` (all of them if M = 1):
        (..., b, G, C/G, Ho·Wg) when shifted, else (..., b, G, C/G, Ho, Wo)."""
        (dH, dW), (sH, sW) = self._dilation, self._stride
        rows = slice(None) if P.shape[-4] == 1 else rows
        if geo.shifted:
            start = i * dH * geo.Wp + j * dW
            return P[..., rows, :, :, start:start + geo.Ho * geo.Wp]
        grid = P.reshape(P.shape[:-1] + (geo.Hp, geo.Wp))[..., rows, :, :, :, :]
        return grid[..., i * dH:i * dH + sH * (geo.Ho - 1) + 1:sH, j * dW:j * dW + sW * (geo.Wo - 1) + 1:sW]

    def _patches(self, P, geo, rows):
        """The patches of the examples ``rows`` of padded P (K_P, M, G, C/G, flat): (K_P, b, G, J, Ho·Wg), J in
        the order (tap, channel); formed a few examples at a time, so that they stay in cache, in one copy from a
        view of P that steps over the taps (every tap's window of :meth:`_window` at once)."""
        (kH, kW), (dH, dW), (sH, sW) = self._kernel, self._dilation, self._stride
        P = P if P.shape[-4] == 1 else P[..., rows, :, :, :]
        sC, item = P.strides[-2:]
        taps = (dH * geo.Wp * item, dW * item)
        positions = (geo.Ho * geo.Wp,) if geo.shifted else (geo.Ho, geo.Wo)
        position_strides = (item,) if geo.shifted else (sH * geo.Wp * item, sW * item)
        view = np.lib.stride_tricks.as_strided(P, P.shape[:-2] + (kH, kW, P.shape[-2]) + positions,
                                               P.strides[:-2] + taps + (sC,) + position_strides, writeable=False)
        U = memory.empty(P.shape[:-2] + (kH, kW, P.shape[-2]) + positions, P.dtype)
        U[...] = view
        return U.reshape(P.shape[:-2] + (-1, geo.Ho * geo.Wg))

    def _map(self, fn, n, per_example):
        """``fn(rows)`` for chunks ``rows`` of the n examples, in order: about ``CHUNK_BYTES`` each, spread over the
        BLAS's threads (as many chunks for each, of equal sizes) when the product has ``PARALLEL_BYTES`` or more."""
        total = n * max(1, per_example)
        threads = blas_threads() if total >= self.PARALLEL_BYTES else 1
        count = -(-total // self.CHUNK_BYTES)
        count = min(n, -(-count // threads) * threads)
        return map_chunks(fn, [slice(i * n // count, (i + 1) * n // count) for i in range(count)], threads)

    def _grid(self, D, geo):
        """A chunk's output-side arrays D (K, b, O, [Ho,] Wo) on the grid of output positions, zero in its dropped
        columns: (K, b, G, O/G, Ho·Wg)."""
        K, b, G = D.shape[0], D.shape[1], self.groups
        D = D.reshape((K, b, G, D.shape[2] // G, geo.Ho, geo.Wo))
        if geo.Wg != geo.Wo:
            Z = memory.empty(D.shape[:-1] + (geo.Wg,), D.dtype)
            Z[..., geo.Wo:] = 0
            Z[..., :geo.Wo] = D
            D = Z
        return D.reshape(D.shape[:4] + (-1,))

    def _patch_bytes(self, K_P, K_other, channels, geo, itemsize):
        """Bytes per example of a chunk: K_P examples' patches and K_other arrays of ``channels`` rows."""
        return (K_P * self.fan_in * self.groups + K_other * channels) * geo.Ho * geo.Wg * itemsize

    def _apply(self, W, P, geo):
        """``W U``: the convolution of padded inputs P (K_P, M, G, C/G, flat) with weights W (K_W, O, C/G, *kernel),
        K_P, K_W ∈ {1, K}: outputs (K, M, O, [Ho,] Wo)."""
        Wt, (K_P, M), G = self._tap_weights(W)[:, None], P.shape[:2], self.groups
        K = max(K_P, W.shape[0])
        out = memory.empty((K, M, G, self.out_channels // G, geo.Ho, geo.Wo), P.dtype)

        def chunk(rows):
            y = memory.matmul(Wt, self._patches(P, geo, rows))  # (K, b, G, O/G, Ho·Wg)
            out[:, rows] = y.reshape(y.shape[:-1] + (geo.Ho, geo.Wg))[..., :geo.Wo]

        self._map(chunk, M, self._patch_bytes(K_P, 2 * K, self.out_channels, geo, P.itemsize))
        return out.reshape((K, M, self.out_channels) + (geo.Ho, geo.Wo)[2 - self.spatial:])

    def _adjoint(self, W, D, geo, summed=False):
        """``fold(Wᵀ D)``, the adjoint of :meth:`_apply` in its inputs: weights W (K_W, O, C/G, *kernel), output-side
        arrays D (K_D, M, O, [Ho,] Wo) -> (K·M, C, [H,] W), or (M, C, [H,] W) summed over K. O may also be a
        multiple of the output channels: pairs of weights and adjoints stacked per group, summed by the fold."""
        Wt = np.swapaxes(self._tap_weights(W), -1, -2)[:, None]
        K = max(D.shape[0], W.shape[0])
        fold = self._fold_shifted if geo.shifted else self._fold_windows
        out = fold(Wt, D, geo, K, summed)  # (K or 1, M, G, C/G, H, W)
        return out.reshape((-1, self.in_channels) + (geo.H, geo.W)[2 - self.spatial:])

    def _fold_windows(self, Wt, D, geo, K, summed):
        """:meth:`_adjoint` for any stride: each tap's rows of ``Wᵀ D`` added onto its window of the padded input."""
        M, Cg = D.shape[1], self.in_channels // self.groups
        P = memory.zeros((1 if summed else K, M, self.groups, Cg, geo.flat), D.dtype)

        def chunk(rows):
            E = memory.matmul(Wt, self._grid(D[:, rows], geo))  # (K, b, G, J, Ho·Wg)
            if summed and K > 1:
                E = E.sum(axis=0, keepdims=True)
            E = E.reshape(E.shape[:3] + (-1, Cg, E.shape[-1]))  # (K, b, G, taps, C/G, Ho·Wg)
            for t, (i, j) in enumerate(np.ndindex(*self._kernel)):
                window = self._window(P, geo, i, j, rows)
                window += E[..., t, :, :].reshape(window.shape)

        self._map(chunk, M, self._patch_bytes(K, 2 * D.shape[0], D.shape[2], geo, D.itemsize))
        (pH, pW) = self._padding
        grid = P[..., :geo.Hp * geo.Wp].reshape(P.shape[:4] + (geo.Hp, geo.Wp))
        return memory.copy(grid[..., pH:pH + geo.H, pW:pW + geo.W])

    def _fold_shifted(self, Wt, D, geo, K, summed):
        """:meth:`_adjoint` for stride 1, in one sum per chunk: input position q of the padded grid gets
        ``Σ_taps E_tap[q − offset_tap]``, the rows of ``E = Wᵀ D`` read through a view with one axis per tap
        coordinate (offsets are linear in them). Each row of E has zeros around it, written once per thread, where
        the view reads outside it."""
        (kH, kW), (dH, dW), (pH, pW) = self._kernel, self._dilation, self._padding
        M, G, Cg, Wp, L = D.shape[1], self.groups, self.in_channels // self.groups, geo.Wp, geo.Ho * geo.Wp
        first, last = pH * Wp + pW, (pH + geo.H - 1) * Wp + pW + geo.W - 1  # the input's positions in the grid
        left = max(0, (kH - 1) * dH * Wp + (kW - 1) * dW - first)
        width = left + max(L, last + 1)
        out = memory.empty((1 if summed else K, M, G, Cg, geo.H, geo.W), D.dtype)
        buffers = {}  # thread -> rows of E with their zeros around, (K, b, G, J, width)

        def chunk(rows):
            b = rows.stop - rows.start
            E = buffers.get(threading.get_ident())
            if E is None or E.shape[1] < b:
                E = buffers[threading.get_ident()] = memory.zeros((K, b, G, self.fan_in, width), D.dtype)
            E = E[:, :b]
            np.matmul(Wt, self._grid(D[:, rows], geo), out=E[..., left:left + L])
            if summed and K > 1:
                E = E.sum(axis=0, keepdims=True)
            sK, sb, sG, sJ, item = E.strides
            sT = Cg * sJ  # from one tap to the next
            view = np.lib.stride_tricks.as_strided(
                E[0, 0, 0, 0, left + first:], (E.shape[0], b, G, kH, kW, Cg, geo.H, geo.W),
                (sK, sb, sG, kW * sT - dH * Wp * item, sT - dW * item, sJ, Wp * item, item), writeable=False)
            np.sum(view, axis=(3, 4), out=out[:, rows])

        self._map(chunk, M, self._patch_bytes(K, 2 * D.shape[0], D.shape[2], geo, D.itemsize))
        return out

    def _correlate(self, D, P, geo, rows=slice(None), per_example=False):
        """``D Uᵀ``, the adjoint of :meth:`_apply` in its weights: output-side arrays D (K_D, b, O, [Ho,] Wo) of the
        examples ``rows`` of P (K_P, M, G, C/G, flat) -> (K, O, C/G, *kernel) summed over the examples, or
        (K, b, O, C/G, *kernel) per example."""
        K, b, start, G = max(D.shape[0], P.shape[0]), D.shape[1], rows.start or 0, self.groups
        out = memory.zeros((K,) + ((b,) if per_example else ()) + (G, self.fan_in, self.out_channels // G), D.dtype)

        def chunk(sub):
            U = self._patches(P, geo, slice(start + sub.start, start + sub.stop))
            # U Dᵀ, the transpose of D Uᵀ: OpenBLAS runs it about twice as fast with few output channels
            y = memory.matmul(U, np.swapaxes(self._grid(D[:, sub], geo), -1, -2))  # (K, c, G, J, O/G)
            if not per_example:
                return y.sum(axis=1)
            out[:, sub] = y

        sums = self._map(chunk, b, self._patch_bytes(P.shape[0], 2 * D.shape[0], self.out_channels, geo, D.itemsize))
        if not per_example:
            for y in sums:  # in the chunks' order, as one thread would add them
                out += y
        return self._from_tap_weights(np.swapaxes(out, -1, -2))

    def _patch_gram(self, cache):
        """``Σ_{b,l} u uᵀ`` (G, J, J) and ``Σ_{b,l} u`` (G, J) over the patches u of every example and output
        position, J = (C/G)·kH·kW in the weight's order."""
        geo, P, G, Cg = cache["geo"], cache["P"][None], self.groups, self.in_channels // self.groups
        A, s = np.zeros((G, self.fan_in, self.fan_in), dtype=P.dtype), np.zeros((G, self.fan_in), dtype=P.dtype)

        def chunk(rows):
            U = self._patches(P, geo, rows)[0]  # (b, G, J, Ho·Wg), J = (tap, channel)
            U = U.reshape(U.shape[:2] + (-1, Cg, geo.Ho, geo.Wg))[..., :geo.Wo]
            U = np.swapaxes(U, 2, 3).reshape(U.shape[:2] + (self.fan_in, -1))  # J = (channel, tap), valid positions
            return np.matmul(U, np.swapaxes(U, -1, -2)).sum(axis=0), U.sum(axis=(0, 3))

        for A_part, s_part in self._map(chunk, P.shape[1], self._patch_bytes(2, 0, 0, geo, P.itemsize)):
            A += A_part
            s += s_part
        return A, s
