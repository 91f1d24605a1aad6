"""First-order baselines with the interface of :class:`~optimizers.NewtonCG`: SGD with momentum, and Adam.

The updates are PyTorch's (``torch.optim.SGD``, ``torch.optim.Adam``), with the gradient of
the loss including its ``l2/2·Σ‖W‖²`` term. A step whose loss or gradient at θ is NaN/Inf is
rejected: θ and the moment buffers stay as they were.
"""

import time

import numpy as np

from hvp._checks import check_bool

from . import _checkpoint
from ._base import Optimizer, check_positive


class _FirstOrder(Optimizer):
    LINE_FIELDS = (("loss", "loss {:.6e}"), ("grad_norm", "|g| {:.2e}"), ("lr", "lr {:.1e}"),
                   ("seconds", "{:.3f} s"))

    def __init__(self, net, loss, theta0, lr, l2, progress):
        super().__init__(net, loss, theta0, l2=l2, progress=progress)
        self.lr = check_positive("lr", lr)
        self.t = 0  # accepted steps so far

    def _config(self):
        return {**super()._config(), "lr": self.lr}

    def _update(self, g):
        """The step to add to θ for gradient g (P,); updates the moment buffers."""
        raise NotImplementedError

    def _step(self, X, y, gtol):
        start = time.perf_counter()
        value, g = self._loss_and_grad(X, y)
        grad_norm = float(np.linalg.norm(g))
        if gtol is not None and grad_norm <= gtol:
            return None
        accepted = bool(np.isfinite(value) and np.isfinite(g).all())
        if accepted:
            self.t += 1
            self.theta = self.theta + self._update(g)
        return {"loss": float(value), "grad_norm": grad_norm, "lr": self.lr, "fevals": 1, "products": 0,
                "accepted": accepted, "seconds": time.perf_counter() - start}


class SGD(_FirstOrder):
    """Stochastic gradient descent with momentum, as ``torch.optim.SGD``.

    ``b ← μ·b + g`` (``b = g`` at the first step), ``θ ← θ − lr·b`` (Nesterov: ``θ ← θ − lr·(g + μ·b)``).

    Parameters
    ----------
    net : hvp.Sequential
    loss : hvp.CrossEntropyLoss or hvp.MSELoss
    theta0 : ndarray, shape (P,), float32 or float64
        Start; copied, never modified.
    lr : float
        Learning rate > 0.
    momentum : float
        μ in [0, 1).
    nesterov : bool
    l2 : float
        Weight of the penalty ``l2/2·Σ‖W‖²`` in the objective.
    progress : {None, "bar", "lines"}

    Attributes
    ----------
    theta : ndarray, shape (P,)
    history : list of dict
        Per step: ``loss`` and ``grad_norm`` at θ before the step, ``lr``, ``fevals``, ``products`` (0),
        ``accepted``, ``seconds``, ``step``.
    """

    def __init__(self, net, loss, theta0, *, lr=0.01, momentum=0.9, nesterov=False, l2=0.0, progress=None):
        super().__init__(net, loss, theta0, lr, l2, progress)
        self.momentum = check_positive("momentum", momentum, allow_zero=True)
        if self.momentum >= 1:
            raise ValueError(f"momentum must lie in [0, 1), got {momentum!r}")
        self.nesterov = check_bool("nesterov", nesterov)
        self.buffer = np.zeros_like(self.theta)

    def _config(self):
        return {**super()._config(), "momentum": self.momentum, "nesterov": self.nesterov}

    def _state(self):
        return {"t": self.t, "buffer": self.buffer}

    def _set_state(self, arrays):
        self.t = _checkpoint.scalar(arrays, "t", integer=True)
        self.buffer = _checkpoint.vector(arrays, "buffer", self.theta.size, self.theta.dtype)

    def _update(self, g):
        mu = g.dtype.type(self.momentum)
        self.buffer = g.copy() if self.t == 1 else mu * self.buffer + g
        direction = g + mu * self.buffer if self.nesterov else self.buffer
        return -g.dtype.type(self.lr) * direction


class Adam(_FirstOrder):
    """Adam (Kingma & Ba 2015), as ``torch.optim.Adam``.

    ``m ← β₁m + (1−β₁)g``, ``v ← β₂v + (1−β₂)g²``, ``θ ← θ − lr·m̂/(√v̂ + eps)`` with
    ``m̂ = m/(1−β₁ᵗ)``, ``v̂ = v/(1−β₂ᵗ)``.

    Parameters
    ----------
    net : hvp.Sequential
    loss : hvp.CrossEntropyLoss or hvp.MSELoss
    theta0 : ndarray, shape (P,), float32 or float64
        Start; copied, never modified.
    lr : float
        Learning rate > 0.
    betas : (float, float)
        β₁, β₂ in [0, 1).
    eps : float
        > 0.
    l2 : float
        Weight of the penalty ``l2/2·Σ‖W‖²`` in the objective (added to the gradient, as torch's
        ``weight_decay`` on the weights).
    progress : {None, "bar", "lines"}

    Attributes
    ----------
    theta : ndarray, shape (P,)
    history : list of dict
        As :attr:`SGD.history`.
    """

    def __init__(self, net, loss, theta0, *, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, l2=0.0, progress=None):
        super().__init__(net, loss, theta0, lr, l2, progress)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        self.betas = tuple(check_positive(f"betas[{i}]", b, allow_zero=True) for i, b in enumerate(betas))
        if max(self.betas) >= 1:
            raise ValueError(f"betas must lie in [0, 1), got {betas!r}")
        self.eps = check_positive("eps", eps)
        self.m = np.zeros_like(self.theta)
        self.v = np.zeros_like(self.theta)

    def _config(self):
        return {**super()._config(), "betas": list(self.betas), "eps": self.eps}

    def _state(self):
        return {"t": self.t, "m": self.m, "v": self.v}

    def _set_state(self, arrays):
        self.t = _checkpoint.scalar(arrays, "t", integer=True)
        self.m = _checkpoint.vector(arrays, "m", self.theta.size, self.theta.dtype)
        self.v = _checkpoint.vector(arrays, "v", self.theta.size, self.theta.dtype, nonnegative=True)

    def _update(self, g):
        b1, b2 = self.betas
        dt = g.dtype.type
        self.m = dt(b1) * self.m + dt(1 - b1) * g
        self.v = dt(b2) * self.v + dt(1 - b2) * g * g
        m_hat = self.m / dt(1 - b1**self.t)
        v_hat = self.v / dt(1 - b2**self.t)
        return -dt(self.lr) * m_hat / (np.sqrt(v_hat) + dt(self.eps))
