"""Curvature, Newton-CG and K-FAC over data that live on a Dask cluster (``pip install "hvp[distributed]"``).

A :class:`ShardedData` is a data set split into ``(X, y)`` shards held in the workers' memory
(sent from here, computed from Dask arrays, or loaded by each worker from its own files). The
operators here are those of :mod:`hvp` with ``data`` a :class:`ShardedData`, and
``optimizers.NewtonCG`` / ``optimizers.KFAC`` take one in ``step(data)`` and ``minimize(data)``:
the loss, gradient, trial losses and curvature products are computed on the workers, while the
optimizer's state stays here and saves and resumes as always. The same code runs on one machine
(``distributed.LocalCluster``) and on a cluster (``distributed.Client("tcp://scheduler:8786")``).
"""

try:
    import distributed  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the installation
    raise ImportError('hvp.distributed needs Dask: pip install "hvp[distributed]"') from e

from .data import ShardedData
from .linearization import ShardedLinearization
from .operators import EmpiricalFisherOperator, GGNOperator, HessianOperator, KFACOperator

__all__ = ["ShardedData", "ShardedLinearization", "HessianOperator", "GGNOperator", "EmpiricalFisherOperator",
           "KFACOperator"]
