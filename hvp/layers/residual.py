"""Residual blocks ``O = I + f(I)``, f a sequence of layers that keeps the shape; nested blocks allowed."""

from .. import memory
from .composition import check_layers
from .second_order import backward_with_cross_terms


class Residual:
    """A residual block ``O = I + f(I)``, f a sequence of layers that keeps the shape (ResNet's skip connection).

    Parameters
    ----------
    *layers
        The layers of f, as instances; blocks may be nested. Their parameters appear in θ in order,
        named ``"<index in f>.<name>"`` as in a PyTorch ``state_dict`` (``"0.weight"``, ``"2.bias"``).

    The rules are those of f's layers, run through f, plus the identity path: ``Ȯ = İ + ḟ``,
    ``DI = DO + f's backward of DO``, and f's rule-4 cross terms (the identity has none).
    ``backward_params`` runs f's backward once and leaves its input adjoint for the
    ``backward_input`` call with the same DO that follows it in a backward pass; ``tangent``
    leaves f's inner tangents for ``tangent_backward`` or ``backward_with_cross_terms`` alike. A Hessian
    product's backward step (``backward_with_cross_terms``) carries its adjoint and f's cross terms through f
    in one pass.
    """

    def __init__(self, *layers):
        check_layers("Residual", layers)
        self.layers = list(layers)
        self._names = [[(f"{j}.{name}", name) for name, _ in layer.param_shapes()]
                       for j, layer in enumerate(self.layers)]
        self.in_shape = next((layer.in_shape for layer in layers if getattr(layer, "in_shape", None) is not None),
                             None)

    def __repr__(self):
        return "Residual(" + ", ".join(repr(layer) for layer in self.layers) + ")"

    def param_shapes(self):
        return [(f"{j}.{name}", shape) for j, layer in enumerate(self.layers) for name, shape in layer.param_shapes()]

    def init_bounds(self):
        return [bound for layer in self.layers if layer.param_shapes() for bound in layer.init_bounds()]

    def out_shape(self, in_shape):
        shape = tuple(in_shape)
        for j, layer in enumerate(self.layers):
            try:
                shape = tuple(layer.out_shape(shape))
            except ValueError as error:
                raise ValueError(f"inside {self!r}, layer {j}: {error}") from None
        if shape != tuple(in_shape):
            raise ValueError(f"{self!r} must keep the shape of its input to add it back: per-example shape "
                             f"{tuple(in_shape)} comes out as {shape}")
        return shape

    def _split(self, p):
        """The block's parameter dict (or None) -> one dict per layer of f (None where a layer has none)."""
        if p is None:
            return [None] * len(self.layers)
        return [{name: p[full] for full, name in names} or None for names in self._names]

    # -- the four rules --------------------------------------------------------------------------

    def forward(self, p, I):
        """Rule 1: ``O = I + f(I)``."""
        X, caches = I, []
        for layer, q in zip(self.layers, self._split(p)):
            X, cache = layer.forward(q or {}, X)
            caches.append(cache)
        return I + X, {"caches": caches}

    def _backward(self, p, cache, DO, out):
        """f's backward pass from DO: parameter adjoints into ``out`` (if given), returns f's input adjoint.

        The first pass through a cache keeps the adjoint at every layer of f's output: in a linearization
        that is the gradient's δ, the DOD of every later Hessian product's cross terms."""
        params, caches = self._split(p), cache["caches"]
        adjoints = cache.setdefault("adjoints", (DO, [None] * len(self.layers)))
        keep = adjoints[0] is DO
        for j in reversed(range(len(self.layers))):
            layer, q = self.layers[j], params[j] or {}
            if keep:
                adjoints[1][j] = DO
            if out is not None and q:
                views = {name: out[full] for full, name in self._names[j] if out.get(full) is not None}
                grads = layer.backward_params(q, caches[j], DO, out=views)
                out.update({full: grads[name] for full, name in self._names[j]})
            DO = layer.backward_input(q, caches[j], DO)
        return DO

    def backward_params(self, p, cache, DO, out=None):
        """Rule 2: f's parameter adjoints for DO (..., B, …), per direction for a leading k axis."""
        out = {} if out is None else out
        cache["input_adjoint"] = (DO, self._backward(p, cache, DO, out))
        return out

    def backward_input(self, p, cache, DO):
        """Rule 2: ``DI = DO + f's input adjoint``."""
        done = cache.pop("input_adjoint", None)
        inner = done[1] if done is not None and done[0] is DO else self._backward(p, cache, DO, None)
        return DO + inner

    # -- per-example pieces: f's layers' own, with adjoints carried back through f ---------------------

    @staticmethod
    def _kept(cache, DO):
        """The adjoints at the output of each layer of f that the gradient's pass kept, when DO is that pass's
        output adjoint (the array itself, or a view of it with a leading axis of 1, as per-example rules take
        it); else None."""
        kept = cache.get("adjoints")
        if kept is None or any(a is None for a in kept[1]):
            return None
        first = kept[0]
        if DO is first:
            return kept[1]
        same = (DO.shape == (1,) + first.shape and DO.strides[1:] == first.strides and DO.dtype == first.dtype
                and DO.ctypes.data == first.ctypes.data)
        return [a[None] for a in kept[1]] if same else None

    def _through(self, p, cache, D, visit, need_input=False):
        """Carry output-side adjoints D back through f, calling ``visit(j, layer, p_j, cache_j, D_j)`` at each
        layer with parameters on the adjoint at its output (those the gradient's pass kept, when D is its
        adjoint); the identity path adds nothing to f's parameters. With ``need_input``, returns f's input
        adjoint, else None."""
        params, caches, kept = self._split(p), cache["caches"], self._kept(cache, D)
        for j in reversed(range(len(self.layers))):
            layer, q = self.layers[j], params[j] or {}
            D = D if kept is None else kept[j]
            if q:
                visit(j, layer, q, caches[j], D)
            if (j > 0 and kept is None) or (j == 0 and need_input):
                D = layer.backward_input(q, caches[j], D)
        return D if need_input else None

    def _sub_views(self, j, out):
        return {name: out[full] for full, name in self._names[j]}

    def batch_grad(self, p, cache, DO, out, rows=slice(None)):
        """Per-example gradients of f's parameters, each layer's own rule on the adjoint at its output."""
        self._through(p, cache, DO, lambda j, layer, q, c, D: layer.batch_grad(q, c, D, self._sub_views(j, out), rows))

    def grad_squares(self, p, cache, D, out, scale=None, weights=None, need_input=False, sums=None):
        """``Σ_{k,b} w_kb g_kb²`` of f's parameters for adjoints ``DO_k = scale ⊙ D_k``, D (K, B or 1, …), w (K, B)
        or None, and ``Σ_{k,b} w_kb g_kb`` into ``sums`` if given; with ``need_input`` also the block's input
        adjoint ``DO + f's input adjoint``, formed on the way back through f."""
        DO = D if scale is None else memory.multiply(D, scale)
        DI = self._through(p, cache, DO, lambda j, layer, q, c, Dj: layer.grad_squares(
            q, c, Dj, self._sub_views(j, out), weights=weights,
            sums=None if sums is None else self._sub_views(j, sums)), need_input)
        if DI is None:
            return None
        if DO is D:
            return DI + DO
        DO += DI  # ours, and of the full shape (K, B, …)
        return DO

    def branch(self, p, cache, DO, out):
        """f's layers for the Hessian diagonal and K-FAC: ``(layer, p_j, cache_j, DO_j, out_j)`` per layer of f,
        DO_j the adjoint at its output for the block's output adjoint DO (those kept by the gradient's pass, or
        carried back through f again) and out_j its views into ``out`` (None without ``out``)."""
        adjoints = self._kept(cache, DO)
        if adjoints is None:
            adjoints, D = [None] * len(self.layers), DO
            for j in reversed(range(len(self.layers))):
                adjoints[j] = D
                if j > 0:
                    D = self.layers[j].backward_input(self._split(p)[j] or {}, cache["caches"][j], D)
        return [(layer, q or {}, c, a, None if out is None else self._sub_views(j, out))
                for j, (layer, q, c, a) in enumerate(zip(self.layers, self._split(p), cache["caches"], adjoints))]

    def tangent_grad_squares(self, p, cache, dI, DO, DOD, out):
        """``Σ_b g_b²`` of f's parameters for a loss on tangents (DO (B, …), DOD (k, B, …), dI (k, B or 1, …) or
        None): each layer's own rule on its input tangent and the adjoints at its output, carried back through f
        as the backward pass of :func:`hvp.tangent_loss_and_grad` does (DO with f's rule-4 cross terms)."""
        params, caches = self._split(p), cache["caches"]
        inputs = self._inner_tangents(p, cache, dI, None)[0]
        for j in reversed(range(len(self.layers))):
            layer, q = self.layers[j], params[j] or {}
            if q:
                layer.tangent_grad_squares(q, caches[j], inputs[j], DO, DOD, self._sub_views(j, out))
            if j > 0:
                cross, _ = layer.tangent_backward(q, caches[j], inputs[j], None, DOD, summed=True)
                DO = layer.backward_input(q, caches[j], DO)
                DO = DO if cross is None else DO + cross
                DOD = layer.backward_input(q, caches[j], DOD)

    def batch_l2(self, p, cache, DO):
        """``‖g_b‖²`` (B,) of f's parameters."""
        norms = []
        self._through(p, cache, DO, lambda j, layer, q, c, D: norms.append(layer.batch_l2(q, c, D)))
        return sum(norms)

    def _inner_tangents(self, p, cache, dI, dp):
        """Tangents at the input of each layer of f, and at f's output."""
        inputs, X = [], dI
        for layer, q, c, dq in zip(self.layers, self._split(p), cache["caches"], self._split(dp)):
            inputs.append(X)
            X = layer.tangent(q or {}, c, X, dq)
        return inputs, X

    def tangent(self, p, cache, dI, dp):
        """Rule 3: ``Ȯ = İ + ḟ(İ, ṗ)``; f's inner tangents are left for the ``tangent_backward`` or
        ``backward_with_cross_terms`` call with the same İ and ṗ that may follow in a second-order pass."""
        inputs, dF = self._inner_tangents(p, cache, dI, dp)
        cache["inner_tangents"] = (dI, dp, inputs)
        if dI is None or dF is None:
            return dF if dI is None else dI
        return dI + dF

    def _left_tangents(self, p, cache, dI, dp):
        """The tangents at f's layers' inputs that :meth:`tangent` left in the cache for this İ and ṗ (taken out),
        else formed again."""
        done = cache.pop("inner_tangents", None)
        if done is not None and done[0] is dI and done[1] is dp:
            return done[2]
        return self._inner_tangents(p, cache, dI, dp)[0]

    def backward_with_cross_terms(self, p, cache, dI, dp, RDO, DOD, out, need_input):
        """Rules 2 and 4 together (:mod:`hvp.layers.second_order`): RDO and f's cross terms go back through f in one
        pass, each layer of f taking its own step with the δ at its output (kept by the gradient's pass); the
        identity path adds RDO to the input adjoint."""
        params, caches, dps = self._split(p), cache["caches"], self._split(dp)
        inputs, kept = [None] * len(self.layers), None
        if DOD is not None:  # f's input tangents and δs, for the cross terms
            inputs, kept = self._left_tangents(p, cache, dI, dp), self._kept(cache, DOD)
        S = RDO
        for j in reversed(range(len(self.layers))):
            q = params[j] or {}
            S = backward_with_cross_terms(self.layers[j], q, caches[j], inputs[j], dps[j], S, DOD,
                                          self._sub_views(j, out), need_input or j > 0)
            if DOD is not None and j > 0:
                DOD = kept[j - 1] if kept is not None else self.layers[j].backward_input(q, caches[j], DOD)
        return RDO + S if need_input else None

    def tangent_backward(self, p, cache, dI, dp, DOD, need_input=True, summed=False):
        """Rule 4 cross terms of f (the identity path has none): per layer of f, its own cross terms with the
        DOD backpropagated to its output, and the primal adjoint R they start carried back through f."""
        params, caches, dps = self._split(p), cache["caches"], self._split(dp)
        inputs, kept = self._left_tangents(p, cache, dI, dp), self._kept(cache, DOD)
        grads, R = {}, None
        for j in reversed(range(len(self.layers))):
            layer, q = self.layers[j], params[j] or {}
            DI_j, g_j = layer.tangent_backward(q, caches[j], inputs[j], dps[j], DOD,
                                               need_input=need_input or j > 0, summed=summed)
            if q and (R is not None or g_j):
                from_R = layer.backward_params(q, caches[j], R) if R is not None else {}
                for full, name in self._names[j]:
                    parts = [g for g in (from_R.get(name), (g_j or {}).get(name)) if g is not None]
                    if parts:
                        grads[full] = parts[0] if len(parts) == 1 else parts[0] + parts[1]
            if j > 0 or need_input:
                R = None if R is None else layer.backward_input(q, caches[j], R)
                if DI_j is not None:
                    R = DI_j if R is None else R + DI_j
                if j > 0:
                    DOD = kept[j - 1] if kept is not None else layer.backward_input(q, caches[j], DOD)
        return R, (grads or None)

