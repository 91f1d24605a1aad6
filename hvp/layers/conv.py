"""Convolutions: Linear layers applied to unfolded input patches (DESIGN.md §7).

Unfolding the padded input of shape (N, C, H, W) gives one row of patch values per output
position, ``U`` (N·L, G, J), L = H_out·W_out positions, G groups, J = (C/G)·kH·kW values per
patch in the order of the weight's axes. Then, per group g,

    O[n, g, :, l] = W_g U[n·L + l, g]ᵀ + b_g,        W_g = weight[g·O/G:(g+1)·O/G] as (O/G, J),

and the four rules are those of :class:`~hvp.layers.dense.Linear` with fold, the adjoint of
unfold, wherever an input-side quantity comes back:

1. forward ``O = U W_gᵀ + b``; 2. backward ``DI = fold(DO W_g)``, ``DW_g = DOᵀ U``, ``Db = Σ DO``;
3. tangent ``Ȯ = unfold(İ) W_gᵀ + U Ẇ_gᵀ + ḃ``;
4. cross terms ``DI_k = fold(DOD Ẇ_k,g)``, ``DW_k = DODᵀ unfold(İ_k)``;

and for the Hessian diagonal, a diagonal d at the output reads ``dᵀ (U²)`` (rule 2 with squared patches).

Conv1d is Conv2d on inputs of height 1, with the weight viewed as (O, C/G, 1, k).
"""

import numpy as np

from .._checks import check_bool
from .windows import positive_ints, unfold, window_geometry


class _Conv:
    """Shared body of Conv1d and Conv2d; subclasses set ``spatial`` (1 or 2)."""

    spatial = 2

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True):
        name = type(self).__name__
        n = self.spatial
        self.in_channels, self.out_channels, self.groups = (
            positive_ints(name, arg, value, 1)[0]
            for arg, value in (("in_channels", in_channels), ("out_channels", out_channels), ("groups", groups)))
        self.kernel_size = positive_ints(name, "kernel_size", kernel_size, n)
        self.stride = positive_ints(name, "stride", stride, n)
        if isinstance(padding, str):
            raise ValueError(f"{name}: padding must be a non-negative integer or a tuple of {n}, got {padding!r} "
                             "(string paddings are not supported)")
        self.padding = positive_ints(name, "padding", padding, n, minimum=0)
        self.dilation = positive_ints(name, "dilation", dilation, n)
        self.bias = check_bool("bias", bias)
        for arg, value in (("in_channels", self.in_channels), ("out_channels", self.out_channels)):
            if value % self.groups:
                raise ValueError(f"{name}: groups={self.groups} must divide {arg}={value}")
        # the geometry in two spatial dimensions (a 1-D convolution runs on inputs of height 1)
        pad = (0,) * (2 - n)
        self._kernel = (1,) * (2 - n) + self.kernel_size
        self._stride = (1,) * (2 - n) + self.stride
        self._padding = pad + self.padding
        self._dilation = (1,) * (2 - n) + self.dilation

    def __repr__(self):
        args = [f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}"]
        defaults = (("stride", (1,) * self.spatial), ("padding", (0,) * self.spatial),
                    ("dilation", (1,) * self.spatial))
        args += [f"{key}={getattr(self, key)}" for key, default in defaults if getattr(self, key) != default]
        args += [f"groups={self.groups}"] if self.groups != 1 else []
        args += [] if self.bias else ["bias=False"]
        return f"{type(self).__name__}({', '.join(args)})"

    @property
    def in_shape(self):
        return (self.in_channels,) + (None,) * self.spatial

    @property
    def fan_in(self):
        return self.in_channels // self.groups * int(np.prod(self.kernel_size))

    def init_bounds(self):
        """PyTorch's default initialization: every parameter ~ U(−1/√fan_in, 1/√fan_in)."""
        return [1 / np.sqrt(self.fan_in)] * len(self.param_shapes())

    def param_shapes(self):
        """weight (out_channels, in_channels // groups, *kernel_size), then bias (out_channels,)."""
        shapes = [("weight", (self.out_channels, self.in_channels // self.groups) + self.kernel_size)]
        if self.bias:
            shapes.append(("bias", (self.out_channels,)))
        return shapes

    def out_shape(self, in_shape):
        name = repr(self)
        if len(in_shape) != 1 + self.spatial:
            raise ValueError(f"{name} needs inputs of shape (batch, {self.in_channels}, "
                             f"{', '.join('HW'[2 - self.spatial:])}), got per-example shape {in_shape}")
        if in_shape[0] != self.in_channels:
            raise ValueError(f"{name} needs {self.in_channels} input channels, got per-example shape {in_shape}")
        sizes = window_geometry(name, in_shape[1:], self.kernel_size, self.stride, self.padding, self.dilation)
        return (self.out_channels,) + sizes

    # -- reshaping between the layer's layout and patch rows ------------------------------------

    def _as2d(self, X):
        """(N, C, [H,] W) -> (N, C, H, W): a view."""
        return X if self.spatial == 2 else X[:, :, None, :]

    def _weight(self, W):
        """weight (..., O, C/G, *kernel) -> (..., G, O/G, J)."""
        G = self.groups
        return W.reshape(W.shape[:-2 - self.spatial] + (G, self.out_channels // G, -1))

    def _patches(self, I):
        """Patch rows of I (N, C, [H,] W): (N·L, G, J), and the output's spatial sizes."""
        windows = unfold(self._as2d(I), self._kernel, self._stride, self._padding, self._dilation)
        N, C, Ho, Wo = windows.shape[:4]
        rows = windows.transpose(0, 2, 3, 1, 4, 5).reshape(N * Ho * Wo, self.groups, -1)
        return rows, (Ho, Wo)

    def _fold_product(self, R, W, cache, summed=False):
        """``fold(R W_g)`` for rows R (K, N·L, G, O/G) and weights W (K′, O, C/G, *kernel), K, K′ ∈ {1, k},
        without forming ``R W_g``: one product per kernel offset, added into the padded input in
        channels-last order, where each offset's slab is contiguous. Returns (K·N, C, [H,] W), or the
        sum over K (N, C, [H,] W) with ``summed``."""
        G, C, spatial = self.groups, self.in_channels, tuple(cache["shape"][2:])
        (pH, pW), (dH, dW), (sH, sW), (Ho, Wo) = self._padding, self._dilation, self._stride, cache["sizes"]
        H, Wd = (1,) * (2 - self.spatial) + spatial
        K, N = max(R.shape[0], W.shape[0]), R.shape[1] // (Ho * Wo)
        Rg = np.moveaxis(R, 2, 1)  # (K, G, N·L, O/G)
        W = W.reshape((W.shape[0], G, self.out_channels // G, C // G) + self._kernel)
        out = np.zeros(((1 if summed else K) * N, H + 2 * pH, Wd + 2 * pW, C), dtype=R.dtype)
        for i in range(self._kernel[0]):
            for j in range(self._kernel[1]):
                D = np.matmul(Rg, W[..., i, j])  # (K, G, N·L, C/G)
                D = D.sum(axis=0, keepdims=True) if summed and K > 1 else D
                out[:, i * dH:i * dH + sH * (Ho - 1) + 1:sH, j * dW:j * dW + sW * (Wo - 1) + 1:sW] += (
                    np.moveaxis(D, 1, 2).reshape((-1, Ho, Wo, C)))
        out = out[:, pH:pH + H, pW:pW + Wd].transpose(0, 3, 1, 2)
        return np.ascontiguousarray(out).reshape((out.shape[0], C) + spatial)

    def _to_rows(self, O):
        """Outputs (..., N, O_ch, [Ho,] Wo) -> rows (..., N·L, G, O/G)."""
        lead, N = O.shape[:-2 - self.spatial], O.shape[-2 - self.spatial]
        moved = np.moveaxis(O, -1 - self.spatial, -1)
        return moved.reshape(lead + (N * int(np.prod(O.shape[-self.spatial:])), self.groups, -1))

    def _from_rows(self, R, N, sizes):
        """Rows (..., N·L, G, O/G) -> outputs (..., N, O_ch, [Ho,] Wo)."""
        spatial = sizes[2 - self.spatial:]
        out = R.reshape(R.shape[:-3] + (N,) + spatial + (self.out_channels,))
        return np.moveaxis(out, -1, -1 - self.spatial)

    # -- the four rules --------------------------------------------------------------------------

    def _linear(self, W, I):
        """``conv(I, W)`` without bias for I (N, C, …): the output (N, O, …), the patch rows and output sizes."""
        U, sizes = self._patches(I)
        R = np.matmul(U.transpose(1, 0, 2), self._weight(W).transpose(0, 2, 1))  # (G, N·L, O/G)
        return np.ascontiguousarray(self._from_rows(R.transpose(1, 0, 2), I.shape[0], sizes)), U, sizes

    def forward(self, p, I):
        """Rule 1: ``O = conv(I, W) + b``; I (B, C, [H,] W) -> O (B, O, [Ho,] Wo)."""
        O, U, sizes = self._linear(p["weight"], I)
        if self.bias:
            O += p["bias"].reshape((-1,) + (1,) * self.spatial)
        return O, {"U": U, "shape": I.shape, "sizes": sizes}

    def backward_input(self, p, cache, DO):
        """Rule 2: ``DI = fold(DO W_g)``; DO (..., B, O, [Ho,] Wo) -> DI (..., B, C, [H,] W), B or 1 (shared)."""
        lead = DO.shape[:-1 - self.spatial]  # the batch axis included: it may be 1
        DO = DO.reshape((-1,) + DO.shape[-1 - self.spatial:])
        DI = self._fold_product(self._to_rows(DO)[None], p["weight"][None], cache)
        return DI.reshape(lead + tuple(cache["shape"][1:]))

    def _param_grads(self, R, U, out, bias_from):
        """``DW = Rᵀ U`` per group and direction into ``out``; R (..., N·L, G, O/G), U (..., N·L, G, J)."""
        W = np.matmul(np.moveaxis(R, -3, -1), np.moveaxis(U, -3, -2))  # (..., G, O/G, J)
        shape = W.shape[:-3] + (self.out_channels, self.in_channels // self.groups) + self.kernel_size
        if out.get("weight") is None:
            out["weight"] = W.reshape(shape)
        else:
            out["weight"][...] = W.reshape(shape)
        if self.bias and bias_from is not None:
            axes = (-2 - self.spatial,) + tuple(range(-self.spatial, 0))
            out["bias"] = np.sum(bias_from, axis=axes, out=out.get("bias"))
        return out

    def backward_params(self, p, cache, DO, out=None):
        """Rule 2: ``DW_g = DOᵀ U``, ``Db = Σ DO``; DO (B, O, …) -> weight (O, C/G, *kernel), or per direction
        for DO (k, B, O, …) -> (k, O, C/G, *kernel)."""
        return self._param_grads(self._to_rows(DO), cache["U"], {} if out is None else out, DO)

    def tangent(self, p, cache, dI, dp):
        """Rule 3: ``Ȯ_k = conv(İ_k, W) + conv(I, Ẇ_k) + ḃ_k``; dI (k, B or 1, C, …) -> dO (k, B, O, …)."""
        dO = None
        if dI is not None:
            dO = self._linear(p["weight"], dI.reshape((-1,) + dI.shape[2:]))[0]
            dO = dO.reshape(dI.shape[:2] + dO.shape[1:])
        if dp is not None:
            U = cache["U"].transpose(1, 0, 2)[None]  # (1, G, N·L, J)
            R = np.matmul(U, self._weight(dp["weight"]).transpose(0, 1, 3, 2))  # (k, G, N·L, O/G)
            from_params = self._from_rows(R.transpose(0, 2, 1, 3), cache["shape"][0], cache["sizes"])
            if self.bias:
                from_params += dp["bias"].reshape(dp["bias"].shape + (1,) * self.spatial)[:, None]
            dO = from_params if dO is None else dO + from_params
        return dO

    def tangent_backward(self, p, cache, dI, dp, DOD, need_input=True, summed=False):
        """Rule 4 cross terms: ``DI_k = fold(DOD Ẇ_k)``, ``DW_k = DODᵀ unfold(İ_k)``; DOD (B, O, …) or (k, B, O, …).

        Returns DI_k (k, B, C, …) and ``{"weight": (k, O, C/G, *kernel)}``; with ``summed`` their sums over k.
        """
        DI = grads = None
        B = cache["shape"][0]
        if dp is not None and need_input:
            R = self._to_rows(DOD)  # (N·L, G, O/G) or (k, N·L, G, O/G)
            DI = self._fold_product(R if R.ndim == 4 else R[None], dp["weight"], cache, summed)
            if not summed:
                DI = DI.reshape((-1,) + tuple(cache["shape"]))
        if dI is not None:
            k, Bt = dI.shape[:2]
            if Bt == 1 and B != 1:  # a tangent shared by all examples: DOD summed over the batch first
                DOD = DOD.sum(axis=DOD.ndim - 2 - self.spatial, keepdims=True)
            U, _ = self._patches(dI.reshape((-1,) + dI.shape[2:]))
            U = U.reshape((k, -1) + U.shape[1:])  # (k, Bt·L, G, J)
            R = self._to_rows(DOD)
            if summed:
                if R.ndim == 3:  # one DOD for every direction: Σ_k DODᵀ U_k = DODᵀ Σ_k U_k
                    grads = self._param_grads(R, U.sum(axis=0), {}, None)
                else:
                    grads = self._param_grads(R.reshape((-1,) + R.shape[2:]), U.reshape((-1,) + U.shape[2:]),
                                              {}, None)
            else:
                grads = self._param_grads(R, U, {}, None)
            grads = {"weight": grads["weight"]}
        return DI, grads

    # -- per-example pieces (hvp.per_example) ------------------------------------------------------

    PER_EXAMPLE_BYTES = 16 << 20  # per-example gradients are formed in blocks of examples of about this size

    def _example_grads(self, cache, D, rows, U=None):
        """Per-example weight gradients (K, b, O, C/G, *kernel) of the examples ``rows`` from their adjoints
        D (K, b, O, …): ``g_kb = Σ_l D_kbl ⊗ U_bl`` per group, the sum over output positions l one matmul;
        U (b or 1, L, G, J) the patches, by default the input's."""
        B, G = cache["shape"][0], self.groups
        if U is None:
            U = cache["U"].reshape(B, -1, G, cache["U"].shape[-1])[rows]  # (b, L, G, J)
        R = self._to_rows(D)  # (K, b·L, G, O/G)
        R = R.reshape((R.shape[0], D.shape[1]) + U.shape[1:3] + (-1,))  # (K, b, L, G, O/G)
        g = np.matmul(R.transpose(0, 1, 3, 4, 2), U.transpose(0, 2, 1, 3))  # (K, b, G, O/G, J)
        return g.reshape(g.shape[:2] + (self.out_channels, self.in_channels // G) + self.kernel_size)

    def _blocks(self, cache, K):
        B = cache["shape"][0]
        per_example = K * self.out_channels * self.fan_in * cache["U"].itemsize * self.groups
        size = max(1, self.PER_EXAMPLE_BYTES // per_example)
        return [slice(start, start + size) for start in range(0, B, size)]

    def _bias_grads(self, D):
        """Per-example bias gradients (…, B, O): D summed over the output positions."""
        return D.sum(axis=tuple(range(-self.spatial, 0)))

    def batch_grad(self, p, cache, DO, out, rows=slice(None)):
        """Per-example gradients of the examples ``rows``: weight (b, O, C/G, *kernel), bias (b, O)."""
        out["weight"][...] = self._example_grads(cache, DO[None, rows], rows)[0]
        if self.bias:
            out["bias"][...] = self._bias_grads(DO[rows])

    def grad_squares(self, p, cache, D, out, scale=None, weights=None):
        """``Σ_{k,b} w_kb (g_kb)²`` for adjoints ``DO_k = scale ⊙ D_k``, D (K, B or 1, O, …), weights w (K, B) or
        None for 1: per-example gradients formed a block of examples at a time (the squares do not factor over
        positions), the σ′ factor applied per block."""
        K, B = D.shape[0], cache["shape"][0]
        D = np.broadcast_to(D, (K, B) + D.shape[2:])  # columns shared by every example
        for view in out.values():
            view[...] = 0
        for rows in self._blocks(cache, K):
            DO = D[:, rows] if scale is None else D[:, rows] * scale[rows]
            g2 = np.square(self._example_grads(cache, DO, rows))  # (K, b, O, C/G, *kernel)
            b2 = np.square(self._bias_grads(DO)) if self.bias else None  # (K, b, O)
            if weights is not None:
                w = weights[:, rows]
                g2 *= w.reshape(w.shape + (1,) * (g2.ndim - 2))
                b2 = None if b2 is None else b2 * w[..., None]
            out["weight"] += g2.sum(axis=(0, 1))
            if self.bias:
                out["bias"] += b2.sum(axis=(0, 1))

    def tangent_grad_squares(self, p, cache, dI, DO, DOD, out):
        """``Σ_b g_b²`` for example b's gradient by rules 2 and 4, ``(g_b)_W = DO_bᵀ U_b + Σ_k DOD_kbᵀ unfold(İ_kb)``
        per group, ``(g_b)_b = Σ_l DO_bl``; dI (k, B or 1, C, …) or None, DO (B, O, …), DOD (k, B, O, …)."""
        k = 0 if dI is None else dI.shape[0]
        if k:
            dU = self._patches(dI.reshape((-1,) + dI.shape[2:]))[0]
            dU = dU.reshape((k, dI.shape[1], -1) + dU.shape[1:])  # (k, B or 1, L, G, J)
        out["weight"][...] = 0
        for rows in self._blocks(cache, 1 + k):
            g = self._example_grads(cache, DO[None, rows], rows)[0]
            for j in range(k):
                g += self._example_grads(cache, DOD[j][None, rows], rows, dU[j] if dU.shape[1] == 1 else dU[j][rows])[0]
            out["weight"] += np.square(g).sum(axis=0)
        if self.bias:
            out["bias"][...] = np.square(self._bias_grads(DO)).sum(axis=0)

    def diagonal_squares(self, p, cache, d, out):
        """``Σ_b diag(J_bᵀ diag(d_b) J_b)`` for a diagonal d (B, O, …) at the output: rule 2's ``DW_g = dᵀ U``
        with squared patches, ``dᵀ (U²)``, and ``Σ d`` over examples and positions for the bias."""
        self._param_grads(self._to_rows(d), np.square(cache["U"]), out, d)

    def input_curvature(self, p, cache, DO):
        """None: O is linear in I."""
        return None

    def batch_l2(self, p, cache, DO):
        """``‖g_b‖²`` (B,)."""
        parts = []
        for rows in self._blocks(cache, 1):
            g = self._example_grads(cache, DO[None, rows], rows)[0]
            parts.append(np.square(g.reshape(len(g), -1)).sum(axis=1))
        norms = np.concatenate(parts)
        if self.bias:
            norms += np.square(self._bias_grads(DO)).sum(axis=1)
        return norms

    # -- K-FAC's Kronecker factors (hvp.kfac) ------------------------------------------------------

    def kronecker_factors(self, cache, D):
        """K-FAC's factors with every output position as an example (Grosse & Martens 2016; "expand"), per
        group g: ``A_g = mean_{b,l} ū ūᵀ`` over the patches ū = [U_g, 1] (J+1, J+1), ``G_g = Σ_{k,b,l} d_g d_gᵀ``
        (O/G, O/G) for output-side columns D (K, B, O, …); stacked (G, ·, ·) when there are several groups,
        whose weights form a block-diagonal matrix."""
        G = self.groups
        U = cache["U"].transpose(1, 0, 2)  # (G, B·L, J)
        n, J = U.shape[1:]
        A = np.matmul(U.transpose(0, 2, 1), U)
        if self.bias:
            s = U.sum(axis=1)
            A = np.concatenate([np.concatenate([A, s[:, :, None]], axis=2),
                                np.concatenate([s, np.full((G, 1), n, dtype=U.dtype)], axis=1)[:, None, :]], axis=1)
        R = self._to_rows(D).reshape(-1, G, self.out_channels // G).transpose(1, 0, 2)  # (G, K·B·L, O/G)
        A, Gm = A / U.dtype.type(n), np.matmul(R.transpose(0, 2, 1), R)
        return (A[0], Gm[0]) if G == 1 else (A, Gm)

    def kronecker_matrix(self, p):
        """The parameters as K-FAC's matrices ``W̄_g = [W_gᵀ; b_g]`` (..., [G,] J+1, O/G), W_g (O/G, J) group g's
        filters as rows; the group axis only when there are several."""
        G = self.groups
        M = np.swapaxes(self._weight(p["weight"]), -1, -2)  # (..., G, J, O/G)
        if self.bias:
            b = p["bias"]
            M = np.concatenate([M, b.reshape(b.shape[:-1] + (G, 1, -1))], axis=-2)
        return M[..., 0, :, :] if G == 1 else M

    def from_kronecker_matrix(self, M, out):
        """Write ``W̄`` (..., [G,] J+1, O/G) into the parameter views ``out``."""
        if self.groups == 1:
            M = M[..., None, :, :]
        J = self.fan_in
        out["weight"][...] = np.swapaxes(M[..., :J, :], -1, -2).reshape(out["weight"].shape)
        if self.bias:
            out["bias"][...] = M[..., J, :].reshape(out["bias"].shape)


class Conv2d(_Conv):
    """2-D convolution as ``torch.nn.Conv2d``: inputs (B, C_in, H, W), outputs (B, C_out, H_out, W_out).

    Parameters
    ----------
    in_channels, out_channels : int
    kernel_size, stride, padding, dilation : int or tuple of 2 ints
        ``H_out = ⌊(H + 2·padding − dilation·(kernel_size − 1) − 1) / stride⌋ + 1``, and alike for W;
        padding with zeros.
    groups : int
        Channels split into this many groups, each convolved with its own filters; it divides both
        channel counts.
    bias : bool

    θ holds weight (out_channels, in_channels // groups, kH, kW), then bias (out_channels,), as torch.
    """

    spatial = 2


class Conv1d(_Conv):
    """1-D convolution as ``torch.nn.Conv1d``: inputs (B, C_in, L), outputs (B, C_out, L_out).

    Parameters as :class:`Conv2d`, with ints or 1-tuples; weight (out_channels, in_channels // groups, k).
    """

    spatial = 1
