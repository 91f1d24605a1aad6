"""How the Hessian's spectrum changes while an MLP learns the scikit-learn digits.

At a few points of training (full-batch Adam, written out below) this prints the top-5
Hessian eigenvalues over the whole training set (Lanczos), the trace ± its standard
error (Hutch++), and draws the spectral density (stochastic Lanczos quadrature) of each
point into one PNG. The Hessian is an ``hvp.HessianOperator`` over batches of 256 digits.

    python examples/curvature_spectrum.py [--out curvature_spectrum.png]

Needs scikit-learn and matplotlib (``pip install 'hvp[examples]'``); about 7 s on 2 quiet cores.
"""

import argparse
import time

import numpy as np
from matplotlib.figure import Figure
from sklearn.datasets import load_digits

import hvp
from hvp import curvature

CHECKPOINTS = (0, 30, 150, 600)  # Adam steps at which the spectrum is measured


def adam(grad_fn, theta, steps, lr=3e-3, beta1=0.9, beta2=0.999, eps=1e-8):
    """Adam (Kingma & Ba 2015) on a flat parameter vector; yields (step, θ) before each step."""
    m, v = np.zeros_like(theta), np.zeros_like(theta)
    for t in range(1, steps + 1):
        yield t - 1, theta
        g = grad_fn(theta)
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        theta = theta - lr * (m / (1 - beta1 ** t)) / (np.sqrt(v / (1 - beta2 ** t)) + eps)
    yield steps, theta


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="curvature_spectrum.png", help="where to save the spectral densities")
    parser.add_argument("--checkpoints", type=int, nargs="+", default=list(CHECKPOINTS),
                        help="Adam steps at which to measure, at most 4 (default 0 30 150 600)")
    args = parser.parse_args()
    checkpoints = sorted(args.checkpoints)[:4]

    digits = load_digits()
    X = digits.data / 16.0
    y = digits.target
    batches = [(X[i:i + 256], y[i:i + 256]) for i in range(0, len(X), 256)]
    net = hvp.Sequential(hvp.Linear(64, 32), hvp.Tanh(), hvp.Linear(32, 10))
    loss = hvp.CrossEntropyLoss()
    l2 = 1e-4
    print(f"MLP 64-32-10 (tanh), P = {net.num_params}, {len(X)} digits in {len(batches)} batches, l2 = {l2}")

    def grad(theta):
        return hvp.loss_and_grad(net, loss, theta, X, y, l2=l2)[1]

    figure = Figure(figsize=(10, 7), layout="constrained")
    axes = figure.subplots(2, 2).ravel()
    start = time.perf_counter()
    for step, theta in adam(grad, net.init(seed=0), checkpoints[-1]):
        if step not in checkpoints:
            continue
        H = hvp.HessianOperator(net, loss, theta, batches, l2=l2)
        accuracy = np.mean(np.argmax(net.forward(theta, X), axis=1) == y)
        top = curvature.eigenvalues(H, k=5, tol=1e-6)
        tr = curvature.trace(H, 150, method="hutch++")
        density = curvature.spectral_density(H, num_probes=10, lanczos_steps=80)
        print(f"\nstep {step:4d}: loss {H.loss:.4f}, training accuracy {accuracy:.3f}")
        print("  top-5 eigenvalues " + " ".join(f"{value:9.4f}" for value in top.values)
              + f"   (Lanczos, {top.num_matvecs} matvecs)")
        print(f"  trace {tr.estimate:9.4f} ± {tr.stderr:.4f}   (Hutch++, {tr.num_matvecs} matvecs)")
        print(f"  density: SLQ {density.num_matvecs} matvecs, Gaussian kernel σ = {density.sigma:.3g}")
        ax = axes[checkpoints.index(step)]
        curvature.plot_spectral_density(density, ax=ax, title=f"step {step}: loss {H.loss:.3f}, "
                                        f"λ_max {top.values[0]:.3g}, σ = {density.sigma:.2g}")
    figure.savefig(args.out, dpi=110)
    print(f"\nspectral densities saved to {args.out}; {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
