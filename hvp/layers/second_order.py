"""Rules 2 and 4 through one layer together: one step of the backward pass of a Hessian or Gauss-Newton product.

Every layer gets this step from its ``backward_params``, ``tangent_backward`` and ``backward_input``. A layer whose
two rules would repeat work when called apart gives its own ``backward_with_cross_terms(p, cache, dI, dp, RDO, DOD,
out, need_input)`` instead: a residual block carries ``RDO`` and its cross terms back through f in one pass, a
convolution folds both input adjoints at once.
"""


def backward_with_cross_terms(layer, p, cache, dI, dp, RDO, DOD, out, need_input):
    """``backward(RDO)`` plus rule 4's cross terms at one layer (seed 002 ``DID``/``DOD``).

    Parameters
    ----------
    layer : a layer of the contract, with its parameter views ``p`` (a dict, empty without parameters) and
        ``cache`` from ``forward``
    dI : ndarray, shape (k, B, m), or None
        The input tangents (None: zero).
    dp : dict of ndarray, shape (*shape, k), or None
        The parameter directions (None: zero).
    RDO : ndarray, shape (k, B, n)
        The product's adjoint at the output.
    DOD : ndarray, shape (B, n), or None
        The gradient's adjoint δ at the output; None for the Gauss-Newton product, which has no cross terms.
    out : dict of ndarray, shape (*shape, k)
        Views that receive ``backward_params(RDO)`` plus the cross terms in the parameters.
    need_input : bool

    Returns
    -------
    ndarray, shape (k, B, m), or None
        ``backward_input(RDO)`` plus the cross term in the input; None without ``need_input``.
    """
    own = getattr(layer, "backward_with_cross_terms", None)
    if own is not None:
        return own(p, cache, dI, dp, RDO, DOD, out, need_input)
    return rules_apart(layer, p, cache, dI, dp, RDO, DOD, out, need_input)


def rules_apart(layer, p, cache, dI, dp, RDO, DOD, out, need_input):
    """:func:`backward_with_cross_terms` from the layer's ``backward_params``, ``tangent_backward`` and
    ``backward_input``, called one after the other."""
    layer.backward_params(p, cache, RDO, out=out)
    cross = None
    if DOD is not None:
        cross, grads = layer.tangent_backward(p, cache, dI, dp, DOD, need_input=need_input)
        for name, g in (grads or {}).items():
            out[name] += g
    if not need_input:
        return None
    RDI = layer.backward_input(p, cache, RDO)
    if cross is not None:
        RDI += cross
    return RDI
