"""The L2 penalty ``l2/2 Σ‖W‖²`` on weights (never biases), added to a loss, its gradient or a product.

``mask`` (P,) marks the weight entries of θ (``net.weight_mask()``); the gradient is ``l2·θ`` and the
Hessian ``l2·diag(mask)`` on them.
"""


def l2_value(theta, mask, l2):
    """``l2/2 ‖θ[mask]‖²`` as a float; theta (P,)."""
    if not l2:
        return 0.0
    w = theta[mask]
    return 0.5 * l2 * float(w @ w)


def add_l2(out, V, mask, l2, axis=0):
    """``out += l2·(mask ⊙ V)`` in place and returns out; V and out (P,) or with the P entries along ``axis``
    ((P, k) for axis 0, (k, P) for axis 1). With V = θ this adds the penalty's gradient, else its product."""
    if l2:
        index = (slice(None),) * axis + (mask,)
        out[index] += out.dtype.type(l2) * V[index]
    return out
