"""Does hvp's speed depend on the C library's allocator? Each quantity timed with glibc's defaults and with
``hvp.reuse_freed_memory()``.

Every (problem, quantity, setting) runs in a fresh process that times only that quantity: the harshest
case for glibc's defaults, which return freed blocks to the system once the top of the heap holds more
than twice the largest block freed so far, so that the next call faults them back in a page at a time.
Prints medians, their ratio (default ÷ reuse) and the minor page faults per call under each setting.

Problems: the MLP 784-512-256-10 (tanh) of products.py at batch 256 and 32, float32; the digits MLP
64-128-64-10 of examples/train_digits.py on its 1,437 training rows, float64; a LeNet-like CNN on
1×28×28, batch 128, float32 (conv.py's).

    python benchmarks/allocator.py [--repeats 20] [--threads 2] [--problems mlp mlp32 digits lenet]
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import common
import numpy as np

QUANTITIES = ("gradient", "linearize", "linearize + hvp", "hvp", "ggnvp", "hvp (P, 8) block", "jvp", "vjp",
              "sum_grad_squared", "variance", "batch_l2", "diag_ggn", "diag_ggn_mc", "diag_hessian",
              "kfac factors", "HessianOperator matvec", "trace (8 products)", "input_jvp (4 directions)",
              "tangent_loss_and_grad (4)")


def problem(name):
    """net, θ, X, y for a problem name."""
    import hvp

    rng = np.random.default_rng(0)
    if name in ("mlp", "mlp32"):
        net, theta, X, y = common.problem(np.float32)
        return (net, theta, X, y) if name == "mlp" else (net, theta, X[:32], y[:32])
    if name == "digits":
        net = common.mlp((64, 128, 64, 10))
        X, y = rng.random((1437, 64)) * 16, rng.integers(0, 10, 1437)
        return net, net.init(seed=0), X, y
    if name == "lenet":
        net = hvp.Sequential(hvp.Conv2d(1, 6, 5, padding=2), hvp.ReLU(), hvp.MaxPool2d(2), hvp.Conv2d(6, 16, 5),
                             hvp.ReLU(), hvp.MaxPool2d(2), hvp.Flatten(), hvp.Linear(400, 120), hvp.ReLU(),
                             hvp.Linear(120, 84), hvp.ReLU(), hvp.Linear(84, 10))
        X = rng.normal(size=(128, 1, 28, 28)).astype(np.float32)
        return net, net.init(seed=0, dtype=np.float32), X, rng.integers(0, 10, 128)
    raise ValueError(f"unknown problem {name!r}")


def quantity(name, net, theta, X, y):
    """A function of no arguments computing the quantity ``name``."""
    import hvp
    from hvp import curvature

    loss = hvp.CrossEntropyLoss()
    rng = np.random.default_rng(1)
    v = rng.normal(size=net.num_params).astype(theta.dtype)
    V = rng.normal(size=(net.num_params, 8)).astype(theta.dtype)
    u = rng.normal(size=(len(y), 10)).astype(theta.dtype)
    pt = hvp.linearize(net, loss, theta, X, y)
    fresh = {"sum_grad_squared", "variance", "batch_l2", "diag_ggn", "diag_ggn_mc", "diag_hessian"}
    if name in fresh:  # timed with their linearization, as a BackPACK extension with its forward and backward
        return lambda: getattr(hvp.linearize(net, loss, theta, X, y), name)()
    directions = rng.normal(size=(4,) + X.shape[1:]).astype(theta.dtype)  # 4 input directions shared by all rows
    penalty = hvp.JacobianPenalty(loss, 0.1)
    halves = [(X[:len(y) // 2], y[:len(y) // 2]), (X[len(y) // 2:], y[len(y) // 2:])]
    op = hvp.HessianOperator(net, loss, theta, halves)
    return {
        "gradient": lambda: hvp.loss_and_grad(net, loss, theta, X, y),
        "linearize": lambda: hvp.linearize(net, loss, theta, X, y),
        "linearize + hvp": lambda: hvp.linearize(net, loss, theta, X, y).hvp(v),
        "hvp": lambda: pt.hvp(v),
        "ggnvp": lambda: pt.ggnvp(v),
        "hvp (P, 8) block": lambda: pt.hvp(V),
        "jvp": lambda: pt.jvp(v),
        "vjp": lambda: pt.vjp(u),
        "kfac factors": lambda: hvp.linearize(net, loss, theta, X, y).kronecker_factors(),
        "HessianOperator matvec": lambda: op.matvec(v),
        "trace (8 products)": lambda: curvature.trace(op, num_matvecs=8, block_size=8),
        "input_jvp (4 directions)": lambda: hvp.input_jvp(net, theta, X, directions),
        "tangent_loss_and_grad (4)": lambda: hvp.tangent_loss_and_grad(net, penalty, theta, X, y, directions),
    }[name]


def child(args):
    """Time one quantity in this fresh process; print JSON."""
    import hvp

    if args.setting == "reuse":
        hvp.reuse_freed_memory()
    fn = quantity(args.quantity, *problem(args.problem))
    for _ in range(3):
        fn()
    times = []
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(args.repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    print(json.dumps({"seconds": float(np.median(times)), "faults": faults / args.repeats}))


def run(problem_name, name, setting, args):
    command = [sys.executable, __file__, "--child", "--problem", problem_name, "--quantity", name,
               "--setting", setting, "--repeats", str(args.repeats)]
    env = {key: value for key, value in os.environ.items() if not key.startswith("MALLOC_")}  # glibc's defaults
    env["OPENBLAS_NUM_THREADS"] = str(args.threads)
    out = subprocess.run(command, capture_output=True, text=True, env=env, check=True).stdout
    return json.loads(out.splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2, help="BLAS threads (default 2)")
    parser.add_argument("--problems", nargs="+", default=["mlp", "mlp32", "digits", "lenet"])
    parser.add_argument("--quantities", nargs="+", default=list(QUANTITIES))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--problem", help=argparse.SUPPRESS)
    parser.add_argument("--quantity", help=argparse.SUPPRESS)
    parser.add_argument("--setting", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    print(f"machine: {common.cpu_name()}, {os.cpu_count()} cores; numpy {np.__version__}; {args.threads} BLAS "
          f"threads; medians of {args.repeats} calls, each (problem, quantity, setting) in a fresh process")
    worst = 0.0
    for problem_name in args.problems:
        print(f"\n{problem_name:<24}{'default ms':>11}{'reuse ms':>10}{'ratio':>7}{'faults/call':>13}{'(reuse)':>9}")
        for name in args.quantities:
            default, reuse = run(problem_name, name, "default", args), run(problem_name, name, "reuse", args)
            ratio = default["seconds"] / reuse["seconds"]
            worst = max(worst, ratio)
            print(f"{name:<24}{1e3 * default['seconds']:>11.2f}{1e3 * reuse['seconds']:>10.2f}{ratio:>7.2f}"
                  f"{default['faults']:>13.0f}{reuse['faults']:>9.0f}", flush=True)
    print(f"\nworst ratio default ÷ reuse: {worst:.2f}")


if __name__ == "__main__":
    main()
