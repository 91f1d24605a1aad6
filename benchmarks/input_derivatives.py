"""Time losses on input tangents against the gradient, and against PyTorch on the identical problem.

MLP 784-512-256-10 with tanh, batch 256, cross-entropy (mean) + 0.1 × Jacobian penalty along
k random directions, shared by all examples or given per example (the same directions
repeated, so only the layout differs). PyTorch: ``torch.func.grad`` of the loss with its
tangents from ``torch.func.jvp`` (one per direction). Medians, timed side by side in
this one run, library by library (``common.rounds``). On a loaded machine use
``--threads 1 --cpu-time`` (CPU time of this process).

    python benchmarks/input_derivatives.py [--repeats 21] [--threads 2] [--dtype float64] [--cpu-time]
        [--reuse-freed-memory]
"""

import argparse
import os
import time

import common
import numpy as np
from common import BATCH, WIDTHS

PENALTY = 0.1


def ours(dtype, directions):
    import hvp

    net, theta, X, y = common.problem(dtype)
    ce = hvp.CrossEntropyLoss()
    penalty = hvp.JacobianPenalty(ce, PENALTY)
    fns = {"gradient": lambda: hvp.loss_and_grad(net, ce, theta, X, y)}
    for k, D in directions.items():
        per_example = np.broadcast_to(D, (BATCH,) + D.shape).copy()
        fns[f"input_jvp k={k}"] = lambda D=D: hvp.input_jvp(net, theta, X, D)
        fns[f"tangent_loss_and_grad k={k}"] = lambda D=D: hvp.tangent_loss_and_grad(net, penalty, theta, X, y, D)
        fns[f"  same, per-example k={k}"] = lambda D=per_example: hvp.tangent_loss_and_grad(
            net, penalty, theta, X, y, D)
        fns[f"tangent_sum_grad_squared k={k}"] = lambda D=D: hvp.tangent_sum_grad_squared(
            net, penalty, theta, X, y, D)
    return net, theta, X, y, penalty, fns


def torch_fns(net, theta, X, y, directions, threads):
    try:
        import torch
    except ImportError:
        return {}, None
    torch.set_num_threads(threads)
    params = [torch.tensor(a) for p in net.unflatten(theta) for a in p.values()]
    Xt, yt = torch.tensor(X), torch.tensor(y)

    def forward(params, x):
        h = x
        for i in range(0, len(params), 2):
            h = h @ params[i] + params[i + 1]
            if i + 2 < len(params):
                h = torch.tanh(h)
        return h

    def loss(params, D):
        dO = torch.stack([torch.func.jvp(lambda x: forward(params, x), (Xt,), (d.expand_as(Xt),))[1] for d in D])
        return torch.nn.functional.cross_entropy(forward(params, Xt), yt) + PENALTY * (dO ** 2).sum() / len(Xt)

    def grad():
        ps = [p.clone().requires_grad_() for p in params]
        return torch.autograd.grad(torch.nn.functional.cross_entropy(forward(ps, Xt), yt), ps)

    tangent_grad = torch.func.grad(loss)
    fns = {"gradient": grad}
    for k, D in directions.items():
        Dt = torch.tensor(D)
        fns[f"tangent_loss_and_grad k={k}"] = lambda Dt=Dt: tangent_grad(params, Dt)
    first = min(directions)
    check = torch.cat([g.reshape(-1) for g in tangent_grad(params, torch.tensor(directions[first]))]).numpy()
    return fns, (first, check)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--threads", type=int, default=2, help="torch threads; set BLAS threads by environment")
    parser.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    parser.add_argument("--cpu-time", action="store_true", help="time.process_time instead of wall time")
    common.add_memory_option(parser)
    args = parser.parse_args()
    memory = common.apply_memory_option(args)
    dtype = np.dtype(args.dtype).type
    rng = np.random.default_rng(1)
    directions = {k: rng.normal(size=(k, WIDTHS[0])).astype(dtype) for k in (1, 4)}
    net, theta, X, y, penalty, fns = ours(dtype, directions)
    peer, check = torch_fns(net, theta, X, y, directions, args.threads)
    if check is not None:
        import hvp

        k, theirs = check
        mine = hvp.tangent_loss_and_grad(net, penalty, theta, X, y, directions[k])[1]
        print(f"max |hvp − PyTorch| of the k={k} gradient: {np.abs(mine - theirs).max():.2e} "
              f"(largest entry {np.abs(theirs).max():.2e})")
    all_fns = {("hvp", key): fn for key, fn in fns.items()}
    all_fns.update({("PyTorch", key): fn for key, fn in peer.items()})
    times = common.median_seconds(all_fns, args.repeats,
                                  clock=time.process_time if args.cpu_time else time.perf_counter)
    mine = {key: t for (who, key), t in times.items() if who == "hvp"}
    theirs = {key: t for (who, key), t in times.items() if who == "PyTorch"}
    print(f"{common.cpu_name()}, {os.cpu_count()} cores, {memory}, "
          f"MLP {'-'.join(map(str, WIDTHS))} tanh, batch {BATCH}, {args.dtype}, "
          f"cross-entropy + {PENALTY} Jacobian penalty; medians of {args.repeats} "
          f"({'CPU' if args.cpu_time else 'wall'} time)")
    print(f"{'quantity':<32}{'hvp ms':>9}{'÷ grad':>8}{'PyTorch ms':>12}{'÷ its grad':>12}{'hvp ÷ PyTorch':>15}")
    for key, t in mine.items():
        row = f"{key:<32}{1e3 * t:>9.2f}{t / mine['gradient']:>8.2f}"
        if key in theirs:
            row += f"{1e3 * theirs[key]:>12.2f}{theirs[key] / theirs['gradient']:>12.2f}{t / theirs[key]:>15.2f}"
        print(row)


if __name__ == "__main__":
    main()
