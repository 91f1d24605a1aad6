"""Fit a smooth 2-D function from few samples, with and without its derivatives (Sobolev training).

Both fits see the same N sample points of f(x1, x2) = sin(2 x1) cos(3 x2) + x1 x2 / 2
on [-1, 1]²; one fits the values alone (hvp.MSELoss), the other fits the values and
the gradient ∇f at the same points (hvp.SobolevLoss on the input tangents along the two
unit directions). Both run L-BFGS (scipy) on the exact loss gradient; the test error is
the RMS error of the values and of the gradient on a 60 × 60 grid.

    python examples/sobolev_fit.py [--samples 20] [--seeds 3] [--hidden 32] [--max-iter 800]
"""

import argparse
import time

import numpy as np
from scipy.optimize import minimize

import hvp


def target(X):
    """f (B,) and ∇f (B, 2) at the points X (B, 2)."""
    x1, x2 = X[:, 0], X[:, 1]
    f = np.sin(2 * x1) * np.cos(3 * x2) + x1 * x2 / 2
    grad = np.stack([2 * np.cos(2 * x1) * np.cos(3 * x2) + x2 / 2,
                     -3 * np.sin(2 * x1) * np.sin(3 * x2) + x1 / 2], axis=1)
    return f, grad


def lbfgs(objective, theta0, max_iter):
    """Minimize ``objective(theta) -> (value, grad)`` with scipy's L-BFGS; returns θ."""
    result = minimize(objective, theta0, jac=True, method="L-BFGS-B",
                      options={"maxiter": max_iter, "maxfun": 2 * max_iter, "gtol": 1e-10, "ftol": 1e-15})
    return result.x


def rms(a):
    return float(np.sqrt(np.mean(np.square(a))))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--max-iter", type=int, default=800)
    args = parser.parse_args()

    net = hvp.Sequential(hvp.Linear(2, args.hidden), hvp.Tanh(), hvp.Linear(args.hidden, args.hidden), hvp.Tanh(),
                         hvp.Linear(args.hidden, 1))
    grid = np.stack(np.meshgrid(np.linspace(-1, 1, 60), np.linspace(-1, 1, 60)), axis=-1).reshape(-1, 2)
    f_grid, grad_grid = target(grid)
    units = np.eye(2)  # directions: the two unit vectors, so the tangents are ∂O/∂x1 and ∂O/∂x2

    print(f"f(x1, x2) = sin(2 x1) cos(3 x2) + x1 x2 / 2 on [-1, 1]^2, {args.samples} samples, "
          f"MLP 2-{args.hidden}-{args.hidden}-1 tanh, L-BFGS up to {args.max_iter} iterations")
    print(f"{'seed':>4}  {'fit':<22}{'value RMSE':>12}{'gradient RMSE':>15}{'seconds':>9}")
    errors = {"values only": [], "values + gradients": []}
    for seed in range(args.seeds):
        rng = np.random.default_rng(seed)
        X = rng.uniform(-1, 1, size=(args.samples, 2))
        f, grad = target(X)
        Y, dY = f[:, None], grad[:, :, None]  # (B, 1) values, (B, k=2, C=1) directional derivatives
        theta0 = net.init(seed=seed)
        fits = {
            "values only": lambda t, X=X, Y=Y: hvp.loss_and_grad(net, hvp.MSELoss(), t, X, Y),
            "values + gradients": lambda t, X=X, Y=Y, dY=dY: hvp.tangent_loss_and_grad(
                net, hvp.SobolevLoss(weight=1.0), t, X, (Y, dY), units),
        }
        for name, objective in fits.items():
            start = time.perf_counter()
            theta = lbfgs(objective, theta0, args.max_iter)
            seconds = time.perf_counter() - start
            O, dO = hvp.input_jvp(net, theta, grid, units)
            value_error, gradient_error = rms(O[:, 0] - f_grid), rms(dO[:, :, 0] - grad_grid)
            errors[name].append((value_error, gradient_error))
            print(f"{seed:>4}  {name:<22}{value_error:>12.4f}{gradient_error:>15.4f}{seconds:>9.1f}")
    print("median over seeds:")
    for name, rows in errors.items():
        value_error, gradient_error = np.median(np.array(rows), axis=0)
        print(f"      {name:<22}{value_error:>12.4f}{gradient_error:>15.4f}")
    ratio = np.median([a[0] / b[0] for a, b in zip(errors["values only"], errors["values + gradients"])])
    print(f"value RMSE, values only / values + gradients: {ratio:.1f}x (median over seeds)")


if __name__ == "__main__":
    main()
