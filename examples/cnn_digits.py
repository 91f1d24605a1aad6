"""A small CNN on scikit-learn's digits: K-FAC against Adam, then the Hessian's spectrum where K-FAC ends.

The digits are 1×8×8 images. The network, in PyTorch's layout:
Conv2d(1, 8, 3, padding=1) ReLU MaxPool2d(2) Conv2d(8, 16, 3, padding=1) ReLU MaxPool2d(2) Flatten Linear(64, 10).
Both methods start from the same θ and get the same seconds of training (evaluating the curves is not
counted); K-FAC takes the whole training set at every step, Adam mini-batches. Then, at K-FAC's final θ,
the top-5 eigenvalues of the Hessian over the training set (Lanczos) and its spectral density
(stochastic Lanczos quadrature). Prints a table and saves a figure with both.

    python examples/cnn_digits.py [--seconds 8] [--output cnn_digits.png]

Needs scikit-learn and matplotlib (``pip install 'hvp[examples]'``); 43 s on one core of the README's machine.
"""

import time

import numpy as np
from train_digits import load_digits_split, train, training_options

import hvp
from hvp import curvature


def cnn():
    return hvp.Sequential(hvp.Conv2d(1, 8, 3, padding=1), hvp.ReLU(), hvp.MaxPool2d(2),
                          hvp.Conv2d(8, 16, 3, padding=1), hvp.ReLU(), hvp.MaxPool2d(2),
                          hvp.Flatten(), hvp.Linear(64, 10))


def main(argv=None):
    args = training_options(__doc__, 8.0, "cnn_digits.png").parse_args(argv)
    from threadpoolctl import threadpool_limits  # installed with scikit-learn

    with threadpool_limits(args.threads):  # for this run only: the caller's setting comes back after it
        run(args)


def run(args):
    """Train, print the table and save the plot, for the parsed command-line arguments."""
    X_train, y_train, X_test, y_test = load_digits_split(args.seed)
    X_train, X_test = X_train.reshape(-1, 1, 8, 8), X_test.reshape(-1, 1, 8, 8)
    net, loss = cnn(), hvp.CrossEntropyLoss()
    theta0 = net.init(seed=args.seed)
    print(f"digits: {len(y_train)} train, {len(y_test)} test images 1×8×8; {net.num_params} parameters; "
          f"{args.seconds:g} s of training per method")

    curves, results = {}, {}
    for name in ("K-FAC", "Adam"):
        curves[name], results[name] = train(name, net, loss, theta0, X_train, y_train, args)

    print(f"\n{'method':<8}{'train loss':>12}{'test loss':>11}{'test acc':>10}")
    for name, theta in results.items():
        outputs = net.forward(theta, X_test)
        accuracy = float(np.mean(outputs.argmax(axis=1) == y_test))
        print(f"{name:<8}{curves[name][-1][1]:>12.5f}{loss.forward(outputs, y_test)[0]:>11.5f}{accuracy:>10.4f}")
    best = min(curves, key=lambda name: curves[name][-1][1])
    other = next(name for name in curves if name != best)
    print(f"Lower training loss after {args.seconds:g} s: {best} ({curves[best][-1][1]:.5f} against "
          f"{curves[other][-1][1]:.5f}).")

    start = time.perf_counter()
    batches = [(X_train[i:i + 512], y_train[i:i + 512]) for i in range(0, len(y_train), 512)]
    H = hvp.HessianOperator(net, loss, results["K-FAC"], batches, l2=args.l2)
    top = curvature.eigenvalues(H, k=5, tol=1e-6)
    density = curvature.spectral_density(H, num_probes=4, lanczos_steps=40)
    print("\nHessian at K-FAC's θ over the training set: top-5 eigenvalues "
          + " ".join(f"{value:.4g}" for value in top.values)
          + f" ({top.num_matvecs} products); spectral density from {density.num_matvecs} products; "
          f"{time.perf_counter() - start:.1f} s")
    if args.output:
        plot(curves, density, top, args.output)


def plot(curves, density, top, path):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print(f"matplotlib is not installed: no figure saved (pip install matplotlib to get {path})")
        return
    figure = Figure(figsize=(11, 4), layout="constrained")
    left, right = figure.subplots(1, 2)
    for name, curve in curves.items():
        seconds, losses = zip(*curve)
        left.semilogy(seconds, losses, label=name)
    left.set_xlabel("training seconds")
    left.set_ylabel("training loss (cross-entropy + L2)")
    left.set_title("CNN on scikit-learn digits, full training set")
    left.legend()
    curvature.plot_spectral_density(density, ax=right, title=f"Hessian at K-FAC's θ: λ_max {top.values[0]:.3g}")
    figure.savefig(path, dpi=110)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
