"""Newton-CG (Hessian-free) optimization: Martens' recipe over hvp's curvature products.

Every part of the recipe is a keyword of :class:`NewtonCG` (and :func:`newton_cg`), on by default:

- curvature ``"ggn"`` (default) or ``"hessian"``, products from one cached linearization per step —
  Martens 2010, "Deep learning via Hessian-free optimization", ICML, §4.2;
- Levenberg–Marquardt damping: CG works on ``B + λI`` and λ follows the reduction ratio
  ``ρ = (f(θ + p) − f(θ)) / (q(p) − q(0))``: ρ < 1/4 → λ·3/2, ρ > 3/4 → λ·2/3 — Martens 2010, §4.1 —
  or Nielsen's smooth rule (:mod:`optimizers._damping`); λ0 the curvature along the first gradient;
- preconditioned CG: the inverse of the batch's K-FAC matrix plus λ (Martens & Grosse 2015,
  "Optimizing neural networks with Kronecker-factored approximate curvature"), or Martens' diagonal
  ``M = (diag(Σ_n g_n²) + l2·[weight] + λ)^0.75`` — Martens 2010, §4.7;
- CG stopped by the relative progress of ``q`` (k = max(10, 0.1·i), ε = 5e-4) or a cap — Martens 2010, §4.4;
  and by the inexact-Newton forcing rule ``‖r‖ <= min(1/2, √‖∇f‖)·‖∇f‖``, which keeps CG short far from
  a minimum — Nocedal & Wright 2006, "Numerical Optimization", Algorithm 7.1;
- CG warm-started from the previous run's last iterate × 0.95 — Martens 2010, §4.5, with the decay of
  Martens & Sutskever 2012, "Training deep and recurrent networks with Hessian-free optimization";
- CG-iterate backtracking on f over the iterates kept at i = ⌈5·1.3ʲ⌉ — Martens 2010, §4.6;
- an Armijo backtracking line search (c = 10⁻², α ← 0.8·α) — Martens & Sutskever 2012 (same chapter);
- a curvature mini-batch, a rotating subset of the gradient batch — Martens 2010, §4.3;
- with the exact Hessian, negative curvature ``dᵀ(H + λI)d = κ‖d‖² <= 0`` found by CG lifts the next λ
  to at least ``3/2·(λ − κ)``, enough to make ``H + λI`` positive along d: a shift of the Hessian by a
  multiple of I (Nocedal & Wright 2006, §3.4) sized by what CG saw, so that λ does not keep falling
  while CG keeps stopping short.

Nothing is lost: a step whose new loss is NaN/Inf, whose ρ <= 0, or whose line search fails is
rejected — θ stays as it was (it is replaced, never written into, only once a step is accepted),
λ is raised by 3/2, by 3/2·2ʳ after r rejections in a row (from 0: to ‖∇f‖), and the next CG starts
from zero. A step whose predicted decrease lies within the rounding of f is not judged by ρ
(:func:`optimizers._damping.judge`).
"""

import time

import numpy as np

import hvp
from hvp import kfac as kronecker
from hvp._checks import check_bool, check_int

from . import _checkpoint
from ._base import Optimizer, check_positive
from ._cg import pcg
from ._damping import DAMPING_UP, RULES, judge, raise_damping, rejections_in_a_row, update_damping

CURVATURES = ("ggn", "hessian")
PRECONDITIONERS = (None, "diag", "kfac")
PRECONDITIONER_EXPONENT = 0.75
ARMIJO_C, ARMIJO_SHRINK, ARMIJO_MAX_STEPS = 1e-2, 0.8, 30


def diagonal_preconditioner(diag):
    """``λ -> (diag + λ)^0.75`` (Martens 2010, §4.7); entries that come out 0 (λ = 0, a parameter that
    no example's gradient touches) are set to 1."""
    def at(damping):
        M = (diag + diag.dtype.type(damping)) ** PRECONDITIONER_EXPONENT
        M[M == 0] = 1
        return M
    return at


def check_recipe(adapt_damping, damping_rule, cg_max_iter, cg_progress_tol, cg_forcing, warm_start, backtrack,
                 line_search):
    """The switches of the recipe, validated, as a dict of keyword arguments of :func:`hf_step`."""
    if cg_progress_tol is not None:
        cg_progress_tol = check_positive("cg_progress_tol", cg_progress_tol)
    warm_start = check_positive("warm_start", warm_start, allow_zero=True)
    if warm_start > 1:
        raise ValueError(f"warm_start must lie in [0, 1], got {warm_start!r}")
    if damping_rule not in RULES:
        raise ValueError(f"damping_rule must be one of {RULES}, got {damping_rule!r}")
    return {"adapt_damping": check_bool("adapt_damping", adapt_damping), "damping_rule": damping_rule,
            "cg_max_iter": check_int("cg_max_iter", cg_max_iter, 1), "cg_progress_tol": cg_progress_tol,
            "cg_forcing": check_bool("cg_forcing", cg_forcing),
            "warm_start": warm_start, "backtrack": check_bool("backtrack", backtrack),
            "line_search": check_bool("line_search", line_search)}


def hf_step(f0, g, curvature, objective, damping, warm, preconditioner=None, rejections=0, *, adapt_damping,
            damping_rule, cg_max_iter, cg_progress_tol, cg_forcing, warm_start, backtrack, line_search):
    """One step of Martens' recipe at a point θ.

    Parameters
    ----------
    f0 : float
        ``f(θ)``.
    g : ndarray, shape (P,)
        ``∇f(θ)``.
    curvature : callable
        ``curvature(v) -> B v`` for v (P,), B the undamped curvature (GGN or Hessian) at θ.
    objective : callable
        ``objective(p) -> f(θ + p)`` for p (P,); NaN/Inf allowed.
    damping : float
        λ for this step.
    warm : ndarray (P,) or None
        The last CG iterate of the previous step.
    preconditioner : callable or None
        ``preconditioner(λ)`` -> CG's preconditioner for ``B + λI``: a positive diagonal (P,) or a
        callable ``r -> M⁻¹ r`` (see :func:`~optimizers._cg.pcg`).
    rejections : int
        Rejected steps in a row just before this one (:func:`~optimizers._damping.raise_damping`).
    adapt_damping, damping_rule, cg_max_iter, cg_progress_tol, cg_forcing, warm_start, backtrack, line_search
        The recipe's switches (see :class:`NewtonCG`).

    Returns
    -------
    step : ndarray (P,) or None
        ``α p`` to add to θ, or None when the step is rejected.
    record : dict
    damping : float
        λ for the next step.
    warm : ndarray (P,) or None
        The last CG iterate, for the next warm start (None after a rejected step).
    """
    fevals = 0

    def f(p):
        nonlocal fevals
        fevals += 1
        if not np.isfinite(p).all():
            return np.inf
        value = objective(p)
        return value if np.isfinite(value) else np.inf

    g_norm = float(np.linalg.norm(g))
    record = {"loss": float(f0), "grad_norm": g_norm, "damping": float(damping),
              "rho": np.nan, "cg_iters": 0, "cg_stop": "nonfinite loss", "cg_iter_used": 0, "products": 0,
              "alpha": 0.0, "trial_loss": np.nan, "fevals": 0, "accepted": False, "rounding": False}
    if not (np.isfinite(f0) and np.isfinite(g).all()):
        return None, record, raise_damping(damping, rejections, g_norm), None
    x0 = warm * g.dtype.type(warm_start) if warm is not None and warm_start > 0 else None
    precond = None if preconditioner is None else preconditioner(damping)
    atol = min(0.5, np.sqrt(g_norm)) * g_norm if cg_forcing else 0.0
    cg = pcg(lambda v: curvature(v) + g.dtype.type(damping) * v, g, x0, precond, cg_max_iter, cg_progress_tol, atol)
    # CG-iterate backtracking: from the last kept iterate back while f keeps falling.
    j = len(cg.iterates) - 1
    f_new = f(cg.iterates[j][1])
    while backtrack and j > 0:
        f_prev = f(cg.iterates[j - 1][1])
        if not f_prev < f_new:
            break
        j, f_new = j - 1, f_prev
    i_used, p, q_p = cg.iterates[j]
    accepted, rho, rounding = judge(f0, q_p, f_new, g.dtype)  # at rounding level: ρ unmeasured, λ stays
    alpha = 1.0
    new_damping = damping
    if adapt_damping and accepted and not rounding:
        new_damping = update_damping(damping, rho, damping_rule)
    if accepted and line_search and not rounding:  # Armijo: f(θ + αp) <= f(θ) + c·α·gᵀp
        slope, tries = float(g @ p), 0
        while not f_new <= f0 + ARMIJO_C * alpha * slope:
            if tries == ARMIJO_MAX_STEPS:
                accepted = False
                break
            alpha, tries = alpha * ARMIJO_SHRINK, tries + 1
            f_new = f(g.dtype.type(alpha) * p)
    if not accepted:
        new_damping = raise_damping(damping, rejections, g_norm)
    if adapt_damping and cg.stop == "negative curvature":  # B + λ'I positive along the direction CG stopped on
        new_damping = max(new_damping, DAMPING_UP * (damping - cg.negative_curvature))
    record.update(rho=float(rho), cg_iters=cg.iterations, cg_stop=cg.stop, cg_iter_used=i_used,
                  products=cg.products, alpha=alpha if accepted else 0.0, trial_loss=float(f_new),
                  fevals=fevals, accepted=accepted, rounding=rounding)
    step = g.dtype.type(alpha) * p if accepted else None
    warm = cg.x if accepted and np.isfinite(cg.x).all() else None  # a rejected step's CG solution is dropped
    return step, record, new_damping, warm


class NewtonCG(Optimizer):
    """Hessian-free Newton-CG (Martens 2010) on an hvp network, every part of the recipe switchable.

    Parameters
    ----------
    net : hvp.Sequential
    loss : hvp.CrossEntropyLoss or hvp.MSELoss
    theta0 : ndarray, shape (P,), float32 or float64
        Start; copied, never modified.
    curvature : {"ggn", "hessian"}
        Curvature matrix B: the generalized Gauss-Newton matrix (positive semi-definite) or the
        exact Hessian, whose negative curvature ends CG at the last iterate (Martens 2010, §4.2)
        and, with ``adapt_damping``, lifts the next λ to at least ``3/2·(λ − κ)``, κ <= 0 the
        curvature ``dᵀ(H + λI)d / dᵀd`` CG found (Nocedal & Wright 2006, §3.4). The GGN is the
        safe choice for deep nets far from a minimum; near one, where the loss's residual is not
        zero, it converges only linearly and the Hessian is faster (benchmarks/optimizers.py).
    damping : float or None
        Initial λ > 0 (≥ 0 with ``adapt_damping=False``); CG solves ``(B + λI) p = −∇L``. None: the
        curvature along the first gradient, ``gᵀBg / gᵀg`` (one product), the scale of B where the
        first step goes. A rejected step raises λ by 3/2, a run of them ever faster (from λ = 0: to ``‖∇L‖``).
    adapt_damping : bool
        Levenberg–Marquardt update of λ from ρ (Martens 2010, §4.1). Off: λ stays, except that a
        rejected step still raises it.
    damping_rule : {"martens", "nielsen"}
        How λ follows ρ after an accepted step (:func:`optimizers._damping.update_damping`):
        Martens' ×3/2 (ρ < 1/4) and ×2/3 (ρ > 3/4), or Nielsen's smooth ``max(1/3, 1 − (2ρ − 1)³)``.
    precondition : {"diag", "kfac", None}
        CG's preconditioner: ``"diag"``, Martens' ``(diag(Σ_n g_n²) + l2·[weight] + λ)^0.75`` from
        ``Linearization.sum_grad_squared`` on the gradient batch (Martens 2010, §4.7; entries that
        come out 0 are set to 1); ``"kfac"``, the inverse of the batch's Kronecker-factored
        Gauss-Newton matrix plus λ (:meth:`hvp.Linearization.kfac`, "exact" factors for networks
        with at most 16 outputs, else "mc"; Martens & Grosse 2015), as Martens' later work
        preconditions CG; None: none. True and False stand for "diag" and None.
    cg_max_iter : int
        Cap on CG iterations per step.
    cg_progress_tol : float or None
        ε of Martens' relative-progress rule, k = max(10, 0.1·i) (Martens 2010, §4.4);
        None: CG runs to the cap (or until the model is solved to rounding).
    cg_forcing : bool
        Also stop CG once the residual ``‖(B + λI)p + ∇L‖ <= min(1/2, √‖∇L‖)·‖∇L‖``: the forcing
        rule of truncated Newton (Nocedal & Wright 2006, "Numerical Optimization", Algorithm 7.1),
        short CG runs far from a minimum and ever more exact ones near it.
    warm_start : float in [0, 1]
        CG starts from the previous step's last CG iterate times this (Martens 2010, §4.5; 0.95 as in
        Martens & Sutskever 2012); 0 starts from zero, as does the step after a rejected one.
    backtrack : bool
        Choose among the CG iterates kept at i = ⌈5·1.3ʲ⌉ the one found by walking back from the
        last while f falls (Martens 2010, §4.6).
    line_search : bool
        Armijo backtracking ``f(θ + αp) <= f(θ) + 10⁻²·α·∇Lᵀp``, α ← 0.8·α
        (Martens & Sutskever 2012, "Training deep and recurrent networks with Hessian-free optimization").
    curvature_batch : None, int or float
        Rows of each batch used for curvature products: None for all, an int for that many rows, a
        float in (0, 1] for that fraction. The rows rotate through the batch from step to step
        (Martens 2010, §4.3); gradient, loss, ρ and the preconditioner use the whole batch.
    l2 : float
        Weight of the penalty ``l2/2·Σ‖W‖²`` in the objective.
    progress : {None, "bar", "lines"}
        Nothing, a progress bar (on stderr, in :meth:`minimize`), or one line per step (stdout).

    Attributes
    ----------
    theta : ndarray, shape (P,)
        Current parameters.
    damping : float
        Current λ.
    history : list of dict
        Per step: ``loss`` (at θ before the step), ``grad_norm``, ``damping`` (λ used), ``rho``,
        ``cg_iters``, ``cg_stop``, ``cg_iter_used`` (after backtracking), ``products`` (curvature
        products), ``alpha``, ``trial_loss`` (the last loss evaluated: the new loss when accepted),
        ``fevals`` (loss evaluations on the batch, the one at θ included), ``accepted``, ``seconds``, ``step``.
    """

    LINE_FIELDS = (("loss", "loss {:.6e}"), ("grad_norm", "|g| {:.2e}"), ("damping", "λ {:.2e}"),
                   ("rho", "ρ {:+.3f}"), ("cg_iters", "cg {:4d}"), ("cg_stop", "{:18s}"),
                   ("alpha", "α {:.3f}"), ("accepted", "accepted {!s:5}"), ("seconds", "{:.3f} s"))

    def __init__(self, net, loss, theta0, *, curvature="ggn", damping=None, adapt_damping=True,
                 damping_rule="martens", precondition="kfac", cg_max_iter=250, cg_progress_tol=5e-4, cg_forcing=True,
                 warm_start=0.95, backtrack=True, line_search=True, curvature_batch=None, l2=0.0, progress=None):
        super().__init__(net, loss, theta0, l2=l2, progress=progress)
        if curvature not in CURVATURES:
            raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}")
        self.curvature = curvature
        if isinstance(precondition, (bool, np.bool_)):  # as before "diag" and "kfac" existed
            precondition = "diag" if precondition else None
        if precondition not in PRECONDITIONERS:
            raise ValueError(f"precondition must be one of {PRECONDITIONERS} (or True/False), got {precondition!r}")
        if precondition == "kfac":
            kronecker.kronecker_layers(net)
        self.precondition = precondition
        self.recipe = check_recipe(adapt_damping, damping_rule, cg_max_iter, cg_progress_tol, cg_forcing,
                                   warm_start, backtrack, line_search)
        self.initial_damping = None if damping is None else \
            check_positive("damping", damping, allow_zero=not self.recipe["adapt_damping"])
        self.damping = self.initial_damping
        if curvature_batch is not None:
            if isinstance(curvature_batch, (float, np.floating)):
                if not 0 < curvature_batch <= 1:
                    raise ValueError(f"a fractional curvature_batch must lie in (0, 1], got {curvature_batch!r}")
                curvature_batch = float(curvature_batch)
            else:
                curvature_batch = check_int("curvature_batch", curvature_batch, 1)
        self.curvature_batch = curvature_batch
        self._warm = None  # last CG iterate of the previous step
        self._offset = 0  # first row of the next curvature batch

    def _config(self):
        return {**super()._config(), **self.recipe, "curvature": self.curvature, "damping": self.initial_damping,
                "precondition": self.precondition, "curvature_batch": self.curvature_batch}

    def _state(self):
        return {"damping": _checkpoint.optional(self.damping), "offset": self._offset,
                "warm": self._warm if self._warm is not None else np.zeros(0, self.theta.dtype)}

    def _set_state(self, arrays):
        self.damping = _checkpoint.optional_scalar(arrays, "damping")  # None: set at the next step
        self._offset = _checkpoint.scalar(arrays, "offset", integer=True)
        warm = _checkpoint.vector(arrays, "warm", self.theta.size, self.theta.dtype, allow_empty=True)
        self._warm = warm if warm.size else None

    def _curvature_rows(self, B):
        if self.curvature_batch is None:
            return B
        if isinstance(self.curvature_batch, float):
            return max(1, min(B, round(self.curvature_batch * B)))
        return min(B, self.curvature_batch)

    def _curvature_operator(self, pt):
        """``v -> B v`` on the curvature batch, scaled to the whole batch's loss; and the next offset."""
        B = pt.num_examples
        b = self._curvature_rows(B)
        if b == B:
            return (pt.ggnvp if self.curvature == "ggn" else pt.hvp), self._offset
        if not hasattr(pt, "inputs"):
            raise TypeError("curvature_batch needs the batch on this machine; with sharded data, leave it None")
        X, y = pt.inputs, pt.targets
        rows = (self._offset + np.arange(b)) % B
        cpt = hvp.linearize(self.net, self.loss, self.theta, X[rows], y[rows], 0.0)
        product = cpt.ggnvp if self.curvature == "ggn" else cpt.hvp
        # The whole batch's data term ≈ (N_sub / N_all)·(B / b) × the sub-batch's, N the loss normalizers.
        scale = pt.theta.dtype.type(self.loss.normalizer(cpt.outputs) / self.loss.normalizer(pt.outputs) * B / b)
        l2, mask = pt.theta.dtype.type(self.l2), pt.weight_mask

        def curvature(v):
            out = product(v)
            out *= scale
            if l2:
                out[mask] += l2 * v[mask]
            return out

        return curvature, (self._offset + b) % B

    def _preconditioner(self, pt):
        """``λ -> preconditioner`` for this step (see :func:`hf_step`), or None."""
        if self.precondition == "diag":
            diag = pt.sum_grad_squared()
            if self.l2:
                diag[pt.weight_mask] += diag.dtype.type(self.l2)
            return diagonal_preconditioner(diag)
        if self.precondition == "kfac":
            kind = kronecker.default_kind(pt.num_outputs)
            K = pt.kfac(kind=kind, seed=len(self.history))
            floor = 1e-12 * max(K.trace(), 1e-300) / K.shape[0]  # λ = l2 = 0: keep the inverse finite
            return lambda damping: K.inverse(max(damping, floor)).matvec
        return None

    def _step(self, X, y, gtol):
        start = time.perf_counter()
        pt = self._linearize(X, y)
        if gtol is not None and np.linalg.norm(pt.grad) <= gtol:
            return None
        curvature, next_offset = self._curvature_operator(pt)
        theta = self.theta

        def objective(p):
            return pt.loss_at(theta + p)

        if self.damping is None:  # the curvature along the gradient, gᵀBg / gᵀg: the scale of B where it matters
            g = pt.grad
            self.damping = max(float(g @ curvature(g)) / max(float(g @ g), 1e-300), 1e-8)
        step, record, damping, warm = hf_step(pt.loss, pt.grad, curvature, objective, self.damping, self._warm,
                                              self._preconditioner(pt), rejections_in_a_row(self.history),
                                              **self.recipe)
        if step is not None:
            self.theta = theta + step
        self.damping, self._warm, self._offset = damping, warm, next_offset
        record["fevals"] += 1  # the loss at θ, from the linearization
        record["seconds"] = time.perf_counter() - start
        return record
