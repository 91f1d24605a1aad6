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
"""

from collections import namedtuple

import numpy as np

Geometry = namedtuple("Geometry", "H W Hp Wp Ho Wo Wg shifted flat")


class PatchProducts:
    """The three products, for a convolution with attributes ``in_channels``, ``out_channels``, ``groups``,
    ``fan_in``, ``kernel_size``, ``spatial`` and the 2-D geometry ``_kernel``, ``_stride``, ``_padding``,
    ``_dilation`` (a 1-D convolution runs on inputs of height 1).

    Arrays: P (K_P, M, G, C/G, flat) padded inputs, flat per channel; D (K_D, M, G, O/G, Ho·Wg) output-side
    arrays on the grid; a leading K axis of 1 is shared by the K of the other operand.
    """

    CHUNK_BYTES = 2 << 20  # the taps loop over a few examples at a time, about this much data, kept in cache

    def _geometry(self, shape):
        """Sizes for inputs of shape (N, C, [H,] W), in two spatial dimensions."""
        (kH, kW), (sH, sW), (pH, pW), (dH, dW) = self._kernel, self._stride, self._padding, self._dilation
        H, W = (1,) * (2 - self.spatial) + tuple(shape[2:])
        Hp, Wp = H + 2 * pH, W + 2 * pW
        Ho, Wo = (Hp - dH * (kH - 1) - 1) // sH + 1, (Wp - dW * (kW - 1) - 1) // sW + 1
        shifted = sH == sW == 1
        return Geometry(H, W, Hp, Wp, Ho, Wo, Wp if shifted else Wo, shifted,
                         Hp * Wp + (dW * (kW - 1) if shifted else 0))

    def _tap_weights(self, W):
        """Weights (K, O, C/G, *kernel) -> (K, G, O/G, J), J = kH·kW·(C/G) in the patches' order (taps first)."""
        G, Cg = self.groups, self.in_channels // self.groups
        W = W.reshape((W.shape[0], G, self.out_channels // G, Cg, -1))
        return np.swapaxes(W, -1, -2).reshape(W.shape[:3] + (-1,))

    def _from_tap_weights(self, W):
        """(..., G, O/G, J) in the patches' order -> weights (..., O, C/G, *kernel)."""
        Cg = self.in_channels // self.groups
        W = np.swapaxes(W.reshape(W.shape[:-1] + (-1, Cg)), -1, -2)  # (..., G, O/G, C/G, taps)
        return W.reshape(W.shape[:-4] + (self.out_channels, Cg) + self.kernel_size)

    def _padded(self, X, geo):
        """Inputs (M, C, [H,] W) -> zero-padded and flat per channel, (M, G, C/G, flat)."""
        M, C, (pH, pW) = X.shape[0], self.in_channels, self._padding
        P = np.zeros((M, C, geo.flat), dtype=X.dtype)
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
        """The patches of the examples ``rows`` of padded P (K_P, M, G, C/G, flat), side by side:
        (K_P, G, J, b·Ho·Wg), J in the order (tap, channel), b = 1 for a P shared by every example (M = 1)."""
        taps, Cg = list(np.ndindex(*self._kernel)), self.in_channels // self.groups
        K_P, b, G = P[..., rows, :, :, :].shape[:-2] if P.shape[-4] > 1 else P.shape[:-2]
        U = np.empty((K_P, G, len(taps), Cg, b, geo.Ho, geo.Wg), dtype=P.dtype)
        for t, (i, j) in enumerate(taps):
            window = self._window(P, geo, i, j, rows).reshape((K_P, b, G, Cg, geo.Ho, geo.Wg))
            U[:, :, t] = np.moveaxis(window, 1, 3)
        return U.reshape((K_P, G, -1, b * geo.Ho * geo.Wg))

    @staticmethod
    def _side_by_side(D):
        """(K, b, G, n, L) -> (K, G, n, b·L), a copy."""
        K, b, G, n, L = D.shape
        return np.moveaxis(D, 1, 3).reshape((K, G, n, b * L))

    def _chunks(self, n, per_example):
        size = max(1, self.CHUNK_BYTES // max(1, per_example))
        return [slice(start, min(start + size, n)) for start in range(0, n, size)]

    def _to_grid(self, D, geo):
        """Output-side arrays (..., M, O, [Ho,] Wo) -> (..., M, G, O/G, Ho·Wg), zero in the dropped columns."""
        lead, G, O = D.shape[:-1 - self.spatial], self.groups, self.out_channels
        D = D.reshape(lead + (O, geo.Ho, geo.Wo))
        if geo.Wg != geo.Wo:
            Z = np.zeros(lead + (O, geo.Ho, geo.Wg), dtype=D.dtype)
            Z[..., :geo.Wo] = D
            D = Z
        return D.reshape(lead + (G, O // G, geo.Ho * geo.Wg))

    def _from_grid(self, Y, geo):
        """(..., G, O/G, Ho·Wg) -> outputs (..., O, [Ho,] Wo), contiguous."""
        lead = Y.shape[:-3]
        Y = Y.reshape(lead + (self.out_channels, geo.Ho, geo.Wg))[..., :geo.Wo]
        return np.ascontiguousarray(Y).reshape(lead + (self.out_channels,) + (geo.Ho, geo.Wo)[2 - self.spatial:])

    def _patch_bytes(self, K_P, K_other, channels, geo, itemsize):
        """Bytes per example of a chunk: K_P examples' patches and K_other arrays of ``channels`` rows."""
        return (K_P * self.fan_in * self.groups + K_other * channels) * geo.Ho * geo.Wg * itemsize

    def _apply(self, W, P, geo):
        """``W U``: the convolution of padded inputs P (K_P, M, G, C/G, flat) with weights W (K_W, O, C/G, *kernel),
        K_P, K_W ∈ {1, K}: (K, M, G, O/G, Ho·Wg). One product per chunk of examples."""
        Wt, (K_P, M), L = self._tap_weights(W), P.shape[:2], geo.Ho * geo.Wg
        K, G, Og = max(K_P, W.shape[0]), self.groups, self.out_channels // self.groups
        out = np.empty((K, M, G, Og, L), dtype=P.dtype)
        for rows in self._chunks(M, self._patch_bytes(K_P, 2 * K, self.out_channels, geo, P.itemsize)):
            y = np.matmul(Wt, self._patches(P, geo, rows))  # (K, G, O/G, b·L)
            out[:, rows] = np.moveaxis(y.reshape((K, G, Og, -1, L)), 3, 1)
        return out

    def _adjoint(self, W, D, geo, summed=False):
        """``fold(Wᵀ D)``, the adjoint of :meth:`_apply` in its inputs: weights W (K_W, O, C/G, *kernel), grid
        adjoints D (K_D, M, G, O/G, Ho·Wg) -> (K·M, C, [H,] W), or (M, C, [H,] W) summed over K."""
        Wt, (K_D, M) = np.swapaxes(self._tap_weights(W), -1, -2), D.shape[:2]
        Cg, G, L = self.in_channels // self.groups, self.groups, D.shape[-1]
        K = max(K_D, W.shape[0])
        P = np.zeros((1 if summed else K, M, G, Cg, geo.flat), dtype=D.dtype)
        for rows in self._chunks(M, self._patch_bytes(K, 2 * K_D, self.out_channels, geo, D.itemsize)):
            E = np.matmul(Wt, self._side_by_side(D[:, rows]))  # (K, G, J, b·L)
            if summed and K > 1:
                E = E.sum(axis=0, keepdims=True)
            E = E.reshape(E.shape[:2] + (-1, Cg, E.shape[-1] // L, L))  # (K, G, taps, C/G, b, L)
            for t, (i, j) in enumerate(np.ndindex(*self._kernel)):
                window = self._window(P, geo, i, j, rows)
                window += np.moveaxis(E[:, :, t], 3, 1).reshape(window.shape)
        (pH, pW), C = self._padding, self.in_channels
        grid = P[..., :geo.Hp * geo.Wp].reshape((-1, C, geo.Hp, geo.Wp))[:, :, pH:pH + geo.H, pW:pW + geo.W]
        return np.ascontiguousarray(grid).reshape((-1, C) + (geo.H, geo.W)[2 - self.spatial:])

    def _correlate(self, D, P, geo, rows=slice(None), per_example=False):
        """``D Uᵀ``, the adjoint of :meth:`_apply` in its weights: grid adjoints D (K_D, b, G, O/G, Ho·Wg) of the
        examples ``rows`` of P (K_P, M, G, C/G, flat) -> (K, O, C/G, *kernel) summed over the examples (one
        product per chunk), or (K, b, O, C/G, *kernel) per example."""
        K, b, start, L = max(D.shape[0], P.shape[0]), D.shape[1], rows.start or 0, D.shape[-1]
        out = np.zeros((K,) + ((b,) if per_example else ()) + D.shape[2:4] + (self.fan_in,), dtype=D.dtype)
        for sub in self._chunks(b, self._patch_bytes(P.shape[0], 2 * D.shape[0], self.out_channels, geo,
                                                     D.itemsize)):
            U = self._patches(P, geo, slice(start + sub.start, start + sub.stop))  # (K_P, G, J, b_P·L)
            Dc = D[:, sub]
            if per_example:
                U = np.moveaxis(U.reshape(U.shape[:3] + (-1, L)), 3, 1)  # (K_P, b_P, G, J, L)
                out[:, sub] = np.matmul(Dc, np.swapaxes(U, -1, -2))  # (K, c, G, O/G, J)
            else:
                if U.shape[-1] == L and Dc.shape[1] > 1:  # patches shared by every example: Σ_n D_n Uᵀ = (Σ_n D_n) Uᵀ
                    Dc = Dc.sum(axis=1, keepdims=True)
                out += np.matmul(self._side_by_side(Dc), np.swapaxes(U, -1, -2))  # (K, G, O/G, J)
        return self._from_tap_weights(out)

    def _patch_gram(self, cache):
        """``Σ_{b,l} u uᵀ`` (G, J, J) and ``Σ_{b,l} u`` (G, J) over the patches u of every example and output
        position, J = (C/G)·kH·kW in the weight's order."""
        geo, P, G, Cg = cache["geo"], cache["P"][None], self.groups, self.in_channels // self.groups
        A, s = np.zeros((G, self.fan_in, self.fan_in), dtype=P.dtype), np.zeros((G, self.fan_in), dtype=P.dtype)
        for rows in self._chunks(P.shape[1], self._patch_bytes(2, 0, 0, geo, P.itemsize)):
            U = self._patches(P, geo, rows)[0]  # (G, J, b·Ho·Wg), J = (tap, channel)
            U = U.reshape((G, -1, Cg, U.shape[-1] // geo.Wg, geo.Wg))[..., :geo.Wo]
            U = np.swapaxes(U, 1, 2).reshape((G, self.fan_in, -1))  # J = (channel, tap), valid positions only
            A += np.matmul(U, np.swapaxes(U, -1, -2))
            s += U.sum(axis=-1)
        return A, s
