"""Training loss against wall-clock time on a problem set: our second-order methods against what users run.

Problems (``--problem``):

- ``digits``: scikit-learn's digits (1797 8×8 images, pixels in [0, 1], a stratified 80/20 split),
  MLP 64-128-64-10 tanh, softmax cross-entropy (mean) + l2/2·Σ‖W‖², l2 = 1e-4, float64.
- ``friedman``: regression on scikit-learn's generated Friedman #1 data (2000 points, 10 features,
  noise 1, target standardized; 1600 train / 400 test), MLP 10-64-64-1 tanh, MSE + 1e-4/2·Σ‖W‖², float64.
- ``curves``: the CURVES deep autoencoder of examples/curves_autoencoder.py (784-400-200-100-50-25-6
  and its mirror, logistic units, BCE on logits, Martens' sparse initialization; 20,000 training
  images from examples/curves_data.py), float32, no L2.

Methods: scipy's L-BFGS-B on ``hvp.loss_and_grad`` (what scikit-learn's ``MLPClassifier(solver="lbfgs")``
runs; full batch, on the full-batch problems), scipy's trust-ncg on the exact Hessian, ``optimizers.KFAC``
(full batch), ``optimizers.NewtonCG`` (GGN at its defaults — K-FAC preconditioner, λ0 from the curvature —
and as it was before them — Martens' diagonal preconditioner, λ0 = 1 — and the exact Hessian), Adam
over a learning-rate sweep and SGD with momentum 0.9, both on shuffled mini-batches.
Every method runs at its defaults unless the row says otherwise, from the same θ0.

The methods run side by side, one step at a time, always advancing the one with the least training time
so far (scipy's loops run in a thread that pauses at each iteration), so that load from other processes
falls on all of them alike. The loss is evaluated afterwards on snapshots of θ, untimed: the loss at time
t is that of the last θ a method reached by t. The race runs ``--repeats`` times; the table shows medians,
and "reaches" the median time at which a method first reached L-BFGS-B's final loss.

    python benchmarks/optimizers.py [--problem digits|friedman|curves] [--budget S] [--repeats 3] [--threads 1]
"""

import argparse
import os
import queue
import sys
import threading
import time

import numpy as np

# This script shares its name with the package it benchmarks: import packages from the repository
# root first (Python puts this folder first on the path), and this folder's common.py after it.
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[0:1] = [ROOT, HERE, os.path.join(ROOT, "examples")]

TIE = 1e-15  # losses closer than this to the lowest count as lowest too
CHECKPOINTS = (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1)
GRID = 128  # θ is kept at 129 evenly spaced times (a problem may ask for fewer): checkpoints and "reaches"


# -- problems ------------------------------------------------------------------


def digits_problem():
    import common
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    import hvp

    X, y = load_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X / 16.0, y, test_size=0.2, random_state=0, stratify=y)
    net = common.mlp((64, 128, 64, 10))
    return dict(net=net, loss=hvp.CrossEntropyLoss(), train=(Xtr, ytr), test=(Xte, yte), l2=1e-4,
                theta0=net.init(seed=0), batch=128, budget=20.0, full_batch=True,
                adam=(1e-3, 3e-3, 1e-2), sgd=(0.1, 0.3),
                describe=f"digits {len(ytr)} train / {len(yte)} test; MLP 64-128-64-10 tanh, cross-entropy "
                         "+ 1e-4/2·Σ‖W‖², float64")


def friedman_problem():
    import common
    from sklearn.datasets import make_friedman1

    import hvp

    X, y = make_friedman1(n_samples=2000, n_features=10, noise=1.0, random_state=0)
    y = ((y - y.mean()) / y.std())[:, None]
    net = common.mlp((10, 64, 64, 1))
    return dict(net=net, loss=hvp.MSELoss(), train=(X[:1600], y[:1600]), test=(X[1600:], y[1600:]), l2=1e-4,
                theta0=net.init(seed=0), batch=128, budget=20.0, full_batch=True,
                adam=(1e-3, 3e-3, 1e-2), sgd=(0.01, 0.03),
                describe="Friedman #1 regression, 1600 train / 400 test; MLP 10-64-64-1 tanh, MSE "
                         "+ 1e-4/2·Σ‖W‖², float64")


def curves_problem():
    from curves_autoencoder import autoencoder, sparse_init
    from curves_data import make_curves

    import hvp

    X = make_curves(20000, seed=0)
    Xte = make_curves(2000, seed=1)
    net = autoencoder()
    return dict(net=net, loss=hvp.BCEWithLogitsLoss(), train=(X, X), test=(Xte, Xte), l2=0.0,
                theta0=sparse_init(net, 0), batch=200, kfac_batch=500, budget=300.0, full_batch=False, grid=32,
                adam=(3e-4, 1e-3, 3e-3), sgd=(0.1,),
                describe=f"CURVES autoencoder, {net.num_params} parameters, 20,000 train images, BCE, float32")


PROBLEMS = {"digits": digits_problem, "friedman": friedman_problem, "curves": curves_problem}


# -- runners: one step per call ---------------------------------------------------


class Ours:
    """One of our optimizers: full batch, or shuffled mini-batches of ``minibatch`` rows."""

    done = False

    def __init__(self, opt, X, y, minibatch, seed):
        self.opt, self.X, self.y, self.minibatch = opt, X, y, minibatch
        self.rng, self.queue = np.random.default_rng(seed), []

    def step(self):
        if self.minibatch is None:
            self.opt.step(self.X, self.y)
        else:
            if not self.queue:
                order = self.rng.permutation(len(self.y))
                self.queue = [order[i:i + self.minibatch] for i in range(0, len(order), self.minibatch)]
            rows = self.queue.pop(0)
            self.opt.step(self.X[rows], self.y[rows])
        return self.opt.theta  # replaced, never written into, by every step

    def close(self):
        pass


class Scipy:
    """scipy.optimize.minimize in a thread that pauses at each iteration's callback: one iteration per call."""

    def __init__(self, method, theta0, **kwargs):
        import scipy.optimize

        self.go, self.out = queue.Queue(), queue.Queue()
        self.started, self.done, self.last = False, False, theta0

        def callback(intermediate_result):
            self.out.put(np.asarray(intermediate_result.x, dtype=theta0.dtype).copy())
            if self.go.get() == "stop":
                raise StopIteration

        def run():
            options = {"maxiter": 10**6, **({"ftol": 0.0, "gtol": 0.0} if method == "L-BFGS-B" else {"gtol": 0.0})}
            try:
                scipy.optimize.minimize(x0=theta0.astype(np.float64), method=method, callback=callback,
                                        options=options, **kwargs)
            finally:
                self.out.put(None)  # scipy returned (converged, or stopped)

        self.thread = threading.Thread(target=run, daemon=True)

    def step(self):
        if self.started:
            self.go.put("go")
        else:
            self.started = True
            self.thread.start()
        x = self.out.get()
        if x is None:
            self.done = True
        else:
            self.last = x
        return self.last

    def close(self):
        if self.started and not self.done:
            self.go.put("stop")
            self.thread.join()


def methods(p):
    """Name -> a function building a fresh runner for problem p."""
    import hvp
    import optimizers

    net, loss, l2, (X, y), theta0 = p["net"], p["loss"], p["l2"], p["train"], p["theta0"]

    def ours(make, minibatch=None):
        return lambda seed: Ours(make(theta0), X, y, minibatch, seed)

    def loss_and_grad(theta):
        value, grad = hvp.loss_and_grad(net, loss, theta.astype(theta0.dtype), X, y, l2=l2)
        return value, grad.astype(np.float64)

    table = {}
    if p["full_batch"]:
        table["scipy L-BFGS-B"] = lambda seed: Scipy("L-BFGS-B", theta0, fun=loss_and_grad, jac=True)
        table["KFAC"] = ours(lambda t: optimizers.KFAC(net, loss, t, l2=l2))
    else:
        table[f"KFAC, batch {p['kfac_batch']}"] = ours(lambda t: optimizers.KFAC(net, loss, t, l2=l2), p["kfac_batch"])
    table["NewtonCG (GGN)"] = ours(lambda t: optimizers.NewtonCG(net, loss, t, l2=l2))
    table["NewtonCG (GGN, diagonal preconditioner, λ0 = 1)"] = ours(
        lambda t: optimizers.NewtonCG(net, loss, t, l2=l2, precondition="diag", damping=1.0))
    if p["full_batch"]:
        table["NewtonCG (Hessian)"] = ours(lambda t: optimizers.NewtonCG(net, loss, t, l2=l2, curvature="hessian"))
        fun, jac, hessp = hvp.scipy_objective(net, loss, X, y, l2=l2)
        table["scipy trust-ncg (Hessian)"] = lambda seed: Scipy("trust-ncg", theta0, fun=fun, jac=jac, hessp=hessp)
    for lr in p["adam"]:
        table[f"Adam lr={lr:g}, batch {p['batch']}"] = ours(
            lambda t, lr=lr: optimizers.Adam(net, loss, t, lr=lr, l2=l2), p["batch"])
    for lr in p["sgd"]:
        table[f"SGD lr={lr:g} momentum 0.9, batch {p['batch']}"] = ours(
            lambda t, lr=lr: optimizers.SGD(net, loss, t, lr=lr, momentum=0.9, l2=l2), p["batch"])
    return table


# -- the race -------------------------------------------------------------------------


def race(runners, theta0, budget, points=None):
    """Advance the runners one step at a time, always the one with the least training time so far.

    Returns the times ``budget·i/points`` (i = 0 … points), per runner θ as of each of them (the θ of
    its last step that ended by then), and its number of steps. Only the steps themselves are timed.
    """
    points = points or GRID
    grid = budget * np.arange(points + 1) / points
    clocks = dict.fromkeys(runners, 0.0)
    last = dict.fromkeys(runners, theta0)
    snaps = {name: [theta0] for name in runners}  # θ at grid[0] = 0
    steps = dict.fromkeys(runners, 0)
    while True:
        active = [name for name in runners if clocks[name] < budget and not runners[name].done]
        if not active:
            break
        name = min(active, key=clocks.get)
        t0 = time.perf_counter()
        theta = runners[name].step()
        clocks[name] += time.perf_counter() - t0
        while len(snaps[name]) <= points and clocks[name] > grid[len(snaps[name])]:
            snaps[name].append(last[name])
        last[name], steps[name] = theta, steps[name] + 1
    for runner in runners.values():
        runner.close()
    for name in runners:
        snaps[name] += [last[name]] * (points + 1 - len(snaps[name]))
    return grid, snaps, steps


def main():
    import common

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problem", choices=sorted(PROBLEMS), default="digits")
    parser.add_argument("--budget", type=float, help="seconds of training per method (default: 20, curves 300)")
    parser.add_argument("--repeats", type=int, default=3, help="races (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="BLAS threads (default 1)")
    parser.add_argument("--methods", nargs="+", help="only the methods whose names start with these")
    common.add_memory_option(parser)
    args = parser.parse_args()
    memory = common.apply_memory_option(args)
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(args.threads)
    except ImportError:
        pass
    import hvp

    p = PROBLEMS[args.problem]()
    budget = args.budget or p["budget"]
    net, loss, l2, (X, y) = p["net"], p["loss"], p["l2"], p["train"]

    def objective(theta):
        return hvp.loss_and_grad(net, loss, np.asarray(theta, dtype=p["theta0"].dtype), X, y, l2=l2)[0]

    table = methods(p)
    if args.methods:
        table = {name: make for name, make in table.items() if any(name.startswith(m) for m in args.methods)}
    checkpoints = [budget * c for c in CHECKPOINTS]
    losses = {name: [] for name in table}
    reaches = {name: [] for name in table}
    steps = {name: [] for name in table}
    for repeat in range(args.repeats):
        runners = {name: make(repeat) for name, make in table.items()}
        points = p.get("grid", GRID)
        grid, snaps, n = race(runners, p["theta0"], budget, points)
        curves = {name: [objective(theta) for theta in thetas] for name, thetas in snaps.items()}
        marks = [int(round(c * points)) for c in CHECKPOINTS]
        final = curves["scipy L-BFGS-B"][-1] if "scipy L-BFGS-B" in curves else None
        for name, curve in curves.items():
            losses[name].append([curve[i] for i in marks])
            steps[name].append(n[name])
            if final is not None:
                reached = [t for t, value in zip(grid, curve) if value <= final]
                reaches[name].append(reached[0] if reached else np.inf)
            print(f"repeat {repeat + 1}/{args.repeats}  {name:<44} loss {curve[-1]:.5e}  steps {n[name]}",
                  flush=True)

    medians = {name: np.median(np.array(losses[name]), axis=0) for name in table}
    lines = [f"machine: {common.cpu_name()}, {os.cpu_count()} cores, {args.threads} BLAS threads; "
             f"numpy {np.__version__}; {memory}",
             f"{p['describe']}; {budget:g} s per method; medians of {args.repeats} races",
             "", "training loss (the objective on the whole training set) after t seconds of training", ""]
    header = (f"{'method':<46}" + "".join(f"{f't={c:g} s':>13}" for c in checkpoints)
              + (f"{'reaches':>10}" if any(reaches.values()) else "") + f"{'steps':>8}")
    lines += [header, "-" * len(header)]
    best = [min(m[i] for m in medians.values()) + TIE for i in range(len(checkpoints))]
    for name in table:
        row = f"{name:<46}" + "".join(f"{v:>12.5e}" + ("*" if v <= best[i] else " ")
                                      for i, v in enumerate(medians[name]))
        if reaches[name]:
            reach = float(np.median(reaches[name]))
            row += f"{reach:>9.2f}s" if np.isfinite(reach) else f"{'never':>10}"
        lines.append(row + f"{int(np.median(steps[name])):>8d}")
    lines += ["", f"* lowest training loss at that time (ties: within {TIE:g})"]
    if any(reaches.values()):
        lines.append(f"reaches: the median training time at which a method first reached L-BFGS-B's final loss "
                     f"(to within {budget / p.get('grid', GRID):.2g} s)")
    text = "\n".join(lines)
    print("\n" + text)
    out = os.path.join(HERE, "results")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"optimizers_{args.problem}.txt"), "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
