"""Judging a step against its quadratic model, and the damping λ that follows: shared by NewtonCG and KFAC.

A step p predicts the change ``q(p) < 0`` of the objective from a quadratic model and achieves
``f(θ + p) − f(θ)``; their ratio ρ says how far the model can be trusted, and λ (a multiple of I
added to the curvature) follows it, as in Levenberg–Marquardt.
"""

import numpy as np

DAMPING_UP, DAMPING_DOWN = 3 / 2, 2 / 3
MAX_GROWTH_DOUBLINGS = 20  # a run of rejections raises λ by at most 3/2·2^20 per step
ROUNDING_ULPS = 100  # a predicted decrease below this many ulps of |f| is rounding: ρ is not measured
RULES = ("martens", "nielsen")


def update_damping(damping, rho, rule="martens"):
    """λ after an accepted step with reduction ratio ρ.

    ``"martens"``: λ·3/2 if ρ < 1/4, λ·2/3 if ρ > 3/4, else λ (Martens 2010, "Deep learning via
    Hessian-free optimization", §4.1). ``"nielsen"``: ``λ·max(1/3, 1 − (2ρ − 1)³)``, a factor that
    falls smoothly from 2 at ρ = 0 to 1 at ρ = 1/2 and to 1/3 for ρ >= 1 (Nielsen 1999; Madsen,
    Nielsen & Tingleff 2004, "Methods for non-linear least squares problems", eq. 3.16): a model that
    keeps under-predicting the decrease (ρ > 1) lets λ fall three times faster than Martens' rule.
    """
    if rule == "nielsen":
        return damping * max(1 / 3, 1 - (2 * rho - 1) ** 3)
    if rho < 0.25:
        return damping * DAMPING_UP
    if rho > 0.75:
        return damping * DAMPING_DOWN
    return damping


def raise_damping(damping, rejections, g_norm):
    """λ after a rejected step: ``λ·3/2·2^r`` after r rejections in a row before this one; from 0, ``‖∇f‖``.

    Martens' factor 3/2 for a single rejection (Martens 2010, §4.1); a run of them doubles the
    factor each time, as Nielsen's rule doubles ν (Madsen, Nielsen & Tingleff 2004, eq. 3.16), so
    that a λ too small by a factor 10⁴ is recovered in 6 rejections rather than 23.
    """
    if damping == 0:
        return g_norm
    return damping * DAMPING_UP * 2.0 ** min(rejections, MAX_GROWTH_DOUBLINGS)


def rounding_level(f0, dtype):
    """How far f may move by rounding alone near ``f0``: ``ROUNDING_ULPS`` ulps of ``|f0|`` in ``dtype``."""
    return ROUNDING_ULPS * float(np.finfo(dtype).eps) * abs(f0)


def judge(f0, q, f_new, dtype):
    """``(accepted, rho, rounding)`` for a step that predicted the change ``q`` and reached ``f_new``.

    A predicted decrease within the rounding of f (:func:`rounding_level`) cannot be checked against
    f: such a step is accepted unless f rises beyond rounding, and ρ is NaN (not measured). Otherwise
    ``ρ = (f_new − f0)/q`` and the step is accepted when f_new is finite and ρ > 0. A step that
    predicts no decrease (q >= 0) is rejected.
    """
    noise = rounding_level(f0, dtype)
    rounding = bool(0 < -q <= noise)
    if rounding:
        return bool(f_new <= f0 + noise), np.nan, True
    rho = (f_new - f0) / q if q < 0 else np.nan
    return bool(np.isfinite(f_new) and rho > 0), rho, False


def rejections_in_a_row(history):
    """How many of the last records in ``history`` are rejected steps."""
    count = 0
    while count < len(history) and not history[-1 - count]["accepted"]:
        count += 1
    return count
