"""K-FAC: natural-gradient steps preconditioned by Kronecker-factored curvature (Martens & Grosse 2015).

Each step, on the batch (X, y) (Martens & Grosse 2015, "Optimizing neural networks with
Kronecker-factored approximate curvature", ICML; sections cited below):

1. one forward and backward pass (``hvp.linearize``): loss, gradient g, and the per-layer factors
   ``A``, ``G`` of :mod:`hvp.kfac`, folded into exponential averages with decay
   ``min(1 − 1/k, factor_decay)`` at step k (§5);
2. proposals ``Δ_γ = −(K + γI)⁻¹ g`` from the averaged factors' eigendecompositions, refreshed every
   ``inverse_every`` steps (§8), the damping γ (+ l2, §6.6) split between the factors by π (§6.3),
   for γ and, every ``gamma_every`` steps, γ/2 and 2γ (§6.6's T₂);
3. for each, the update ``δ = αΔ_γ + μδ₀`` (δ₀ the previous update) with α and μ minimizing the
   quadratic model ``M(δ) = ½ δᵀ(G + λI)δ + gᵀδ`` with the exact Gauss-Newton matrix G of the batch:
   2×2 systems from one tangent pass of all the directions (§7). The update that lowers M most is
   taken, and its γ kept for the next step;
4. ``ρ = (f(θ + δ) − f(θ)) / M(δ)`` from one more forward pass; the model's damping λ follows ρ, by
   Nielsen's smooth rule every step (default) or by Martens & Grosse's ``λ·ω^±1`` every
   ``damping_every`` steps (§6.5).

Nothing is lost: a step whose new loss is NaN/Inf or higher than the old one (ρ <= 0) is rejected,
θ, the momentum and γ stay, and λ rises as in :func:`optimizers._damping.raise_damping`: a larger λ
shortens the next step along its direction (α), while raising γ too would turn the direction
towards the gradient for many steps after one bad mini-batch.
"""

import math
import time

import numpy as np

from hvp import kfac as kronecker
from hvp._checks import check_bool, check_int

from . import _checkpoint
from ._base import Optimizer, check_positive
from ._damping import judge, raise_damping, rejections_in_a_row, update_damping

OMEGA_BASE = 19 / 20
MAX_INVERSE_EVERY = 20
EIGH_COST = 4.0
DAMPING_RULES = ("nielsen", "martens-grosse")
GAMMA_STEP = 2.0  # the proposal's damping γ is chosen among γ/2, γ and 2γ every gamma_every steps
GAMMA_EVERY = 5


class KFAC(Optimizer):
    """K-FAC (Martens & Grosse 2015) on an hvp network, every part of the method a keyword.

    Parameters
    ----------
    net : hvp.Sequential
    loss : hvp.CrossEntropyLoss, hvp.MSELoss or hvp.BCEWithLogitsLoss
    theta0 : ndarray, shape (P,), float32 or float64
        Start; copied, never modified.
    kind : {"mc", "exact", "empirical"}
        The output-side factor G: one backward column per sampled target (Martens & Grosse's
        Fisher, ``num_samples`` columns), the loss-Hessian factor columns (C − 1 or C backward
        columns; Botev et al. 2017's KFLR), or the gradient's adjoints (the empirical Fisher).
        The averages over steps smooth out the sampling noise of "mc", which costs the least.
    num_samples : int
        Sampled targets per example for "mc".
    damping : float or None
        Initial λ, and γ; None: the mean eigenvalue of the first step's K-FAC matrix, ``tr(K)/P``.
    adapt_damping : bool
        Adapt λ to the reduction ratio ρ, and γ by the model's choice among γ/2, γ, 2γ.
    gamma_every : int
        Steps between choices of γ (T₂ of §6.6). The steps between use one proposal, which halves
        their tangent pass and their solves with the factors.
    damping_rule : {"nielsen", "martens-grosse"}
        ``"nielsen"``: every step, ``λ·max(1/3, 1 − (2ρ − 1)³)`` (Nielsen 1999; see
        :func:`optimizers._damping.update_damping`); ``"martens-grosse"``: every ``damping_every``
        steps, ``λ·ω`` if ρ > 3/4 and ``λ/ω`` if ρ < 1/4, ``ω = (19/20)^damping_every`` (§6.5).
    damping_every : int
        T₁ of §6.5, for ``"martens-grosse"``.
    factor_decay : float in [0, 1)
        ε of the factors' exponential averages, ``min(1 − 1/k, ε)`` at step k (§5).
    inverse_every : int or None
        Steps between refreshes of the eigendecompositions (T₃ of §8). None: every step while they
        cost at most a tenth of a step's products (``Σ d³ <= B·P``, d the factors' sizes), else less
        often, at least every 20 steps.
    pi : bool
        Split the damping between the factors by π (§6.3); False: the exact inverse of
        ``A ⊗ G + γI`` in the factors' eigenbasis.
    momentum : bool
        Rescale the proposal and add the previous update, α and μ from the exact quadratic model
        (§7); False: α alone.
    seed : int
        Seed of the targets sampled for "mc" (step k uses ``default_rng((seed, k))``).
    l2 : float
        Weight of the penalty ``l2/2·Σ‖W‖²`` in the objective.
    progress : {None, "bar", "lines"}

    Attributes
    ----------
    theta : ndarray, shape (P,)
    damping : float or None
        Current λ (None until the first step).
    proposal_damping : float or None
        Current γ of the proposal (None until the first step).
    history : list of dict
        Per step: ``loss`` (before the step), ``grad_norm``, ``damping`` (λ used), ``proposal_damping``
        (γ taken), ``rho``,
        ``alpha``, ``mu``, ``trial_loss``, ``products`` (curvature products), ``fevals``,
        ``accepted``, ``rounding``, ``inverse_refreshed``, ``seconds``, ``step``.
    """

    LINE_FIELDS = (("loss", "loss {:.6e}"), ("grad_norm", "|g| {:.2e}"), ("damping", "λ {:.2e}"),
                   ("rho", "ρ {:+.3f}"), ("alpha", "α {:.3f}"), ("mu", "μ {:+.3f}"),
                   ("accepted", "accepted {!s:5}"), ("seconds", "{:.3f} s"))

    def __init__(self, net, loss, theta0, *, kind="mc", num_samples=1, damping=None, adapt_damping=True,
                 damping_rule="nielsen", damping_every=5, gamma_every=GAMMA_EVERY, factor_decay=0.95,
                 inverse_every=None, pi=True, momentum=True, seed=0, l2=0.0, progress=None):
        super().__init__(net, loss, theta0, l2=l2, progress=progress)
        kronecker.kronecker_layers(net)
        self.num_samples = kronecker.check_kind(kind, num_samples)
        self.kind = kind
        self.initial_damping = None if damping is None else check_positive("damping", damping)
        self.damping = self.initial_damping
        self.proposal_damping = None  # γ of the proposal; None: λ at the first step
        self.adapt_damping = check_bool("adapt_damping", adapt_damping)
        self.damping_every = check_int("damping_every", damping_every, 1)
        self.gamma_every = check_int("gamma_every", gamma_every, 1)
        if damping_rule not in DAMPING_RULES:
            raise ValueError(f"damping_rule must be one of {DAMPING_RULES}, got {damping_rule!r}")
        self.damping_rule = damping_rule
        self.factor_decay = check_positive("factor_decay", factor_decay, allow_zero=True)
        if self.factor_decay >= 1:
            raise ValueError(f"factor_decay must lie in [0, 1), got {factor_decay!r}")
        self.inverse_every = None if inverse_every is None else check_int("inverse_every", inverse_every, 1)
        self.pi, self.momentum = check_bool("pi", pi), check_bool("momentum", momentum)
        self.seed = check_int("seed", seed, 0)
        self._k = 0  # accepted steps so far: the factors' average has k terms
        self._factors = None  # exponential averages {layer index: (A, G)}
        self._curvature = None  # the K-FAC matrix whose eigendecompositions precondition (refreshed)
        self._since_refresh = 0
        self._previous = np.zeros_like(self.theta)  # δ₀, the last accepted update

    # -- settings and state ---------------------------------------------------

    def _config(self):
        return {**super()._config(), "kind": self.kind, "num_samples": self.num_samples,
                "damping": self.initial_damping, "adapt_damping": self.adapt_damping,
                "damping_rule": self.damping_rule, "damping_every": self.damping_every,
                "gamma_every": self.gamma_every,
                "factor_decay": self.factor_decay, "inverse_every": self.inverse_every, "pi": self.pi,
                "momentum": self.momentum, "seed": self.seed}

    def _state(self):
        state = {"k": self._k, "since_refresh": self._since_refresh, "previous": self._previous,
                 "damping": _checkpoint.optional(self.damping),
                 "proposal_damping": _checkpoint.optional(self.proposal_damping)}
        refreshed = [] if self._curvature is None else self._curvature.factors
        for name, factors in (("average", list((self._factors or {}).values())), ("refreshed", refreshed)):
            for j, (A, G) in enumerate(factors):
                state[f"{name}_A{j}"], state[f"{name}_G{j}"] = A, G
        return state

    def _set_state(self, arrays):
        P, dtype = self.theta.size, self.theta.dtype
        self._k = _checkpoint.scalar(arrays, "k", integer=True)
        self._since_refresh = _checkpoint.scalar(arrays, "since_refresh", integer=True)
        self._previous = _checkpoint.vector(arrays, "previous", P, dtype)
        self.damping = _checkpoint.optional_scalar(arrays, "damping")  # None: set at the next step
        self.proposal_damping = _checkpoint.optional_scalar(arrays, "proposal_damping")
        for name in ("average", "refreshed"):
            if f"{name}_A0" not in arrays:
                continue
            factors = {}
            for j, (key, layer) in enumerate(kronecker.kronecker_layers(self.net).items()):
                size = sum(int(np.prod(shape)) for _, shape in layer.param_shapes())
                A, G = (_checkpoint.matrix(arrays, f"{name}_{F}{j}", dtype) for F in "AG")
                if A.size // A.shape[-1] * G.shape[-1] != size:
                    raise ValueError(f"state {name}_A{j} and {name}_G{j} have shapes {A.shape} and {G.shape}, "
                                     f"whose product is not layer {key}'s {size} parameters")
                factors[key] = (A, G)
            if name == "average":
                self._factors = factors
            else:
                self._curvature = kronecker.KroneckerFactored(self.net, factors, self.l2, dtype)

    # -- one step ---------------------------------------------------------------

    def _inverse_every(self, B):
        if self.inverse_every is not None:
            return self.inverse_every
        cubes = sum(A.size * A.shape[-1] + G.size * G.shape[-1] for A, G in self._factors.values())
        return min(MAX_INVERSE_EVERY, max(1, math.ceil(EIGH_COST * cubes / (B * self.theta.size))))

    def _step(self, X, y, gtol):
        start = time.perf_counter()
        pt = self._linearize(X, y)
        g, f0 = pt.grad, pt.loss
        g_norm = float(np.linalg.norm(g))
        if gtol is not None and g_norm <= gtol:
            return None
        dt = g.dtype.type
        record = {"loss": float(f0), "grad_norm": g_norm, "damping": np.nan, "proposal_damping": np.nan,
                  "rho": np.nan, "alpha": 0.0,
                  "mu": 0.0, "trial_loss": np.nan, "products": 0, "fevals": 1, "accepted": False,
                  "rounding": False, "inverse_refreshed": False}
        rejections = rejections_in_a_row(self.history)
        if not (np.isfinite(f0) and np.isfinite(g).all()):
            if self.damping is not None:
                self.damping = raise_damping(self.damping, rejections, g_norm)
            record["seconds"] = time.perf_counter() - start
            return record
        # 1. the factors' exponential averages (the new batch's factors enter with weight 1 − ε)
        batch = pt.kronecker_factors(self.kind, self.num_samples, np.random.default_rng((self.seed, self._k)))
        decay = min(1 - 1 / (self._k + 1), self.factor_decay)
        factors = batch if self._factors is None else {
            i: (dt(decay) * A + dt(1 - decay) * batch[i][0], dt(decay) * G + dt(1 - decay) * batch[i][1])
            for i, (A, G) in self._factors.items()}
        curvature = self._curvature
        refresh = curvature is None or self._since_refresh + 1 >= self._inverse_every(pt.num_examples)
        if refresh:
            curvature = kronecker.KroneckerFactored(self.net, factors, self.l2, g.dtype)
        damping = self.damping if self.damping is not None else max(curvature.trace() / g.size, 1e-8)
        gamma = self.proposal_damping if self.proposal_damping is not None else damping
        # 2. proposals for γ and, adapting it, γ/ω and γ·ω (§6.4); 3. each one's scale and the momentum from
        # the exact quadratic model, all from one tangent pass; the proposal whose step lowers the model most wins
        choose = self.adapt_damping and self._k % self.gamma_every == 0
        gammas = (gamma / GAMMA_STEP, gamma, gamma * GAMMA_STEP) if choose else (gamma,)
        columns = [curvature.inverse(c, pi=self.pi).matvec(-g) for c in gammas]
        use_momentum = bool(self.momentum and self._previous.any())
        V = np.stack(columns + ([self._previous] if use_momentum else []), axis=1)
        with np.errstate(all="ignore"):
            H, c = _model_matrix(pt, V, damping), V.T.astype(np.float64) @ g
        best = None
        for i in range(len(gammas)):
            pair = [i, len(gammas)] if use_momentum else [i]
            x = _solve_small(H[np.ix_(pair, pair)], c[pair])
            q = 0.5 * float(c[pair] @ x)  # M(δ) at its minimizer along the pair: ½ cᵀx
            if best is None or q < best[0]:
                best = (q, i, pair, x)
        q, i, pair, coefficients = best
        update = V[:, pair] @ coefficients.astype(g.dtype)
        # 4. ρ from one forward pass at the trial point
        trial = self.theta + update
        f_new = pt.loss_at(trial)
        accepted, rho, rounding = judge(f0, q, f_new, g.dtype)
        new_damping, new_gamma = damping, (gammas[i] if accepted else gamma)
        if not accepted:
            new_damping = raise_damping(damping, rejections, g_norm)
        elif self.adapt_damping and not rounding and self.damping_rule == "nielsen":
            new_damping = update_damping(damping, rho, "nielsen")
        elif self.adapt_damping and not rounding and (self._k + 1) % self.damping_every == 0:
            omega = OMEGA_BASE ** self.damping_every
            new_damping = damping * omega if rho > 0.75 else damping / omega if rho < 0.25 else damping
        if accepted:
            self.theta, self._previous = trial, update
            self._factors, self._k = factors, self._k + 1
            self._curvature = curvature
            self._since_refresh = 0 if refresh else self._since_refresh + 1
        self.damping, self.proposal_damping = new_damping, new_gamma
        record.update(damping=float(damping), proposal_damping=float(gammas[i]), rho=float(rho),
                      alpha=float(coefficients[0]), mu=float(coefficients[1]) if use_momentum else 0.0,
                      trial_loss=float(f_new), products=V.shape[1], fevals=2, accepted=accepted, rounding=rounding,
                      inverse_refreshed=bool(refresh), seconds=time.perf_counter() - start)
        return record


def _model_matrix(pt, V, damping):
    """``Vᵀ(G + λI)V`` (k, k) in float64 for V (P, k), G the batch's Gauss-Newton matrix with its L2 term."""
    if not np.isfinite(V).all():  # the proposal overflowed: no model
        return np.full((V.shape[1],) * 2, np.nan)
    V64 = V.astype(np.float64)  # sums of P squares overflow float32 long before the step is useless
    return pt.ggn_quadratic(V) + damping * (V64.T @ V64)


def _solve_small(H, c):
    """x minimizing ``½ xᵀHx + cᵀx`` for a 1×1 or 2×2 H; the least-squares solution if H is singular; 0 if
    H or c is not finite (a proposal that overflowed), which the step's judgement then rejects."""
    if not (np.isfinite(H).all() and np.isfinite(c).all()):
        return np.zeros_like(c)
    x = np.linalg.lstsq(H, -c, rcond=1e-12)[0]
    if not np.isfinite(x).all():
        return np.zeros_like(c)
    return x
