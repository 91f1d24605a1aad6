"""The loss of a sharded data set at θ, linearized on the workers that hold the shards.

Each worker linearizes its shards once (``hvp.linearize``, no L2 term) and keeps them; every
product is then one broadcast of the directions (P·k numbers) and one task per worker, which
returns the weighted sum of its shards' products (P·k numbers) to be added up here. With
mean reduction shard s enters with weight ``w_s = B_s/ΣB``, with sum reduction with 1, so
that every result equals the single-process one on all the data taken as one batch; the L2
term is added here.
"""

import time

import numpy as np

from .. import kfac
from .._checks import check_bool, check_direction, check_l2, check_seed
from ..operators import check_dataset_problem, empirical_fisher_product
from ..penalty import add_l2, l2_value
from ..products import linearize

# -- on the workers ---------------------------------------------------------------


def _linearize_group(net, loss, theta, shard_indices, *shards):
    """The linearizations of one worker's shards (their errors name the shard)."""
    out = []
    for i, (X, y) in zip(shard_indices, shards):
        try:
            out.append(linearize(net, loss, theta, X, y))
        except (TypeError, ValueError) as e:
            raise type(e)(f"shard {i}: {e}") from None
    return out


def _add(total, value):
    """``total + value`` for arrays, numbers or tuples of them (elementwise); ``value`` when total is None."""
    if total is None:
        return value
    return tuple(t + v for t, v in zip(total, value)) if isinstance(value, tuple) else total + value


def _group_sum(group, weights, product, *args):
    """``Σ_s w_s product(pt_s, *args)`` over one worker's linearizations, and the seconds it took."""
    start = time.perf_counter()
    total = None
    for w, pt in zip(weights, group):
        value = product(pt, *args)
        total = _add(total, tuple(w * v for v in value) if isinstance(value, tuple) else w * value)
    return total, time.perf_counter() - start


def _group_factors(group, a_weights, g_weights, kind, num_samples, seeds):
    """``{layer: (Σ a_s A_s, Σ g_s G_s)}`` over one worker's linearizations."""
    total = {}
    for a, g, seed, pt in zip(a_weights, g_weights, seeds, group):
        kfac.add_factors(total, pt.kronecker_factors(kind, num_samples, seed), a, g)
    return total


def _loss_and_grad(pt):
    return pt.loss, pt.grad


def _hvp(pt, V):
    return pt.hvp(V)


def _ggnvp(pt, V):
    return pt.ggnvp(V)


def _empirical_fisher(pt, V):
    return empirical_fisher_product(pt, V)


def _sum_grad_squared(pt):
    return pt.sum_grad_squared()


def _ggn_quadratic(pt, V):
    return pt.ggn_quadratic(V)


def _loss_at(pt, theta):
    return pt.loss_at(theta)


# -- here -------------------------------------------------------------------------


class ShardedLinearization:
    """:class:`hvp.Linearization`'s products over a :class:`ShardedData`, computed on its workers.

    Build it with ``data.linearize(net, loss, theta, l2)``. It offers what
    :class:`optimizers.NewtonCG` and :class:`optimizers.KFAC` ask of a batch, with the same
    shapes and normalization as :class:`hvp.Linearization` of all the shards as one batch.

    Parameters
    ----------
    data : ShardedData
    net : Sequential
    loss : CrossEntropyLoss, MSELoss or BCEWithLogitsLoss
        With reduction "mean" or "sum".
    theta : ndarray, shape (P,), float32 or float64
        Copied; sent once to every worker.
    l2 : float
    cache : bool
        Keep the shards' linearizations on the workers until this object is dropped; False
        linearizes them afresh for every call, holding one shard's caches at a time per worker.

    Attributes
    ----------
    loss : float
    grad : ndarray, shape (P,)
    num_examples, num_outputs : int
    batch_sizes : list of int
        The shards' sizes.
    last_call : dict
        Of the last call to the workers: ``seconds`` (wall time here) and ``compute`` (seconds
        each worker's task spent computing), for the cost model of the README.
    """

    def __init__(self, data, net, loss, theta, l2=0.0, cache=True):
        theta = check_dataset_problem(net, loss, theta)
        self.data, self.net, self.loss_fn, self.theta = data, net, loss, theta.copy()
        self.l2, self.cache = check_l2(l2), check_bool("cache", cache)
        self.weight_mask = net.weight_mask()
        self.batch_sizes, self.num_examples = list(data.shard_sizes), data.num_examples
        mean = loss.reduction == "mean"
        self._weights = [B / self.num_examples if mean else 1.0 for B in self.batch_sizes]
        client = data.client
        self._theta = client.scatter(self.theta, broadcast=True, hash=False)
        self._groups = self._linearize() if cache else None
        self.last_call = {}
        loss_sum, self.grad = self._sum(_loss_and_grad)
        self.num_outputs = int(np.prod(net.output_shape(data.in_shapes[0])))
        self.loss = float(loss_sum) + l2_value(self.theta, self.weight_mask, self.l2)
        add_l2(self.grad, self.theta, self.weight_mask, self.l2)

    # -- plumbing -------------------------------------------------------------------

    def _linearize(self):
        client, shards = self.data.client, self.data.shards
        return [client.submit(_linearize_group, self.net, self.loss_fn, self._theta, indices,
                              *[shards[i] for i in indices], workers=[address], allow_other_workers=True, pure=False)
                for address, indices in self.data.groups]

    def _groups_now(self):
        return self._groups if self.cache else self._linearize()

    def _sum(self, product, *args, power=1):
        """``Σ_s w_s^power product(pt_s, *args)`` over all shards: one task per worker, arrays in args sent once;
        the workers' sums added up here in the order of the groups."""
        client = self.data.client
        start = time.perf_counter()

        def submit():
            sent = [client.scatter(a, broadcast=True, hash=False) if isinstance(a, np.ndarray) else a for a in args]
            return [client.submit(_group_sum, g, [self._weights[i] ** power for i in indices], product, *sent,
                                  workers=[address], allow_other_workers=True, pure=False)
                    for g, (address, indices) in zip(self._groups_now(), self.data.groups)]
        results = self._gather(submit)
        self.last_call = {"seconds": time.perf_counter() - start, "compute": [seconds for _, seconds in results]}
        total = None
        for value, _ in results:
            total = _add(total, value)
        return total

    def _gather(self, submit):
        """The results of the futures ``submit()`` returns. When a worker dies, the scheduler recomputes what it
        held from the shards' loaders, but it may also cancel the tasks in flight: then θ is sent again, the shards
        are linearized again and the tasks submitted once more. A lost shard that cannot be recomputed ends in a
        RuntimeError that says so."""
        from distributed.client import FutureCancelledError

        client = self.data.client
        try:
            return client.gather(submit())
        except FutureCancelledError:
            self._theta = client.scatter(self.theta, broadcast=True, hash=False)
            self._groups = self._linearize() if self.cache else None
        try:
            return client.gather(submit())
        except FutureCancelledError as e:
            raise RuntimeError(f"a worker holding shards was lost and they cannot be recomputed ({e}); shards sent "
                               f"from this process (ShardedData.from_batches) exist nowhere else: build the data "
                               f"with from_loader or from_dask_arrays to survive the loss of a worker") from None

    # -- what the optimizers and operators ask for -------------------------------------

    def hvp(self, v):
        """``H v`` over all the shards, L2 term included; v (P,) or (P, k), as :meth:`hvp.Linearization.hvp`."""
        V = check_direction("v", v, self.net.num_params, self.theta.dtype)
        return add_l2(self._sum(_hvp, V), V, self.weight_mask, self.l2)

    def ggnvp(self, v):
        """``G v`` over all the shards, L2 term included; as :meth:`hvp.Linearization.ggnvp`."""
        V = check_direction("v", v, self.net.num_params, self.theta.dtype)
        return add_l2(self._sum(_ggnvp, V), V, self.weight_mask, self.l2)

    def empirical_fisher_vp(self, v):
        """``F v``, F the empirical Fisher of :class:`hvp.EmpiricalFisherOperator`, L2 term included."""
        V = check_direction("v", v, self.net.num_params, self.theta.dtype)
        out = self._sum(_empirical_fisher, V.reshape(V.shape[0], -1))
        return add_l2(out.reshape(V.shape), V, self.weight_mask, self.l2)

    def sum_grad_squared(self):
        """``Σ_n g_n²`` (P,) over all examples, g_n example n's term of the loss of all the shards (no L2)."""
        return self._sum(_sum_grad_squared, power=2)

    def ggn_quadratic(self, V):
        """``Vᵀ G V`` (k, k) float64 over all the shards, L2 term included; V (P, k)."""
        V = check_direction("V", V, self.net.num_params, self.theta.dtype)
        out = self._sum(_ggn_quadratic, V)
        if self.l2:
            W = V[self.weight_mask].astype(np.float64)
            out += self.l2 * (W.T @ W)
        return out

    def loss_at(self, theta):
        """The loss of all the shards at another θ′ (P,), L2 term included; +inf for NaN/Inf."""
        value = float(self._sum(_loss_at, theta)) + l2_value(theta, self.weight_mask, self.l2)
        return value if np.isfinite(value) else np.inf

    def kronecker_factors(self, kind="exact", num_samples=1, seed=0):
        """K-FAC's factors ``{layer: (A, G)}`` over all the shards (see :meth:`hvp.Linearization.kfac`).

        A is the mean of the shards' A over examples, G their sum with weights ``w_s``; "exact" and
        "empirical" equal the single-process factors of all the data as one batch. For "mc", shard s
        draws its targets from its own generator, seeded from ``seed``.
        """
        num_samples = kfac.check_kind(kind, num_samples)
        seeds = check_seed(seed).integers(2**63, size=len(self.batch_sizes))
        client = self.data.client

        def submit():
            return [client.submit(_group_factors, g, [self.batch_sizes[i] / self.num_examples for i in indices],
                                  [self._weights[i] for i in indices], kind, num_samples, [seeds[i] for i in indices],
                                  workers=[address], allow_other_workers=True, pure=False)
                    for g, (address, indices) in zip(self._groups_now(), self.data.groups)]
        total = {}
        for part in self._gather(submit):
            kfac.add_factors(total, part)
        return total

    def kfac(self, kind="exact", num_samples=1, seed=0):
        """K-FAC over all the shards, a scipy ``LinearOperator`` (P, P), as :meth:`hvp.Linearization.kfac`."""
        return kfac.KroneckerFactored(self.net, self.kronecker_factors(kind, num_samples, seed), self.l2,
                                      self.theta.dtype)

