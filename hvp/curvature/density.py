"""Spectral density by stochastic Lanczos quadrature, and its plot."""


import numpy as np
from scipy.linalg import eigh_tridiagonal

from .._checks import check_bool, check_seed, describe, real_array
from ._common import DensityResult, _Counted, _operator, _positive_int, _Progress, _rademacher


def spectral_density(op, num_probes=10, lanczos_steps=80, grid=None, sigma=None, reorthogonalize=False,
                     seed=0, progress=None):
    """Eigenvalue density ``φ(t) = (1/P) Σ_i δ(t − λ_i)`` by stochastic Lanczos quadrature, smoothed.

    SLQ (Lin, Saad & Yang 2016; Ubaru, Chen & Saad 2017; Ghorbani, Krishnan & Xiao 2019):
    each of ``num_probes`` Lanczos runs starts from a Rademacher vector ``z/√P`` and after
    m steps gives the Gauss quadrature of its spectral measure: nodes θ_k (eigenvalues of
    the tridiagonal T) and weights τ_k (squared first entries of T's eigenvectors, summing
    to 1), with ``Σ_k τ_k θ_k^j = vᵀ op^j v`` for j <= 2m−1, whose mean is ``tr(op^j)/P``.
    All probes advance together: one block product of ``num_probes`` columns per step.
    Then ``φ(t) = (1/num_probes) Σ_probes Σ_k τ_k g_σ(t − θ_k)``, g_σ the Gaussian density
    with standard deviation σ: a probability density (it integrates to 1).

    The kernel's width is explicit because peers differ: σ here is a standard deviation
    in eigenvalue units; the default ``σ = (θ_max − θ_min)/lanczos_steps``, the spacing
    of m nodes across the spectrum, is pytorch-hessian-eigenthings' choice. PyHessian's
    ``density_generate`` and Ghorbani et al.'s code smooth with a kernel *variance* of
    ``1e-5·max(1, θ_max − θ_min)``, i.e. ``sigma=sqrt(1e-5·max(1, θ_max − θ_min))``, a
    standard deviation typically 10–50× narrower. Pass ``sigma`` to reproduce either.

    Defaults: 10 probes of 80 steps as pytorch-hessian-eigenthings (PyHessian: 1 × 100).
    No reorthogonalization by default, as Papyan (2019) at scale: in floating point the
    Lanczos quadrature still matches the spectral measure (Greenbaum 1989; Golub & Meurant
    2010) — converged outliers come back as ghost copies that share their weight, which
    leaves the density unchanged — and it keeps three blocks in memory. PyHessian and
    Ghorbani et al. reorthogonalize fully: ``reorthogonalize=True`` does so (classical
    Gram–Schmidt against every earlier vector), at the cost of num_probes·m·P numbers in
    op's dtype and a memory-bound pass over them at each step (4× the time of the
    products on the benchmark MLP).

    Parameters
    ----------
    op : LinearOperator or array, shape (P, P), symmetric
    num_probes : int
    lanczos_steps : int
        m, capped at P. A run stops early when its Krylov space is exhausted.
    grid : int, array_like of shape (G,), or None
        Points where φ is evaluated: an array, or how many evenly spaced points span
        ``[θ_min − 6σ, θ_max + 6σ]`` (None: enough for 8 points per σ, 1000 to 200000).
    sigma : float or None
        Standard deviation of the Gaussian kernel, > 0.
    reorthogonalize : bool
    seed : int, numpy.random.Generator or None
    progress : bool or None

    Returns
    -------
    DensityResult
        ``(grid, density)``, both (G,) float64; ``.nodes`` and ``.weights``
        (num_probes, m) float64 — a run that stopped early after j steps has weight 0
        on its last m − j entries (node repeated); ``.sigma``; ``.num_matvecs``.
    """
    op = _operator(op)
    n = op.shape[0]
    num_probes = _positive_int("num_probes", num_probes)
    steps = min(_positive_int("lanczos_steps", lanczos_steps), n)
    reorthogonalize = check_bool("reorthogonalize", reorthogonalize)
    if sigma is not None and not (np.isscalar(sigma) and np.isreal(sigma) and np.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
    rng = check_seed(seed)
    counted = _Counted(op, _Progress("spectral density", num_probes * steps, progress))
    try:
        start = _rademacher(rng, n, num_probes, op.dtype) / op.dtype.type(np.sqrt(n))
        alphas, betas, lengths = _block_lanczos(counted, start, steps, reorthogonalize)
    finally:
        counted.progress.close()
    nodes = np.empty((num_probes, steps))
    weights = np.zeros((num_probes, steps))
    for p in range(num_probes):
        j = lengths[p]
        theta, S = eigh_tridiagonal(alphas[p, :j], betas[p, :j - 1])
        nodes[p, :j], nodes[p, j:] = theta, theta[-1]
        weights[p, :j] = S[0] ** 2
    if sigma is None:
        width = nodes.max() - nodes.min()
        sigma = (width if width > 0 else max(abs(nodes.max()), 1.0)) / steps
    sigma = float(sigma)
    if grid is None or np.isscalar(grid):
        lo, hi = nodes.min() - 6 * sigma, nodes.max() + 6 * sigma
        points = int(np.clip(8 * (hi - lo) / sigma, 1000, 200_000)) if grid is None else \
            _positive_int("grid", grid, 2)
        grid = np.linspace(lo, hi, points)
    else:
        grid = real_array("grid", grid, np.float64)
        if grid.ndim != 1 or grid.size == 0 or not np.isfinite(grid).all():
            raise ValueError(f"grid must be a number of points or a finite 1-D array, got {describe(grid)}")
    density = _gaussian_mixture(grid, nodes.ravel(), weights.ravel() / num_probes, sigma)
    return DensityResult(grid, density, nodes, weights, sigma, counted.count)


def _gaussian_mixture(grid, centers, weights, sigma, chunk=1 << 22):
    """``Σ_i weights_i · N(grid; centers_i, σ²)`` evaluated in chunks of the grid."""
    keep = weights > 0
    centers, weights = centers[keep], weights[keep]
    out = np.empty(grid.shape)
    rows = max(1, chunk // max(1, centers.size))
    for start in range(0, grid.size, rows):
        z = (grid[start:start + rows, None] - centers) / sigma
        out[start:start + rows] = np.exp(-0.5 * z * z) @ weights
    return out / (sigma * np.sqrt(2 * np.pi))


def _block_lanczos(counted, V0, steps, reorthogonalize):
    """Lanczos from each column of V0 (P, q) (unit norms), all advanced by one block product per step.

    Vectors are kept as columns in op's dtype, the layout the products take; dot products accumulate
    in float64. Returns α (q, steps), β (q, steps), and each run's length (steps unless its Krylov
    space was exhausted: β below √eps of the largest |α|, β seen).
    """
    n, q = V0.shape
    dtype = counted.dtype
    alphas, betas = np.zeros((q, steps)), np.zeros((q, steps))
    lengths = np.full(q, steps)
    basis = np.empty((q, steps, n), dtype=dtype) if reorthogonalize else None
    V, V_prev = V0, np.zeros_like(V0)
    active = np.arange(q)
    scale = np.zeros(q)
    for j in range(steps):
        if reorthogonalize:
            basis[active, j] = V[:, active].T
        W = np.zeros_like(V)
        W[:, active] = counted.matmat(V if active.size == q else V[:, active])
        alpha = np.einsum("ij,ij->j", V, W, dtype=np.float64)
        W -= alpha.astype(dtype) * V
        if j > 0:
            W -= betas[:, j - 1].astype(dtype) * V_prev
        if reorthogonalize:
            for p in active:
                B = basis[p, :j + 1]
                W[:, p] -= (B @ W[:, p]) @ B
        beta = np.sqrt(np.einsum("ij,ij->j", W, W, dtype=np.float64))
        alphas[:, j], betas[:, j] = alpha, beta
        scale = np.maximum(scale, np.maximum(np.abs(alpha), beta))
        if j == steps - 1:
            break
        done = active[beta[active] <= np.sqrt(np.finfo(dtype).eps) * scale[active]]
        lengths[done] = j + 1
        active = np.setdiff1d(active, done)
        if active.size == 0:
            break
        V_prev, V = V, np.zeros_like(V)
        V[:, active] = W[:, active] / beta[active].astype(dtype)
    return alphas, betas, lengths


# -- plot -------------------------------------------------------------------------


def plot_spectral_density(result, ax=None, path=None, log=True, title=None):
    """Plot a spectral density (matplotlib, an optional extra: ``pip install hvp[examples]``).

    Parameters
    ----------
    result : DensityResult or (grid, density)
        As returned by :func:`spectral_density`; grid and density (G,).
    ax : matplotlib Axes or None
        Draw into it; None makes a new figure (without pyplot, so no display is needed).
    path : str or path-like or None
        Save the figure there (PNG, PDF, … by the suffix).
    log : bool
        Logarithmic density axis (the bulk and the outliers differ by orders of magnitude).
    title : str or None

    Returns
    -------
    matplotlib Axes
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("plot_spectral_density needs matplotlib, an optional dependency: "
                          "pip install matplotlib (or pip install 'hvp[examples]')") from None
    grid, density = (np.asarray(a, dtype=np.float64) for a in result)
    if ax is None:
        ax = Figure(figsize=(6, 4), layout="constrained").subplots()
    if log:
        floor = max(density.max() * 1e-12, np.finfo(np.float64).tiny)
        ax.semilogy(grid, np.maximum(density, floor))
        ax.set_ylim(bottom=max(floor, density.max() * 1e-8))
    else:
        ax.plot(grid, density)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    sigma = getattr(result, "sigma", None)
    if title is not None or sigma is not None:
        ax.set_title(title if title is not None else f"spectral density (Gaussian σ = {sigma:.3g})")
    if path is not None:
        ax.figure.savefig(path, dpi=120)
    return ax
