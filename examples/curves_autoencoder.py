"""The deep autoencoder on CURVES-style data: Newton-CG (Hessian-free) and K-FAC against Adam and SGD.

Hinton & Salakhutdinov's (2006) CURVES autoencoder, the problem on which Martens (2010)
showed Hessian-free optimization training a deep network from a random start:
784-400-200-100-50-25-6 with logistic units, a linear 6-unit code layer, and the mirror
image 6-25-50-100-200-400-784 with logistic outputs under cross-entropy. The data come
from ``curves_data.make_curves`` (see its docstring). Every method gets the same wall-clock
budget; the table reports, as Martens' Table 1 does, the squared reconstruction error per
example summed over the 784 pixels, on the training and the test set.

    python examples/curves_autoencoder.py --quick          # about a minute
    python examples/curves_autoencoder.py                  # 20,000 / 10,000 images, 5 min per method
"""

import argparse
import time

import numpy as np
from curves_data import make_curves

import hvp
import optimizers

ENCODER = (784, 400, 200, 100, 50, 25, 6)


def autoencoder():
    """The 784-…-6-…-784 autoencoder: logistic hidden units, linear code, logistic outputs (as logits)."""
    widths = ENCODER + ENCODER[-2::-1]
    layers = []
    for i, (m, n) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(hvp.Linear(m, n))
        if i != len(ENCODER) - 2 and i != len(widths) - 2:  # no unit after the code and the output layer
            layers.append(hvp.Sigmoid())
    return hvp.Sequential(*layers)


def sparse_init(net, seed, nonzero=15, dtype=np.float32):
    """Martens' (2010) sparse initialization: each unit gets ``nonzero`` incoming weights ~ N(0, 1), biases 0."""
    rng = np.random.default_rng(seed)
    theta = np.zeros(net.num_params, dtype=dtype)
    for params in net.unflatten(theta):
        if "weight" in params:
            W = params["weight"]
            for unit in range(W.shape[1]):
                rows = rng.choice(W.shape[0], size=min(nonzero, W.shape[0]), replace=False)
                W[rows, unit] = rng.standard_normal(len(rows))
    return theta


def reconstruction_error(net, theta, X, chunk=2000):
    """Squared error per example summed over pixels: mean_b Σ_pixels (sigmoid(O_b) − X_b)²."""
    total = 0.0
    for start in range(0, len(X), chunk):
        recon = 1 / (1 + np.exp(-net.forward(theta, X[start:start + chunk])))
        total += float(((recon - X[start:start + chunk]) ** 2).sum())
    return total / len(X)


def race(name, opt, run_step, budget, checkpoints, net, X_train, X_test):
    """Run ``run_step()`` until ``budget`` optimizer seconds; record errors at the checkpoints."""
    rows, spent, steps = [], 0.0, 0
    marks = iter(checkpoints)
    mark = next(marks)
    while spent < budget:
        start = time.perf_counter()
        run_step()
        spent += time.perf_counter() - start
        steps += 1
        while mark is not None and spent >= mark:
            rows.append((mark, reconstruction_error(net, opt.theta, X_train),
                         reconstruction_error(net, opt.theta, X_test)))
            print(f"  {name:<10} {mark:7.1f} s  step {steps:6d}  train error {rows[-1][1]:8.3f}  "
                  f"test error {rows[-1][2]:8.3f}", flush=True)
            mark = next(marks, None)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2,000 / 1,000 images, 20 s per method")
    parser.add_argument("--n-train", type=int, default=20000)
    parser.add_argument("--n-test", type=int, default=10000)
    parser.add_argument("--budget", type=float, default=300.0, help="optimizer seconds per method")
    parser.add_argument("--curvature-batch", type=float, default=0.25,
                        help="fraction of the training set for curvature products (Martens: a mini-batch)")
    parser.add_argument("--damping", type=float, default=1.0, help="Newton-CG's initial damping λ")
    parser.add_argument("--batch", type=int, default=200, help="mini-batch size of Adam and SGD")
    parser.add_argument("--kfac-batch", type=int, default=500, help="mini-batch size of K-FAC")
    parser.add_argument("--adam-lr", type=float, default=1e-3)
    parser.add_argument("--sgd-lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="+", default=["Newton-CG", "K-FAC", "Adam", "SGD"])
    args = parser.parse_args(argv)
    if args.quick:
        args.n_train, args.n_test, args.budget = 2000, 1000, min(args.budget, 20.0)

    X_train = make_curves(args.n_train, seed=args.seed)
    X_test = make_curves(args.n_test, seed=args.seed + 1)
    net = autoencoder()
    loss = hvp.BCEWithLogitsLoss()
    theta0 = sparse_init(net, args.seed)
    checkpoints = [args.budget * f for f in (0.05, 0.1, 0.25, 0.5, 1.0)]
    print(f"CURVES-style data: {args.n_train} train, {args.n_test} test; autoencoder with "
          f"{net.num_params} parameters, float32; {args.budget:g} s per method")
    print(f"  start      train error {reconstruction_error(net, theta0, X_train):8.3f}")

    rng = np.random.default_rng(args.seed)
    tables = {}
    for name in args.methods:
        if name == "Newton-CG":
            opt = optimizers.NewtonCG(net, loss, theta0, damping=args.damping, curvature_batch=args.curvature_batch)

            def run_step(opt=opt):
                opt.step(X_train, X_train)
        elif name == "K-FAC":
            opt = optimizers.KFAC(net, loss, theta0)

            def run_step(opt=opt):
                rows = rng.choice(args.n_train, size=min(args.kfac_batch, args.n_train), replace=False)
                opt.step(X_train[rows], X_train[rows])
        elif name in ("Adam", "SGD"):
            opt = (optimizers.Adam(net, loss, theta0, lr=args.adam_lr) if name == "Adam"
                   else optimizers.SGD(net, loss, theta0, lr=args.sgd_lr, momentum=0.9))

            def run_step(opt=opt):
                rows = rng.choice(args.n_train, size=min(args.batch, args.n_train), replace=False)
                opt.step(X_train[rows], X_train[rows])
        else:
            raise SystemExit(f"unknown method {name!r}: choose from Newton-CG, K-FAC, Adam, SGD")
        tables[name] = race(name, opt, run_step, args.budget, checkpoints, net, X_train, X_test)

    print("\nsquared reconstruction error per example (train / test) after optimizer seconds")
    labels = [f"{mark:g} s" for mark in checkpoints]
    print(f"{'method':<10}" + "".join(f"{label:>20}" for label in labels))
    for name, rows in tables.items():
        print(f"{name:<10}" + "".join(f"{tr:>11.2f} / {te:6.2f}" for _, tr, te in rows))


if __name__ == "__main__":
    main()
