"""Layers, and the contract of four derivative rules every layer keeps (DESIGN.md §1, seed 002).

One module per family: :mod:`~hvp.layers.dense` (Linear), :mod:`~hvp.layers.conv` (Conv1d,
Conv2d), :mod:`~hvp.layers.pooling` (max and average pooling, Flatten),
:mod:`~hvp.layers.activations` (elementwise), :mod:`~hvp.layers.composition` (Sequential),
:mod:`~hvp.layers.residual` (Residual); :mod:`~hvp.layers.windows` holds the sliding windows that convolutions
and pooling share, :mod:`~hvp.layers.second_order` the step of a Hessian product's backward pass that rules 2
and 4 make together.

Arrays are batch first; a block of k directions adds a leading axis k to tangents and
adjoints, so that each direction is one ordinary batch and k directions cost k matrix products
of full size (or one, where the k axis folds into the batch). Directions in parameter space,
and the per-direction parameter adjoints, are columns instead: ``(*shape, k)``, the rows of the
(P, k) block the user passes, so that a Linear layer's ``I [Ẇ_1 … Ẇ_k]`` and ``Iᵀ [DO_1 … DO_k]``
are one matrix product each and the block is never transposed as a whole. A layer maps per-example
inputs of one shape to outputs of another, ``out_shape(in_shape)`` (a ValueError saying what it needs when the
input does not fit). Written below for a Linear layer, inputs (B, m) and outputs (B, n); other
layers replace ``m`` and ``n`` by their per-example shapes:

====================  ===========================================  ==========================================
rule                  method                                       shapes
====================  ===========================================  ==========================================
1 forward             ``forward(p, I) -> (O, cache)``              I (B, m) -> O (B, n)
2 backward            ``backward_input(p, cache, DO) -> DI``       DO (..., B, n) -> DI (..., B, m)
                      ``backward_params(p, cache, DO[, out])``     DO (B, n) -> dict like ``p``;
                                                                   DO (k, B, n) -> (*shape, k) per direction
3 tangent             ``tangent(p, cache, dI, dp) -> dO``          dI (k, B, m), dp {name: (*shape, k)} -> (k, B, n)
4 tangent backward    ``tangent_backward(p, cache, dI, dp, DOD,    DOD (B, n) or (k, B, n) -> DI_k (k, B, m)
                      need_input, summed=False)                    and {name: (*shape, k)};
                      -> (DI_k, grads_k)``                         ``summed``: DI (B, m), {name: shape}
====================  ===========================================  ==========================================

Layers with parameters may also give per-example pieces (:mod:`hvp.per_example`), from their cache
and output-side adjoints: ``batch_grad(p, cache, DO, out, rows)`` (the examples ``rows``' gradients
into views ``out`` of shape (b, *shape)), ``grad_squares(p, cache, D, out, scale=None, weights=None,
need_input=False, sums=None)`` (``Σ_{k,b} w_kb g_kb²`` for adjoints ``scale ⊙ D_k``, D (K, B or 1, n), weights
w (K, B) of either sign or None for 1, and ``Σ_{k,b} w_kb g_kb`` into views ``sums`` when given; it returns None,
or with ``need_input`` the input adjoint of ``scale ⊙ D`` where it forms that on the way, as a residual block
does) and ``batch_l2(p, cache, DO)`` ((B,)); for losses on input
tangents (:mod:`hvp.input_derivatives`), ``tangent_grad_squares(p, cache, dI, DO, DOD, out)``: ``Σ_b g_b²`` for
example b's gradient by rules 2 and 4 (DO (B, n), DOD (k, B, n), dI (k, B or 1, m) or None); and
K-FAC's Kronecker factors (:mod:`hvp.kfac`):
``kronecker_factors(cache, D) -> (A, G)`` for output-side columns D (K, B, n) (or stacks (G, ·, ·) of
independent blocks, one per group of a grouped convolution), and their
parameters as one matrix, ``kronecker_matrix(p) -> W̄`` (..., rows, cols) with
``from_kronecker_matrix(W̄, out)`` writing it back, so that the block is ``W̄ -> A W̄ G``.

The exact Hessian diagonal (:mod:`hvp.diag_hessian`) carries columns v of ``∇²_O L_b = Σ_k c_kb v_kb v_kbᵀ``
back by ``backward_input``, which also takes columns shared by every example, DO (K, 1, n) (kept shared or
broadcast to B), and a diagonal term ``diag(d_b)`` as long as it stays one. Every layer states its own
curvature in its input, ``input_curvature(p, cache, DO)``: the diagonal (B, m) of ``Σ_j DO_j ∇²_I O_j``
(``σ″ ⊙ DO``), or None where that is zero (layers linear in I on each piece). A layer each of whose outputs
copies one input entry keeps a diagonal one, ``backward_diagonal(p, cache, d)`` = ``(J∘J)ᵀ d`` = diag(Jᵀ diag(d) J),
d (B, n) -> (B, m) (activations, max pooling, Flatten); one whose Jacobian is diagonal gives it,
``jacobian_diagonal(p, cache) -> σ′`` (B, m), for columns to carry as a factor. Layers with parameters read
a diagonal term d (B, n) at their output, ``diagonal_squares(p, cache, d, out)`` =
``Σ_b diag(J_bᵀ diag(d_b) J_b)``, J_b = ∂O_b/∂θ (Linear ``(I²)ᵀ d``; a convolution the same from squared
patches), and columns by ``grad_squares`` with weights c. One whose parameters each reach one output entry
per example (Linear) sets ``output_diagonal_only = True``: the diagonal of ∇²_O L is all it needs, summed
over every term and read once by ``diagonal_squares``. A block ``O = I + f(I)`` gives instead
``branch(p, cache, DO, out)``: per layer of f, ``(layer, p_j, cache_j, DO_j, out_j)``, DO_j the adjoint at
its output and out_j its views into ``out``; such a block lists f's layers in ``layers``, their parameters
named ``"<j>.<name>"``, and K-FAC gives each of them its own Kronecker block through ``branch``.

``p`` is the layer's dict of parameter views (``net.unflatten``), ``cache``
what ``forward`` returned, ``param_shapes()`` the names and shapes of the parameters in θ's
order, and ``fan_in`` (layers with parameters) the inputs each output sums over, which sets
the initialization. ``None`` stands for a tangent, a direction or a term
that is zero, so that no work is spent on it.

Rule 4 is written per direction: for scalars ``T_k`` that depend on ``O`` and
``Ȯ_k`` with ``∂T_k/∂Ȯ_k = DOD`` and ``∂T_k/∂O = DO_k``, the adjoints at the
input and the parameters are ``backward(DO_k)`` plus the cross terms that
``tangent_backward`` returns, and the adjoint of the input tangent is
``backward_input(DOD)``. The Gauss-Newton product is the same pass without the
cross terms. With ``summed=True`` the cross terms come summed over the k
directions, for one scalar ``L(O, Ȯ_1..Ȯ_k)`` (a loss on input tangents, seed
002 §2): ``DI = Σ_k (cross term)_k`` and one gradient per parameter.

A tangent may have a batch axis of 1, dI (k, 1, m): the same tangent for every
example (directions given at the input, with dp None). ``tangent`` and
``tangent_backward`` broadcast it; a Linear layer keeps it shared, so that
``İ W`` and ``Σ_k İ_kᵀ DOD_k`` cost k·m·n, not k·B·m·n.
"""

from .activations import ELU, Elementwise, Identity, LeakyReLU, ReLU, Sigmoid, Softplus, Softsign, Tanh
from .composition import Sequential
from .conv import Conv1d, Conv2d
from .dense import Linear
from .pooling import AvgPool1d, AvgPool2d, Flatten, MaxPool1d, MaxPool2d
from .residual import Residual

__all__ = ["Linear", "Conv1d", "Conv2d", "MaxPool1d", "MaxPool2d", "AvgPool1d", "AvgPool2d", "Flatten",
           "Elementwise", "ELU", "Identity", "LeakyReLU", "ReLU", "Sigmoid", "Softplus", "Softsign", "Tanh",
           "Sequential", "Residual"]
