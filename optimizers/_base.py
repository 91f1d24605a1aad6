"""What every optimizer here shares: the loop, the history, progress output and the .npz state.

A subclass implements ``_step(X, y, gtol)`` (one step; returns a record dict, or None when
the gradient norm at θ is already <= gtol and θ stays), ``_config()`` (its constructor's
keyword arguments, JSON-able) and ``_state()`` / ``_set_state(arrays)`` (its other state).
"""

import json
import sys

import numpy as np
from scipy.optimize import OptimizeResult

import hvp
from hvp._checks import check_int, check_l2, check_loss, check_net, check_theta, describe

from . import _checkpoint

PROGRESS = (None, "bar", "lines")


def check_net_and_loss(net, loss):
    check_net(net)
    check_loss(loss)


def check_positive(name, value, allow_zero=False):
    if isinstance(value, (bool, np.bool_)) or not np.isscalar(value) or not np.isreal(value):
        raise TypeError(f"{name} must be a real number, got {describe(value)}")
    if not np.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be a finite number {'>=' if allow_zero else '>'} 0, got {value!r}")
    return float(value)


def batches(data):
    """``data`` as a list of (X, y) pairs: one pair (X, y) (X an array), or a list of pairs taken in turn;
    sharded data (with a ``linearize`` method) as ``[(data, None)]``."""
    if hasattr(data, "linearize"):
        return [(data, None)]
    if isinstance(data, (tuple, list)) and len(data) == 2 and not isinstance(data[0], (tuple, list)):
        return [tuple(data)]
    if isinstance(data, (tuple, list)) and data and all(isinstance(b, (tuple, list)) and len(b) == 2 for b in data):
        return [tuple(b) for b in data]
    raise TypeError(f"data must be a pair (X, y) with X of shape (B, in_features), or a list of such pairs, "
                    f"got {describe(data)}")


class Optimizer:
    """Base of :class:`~optimizers.NewtonCG`, :class:`~optimizers.SGD` and :class:`~optimizers.Adam`.

    Attributes
    ----------
    theta : ndarray, shape (P,)
        The current parameters (the optimizer's own copy of ``theta0``).
    history : list of dict
        One record per step, in order.
    """

    #: (record key, format) pairs of the line printed per step with ``progress="lines"``.
    LINE_FIELDS = (("loss", "loss {:.6e}"), ("grad_norm", "|g| {:.2e}"), ("seconds", "{:.3f} s"))

    def __init__(self, net, loss, theta0, l2=0.0, progress=None):
        check_net_and_loss(net, loss)
        self.net, self.loss = net, loss
        self.theta = check_theta(theta0, net.num_params).copy()
        self.l2 = check_l2(l2)
        if progress not in PROGRESS:
            raise ValueError(f"progress must be one of {PROGRESS}, got {progress!r}")
        self.progress = progress
        self.history = []

    # -- one step ------------------------------------------------------------

    def step(self, X, y=None):
        """One step on the batch (X, y); θ changes only if the step is accepted.

        Parameters
        ----------
        X : array_like, shape (B, *in_shape), or hvp.distributed.ShardedData
            A batch, or (Newton-CG and K-FAC) a data set whose shards live on Dask workers, which
            then compute the loss, gradient and curvature products.
        y : array_like, labels (B,) or targets (B, C); None with sharded data

        Returns
        -------
        dict
            The step's record, also appended to :attr:`history`.
        """
        return self._record(self._step(X, y, None))

    def _record(self, record):
        record["step"] = len(self.history)
        self.history.append(record)
        if self.progress == "lines":
            print(self.format_record(record), flush=True)
        return record

    def format_record(self, record):
        """One line describing a step record."""
        parts = [f"step {record['step']:5d}"]
        parts += [fmt.format(record[key]) for key, fmt in self.LINE_FIELDS if key in record]
        return "  ".join(parts)

    def _linearize(self, X, y):
        """The linearization at θ (L2 term included) of a batch (X, y), or of sharded data X (y None)."""
        if y is None and hasattr(X, "linearize"):  # hvp.distributed.ShardedData: computed on its workers
            return X.linearize(self.net, self.loss, self.theta, self.l2)
        if y is None:
            raise TypeError(f"step takes a batch X, y, or sharded data alone (hvp.distributed.ShardedData); "
                            f"got X = {describe(X)} and no y")
        return hvp.linearize(self.net, self.loss, self.theta, X, y, self.l2)

    def _loss_and_grad(self, X, y):
        """Loss and gradient at θ, as :meth:`_linearize` but keeping nothing for products on a local batch."""
        if y is None:
            pt = self._linearize(X, y)
            return pt.loss, pt.grad
        return hvp.loss_and_grad(self.net, self.loss, self.theta, X, y, l2=self.l2)

    # -- the loop ------------------------------------------------------------

    def minimize(self, data, max_iters=100, gtol=1e-5, callback=None, max_rejections=20):
        """Take steps until the gradient norm is at most ``gtol`` or ``max_iters`` steps are done.

        Parameters
        ----------
        data : (X, y), a list of (X, y) batches used in turn, or hvp.distributed.ShardedData
            X of shape (B, *in_shape); y labels (B,) or targets (B, C). Sharded data (Newton-CG and
            K-FAC): every step uses all of it, computed on its workers.
        max_iters : int
            Most steps to take (accepted or not).
        gtol : float
            Stop, θ unchanged, once ``‖∇L(θ)‖₂ <= gtol`` on the current batch.
        callback : callable or None
            ``callback(intermediate_result)`` after each step, with an ``OptimizeResult``
            holding ``x`` (a copy of θ) and the step's record; returning True stops.
        max_rejections : int
            Stop after this many rejected steps in a row.

        Returns
        -------
        scipy.optimize.OptimizeResult
            ``x``, ``fun`` and ``jac`` (loss and gradient at x on the last batch), ``nit``,
            ``nfev``, ``njev``, ``nhev`` (curvature products), ``status``, ``success``,
            ``message``, ``history``.
        """
        data = batches(data)
        max_iters = check_int("max_iters", max_iters, 0)
        gtol = check_positive("gtol", gtol, allow_zero=True)
        max_rejections = check_int("max_rejections", max_rejections, 1)
        if callback is not None and not callable(callback):
            raise TypeError(f"callback must be callable or None, got {describe(callback)}")
        start, rejected = len(self.history), 0
        status, message = 1, "maximum number of iterations reached"
        X, y = data[0]
        for it in range(max_iters):
            X, y = data[(start + it) % len(data)]
            record = self._step(X, y, gtol)
            if record is None:
                status, message = 0, f"gradient norm <= gtol = {gtol:g}"
                break
            self._record(record)
            if self.progress == "bar":
                self._draw_bar(it + 1, max_iters, record)
            rejected = 0 if record["accepted"] else rejected + 1
            if callback is not None and callback(OptimizeResult(x=self.theta.copy(), **record)) is True:
                status, message = 3, "stopped by the callback"
                break
            if rejected >= max_rejections:
                status, message = 2, f"{rejected} rejected steps in a row"
                break
        if self.progress == "bar":
            print(file=sys.stderr, flush=True)
        fun, jac = self._loss_and_grad(X, y)
        steps = self.history[start:]
        return OptimizeResult(
            x=self.theta.copy(), fun=fun, jac=jac, nit=len(steps), status=status, success=status == 0,
            message=message, nfev=sum(r["fevals"] for r in steps) + 1, njev=len(steps) + 1,
            nhev=sum(r.get("products", 0) for r in steps), history=list(steps))

    def _draw_bar(self, done, total, record, width=30):
        filled = width * done // max(total, 1)
        text = f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total}  loss {record['loss']:.4e}"
        print(text, end="", file=sys.stderr, flush=True)

    # -- state ---------------------------------------------------------------

    def _config(self):
        return {"l2": self.l2, "progress": self.progress}

    def _state(self):
        return {}

    def _set_state(self, arrays):
        pass

    def save(self, path):
        """Write θ, the optimizer's state, its settings and its history to an ``.npz`` file (no pickle).

        The file is written to a temporary file in the same folder and renamed over ``path``, so
        that an interrupted save leaves an earlier checkpoint at ``path`` whole.

        Parameters
        ----------
        path : str or path-like
            Written exactly as given (no suffix is added).
        """
        arrays = {"theta": self.theta, "config": np.array(json.dumps(self._config())),
                  "kind": np.array(type(self).__name__), "net": np.array(repr(self.net)),
                  "loss": np.array(repr(self.loss))}
        for key, value in self._state().items():
            arrays["state_" + key] = np.asarray(value)
        keys = list(self.history[0]) if self.history else []
        for key in keys:
            arrays["history_" + key] = np.array([record[key] for record in self.history])
        arrays["history_keys"] = np.array(keys, dtype=str)
        _checkpoint.write(path, arrays)

    @classmethod
    def load(cls, path, net, loss):
        """An optimizer in the state :meth:`save` wrote, on ``net`` and ``loss`` (which must match).

        Parameters
        ----------
        path : str or path-like
        net : Sequential
            The same architecture as when saved.
        loss : CrossEntropyLoss or MSELoss
            The same loss as when saved.

        Raises
        ------
        ValueError
            Naming the file and the problem, for anything but a whole checkpoint of this optimizer
            on this network and loss: an empty, truncated or foreign file, missing or misshapen
            state, settings the constructor refuses, a ragged history. Nothing is unpickled.
        """
        arrays = _checkpoint.read(path)
        if str(arrays["kind"]) != cls.__name__:
            raise ValueError(f"{path} holds a {arrays['kind']} optimizer, not a {cls.__name__}")
        for name, obj in (("net", net), ("loss", loss)):
            if str(arrays[name]) != repr(obj):
                raise ValueError(f"{path} was saved with {name} {arrays[name]}, got {obj!r}")
        try:
            opt = cls(net, loss, arrays["theta"], **arrays["config"])
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path} holds a θ or settings that {cls.__name__} refuses: {e}") from None
        try:
            opt._set_state({key[len("state_"):]: value for key, value in arrays.items() if key.startswith("state_")})
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        opt.history = arrays["history"]
        return opt
