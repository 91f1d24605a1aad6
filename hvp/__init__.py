"""hvp: second-order backpropagation in numpy.

Exact Hessian-vector and Gauss-Newton-vector products of small and mid-sized
networks, from four derivative rules per layer (see :mod:`hvp.layers`).
"""

from .activations import ELU, Identity, LeakyReLU, ReLU, Sigmoid, Softplus, Softsign, Tanh
from .layers import Linear
from .losses import CrossEntropyLoss, MSELoss
from .network import Sequential
from .products import Linearization, linearize, loss_and_grad

__version__ = "0.1.0"

__all__ = [
    "ELU", "Identity", "LeakyReLU", "ReLU", "Sigmoid", "Softplus", "Softsign", "Tanh",
    "Linear", "Sequential", "CrossEntropyLoss", "MSELoss",
    "Linearization", "linearize", "loss_and_grad",
]
