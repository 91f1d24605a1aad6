"""The network: a sequence of layers over one flat parameter vector θ."""

import numpy as np

from .._checks import check_inputs, check_instance, check_seed, check_theta, describe


def check_layers(owner, layers):
    """Layers given to Sequential or Residual: at least one, each an instance with the four rules."""
    if not layers:
        raise ValueError(f"{owner} needs at least one layer, got none")
    expected = "a layer such as hvp.Linear(in_features, out_features) or hvp.Tanh()"
    for i, layer in enumerate(layers):
        check_instance(f"layers[{i}]", layer, expected)
        if not all(hasattr(layer, name) for name in ("forward", "backward_input", "param_shapes", "out_shape")):
            hint = f" (pass them one by one: hvp.{owner}(*layers))" if isinstance(layer, (list, tuple)) else ""
            raise TypeError(f"layers[{i}] must be {expected}, got {describe(layer)}{hint}")


class Sequential:
    """Layers applied in order, ``O = f_L(… f_1(X))``, with parameters in one flat θ.

    θ holds each layer's parameters in order (``param_shapes()``: a Linear layer's weight
    (in_features, out_features) before its bias (out_features,); a convolution's weight and bias
    in PyTorch's shapes), each in C order. No input shape is needed: the shapes are checked
    through the network when inputs arrive, with an error naming the layer that does not fit.

    Parameters
    ----------
    *layers
        Layers as instances: ``hvp.Sequential(hvp.Linear(4, 5), hvp.Tanh(), hvp.Linear(5, 3))`` or
        ``hvp.Sequential(hvp.Conv2d(1, 4, 3), hvp.ReLU(), hvp.MaxPool2d(2), hvp.Flatten(), hvp.Linear(36, 10))``.
        The outputs must be (B, C) for the losses.

    Attributes
    ----------
    num_params : int
    in_shape : tuple or None
        What the first layer that cares needs per example, None for a free size (a convolution's
        height and width); None if any shape goes.
    in_features, out_features : int or None
        The widths of inputs (B, in_features) and outputs (B, out_features) where the layers fix
        them (networks of Linear layers and activations), else None.
    """

    def __init__(self, *layers):
        check_layers("Sequential", layers)
        if not any(layer.param_shapes() for layer in layers):
            raise ValueError("Sequential needs at least one layer with parameters, such as hvp.Linear or hvp.Conv2d")
        self.layers = list(layers)
        self.in_shape = next((layer.in_shape for layer in layers if getattr(layer, "in_shape", None) is not None),
                             None)
        self._slices = []  # per layer: list of (name, start, stop, shape)
        start = 0
        for layer in self.layers:
            entries = []
            for name, shape in layer.param_shapes():
                size = int(np.prod(shape))
                entries.append((name, start, start + size, shape))
                start += size
            self._slices.append(entries)
        self.num_params = start
        self._out_shapes = {}
        fixed = self.in_shape is not None and None not in self.in_shape
        self.in_features = self.in_shape[0] if fixed and len(self.in_shape) == 1 else None
        self.out_features = self.output_shape(self.in_shape, "the network's inputs")[0] if fixed else None

    def output_shape(self, in_shape, source="X"):
        """The per-example output shape for per-example inputs of shape ``in_shape``.

        A ValueError names the first layer the shapes do not fit, and what it needs.
        """
        in_shape = tuple(int(n) for n in in_shape)
        if in_shape not in self._out_shapes:
            shape = in_shape
            for i, layer in enumerate(self.layers):
                try:
                    shape = tuple(layer.out_shape(shape))
                except ValueError as error:
                    raise ValueError(f"layer {i} does not fit {source} of per-example shape {in_shape}: "
                                     f"{error}") from None
            if len(shape) != 1:
                raise ValueError(f"the network's outputs must have shape (batch, C) for the losses, but {source} "
                                 f"of per-example shape {in_shape} gives {shape}: end with hvp.Flatten() or a "
                                 "Linear layer")
            self._out_shapes[in_shape] = shape
        return self._out_shapes[in_shape]

    def __repr__(self):
        return "Sequential(" + ", ".join(repr(layer) for layer in self.layers) + ")"

    def init(self, seed=0, dtype=np.float64):
        """A fresh θ, as PyTorch initializes Linear and convolution layers: entries ~ U(−1/√m, 1/√m),
        m = ``fan_in``, the inputs each output sums over (in_features; in_channels/groups·kH·kW).

        Parameters
        ----------
        seed : int >= 0, numpy.random.Generator or None
            Seed of ``numpy.random.default_rng`` (or the generator to draw from); the same
            int seed gives the same θ, None a fresh random one.
        dtype : float32 or float64

        Returns
        -------
        theta : ndarray, shape (num_params,)
        """
        try:
            dtype = np.dtype(dtype)
        except TypeError:
            raise TypeError(f"dtype must be float32 or float64, got {describe(dtype)}") from None
        if dtype not in (np.float32, np.float64):
            raise TypeError(f"dtype must be float32 or float64, got {dtype}")
        rng = check_seed(seed)
        theta = np.empty(self.num_params, dtype=dtype)
        for layer, entries in zip(self.layers, self._slices):
            for (_, start, stop, _), bound in zip(entries, layer.init_bounds() if entries else []):
                theta[start:stop] = rng.uniform(-bound, bound, size=stop - start)
        return theta

    def unflatten(self, theta):
        """Named views into θ, one dict per layer; writing into a view writes θ.

        Parameters
        ----------
        theta : ndarray, shape (num_params,) or (k, num_params)
            With a leading k axis (k vectors in parameter space, as rows) every
            view gets it too.

        Returns
        -------
        list of dict
            ``{"weight": ([k,] in, out), "bias": ([k,] out)}`` for Linear layers,
            ``{}`` for parameter-free layers.
        """
        if not isinstance(theta, np.ndarray):
            raise TypeError(f"theta must be a numpy array of shape ({self.num_params},) or (k, {self.num_params}), "
                            f"got {describe(theta)}")
        if theta.ndim not in (1, 2) or theta.shape[-1] != self.num_params:
            raise ValueError(f"theta must have shape ({self.num_params},) or (k, {self.num_params}), "
                             f"got {describe(theta)}")
        leading = theta.shape[:-1]
        return [{name: theta[..., start:stop].reshape(leading + shape) for name, start, stop, shape in entries}
                for entries in self._slices]

    def unflatten_columns(self, V):
        """Named views into the columns of V (P, k), k directions in parameter space: ``(*shape, k)`` per
        parameter, each a C-contiguous block of V's rows (the layout of a block of directions in the layer
        contract, :mod:`hvp.layers`).

        Parameters
        ----------
        V : ndarray, shape (num_params, k), C-contiguous

        Returns
        -------
        list of dict
        """
        if not isinstance(V, np.ndarray):
            raise TypeError(f"V must be a numpy array of shape ({self.num_params}, k), got {describe(V)}")
        if V.ndim != 2 or V.shape[0] != self.num_params or not V.flags.c_contiguous:
            raise ValueError(f"V must be a C-contiguous array of shape ({self.num_params}, k), got {describe(V)}"
                             f"{'' if V.flags.c_contiguous else ', not C-contiguous'}")
        k = V.shape[1]
        return [{name: V[start:stop].reshape(shape + (k,)) for name, start, stop, shape in entries}
                for entries in self._slices]

    def weight_mask(self):
        """Boolean (num_params,): True on weight-matrix entries (where the L2 penalty acts)."""
        mask = np.zeros(self.num_params, dtype=bool)
        for entries in self._slices:
            for name, start, stop, _ in entries:
                mask[start:stop] = name.rsplit(".", 1)[-1] == "weight"
        return mask

    def forward(self, theta, X):
        """Outputs of the network.

        Parameters
        ----------
        theta : ndarray, shape (num_params,), float32 or float64
        X : array_like, shape (B, *in_shape); converted to θ's dtype

        Returns
        -------
        O : ndarray, shape (B, C)
        """
        theta = check_theta(theta, self.num_params)
        O, _ = self.forward_cached(self.unflatten(theta), check_inputs(X, self, theta.dtype))
        return O

    def forward_cached(self, params, X):
        """Rule 1 through every layer; returns the outputs and each layer's cache."""
        caches = []
        for layer, p in zip(self.layers, params):
            X, cache = layer.forward(p, X)
            caches.append(cache)
        return X, caches
