"""Optimizers built on hvp's curvature products.

- :class:`NewtonCG`: Hessian-free Newton-CG (Martens 2010) on an hvp network, every part of the
  recipe switchable; :func:`newton_cg`, the same method for any objective with a Hessian-vector product.
- :class:`KFAC`: Kronecker-factored natural-gradient steps with the exact quadratic model's scale and
  momentum (Martens & Grosse 2015).
- :class:`SGD` (with momentum) and :class:`Adam`: first-order baselines with the same interface.

All three take ``(net, loss, theta0, ...)`` and offer ``step(X, y)``, ``minimize(data, ...)``
(returning a ``scipy.optimize.OptimizeResult``), a per-step ``history``, and ``save(path)`` /
``load(path, net, loss)`` in ``.npz`` without pickle.
"""

from .first_order import SGD, Adam
from .hessian_free import NewtonCG
from .kfac import KFAC
from .minimize import newton_cg

__all__ = ["NewtonCG", "newton_cg", "KFAC", "SGD", "Adam"]
