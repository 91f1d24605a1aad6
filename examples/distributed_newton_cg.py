"""Curvature and Newton-CG on data sharded over Dask workers (a LocalCluster here, any cluster in use).

Each worker makes its own shards with ``make_shard`` (in real use: reads its own files), so the data
never pass through this process. On them: the Gauss-Newton matrix's top eigenvalues, a check that a
product equals the single-process one, and Newton-CG steps whose loss, gradient, line search and
curvature products run on the workers.

    python examples/distributed_newton_cg.py [--workers 2] [--shards 8] [--steps 10] [--scheduler ADDRESS]

With ``--scheduler tcp://host:8786`` the same code runs on a running cluster (whose workers have hvp).
"""

import argparse
import time

import numpy as np

import hvp
import hvp.distributed as hd
import optimizers

FEATURES, CLASSES, PER_SHARD = 20, 5, 2500


def make_shard(seed):
    """Shard ``seed``: inputs ~ N(0, I) and labels from a fixed random teacher network (runs on a worker)."""
    teacher = np.random.default_rng(12345)
    W1, W2 = teacher.normal(size=(FEATURES, 32)), teacher.normal(size=(32, CLASSES))
    X = np.random.default_rng(seed).normal(size=(PER_SHARD, FEATURES))
    return X, np.argmax(np.tanh(X @ W1) @ W2, axis=1)


def main(argv=None):
    from distributed import Client, LocalCluster

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--scheduler", default=None, help="address of a running Dask scheduler")
    args = parser.parse_args(argv)

    cluster = None if args.scheduler else LocalCluster(n_workers=args.workers, threads_per_worker=1,
                                                       dashboard_address=":0", silence_logs=50)
    with Client(args.scheduler or cluster) as client:
        data = hd.ShardedData.from_loader(client, make_shard, list(range(args.shards)))
        print(data)
        net = hvp.Sequential(hvp.Linear(FEATURES, 64), hvp.Tanh(), hvp.Linear(64, CLASSES))
        loss, theta0 = hvp.CrossEntropyLoss(), net.init(seed=0)

        G = hd.GGNOperator(net, loss, theta0, data, l2=1e-4)
        top = hvp.curvature.eigenvalues(G, k=3)
        print(f"top-3 Gauss-Newton eigenvalues at θ0: {np.round(top.values, 5)} ({top.num_matvecs} products)")
        shards = [make_shard(s) for s in range(args.shards)]  # only to check against one process
        local = hvp.GGNOperator(net, loss, theta0, shards, l2=1e-4)
        v = np.random.default_rng(1).normal(size=net.num_params)
        print(f"max |G v − single-process G v| / max |G v| = "
              f"{np.abs(G @ v - local @ v).max() / np.abs(local @ v).max():.1e}")

        opt = optimizers.NewtonCG(net, loss, theta0, l2=1e-4, progress="lines")
        start = time.perf_counter()
        result = opt.minimize(data, max_iters=args.steps, gtol=1e-6)
        print(f"Newton-CG on {data.num_examples} examples: loss {opt.history[0]['loss']:.4f} -> {result.fun:.4f} "
              f"in {result.nit} steps, {time.perf_counter() - start:.1f} s")
    if cluster is not None:
        cluster.close()


if __name__ == "__main__":
    main()
