"""The network: a sequence of layers over one flat parameter vector θ."""

import numpy as np

from ._checks import check_inputs, check_instance, check_seed, check_theta, describe
from .layers import Linear


class Sequential:
    """Layers applied in order, ``O = f_L(… f_1(X))``, with parameters in one flat θ.

    θ holds each layer's parameters in order, weight (in_features, out_features)
    before bias (out_features,), each in C order. The network needs at least one
    :class:`~hvp.Linear` layer; it fixes the input width ``in_features``.

    Parameters
    ----------
    *layers
        :class:`~hvp.Linear` layers and elementwise activations, as instances:
        ``hvp.Sequential(hvp.Linear(4, 5), hvp.Tanh(), hvp.Linear(5, 3))``.
    """

    def __init__(self, *layers):
        if not layers:
            raise ValueError("Sequential needs at least one layer, got none")
        expected = "a layer such as hvp.Linear(in_features, out_features) or hvp.Tanh()"
        for i, layer in enumerate(layers):
            check_instance(f"layers[{i}]", layer, expected)
            if not all(hasattr(layer, name) for name in ("forward", "backward_input", "param_shapes")):
                hint = " (pass them one by one: hvp.Sequential(*layers))" if isinstance(layer, (list, tuple)) else ""
                raise TypeError(f"layers[{i}] must be {expected}, got {describe(layer)}{hint}")
        linears = [layer for layer in layers if isinstance(layer, Linear)]
        if not linears:
            raise ValueError("Sequential needs at least one hvp.Linear layer to fix the input width")
        self.layers = list(layers)
        self.in_features = linears[0].in_features
        width = self.in_features
        self._slices = []  # per layer: list of (name, start, stop, shape)
        start = 0
        for i, layer in enumerate(self.layers):
            if isinstance(layer, Linear) and layer.in_features != width:
                raise ValueError(f"layer {i} ({layer!r}) expects {layer.in_features} inputs, "
                                 f"but the layer before it gives {width}")
            width = layer.out_width(width)
            entries = []
            for name, shape in layer.param_shapes():
                size = int(np.prod(shape))
                entries.append((name, start, start + size, shape))
                start += size
            self._slices.append(entries)
        self.out_features = width
        self.num_params = start

    def __repr__(self):
        return "Sequential(" + ", ".join(repr(layer) for layer in self.layers) + ")"

    def init(self, seed=0, dtype=np.float64):
        """A fresh θ, as PyTorch initializes Linear layers: entries ~ U(−1/√m, 1/√m).

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
            for _, start, stop, _ in entries:
                bound = 1 / np.sqrt(layer.in_features)
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

    def weight_mask(self):
        """Boolean (num_params,): True on weight-matrix entries (where the L2 penalty acts)."""
        mask = np.zeros(self.num_params, dtype=bool)
        for entries in self._slices:
            for name, start, stop, _ in entries:
                mask[start:stop] = name == "weight"
        return mask

    def forward(self, theta, X):
        """Outputs of the network.

        Parameters
        ----------
        theta : ndarray, shape (num_params,), float32 or float64
        X : array_like, shape (B, in_features); converted to θ's dtype

        Returns
        -------
        O : ndarray, shape (B, out_features)
        """
        theta = check_theta(theta, self.num_params)
        O, _ = self.forward_cached(self.unflatten(theta), check_inputs(X, self.in_features, theta.dtype))
        return O

    def forward_cached(self, params, X):
        """Rule 1 through every layer; returns the outputs and each layer's cache."""
        caches = []
        for layer, p in zip(self.layers, params):
            X, cache = layer.forward(p, X)
            caches.append(cache)
        return X, caches
