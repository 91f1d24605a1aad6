"""Convolutions: Linear layers applied to the input's patches (DESIGN.md §7).

Per example n and group g, with the patches U_n (G, J, L) of the padded input (J = kH·kW·(C/G) values at
each of L = H_out·W_out output positions) and the weights as W_g (O/G, J),

    O[n, g] = W_g U_n,g + b_g        (O/G, L),

and the four rules are those of :class:`~hvp.layers.dense.Linear`, with fold (the adjoint of forming
patches) wherever an input-side quantity comes back:

1. forward ``O = W U + b``; 2. backward ``DI = fold(Wᵀ DO)``, ``DW = Σ_n DO_n U_nᵀ``, ``Db = Σ DO``;
3. tangent ``Ȯ = W unfold(İ) + Ẇ U + ḃ``;
4. cross terms ``DI_k = fold(Ẇ_kᵀ DOD)``, ``DW_k = Σ_n DOD_n unfold(İ_k,n)ᵀ``;

and for the Hessian diagonal, a diagonal d at the output reads ``Σ_n d_n (U_n²)ᵀ`` (rule 2 with squared
patches). The three products, and how patches are formed a few examples at a time, are in
:mod:`~hvp.layers.patches`. Conv1d is Conv2d on inputs of height 1, with the weight viewed as (O, C/G, 1, k).
"""

import numpy as np

from .._checks import check_bool
from .patches import PatchProducts
from .second_order import rules_apart
from .windows import positive_ints, window_geometry


class _Conv(PatchProducts):
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

    # -- the four rules --------------------------------------------------------------------------

    def forward(self, p, I):
        """Rule 1: ``O = conv(I, W) + b``; I (B, C, [H,] W) -> O (B, O, [Ho,] Wo)."""
        geo = self._geometry(I.shape)
        P = self._padded(I, geo)
        O = self._apply(p["weight"][None], P[None], geo)[0]
        if self.bias:
            O += p["bias"].reshape((-1,) + (1,) * self.spatial)
        return O, {"P": P, "shape": I.shape, "geo": geo}

    def backward_input(self, p, cache, DO):
        """Rule 2: ``DI = fold(Wᵀ DO)``; DO (..., B, O, [Ho,] Wo) -> DI (..., B, C, [H,] W), B or 1 (shared)."""
        lead = DO.shape[:-1 - self.spatial]  # the batch axis included: it may be 1
        DI = self._adjoint(p["weight"][None], DO.reshape((1, -1) + DO.shape[-1 - self.spatial:]), cache["geo"])
        return DI.reshape(lead + tuple(cache["shape"][1:]))

    def _bias_grads(self, D):
        """Per-example bias gradients (…, B, O): D summed over the output positions."""
        return D.sum(axis=tuple(range(-self.spatial, 0)))

    def backward_params(self, p, cache, DO, out=None):
        """Rule 2: ``DW = Σ_n DO_n U_nᵀ``, ``Db = Σ DO``; DO (B, O, …) -> weight (O, C/G, *kernel), or per direction
        for DO (k, B, O, …) -> columns (O, C/G, *kernel, k)."""
        out = {} if out is None else out
        per_direction = DO.ndim == 3 + self.spatial
        W = self._correlate(DO if per_direction else DO[None], cache["P"][None], cache["geo"])
        grads = {"weight": np.moveaxis(W, 0, -1) if per_direction else W[0]}
        if self.bias:
            b = np.sum(self._bias_grads(DO), axis=-2)
            grads["bias"] = b.T if per_direction else b
        for name, g in grads.items():
            if out.get(name) is None:
                out[name] = g
            else:
                out[name][...] = g
        return out

    def tangent(self, p, cache, dI, dp):
        """Rule 3: ``Ȯ_k = conv(İ_k, W) + conv(I, Ẇ_k) + ḃ_k``; dI (k, B or 1, C, …), Ẇ (O, C/G, *kernel, k)
        -> dO (k, B, O, …)."""
        geo, dO = cache["geo"], None
        if dI is not None:
            P = self._padded(dI.reshape((-1,) + dI.shape[2:]), geo)
            dO = self._apply(p["weight"][None], P[None], geo)[0]
            dO = dO.reshape(dI.shape[:2] + dO.shape[1:])
        if dp is not None:
            from_params = self._apply(np.moveaxis(dp["weight"], -1, 0), cache["P"][None], geo)  # (k, B, O, …)
            if self.bias:
                from_params += dp["bias"].T.reshape(dp["bias"].shape[::-1] + (1,) * self.spatial)[:, None]
            dO = from_params if dO is None else dO + from_params
        return dO

    def tangent_backward(self, p, cache, dI, dp, DOD, need_input=True, summed=False):
        """Rule 4 cross terms: ``DI_k = fold(Ẇ_kᵀ DOD)``, ``DW_k = Σ_n DOD_n unfold(İ_k,n)ᵀ``; DOD (B, O, …) or
        (k, B, O, …).

        Ẇ as columns (O, C/G, *kernel, k). Returns DI_k (k, B, C, …) and ``{"weight": (O, C/G, *kernel, k)}``; with
        ``summed`` their sums over k.
        """
        DI = grads = None
        geo, B, shared_dod = cache["geo"], cache["shape"][0], DOD.ndim == 2 + self.spatial
        if dp is not None and need_input:
            DI = self._adjoint(np.moveaxis(dp["weight"], -1, 0), DOD[None] if shared_dod else DOD, geo, summed)
            if not summed:
                DI = DI.reshape((-1,) + tuple(cache["shape"]))
        if dI is not None:
            k, Bt = dI.shape[:2]
            DOD = DOD[None] if shared_dod else DOD
            if Bt == 1 and B != 1:  # a tangent shared by all examples: DOD summed over the batch first
                DOD = DOD.sum(axis=1, keepdims=True)
            if summed and shared_dod:  # one DOD for every direction: Σ_k DODᵀ unfold(İ_k) = DODᵀ unfold(Σ_k İ_k)
                dI = dI.sum(axis=0, keepdims=True)
            P = self._padded(dI.reshape((-1,) + dI.shape[2:]), geo).reshape(dI.shape[:2] + (self.groups, -1, geo.flat))
            if summed and not shared_dod:
                DOD, P = DOD.reshape((1, -1) + DOD.shape[2:]), P.reshape((1, -1) + P.shape[2:])
            W = self._correlate(DOD, P, geo)
            grads = {"weight": W[0] if summed else np.moveaxis(W, 0, -1)}
        return DI, grads

    def backward_with_cross_terms(self, p, cache, dI, dp, RDO, DOD, out, need_input):
        """Rules 2 and 4 together (:mod:`hvp.layers.second_order`); when both input adjoints are wanted, one fold
        ``fold([W; Ẇ_k]ᵀ [RDO_k; DOD])``, the pairs stacked along each group's output channels, where apart
        they make two passes over the patch-sized ``Wᵀ D``."""
        both = need_input and DOD is not None and dp is not None
        RDI = rules_apart(self, p, cache, dI, dp, RDO, DOD, out, need_input and not both)
        if not both:
            return RDI
        G = self.groups
        dW = np.moveaxis(dp["weight"], -1, 0)  # (k, O, C/G, *kernel)
        W = np.broadcast_to(p["weight"], dW.shape)
        D = np.broadcast_to(DOD, RDO.shape)

        def pair(a, b, axis):  # stacked along axis's groups of O/G channels
            split = a.shape[:axis] + (G, -1) + a.shape[axis + 1:]
            stacked = np.concatenate([a.reshape(split), b.reshape(split)], axis=axis + 1)
            return stacked.reshape(a.shape[:axis] + (-1,) + a.shape[axis + 1:])

        RDI = self._adjoint(pair(W, dW, 1), pair(RDO, D, 2), cache["geo"])
        return RDI.reshape(RDO.shape[:2] + tuple(cache["shape"][1:]))

    # -- per-example pieces (hvp.per_example) ------------------------------------------------------

    PER_EXAMPLE_BYTES = 16 << 20  # per-example gradients are formed in blocks of examples of about this size

    def _example_grads(self, cache, D, rows, P=None):
        """Per-example weight gradients (K, b, O, C/G, *kernel) of the examples ``rows`` from their adjoints
        D (K, b, O, …): ``g_kb = Σ_l D_kbl ⊗ u_bl`` per group; P (B or 1, G, C/G, flat) the padded inputs
        whose patches u are, by default the layer's input."""
        P = cache["P"] if P is None else P
        return self._correlate(D, P[None], cache["geo"], rows, per_example=True)

    def _blocks(self, cache, K):
        B = cache["shape"][0]
        per_example = K * self.out_channels * self.fan_in * cache["P"].itemsize * self.groups
        size = max(1, self.PER_EXAMPLE_BYTES // per_example)
        return [slice(start, start + size) for start in range(0, B, size)]

    def batch_grad(self, p, cache, DO, out, rows=slice(None)):
        """Per-example gradients of the examples ``rows``: weight (b, O, C/G, *kernel), bias (b, O)."""
        out["weight"][...] = self._example_grads(cache, DO[None, rows], rows)[0]
        if self.bias:
            out["bias"][...] = self._bias_grads(DO[rows])

    def grad_squares(self, p, cache, D, out, scale=None, weights=None, need_input=False, sums=None):
        """``Σ_{k,b} w_kb (g_kb)²`` for adjoints ``DO_k = scale ⊙ D_k``, D (K, B or 1, O, …), weights w (K, B) or
        None for 1: per-example gradients formed a block of examples at a time (the squares do not factor over
        positions), the σ′ factor applied per block; ``sums`` (views like ``out``, or None) receive
        ``Σ_{k,b} w_kb g_kb`` from the same g. Returns None (``need_input``: the caller carries D back)."""
        K, B = D.shape[0], cache["shape"][0]
        D = np.broadcast_to(D, (K, B) + D.shape[2:])  # columns shared by every example
        for views in (out, sums or {}):
            for view in views.values():
                view[...] = 0
        for rows in self._blocks(cache, K):
            DO = D[:, rows] if scale is None else D[:, rows] * scale[rows]
            grads = {"weight": self._example_grads(cache, DO, rows)}  # (K, b, O, C/G, *kernel)
            if self.bias:
                grads["bias"] = self._bias_grads(DO)  # (K, b, O)
            for name, g in grads.items():
                w = None if weights is None else weights[:, rows].reshape((K, -1) + (1,) * (g.ndim - 2))
                if sums is not None:
                    sums[name] += (g if w is None else g * w).sum(axis=(0, 1))
                g2 = np.square(g, out=g)  # g is ours
                if w is not None:
                    g2 *= w
                out[name] += g2.sum(axis=(0, 1))

    def tangent_grad_squares(self, p, cache, dI, DO, DOD, out):
        """``Σ_b g_b²`` for example b's gradient by rules 2 and 4, ``(g_b)_W = DO_b U_bᵀ + Σ_k DOD_kb unfold(İ_kb)ᵀ``
        per group, ``(g_b)_b = Σ_l DO_bl``; dI (k, B or 1, C, …) or None, DO (B, O, …), DOD (k, B, O, …)."""
        k = 0 if dI is None else dI.shape[0]
        if k:
            dP = self._padded(dI.reshape((-1,) + dI.shape[2:]), cache["geo"])
            dP = dP.reshape((k, dI.shape[1]) + dP.shape[1:])  # (k, B or 1, G, C/G, flat)
        out["weight"][...] = 0
        for rows in self._blocks(cache, 1 + k):
            g = self._example_grads(cache, DO[None, rows], rows)[0]
            for j in range(k):
                g += self._example_grads(cache, DOD[j][None, rows], rows, dP[j])[0]
            out["weight"] += np.square(g).sum(axis=0)
        if self.bias:
            out["bias"][...] = np.square(self._bias_grads(DO)).sum(axis=0)

    def diagonal_squares(self, p, cache, d, out):
        """``Σ_b diag(J_bᵀ diag(d_b) J_b)`` for a diagonal d (B, O, …) at the output: rule 2's ``Σ_n d_n U_nᵀ``
        with squared patches (the patches of I², padding included), and ``Σ d`` for the bias."""
        W = self._correlate(d[None], np.square(cache["P"])[None], cache["geo"])[0]
        out["weight"][...] = W
        if self.bias:
            out["bias"][...] = self._bias_grads(d).sum(axis=0)

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
        group g: ``A_g = mean_{b,l} ū ūᵀ`` over the patches ū = [u_g, 1] (J+1, J+1), ``G_g = Σ_{k,b,l} d_g d_gᵀ``
        (O/G, O/G) for output-side columns D (K, B, O, …); stacked (G, ·, ·) when there are several groups,
        whose weights form a block-diagonal matrix."""
        G, geo = self.groups, cache["geo"]
        A, s = self._patch_gram(cache)
        n = cache["shape"][0] * geo.Ho * geo.Wo
        if self.bias:
            A = np.concatenate([np.concatenate([A, s[:, :, None]], axis=2),
                                np.concatenate([s, np.full((G, 1), n, dtype=A.dtype)], axis=1)[:, None, :]], axis=1)
        R = D.reshape((-1, G, self.out_channels // G, geo.Ho * geo.Wo))  # (K·B, G, O/G, L)
        A, Gm = A / A.dtype.type(n), np.matmul(R, np.swapaxes(R, -1, -2)).sum(axis=0)
        return (A[0], Gm[0]) if G == 1 else (A, Gm)

    def kronecker_matrix(self, p):
        """The parameters as K-FAC's matrices ``W̄_g = [W_gᵀ; b_g]`` (..., [G,] J+1, O/G), W_g (O/G, J) group g's
        filters as rows; the group axis only when there are several."""
        G = self.groups
        W = p["weight"]
        M = np.swapaxes(W.reshape(W.shape[:-2 - self.spatial] + (G, self.out_channels // G, -1)), -1, -2)
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
