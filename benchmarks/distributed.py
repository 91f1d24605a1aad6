"""Curvature products and Newton-CG steps on a Dask cluster: 1 against 2 worker processes on this machine.

Problem: the CURVES autoencoder of examples/curves_autoencoder.py (784-400-200-100-50-25-6 and its mirror,
P = 842,340 parameters, float32, BCE on logits, Martens' sparse initialization) on 20,000 CURVES images in 4
shards of 5,000, each made on a worker by a loader (the images never pass through this process).

For each cluster (``LocalCluster``, processes, one thread each; workers get one BLAS thread, Dask's default):

- ``linearize``: building ``hvp.distributed.GGNOperator`` (θ sent to every worker, the shards linearized there);
- ``GGN product``: one ``G v``, median of ``--repeats``, split into compute (the slowest worker's task),
  serialization (pickling v and the partial products that cross this process: 2·W vectors of P numbers,
  timed here) and the rest, communication and scheduling;
- ``Newton-CG step``: the first step of ``optimizers.NewtonCG`` at its defaults from θ0, median of 3 (gradient,
  loss, ρ, line search, K-FAC factors and curvature products on the workers; the factors' eigendecompositions
  and CG's vector work here).

For reference, the same on one process without Dask (``hvp.GGNOperator`` and ``NewtonCG.step(X, y)``) with 1
and 2 BLAS threads. Then the cost model of the README with the measured figures.

    python benchmarks/distributed.py [--repeats 5] [--examples 20000]
"""

import argparse
import os
import pickle
import sys
import time

# This script shares its name with Dask's package "distributed": put this folder after site-packages,
# so that "import distributed" finds Dask's, and the repository and examples first.
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[0:1] = [ROOT, os.path.join(ROOT, "examples")]
sys.path.append(HERE)

import numpy as np  # noqa: E402

SHARDS = 4


def load_shard(args):
    """A worker's loader: CURVES images (seeded by the shard), autoencoder targets = inputs."""
    from curves_data import make_curves

    n, seed = args
    X = make_curves(n, seed=seed)
    return X, X.copy()


def problem():
    from curves_autoencoder import autoencoder, sparse_init

    import hvp

    net = autoencoder()
    return net, hvp.BCEWithLogitsLoss(), sparse_init(net, seed=0)


def newton_cg_step(optimizers, net, loss, theta, *data, repeats=3):
    """Median seconds of the first step of a fresh NewtonCG at its defaults, and that step's record."""
    times = []
    for _ in range(repeats):
        opt = optimizers.NewtonCG(net, loss, theta)
        start = time.perf_counter()
        record = opt.step(*data)
        times.append(time.perf_counter() - start)
    return float(np.median(times)), record


def run_cluster(workers, examples, repeats, threads=1):
    import dask
    from distributed import Client, LocalCluster

    import hvp.distributed as hd
    import optimizers

    net, loss, theta = problem()
    environ = {name: str(threads) for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}), \
            LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                         silence_logs=50) as cluster, Client(cluster) as client:
        per_shard = examples // SHARDS
        data = hd.ShardedData.from_loader(client, load_shard, [(per_shard, s) for s in range(SHARDS)])
        start = time.perf_counter()
        G = hd.GGNOperator(net, loss, theta, data)
        linearize = time.perf_counter() - start
        v = np.random.default_rng(0).standard_normal(net.num_params).astype(theta.dtype)
        G.matvec(v)  # warm-up
        walls, computes = [], []
        for _ in range(repeats):
            G.matvec(v)
            walls.append(G.linearization.last_call["seconds"])
            computes.append(max(G.linearization.last_call["compute"]))
        del G
        step, record = newton_cg_step(optimizers, net, loss, theta, data)
    i = int(np.argsort(walls)[len(walls) // 2])
    return {"linearize": linearize, "product": walls[i], "compute": computes[i], "step": step,
            "cg_iters": record["cg_iters"], "step_loss": record["trial_loss"]}


def run_local(examples, repeats, threads):
    from threadpoolctl import threadpool_limits

    import hvp
    import optimizers

    net, loss, theta = problem()
    per_shard = examples // SHARDS
    X = np.concatenate([load_shard((per_shard, s))[0] for s in range(SHARDS)])
    with threadpool_limits(threads):
        start = time.perf_counter()
        G = hvp.GGNOperator(net, loss, theta, (X, X))
        linearize = time.perf_counter() - start
        v = np.random.default_rng(0).standard_normal(net.num_params).astype(theta.dtype)
        G.matvec(v)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            G.matvec(v)
            times.append(time.perf_counter() - start)
        del G
        step, record = newton_cg_step(optimizers, net, loss, theta, X, X)
    return {"linearize": linearize, "product": float(np.median(times)), "compute": float(np.median(times)),
            "step": step, "cg_iters": record["cg_iters"], "step_loss": record["trial_loss"]}


def pickle_seconds(P, dtype, repeats=20):
    """Median seconds to pickle and unpickle one vector of P numbers (protocol 5, as Dask)."""
    v = np.ones(P, dtype=dtype)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        pickle.loads(pickle.dumps(v, protocol=5))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main(argv=None):
    import common

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--examples", type=int, default=20000)
    args = parser.parse_args(argv)
    import dask
    import distributed

    net, _, theta = problem()
    P, bytes_per = net.num_params, theta.dtype.itemsize
    load = os.getloadavg()[0]
    print(f"machine: {common.cpu_name()}, {os.cpu_count()} cores; numpy {np.__version__}, dask {dask.__version__}, "
          f"distributed {distributed.__version__}; CURVES autoencoder P = {P}, float32, {args.examples} examples "
          f"in {SHARDS} shards; medians of {args.repeats}", flush=True)
    rows = {"no Dask, 1 process, 1 thread": run_local(args.examples, args.repeats, 1),
            "no Dask, 1 process, 2 threads": run_local(args.examples, args.repeats, 2),
            "Dask, 1 worker (1 thread)": run_cluster(1, args.examples, args.repeats),
            "Dask, 1 worker (2 threads)": run_cluster(1, args.examples, args.repeats, threads=2),
            "Dask, 2 workers (1 thread each)": run_cluster(2, args.examples, args.repeats)}
    t_pickle = pickle_seconds(P, theta.dtype)
    print(f"\n{'':34s}{'linearize s':>12s}{'G v ms':>9s}{'compute':>9s}{'serial.':>9s}{'comm.':>9s}"
          f"{'NCG step s':>11s}{'CG its':>7s}")
    for name, r in rows.items():
        workers = 0 if name.startswith("no Dask") else 2 if "2 workers" in name else 1
        serial = 2 * workers * t_pickle
        comm = max(r["product"] - r["compute"] - serial, 0.0) if workers else 0.0
        ms = [1e3 * t for t in (r["product"], r["compute"], serial, comm)]
        print(f"{name:34s}{r['linearize']:12.2f}" + "".join(f"{t:9.1f}" for t in ms) +
              f"{r['step']:11.2f}{r['cg_iters']:7d}")
    one, two = rows["Dask, 1 worker (1 thread)"], rows["Dask, 2 workers (1 thread each)"]
    print(f"\nspeed-up, 2 workers against 1 (1 thread each): GGN product {one['product'] / two['product']:.2f}x, "
          f"Newton-CG step {one['step'] / two['step']:.2f}x, linearize {one['linearize'] / two['linearize']:.2f}x "
          f"(goal >= 1.6x)")
    best_local = min(rows["no Dask, 1 process, 1 thread"]["product"], rows["no Dask, 1 process, 2 threads"]["product"])
    print(f"2 workers against the faster single process without Dask: GGN product {best_local / two['product']:.2f}x")
    # Cost model: a product on N examples costs κ·N·P of compute, spread over W workers; the client sends v to
    # each worker and receives each one's partial product: 2·W·P·b bytes over its link, plus a fixed latency.
    kappa = one["compute"] / (args.examples * P)
    latency = max(two["product"] - two["compute"] - 4 * t_pickle - 2 * 2 * P * bytes_per / 1e9, 0.0)
    print(f"\ncost model: t(W) = κ·N·P/W + 2·W·P·b/BW + t0, κ = {kappa:.3e} s per example·parameter "
          f"(measured, 1 thread), b = {bytes_per} bytes, t0 ≈ {latency * 1e3:.0f} ms (this machine's scheduling)")
    bandwidth = 10e9 / 8
    for N in (20000, 1000000):
        crossover = np.sqrt(kappa * N * bandwidth / (2 * bytes_per))
        print(f"  N = {N:>8d}: communication passes compute at W ≈ {crossover:.0f} workers on 10 Gbit/s "
              f"(independent of P: both terms grow with P)")
        for P_model in (10**6, 10**7):
            seconds = [kappa * N * P_model / W + 2 * W * P_model * bytes_per / bandwidth + latency
                       for W in (1, 4, 16, 64)]
            times = ", ".join(f"W={W}: {t:.3g} s" for W, t in zip((1, 4, 16, 64), seconds))
            print(f"    P = {P_model:.0e}: {times}")
    print(f"\nload average before/after: {load:.1f}/{os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
