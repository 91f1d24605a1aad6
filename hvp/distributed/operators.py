"""Data-set curvature over a :class:`ShardedData`, as scipy ``LinearOperator``: the operators of
:mod:`hvp.operators` and :class:`hvp.KFACOperator` with the same arguments and results, computed on
the workers that hold the shards.

One product (``matvec``) or one block of k directions (``matmat``) is one broadcast of the
directions and one task per worker, whose weighted sums of its shards' products come back to be
added up; every estimator of :mod:`hvp.curvature` and scipy's solvers take these operators as they
take the single-process ones.
"""

from .. import kfac
from .._checks import describe
from ..operators import SymmetricOperator
from .data import ShardedData


def _check_data(data):
    if not isinstance(data, ShardedData):
        raise TypeError(f"data must be an hvp.distributed.ShardedData (for batches on this machine use "
                        f"the operators of hvp), got {describe(data)}")


class _ShardedCurvature(SymmetricOperator):
    """Shared: the sharded linearization, kept on the workers while the operator lives."""

    def __init__(self, net, loss, theta, data, l2=0.0, cache=True):
        _check_data(data)
        #: The :class:`ShardedLinearization` the products come from.
        self.linearization = data.linearize(net, loss, theta, l2, cache)
        pt = self.linearization
        super().__init__(dtype=pt.theta.dtype, shape=(net.num_params, net.num_params))
        self.net, self.loss_fn, self.theta, self.l2, self.cache = net, loss, pt.theta, pt.l2, pt.cache
        self.loss, self.grad = pt.loss, pt.grad
        self.num_examples, self.batch_sizes = pt.num_examples, pt.batch_sizes

    def __repr__(self):
        return (f"<distributed.{type(self).__name__} {self.shape[0]}x{self.shape[1]} {self.dtype}: "
                f"{self.num_examples} examples in {len(self.batch_sizes)} shards, l2={self.l2}, cache={self.cache}>")


class HessianOperator(_ShardedCurvature):
    """:class:`hvp.HessianOperator` of a :class:`ShardedData`, computed on its workers.

    Parameters
    ----------
    net : Sequential
    loss : CrossEntropyLoss, MSELoss or BCEWithLogitsLoss
    theta : ndarray, shape (P,), float32 or float64
    data : ShardedData
    l2 : float
    cache : bool
        Keep the shards' linearizations on the workers while the operator lives; False
        linearizes them again at every product.

    Attributes
    ----------
    loss : float
    grad : ndarray, shape (P,)
    num_examples : int
    batch_sizes : list of int
        The shards' sizes.
    linearization : ShardedLinearization
        ``linearization.last_call`` times the last product (wall and per-worker compute seconds).

    Examples
    --------
    >>> client = distributed.Client(distributed.LocalCluster(n_workers=2, threads_per_worker=1))
    >>> data = hvp.distributed.ShardedData.from_batches(client, [(X1, y1), (X2, y2)])
    >>> H = hvp.distributed.HessianOperator(net, hvp.CrossEntropyLoss(), theta, data)
    >>> top = hvp.curvature.eigenvalues(H, k=5)
    """

    def _matmat(self, V):
        return self.linearization.hvp(V)


class GGNOperator(_ShardedCurvature):
    """:class:`hvp.GGNOperator` of a :class:`ShardedData`; arguments as :class:`HessianOperator`."""

    def _matmat(self, V):
        return self.linearization.ggnvp(V)


class EmpiricalFisherOperator(_ShardedCurvature):
    """:class:`hvp.EmpiricalFisherOperator` of a :class:`ShardedData`; arguments as :class:`HessianOperator`."""

    def _matmat(self, V):
        return self.linearization.empirical_fisher_vp(V)


class KFACOperator(kfac.KroneckerFactored):
    """:class:`hvp.KFACOperator` of a :class:`ShardedData`: factors summed over the workers' shards.

    Parameters as :class:`hvp.KFACOperator`, with ``data`` a :class:`ShardedData`. "exact" and
    "empirical" equal the single-process operator on all the shards as one batch; with "mc" every
    shard draws from its own generator seeded from ``seed``, so the draws differ from the
    single-process operator's (not their expectation).

    Attributes
    ----------
    factors : list of (A, G)
    loss : float
    num_examples : int
    """

    def __init__(self, net, loss, theta, data, kind="exact", l2=0.0, num_samples=1, seed=0):
        _check_data(data)
        pt = data.linearize(net, loss, theta, l2, cache=False)
        super().__init__(net, pt.kronecker_factors(kind, num_samples, seed), pt.l2, pt.theta.dtype)
        self.loss, self.num_examples = pt.loss, pt.num_examples
