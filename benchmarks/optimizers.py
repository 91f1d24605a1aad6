"""Training loss and test accuracy against wall-clock time: NewtonCG, Adam, SGD, scipy's Newton-CG and trust-ncg.

scikit-learn's digits (1797 8×8 images, pixels scaled to [0, 1]; a stratified 80/20 split),
MLP 64-128-64-10 with tanh, softmax cross-entropy (mean) plus l2/2·Σ‖W‖² (``--l2``, default 1e-4:
with it the objective has minimizers; without, the training set is separable and the loss only
approaches 0 as the weights grow), float64, the same θ0 (``net.init(seed=0)``) for every method.

- NewtonCG: the full training set for the gradient and ρ, the default recipe (GGN, Martens'
  damping from λ0 = 1, preconditioner, CG's progress and forcing rules, warm start, backtracking,
  line search); the same with a rotating curvature mini-batch of 256 rows; with the exact
  Hessian as curvature; and that with at most 60 CG iterations per step instead of 250.
- Adam (a small learning-rate sweep) and SGD with momentum 0.9: mini-batches of 128, reshuffled
  every epoch.
- scipy.optimize.minimize "Newton-CG" and "trust-ncg" on ``hvp.scipy_objective`` (exact Hessian).

Every method gets the same budget of training time. The methods run side by side, one step at a
time, always advancing the one with the least training time so far (scipy's loops run in a thread
that pauses at each iteration), so that load from other processes falls on all of them alike.
Training loss and test accuracy are evaluated afterwards on snapshots of θ, untimed: the loss at
time t is that of the last θ a method reached by t. ``hvp.reuse_freed_memory()`` is on for all
(``--default-malloc`` leaves glibc's allocator as it is). The race runs ``--repeats`` times; the table
shows medians. Prints the table and writes it to benchmarks/results/optimizers_l2_<l2>.txt.

    python benchmarks/optimizers.py [--budget 20] [--repeats 3] [--threads 2] [--l2 1e-4] [--default-malloc]
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
sys.path[0:1] = [os.path.dirname(HERE), HERE]

WIDTHS = (64, 128, 64, 10)
BATCH = 128
TIE = 1e-15  # losses closer than this to the lowest count as lowest too


def digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    X = X / 16.0
    return train_test_split(X, y, test_size=0.2, random_state=0, stratify=y)


class Ours:
    """One of our optimizers, one step per call: full batch, or shuffled mini-batches."""

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

    done = False

    def close(self):
        pass


class Scipy:
    """scipy.optimize.minimize in a thread that pauses at each iteration's callback: one iteration per call."""

    def __init__(self, method, fun, jac, hessp, theta0):
        import scipy.optimize

        self.go, self.out = queue.Queue(), queue.Queue()
        self.started, self.done, self.last = False, False, theta0

        def callback(intermediate_result):
            self.out.put(intermediate_result.x.copy())
            if self.go.get() == "stop":
                raise StopIteration

        def run():
            options = {"maxiter": 10**6, **({"xtol": 1e-300} if method == "Newton-CG" else {"gtol": 0.0})}
            try:
                scipy.optimize.minimize(fun, theta0, jac=jac, hessp=hessp, method=method, callback=callback,
                                        options=options)
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


def product_fns(net, loss, theta, X, y, l2):
    """A gradient, a linearization and one hvp / ggnvp on the whole training set, as callables."""
    import hvp

    pt = hvp.linearize(net, loss, theta, X, y, l2)
    v = np.random.default_rng(0).normal(size=theta.size)
    return {"gradient": lambda: hvp.loss_and_grad(net, loss, theta, X, y, l2=l2),
            "linearize": lambda: hvp.linearize(net, loss, theta, X, y, l2),
            "hvp": lambda: pt.hvp(v), "ggnvp": lambda: pt.ggnvp(v)}


def race(runners, theta0, checkpoints):
    """Advance the runners one step at a time, always the one with the least training time so far.

    A runner's clock adds up the wall-clock time of its own steps only, so load from other
    processes falls on all methods alike. Returns, per runner, θ as of each checkpoint (the θ of
    its last step that ended by then) and its number of steps.
    """
    clocks = dict.fromkeys(runners, 0.0)
    last = dict.fromkeys(runners, theta0)
    snaps = {name: [] for name in runners}
    steps = dict.fromkeys(runners, 0)
    while True:
        active = [name for name in runners if clocks[name] < checkpoints[-1]]
        if not active:
            break
        name = min(active, key=clocks.get)
        t0 = time.perf_counter()
        theta = runners[name].step()
        clocks[name] += time.perf_counter() - t0
        if runners[name].done:  # scipy returned early: its last θ stays
            clocks[name] = checkpoints[-1]
        while len(snaps[name]) < len(checkpoints) and clocks[name] > checkpoints[len(snaps[name])]:
            snaps[name].append(last[name])
        last[name], steps[name] = theta, steps[name] + 1
    for runner in runners.values():
        runner.close()
    for name in runners:
        snaps[name] += [last[name]] * (len(checkpoints) - len(snaps[name]))
    return snaps, steps


def methods(net, loss, l2):
    """Name -> (kind, how to build or which scipy method, mini-batch size)."""
    import optimizers

    table = {
        "NewtonCG (GGN)": ("ours", lambda t: optimizers.NewtonCG(net, loss, t, l2=l2), None),
        "NewtonCG (GGN, curvature batch 256)": (
            "ours", lambda t: optimizers.NewtonCG(net, loss, t, l2=l2, curvature_batch=256), None),
        "NewtonCG (Hessian)": ("ours", lambda t: optimizers.NewtonCG(net, loss, t, l2=l2, curvature="hessian"), None),
        "NewtonCG (Hessian, CG cap 60)": (
            "ours", lambda t: optimizers.NewtonCG(net, loss, t, l2=l2, curvature="hessian", cg_max_iter=60), None),
    }
    for lr in (1e-3, 3e-3, 1e-2):
        table[f"Adam lr={lr:g}, batch {BATCH}"] = (
            "ours", lambda t, lr=lr: optimizers.Adam(net, loss, t, lr=lr, l2=l2), BATCH)
    for lr in (0.03, 0.1, 0.3):
        table[f"SGD lr={lr:g} momentum 0.9, batch {BATCH}"] = (
            "ours", lambda t, lr=lr: optimizers.SGD(net, loss, t, lr=lr, momentum=0.9, l2=l2), BATCH)
    table["scipy Newton-CG (Hessian)"] = ("scipy", "Newton-CG", None)
    table["scipy trust-ncg (Hessian)"] = ("scipy", "trust-ncg", None)
    return table


def main():
    import common
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=20.0, help="seconds of training per method (default 20)")
    parser.add_argument("--repeats", type=int, default=3, help="races (default 3; 0: only time the products)")
    parser.add_argument("--threads", type=int, default=2, help="BLAS threads (default 2)")
    parser.add_argument("--l2", type=float, default=1e-4, help="weight of l2/2·Σ‖W‖² in the objective (default 1e-4)")
    common.add_memory_option(parser)
    args = parser.parse_args()
    memory = common.apply_memory_option(args)
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(args.threads)
    except ImportError:
        pass

    import hvp

    Xtr, Xte, ytr, yte = digits()
    net, loss = common.mlp(WIDTHS), hvp.CrossEntropyLoss()
    theta0 = net.init(seed=0)
    products = common.median_seconds(product_fns(net, loss, theta0, Xtr, ytr, args.l2), repeats=20)
    products = "on the whole training set at θ0, median ms: " + ", ".join(
        f"{name} {1e3 * seconds:.2f}" for name, seconds in products.items())
    print(products, flush=True)
    if args.repeats == 0:
        return
    checkpoints = [args.budget * f for f in (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1)]
    table = methods(net, loss, args.l2)
    losses = {name: [] for name in table}
    accuracies = {name: [] for name in table}
    steps = {name: [] for name in table}
    for repeat in range(args.repeats):
        runners = {}
        for name, (kind, how, minibatch) in table.items():
            if kind == "ours":
                runners[name] = Ours(how(theta0), Xtr, ytr, minibatch, seed=repeat)
            else:
                fun, jac, hessp = hvp.scipy_objective(net, loss, Xtr, ytr, l2=args.l2)
                runners[name] = Scipy(how, fun, jac, hessp, theta0)
        snaps, n = race(runners, theta0, checkpoints)
        for name in table:
            losses[name].append([hvp.loss_and_grad(net, loss, t, Xtr, ytr, l2=args.l2)[0] for t in snaps[name]])
            accuracies[name].append(float(np.mean(np.argmax(net.forward(snaps[name][-1], Xte), axis=1) == yte)))
            steps[name].append(n[name])
            print(f"repeat {repeat + 1}/{args.repeats}  {name:<40} loss {losses[name][-1][-1]:.4e}  "
                  f"test acc {accuracies[name][-1]:.4f}  steps {n[name]}", flush=True)

    lines = [f"machine: {common.cpu_name()}, {os.cpu_count()} cores, {args.threads} BLAS threads; "
             f"numpy {np.__version__}; {memory}",
             f"digits: {len(ytr)} train / {len(yte)} test; MLP {'-'.join(map(str, WIDTHS))} tanh, P = "
             f"{net.num_params}, cross-entropy + {args.l2:g}/2·Σ‖W‖², float64; medians of {args.repeats} runs",
             products,
             "",
             "training loss (objective, full training set) at training time t; test accuracy and steps at the end",
             ""]
    header = f"{'method':<42}" + "".join(f"{f't={c:g} s':>13}" for c in checkpoints) + f"{'test acc':>10}{'steps':>8}"
    lines += [header, "-" * len(header)]
    medians = {name: np.median(np.array(losses[name]), axis=0) for name in table}
    best = {i: min(m[i] for m in medians.values()) + TIE for i in range(len(checkpoints))}
    for name in table:
        row = f"{name:<42}"
        for i, value in enumerate(medians[name]):
            row += f"{value:>12.4e}" + ("*" if value <= best[i] else " ")
        row += f"{np.median(accuracies[name]):>10.4f}{int(np.median(steps[name])):>8d}"
        lines.append(row)
    lines += ["", f"* lowest training loss at that time (ties: within {TIE:g}, zero to float64 rounding)"]
    text = "\n".join(lines)
    print("\n" + text)
    out = os.path.join(HERE, "results")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"optimizers_l2_{args.l2:g}.txt"), "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
