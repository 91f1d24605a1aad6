"""Train an MLP on scikit-learn's digits with K-FAC, Newton-CG, L-BFGS-B and Adam, and say which wins.

Every method starts from the same θ and gets the same seconds of training (evaluating the curves
is not counted). K-FAC, Newton-CG and L-BFGS-B (scipy's, on ``hvp.loss_and_grad``: what
scikit-learn's ``MLPClassifier(solver="lbfgs")`` runs) use the whole training set at every step;
Adam takes mini-batches. Prints progress and a table, saves a plot of training loss against seconds.

    python examples/train_digits.py [--seconds 5] [--hidden 128 64] [--output digits.png]
"""

import argparse
import time

import numpy as np
import scipy.optimize

import hvp
import optimizers


def load_digits_split(seed, test_fraction=0.2):
    """Digits (1797 8×8 images, scaled to [0, 1]) split at random into train and test."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(y))
    X, y = X[order] / 16.0, y[order]
    n_test = int(round(test_fraction * len(y)))
    return X[n_test:], y[n_test:], X[:n_test], y[:n_test]


def mlp(widths):
    layers = []
    for i, (m, n) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(hvp.Linear(m, n))
        if i < len(widths) - 2:
            layers.append(hvp.Tanh())
    return hvp.Sequential(*layers)


class Clock:
    """Training seconds: the time between calls of ``tick``, less the time spent inside ``untimed``."""

    def __init__(self):
        self.seconds, self.last = 0.0, time.perf_counter()

    def tick(self):
        now = time.perf_counter()
        self.seconds += now - self.last
        self.last = now
        return self.seconds

    def untimed(self):
        self.last = time.perf_counter()


def train(name, net, loss, theta0, X, y, args):
    """Run one method for ``args.seconds`` of training; the curve [(seconds, training loss)] and the final θ."""
    def objective(theta):
        return hvp.loss_and_grad(net, loss, theta, X, y, l2=args.l2)[0]

    curve, clock = [(0.0, objective(theta0))], Clock()

    def record(theta):  # after a step: True once the time is up
        seconds = clock.tick()
        curve.append((seconds, objective(theta)))
        clock.untimed()
        return seconds >= args.seconds

    if name == "L-BFGS-B":
        theta = [theta0]

        def callback(intermediate_result):
            theta[0] = intermediate_result.x
            if record(theta[0]):
                raise StopIteration

        scipy.optimize.minimize(lambda t: hvp.loss_and_grad(net, loss, t, X, y, l2=args.l2), theta0, jac=True,
                                method="L-BFGS-B", callback=callback,
                                options={"maxiter": 10**6, "ftol": 0.0, "gtol": 0.0})
        return curve, theta[0]
    if name == "Adam":
        opt = optimizers.Adam(net, loss, theta0, lr=args.adam_lr, l2=args.l2)
        rng = np.random.default_rng(args.seed)
        while True:  # one epoch of mini-batches, then a point on the curve
            order = rng.permutation(len(y))
            for start in range(0, len(y), args.batch):
                opt.step(X[order[start:start + args.batch]], y[order[start:start + args.batch]])
            if record(opt.theta):
                return curve, opt.theta
    opt = (optimizers.KFAC if name == "K-FAC" else optimizers.NewtonCG)(net, loss, theta0, l2=args.l2)
    while True:
        opt.step(X, y)
        if record(opt.theta):
            return curve, opt.theta


def first_time_below(curve, target):
    return next((seconds for seconds, value in curve if value <= target), None)


def plot(curves, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no plot saved (pip install matplotlib to get {path})")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        seconds, losses = zip(*curve)
        ax.semilogy(seconds, losses, label=name)
    finals = [curve[-1][1] for curve in curves.values()]
    ax.set_ylim(0.9 * min(finals), 30 * max(finals))  # the end of the race, where the methods differ
    ax.set_xlabel("training seconds")
    ax.set_ylabel("training loss (cross-entropy + L2)")
    ax.set_title("MLP on scikit-learn digits, full training set")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"saved {path}")


def training_options(doc, seconds, output):
    """The options :func:`train` reads (seconds, adam_lr, batch, l2, seed), and output and threads."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=seconds,
                        help=f"training seconds per method (default {seconds:g})")
    parser.add_argument("--adam-lr", type=float, default=3e-3, help="Adam's learning rate (default 3e-3)")
    parser.add_argument("--batch", type=int, default=128, help="Adam's mini-batch size")
    parser.add_argument("--l2", type=float, default=1e-4, help="L2 penalty on weights (default 1e-4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=output, help="path of the plot (PNG)")
    parser.add_argument("--threads", type=int, default=1, help="BLAS threads (default 1)")
    return parser


def main(argv=None):
    parser = training_options(__doc__, 5.0, "digits.png")
    parser.add_argument("--hidden", type=int, nargs="+", default=[128, 64], help="hidden widths (default 128 64)")
    args = parser.parse_args(argv)
    # numpy and scipy each bring their own OpenBLAS; on a small problem their idle threads spin against
    # each other and slow scipy's L-BFGS-B four-fold. One thread each is fair to all and fastest here.
    from threadpoolctl import threadpool_limits  # installed with scikit-learn

    with threadpool_limits(args.threads):  # for this run only: the caller's setting comes back after it
        run(args)


def run(args):
    """Train, print the table and save the plot, for the parsed command-line arguments."""
    X_train, y_train, X_test, y_test = load_digits_split(args.seed)
    net = mlp([X_train.shape[1], *args.hidden, 10])
    loss = hvp.CrossEntropyLoss()
    theta0 = net.init(seed=args.seed)
    print(f"digits: {len(y_train)} train, {len(y_test)} test; {net}; {net.num_params} parameters; "
          f"{args.seconds:g} s of training per method")

    curves, results = {}, {}
    for name in ("K-FAC", "Newton-CG", "L-BFGS-B", "Adam"):
        curves[name], results[name] = train(name, net, loss, theta0, X_train, y_train, args)
        print(f"  {name:<10} {len(curves[name]) - 1:5d} {'epochs' if name == 'Adam' else 'steps':6}  "
              f"training loss {curves[name][-1][1]:.5f}", flush=True)

    target = curves["L-BFGS-B"][-1][1]
    print(f"\n{'method':<11}{'train loss':>12}{'test loss':>11}{'test acc':>10}   reaches L-BFGS-B's final loss")
    for name, theta in results.items():
        outputs = net.forward(theta, X_test)
        test_loss = loss.forward(outputs, y_test)[0]
        accuracy = float(np.mean(outputs.argmax(axis=1) == y_test))
        reached = first_time_below(curves[name], target)
        when = f"after {reached:.2f} s" if reached is not None else "no"
        print(f"{name:<11}{curves[name][-1][1]:>12.5f}{test_loss:>11.5f}{accuracy:>10.4f}   {when}")
    best = min(curves, key=lambda name: curves[name][-1][1])
    print(f"\nLowest training loss after {args.seconds:g} s: {best} ({curves[best][-1][1]:.5f}); "
          + ", ".join(f"{name} {curves[name][-1][1]:.5f}" for name in curves if name != best) + ".")
    if args.output:
        plot(curves, args.output)


if __name__ == "__main__":
    main()
