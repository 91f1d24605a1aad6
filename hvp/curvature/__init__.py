"""Randomized estimators of a symmetric operator's spectrum: eigenvalues, trace, diagonal, density.

Every function takes ``op``: an ``hvp`` curvature operator (:class:`~hvp.HessianOperator`,
:class:`~hvp.GGNOperator`, :class:`~hvp.EmpiricalFisherOperator`), any square
``scipy.sparse.linalg.LinearOperator``, or an array; it must be symmetric. Random probes
come from ``numpy.random.default_rng(seed)``: the same seed gives the same result.
Products go through ``op.matmat`` in blocks of ``block_size`` columns (one pass over the
data per block) wherever the algorithm allows it; each result reports ``num_matvecs``,
the number of columns multiplied. ``progress=None`` prints a progress line on stderr
once a run has taken more than 2 s (``True``: always, ``False``: never).

Results are tuples that also carry named attributes::

    values, vectors = eigenvalues(H, k=5)          # EigenResult
    estimate, stderr = trace(H, 100)                # TraceResult
    grid, density = spectral_density(H)             # DensityResult (.nodes, .weights, .sigma)
"""

from ._common import DensityResult, EigenResult, TraceResult
from .density import plot_spectral_density, spectral_density
from .eigen import eigenvalues
from .traces import diagonal, trace

__all__ = ["eigenvalues", "trace", "diagonal", "spectral_density", "plot_spectral_density",
           "EigenResult", "TraceResult", "DensityResult"]
