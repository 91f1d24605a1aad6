"""Train an MLP on scikit-learn's digits with Newton-CG (Hessian-free) and with Adam.

Both start from the same θ; training loss is recorded against optimizer seconds (the time
spent evaluating the curves is not counted). Prints progress, a final table of train and test
loss and accuracy, and saves a loss-against-seconds plot.

    python examples/newton_cg_digits.py [--hidden 128 64] [--curvature ggn] [--output digits.png]
"""

import argparse

import numpy as np

import hvp
import optimizers

ACTIVATIONS = {"tanh": hvp.Tanh, "relu": hvp.ReLU, "sigmoid": hvp.Sigmoid, "softplus": hvp.Softplus,
               "elu": hvp.ELU}


def load_digits_split(seed, test_fraction=0.2):
    """Digits (1797 8×8 images, scaled to [0, 1]) split at random into train and test."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(y))
    X, y = X[order] / 16.0, y[order]
    n_test = int(round(test_fraction * len(y)))
    return X[n_test:], y[n_test:], X[:n_test], y[:n_test]


def mlp(widths, activation):
    layers = []
    for i, (m, n) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(hvp.Linear(m, n))
        if i < len(widths) - 2:
            layers.append(ACTIVATIONS[activation]())
    return hvp.Sequential(*layers)


def evaluate(net, loss, theta, X, y):
    """(mean cross-entropy, accuracy) of θ on (X, y)."""
    outputs = net.forward(theta, X)
    value, _ = loss.forward(outputs, y)
    return value, float(np.mean(outputs.argmax(axis=1) == y))


def train_newton_cg(net, loss, theta0, X, y, args):
    opt = optimizers.NewtonCG(net, loss, theta0, curvature=args.curvature, l2=args.l2,
                              curvature_batch=args.curvature_batch, cg_max_iter=args.cg_max_iter)
    curve = [(0.0, evaluate(net, loss, theta0, X, y)[0])]

    def record(result):
        seconds = curve[-1][0] + result.seconds
        curve.append((seconds, evaluate(net, loss, result.x, X, y)[0]))
        if result.step % 5 == 0 or result.step == args.newton_iters - 1:
            print(f"  Newton-CG step {result.step:3d}  {seconds:6.2f} s  train loss {curve[-1][1]:.5f}  "
                  f"λ {result.damping:.2e}  CG iterations {result.cg_iters:3d}  accepted {result.accepted}")

    opt.minimize((X, y), max_iters=args.newton_iters, gtol=0.0, callback=record)
    return opt.theta, curve


def train_adam(net, loss, theta0, X, y, args):
    opt = optimizers.Adam(net, loss, theta0, lr=args.adam_lr, l2=args.l2)
    rng = np.random.default_rng(args.seed)
    curve = [(0.0, evaluate(net, loss, theta0, X, y)[0])]
    for epoch in range(args.adam_epochs):
        order = rng.permutation(len(y))
        batches = [(X[order[i:i + args.batch]], y[order[i:i + args.batch]]) for i in range(0, len(y), args.batch)]
        result = opt.minimize(batches, max_iters=len(batches), gtol=0.0)
        seconds = curve[-1][0] + sum(r["seconds"] for r in result.history)
        curve.append((seconds, evaluate(net, loss, opt.theta, X, y)[0]))
        if epoch % 25 == 0 or epoch == args.adam_epochs - 1:
            print(f"  Adam epoch {epoch:4d}  {seconds:6.2f} s  train loss {curve[-1][1]:.5f}")
    return opt.theta, curve


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
    ax.set_xlabel("optimizer seconds")
    ax.set_ylabel("training loss (cross-entropy)")
    ax.set_title("MLP on scikit-learn digits")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"saved {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, nargs="+", default=[128, 64], help="hidden widths (default 128 64)")
    parser.add_argument("--activation", choices=sorted(ACTIVATIONS), default="tanh")
    parser.add_argument("--curvature", choices=["ggn", "hessian"], default="ggn")
    parser.add_argument("--newton-iters", type=int, default=60, help="Newton-CG steps (default 60)")
    parser.add_argument("--cg-max-iter", type=int, default=100, help="CG iterations per step at most")
    parser.add_argument("--curvature-batch", type=float, default=0.25,
                        help="fraction of the training set for curvature products (default 0.25)")
    parser.add_argument("--adam-epochs", type=int, default=200, help="Adam epochs (default 200)")
    parser.add_argument("--adam-lr", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=64, help="Adam mini-batch size")
    parser.add_argument("--l2", type=float, default=1e-4, help="L2 penalty on weights")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="newton_cg_digits.png", help="path of the plot (PNG)")
    args = parser.parse_args(argv)
    hvp.reuse_freed_memory()  # keep freed arrays for reuse: about 2× on full-batch products here

    X_train, y_train, X_test, y_test = load_digits_split(args.seed)
    net = mlp([X_train.shape[1], *args.hidden, 10], args.activation)
    loss = hvp.CrossEntropyLoss()
    theta0 = net.init(seed=args.seed)
    print(f"digits: {len(y_train)} train, {len(y_test)} test; {net}; {net.num_params} parameters")

    results, curves = {}, {}
    for name, train in (("Newton-CG", train_newton_cg), ("Adam", train_adam)):
        print(f"{name}:")
        results[name], curves[name] = train(net, loss, theta0, X_train, y_train, args)

    print(f"\n{'method':<10}{'seconds':>9}{'train loss':>12}{'train acc':>11}{'test loss':>11}{'test acc':>10}")
    for name, theta in results.items():
        train_loss, train_acc = evaluate(net, loss, theta, X_train, y_train)
        test_loss, test_acc = evaluate(net, loss, theta, X_test, y_test)
        print(f"{name:<10}{curves[name][-1][0]:>9.2f}{train_loss:>12.5f}{train_acc:>11.4f}{test_loss:>11.5f}"
              f"{test_acc:>10.4f}")
    if args.output:
        plot(curves, args.output)


if __name__ == "__main__":
    main()
