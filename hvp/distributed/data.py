"""A data set split into shards that live in the memory of Dask workers.

Each shard is one ``(X, y)`` batch held by one worker. Shards are grouped by the worker that
holds them; every computation runs as one task per group, on that worker, so that the data
never travel and one product costs one task per worker.
"""

import numpy as np

from .._checks import check_batch, describe


def _shard_info(i, shard):
    """On a worker: shard i's number of examples and per-example input shape, after checking it is an (X, y) pair."""
    X, y = check_batch(i, shard)
    if not (hasattr(X, "shape") and hasattr(y, "shape")):
        raise TypeError(f"shard {i} must be a pair of arrays (X, y), got X = {describe(X)}, y = {describe(y)}")
    if len(X.shape) < 2 or X.shape[0] == 0 or y.shape[:1] != X.shape[:1]:
        raise ValueError(f"shard {i} must hold X of shape (B, …) with B >= 1 and y with as many rows, "
                         f"got X of shape {X.shape} and y of shape {y.shape}")
    return int(X.shape[0]), tuple(X.shape[1:])


def _pair(X, y):
    return X, y


class ShardedData:
    """``(X, y)`` shards in the memory of a Dask cluster's workers, used as one data set.

    Build it with :meth:`from_batches`, :meth:`from_dask_arrays` or :meth:`from_loader`. It
    stands in for ``data`` in :mod:`hvp.distributed`'s operators and for ``X, y`` in
    :class:`optimizers.NewtonCG` and :class:`optimizers.KFAC` (``opt.step(data)``,
    ``opt.minimize(data)``): all shards taken as one batch, as ``hvp.GGNOperator`` takes a
    list of batches.

    Parameters
    ----------
    client : distributed.Client
    shards : list of distributed.Future
        Each one an ``(X, y)`` pair on a worker: X (B_s, *in_shape), y (B_s,) or (B_s, C).

    Attributes
    ----------
    client : distributed.Client
    shards : list of distributed.Future
    shard_sizes : list of int
        B_s per shard.
    in_shapes : list of tuple
        Each shard's per-example input shape, X.shape[1:].
    num_examples : int
    groups : list of (str, list of int)
        A worker's address and the shards it held when the data set was built. Tasks on a group
        run there; if that worker is gone they run elsewhere (``allow_other_workers``).

    Notes
    -----
    Losing a worker. Shards made by :meth:`from_loader` or :meth:`from_dask_arrays` are
    recomputed by Dask from their recipe and the computation goes on; shards sent from this
    process by :meth:`from_batches` exist nowhere else, so a computation that needs a lost one
    ends in a ``RuntimeError`` that says so, never in a partial sum.
    """

    def __init__(self, client, shards):
        from distributed import Future

        shards = list(shards)
        if not shards:
            raise ValueError("shards is empty: expected at least one (X, y) shard")
        for i, s in enumerate(shards):
            if not isinstance(s, Future):
                raise TypeError(f"shards must be Dask futures of (X, y) pairs; shard {i} is {describe(s)}")
        self.client, self.shards = client, shards
        infos = client.gather([client.submit(_shard_info, i, s, pure=False) for i, s in enumerate(shards)])
        self.shard_sizes, self.in_shapes = [B for B, _ in infos], [shape for _, shape in infos]
        self.num_examples = sum(self.shard_sizes)
        holders = client.who_has(shards)
        groups = {}
        for i, s in enumerate(shards):
            groups.setdefault(holders[s.key][0], []).append(i)
        self.groups = sorted(groups.items(), key=lambda item: item[1][0])

    @classmethod
    def from_batches(cls, client, batches):
        """Send ``(X, y)`` batches from this process to the workers, spread evenly, one shard each.

        Parameters
        ----------
        client : distributed.Client
        batches : list of (X, y)
            X an array (B_s, *in_shape), y labels (B_s,) or targets (B_s, C).
        """
        if not isinstance(batches, (list, tuple)) or not batches:
            raise TypeError(f"batches must be a non-empty list of (X, y) pairs, got {describe(batches)}")
        pairs = []
        for i, batch in enumerate(batches):
            X, y = check_batch(i, batch)
            pairs.append((np.asarray(X), np.asarray(y)))
        return cls(client, client.scatter(pairs, hash=False))

    @classmethod
    def from_dask_arrays(cls, client, X, y):
        """One shard per chunk of a Dask array along the batch axis, computed on the workers.

        Parameters
        ----------
        client : distributed.Client
        X : dask.array.Array, shape (N, *in_shape)
            Chunked along axis 0 (other axes are merged into one chunk).
        y : dask.array.Array, shape (N,) or (N, C)
            Rechunked to X's chunks along axis 0.
        """
        import dask
        import dask.array as da

        for name, a in (("X", X), ("y", y)):
            if not isinstance(a, da.Array):
                raise TypeError(f"{name} must be a dask.array.Array, got {describe(a)}")
        if X.ndim < 2 or y.ndim not in (1, 2) or X.shape[0] != y.shape[0]:
            raise ValueError(f"X must have shape (N, …) and y (N,) or (N, C) with the same N, "
                             f"got X of shape {X.shape} and y of shape {y.shape}")
        X = X.rechunk({axis: -1 for axis in range(1, X.ndim)})
        y = y.rechunk({0: X.chunks[0], **({1: -1} if y.ndim == 2 else {})})
        pairs = [dask.delayed(_pair)(a, b) for a, b in zip(X.to_delayed().ravel(), y.to_delayed().ravel())]
        return cls(client, client.compute(pairs))

    @classmethod
    def from_loader(cls, client, loader, args):
        """Shards made on the workers by ``loader(arg)`` for each arg, so the data never pass through here.

        Parameters
        ----------
        client : distributed.Client
        loader : callable
            ``loader(arg) -> (X, y)``, run on a worker (it reads that worker's files, say).
        args : list
            One argument per shard, such as file names.

        Examples
        --------
        >>> data = ShardedData.from_loader(client, load_npz, ["part-0.npz", "part-1.npz"])
        """
        if not callable(loader):
            raise TypeError(f"loader must be callable, got {describe(loader)}")
        if not isinstance(args, (list, tuple)) or not args:
            raise TypeError(f"args must be a non-empty list (one argument per shard), got {describe(args)}")
        return cls(client, [client.submit(loader, a, pure=False) for a in args])

    def linearize(self, net, loss, theta, l2=0.0, cache=True):
        """The loss of all the shards at θ, linearized on the workers (see :class:`ShardedLinearization`)."""
        from .linearization import ShardedLinearization

        return ShardedLinearization(self, net, loss, theta, l2, cache)

    def __repr__(self):
        return (f"<ShardedData: {self.num_examples} examples in {len(self.shards)} shards "
                f"on {len(self.groups)} workers>")
