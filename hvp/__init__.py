"""hvp: second-order backpropagation in numpy.

Exact Hessian-vector and Gauss-Newton-vector products of small and mid-sized
networks, from four derivative rules per layer (see :mod:`hvp.layers`).
"""

from . import curvature
from .input_derivatives import (
    JacobianPenalty,
    SobolevLoss,
    input_jacobian,
    input_jvp,
    tangent_loss_and_grad,
    tangent_sum_grad_squared,
)
from .kfac import KFACOperator
from .layers import (
    ELU,
    AvgPool1d,
    AvgPool2d,
    Conv1d,
    Conv2d,
    Flatten,
    Identity,
    LeakyReLU,
    Linear,
    MaxPool1d,
    MaxPool2d,
    ReLU,
    Residual,
    Sequential,
    Sigmoid,
    Softplus,
    Softsign,
    Tanh,
)
from .losses import BCEWithLogitsLoss, CrossEntropyLoss, MSELoss
from .memory import reuse_freed_memory
from .operators import EmpiricalFisherOperator, GGNOperator, HessianOperator
from .products import Linearization, linearize, loss_and_grad
from .scipy_objective import scipy_objective

__version__ = "0.1.0"

__all__ = [
    "ELU", "Identity", "LeakyReLU", "ReLU", "Sigmoid", "Softplus", "Softsign", "Tanh",
    "Linear", "Conv1d", "Conv2d", "MaxPool1d", "MaxPool2d", "AvgPool1d", "AvgPool2d", "Flatten", "Sequential",
    "Residual",
    "CrossEntropyLoss", "MSELoss", "BCEWithLogitsLoss",
    "Linearization", "linearize", "loss_and_grad",
    "input_jvp", "input_jacobian", "tangent_loss_and_grad", "tangent_sum_grad_squared",
    "SobolevLoss", "JacobianPenalty",
    "scipy_objective", "reuse_freed_memory",
    "HessianOperator", "GGNOperator", "EmpiricalFisherOperator", "KFACOperator", "curvature",
]
