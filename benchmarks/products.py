"""Time hvp's products against the gradient, and against PyTorch and JAX on the identical problem.

MLP 784-512-256-10 with tanh, batch 256, softmax cross-entropy (mean), float32 and
float64. Prints medians and ratios measured side by side in this one run (library by library,
``common.rounds``); PyTorch and JAX rows appear when they are installed. Then a block of 16 directions
against its columns one by one (16 different vectors) and against 16 times one product (one vector, warm in cache) at
batches 8, 32 and 256, and the peak memory of each product: tracemalloc for hvp (its pool
of buffers emptied first), torch's profiler, XLA's memory analysis of the compiled function. The row
"once: matrix products alone" times the 19 matrix products of linearize + one hvp by themselves, on fresh
operands of their shapes (hvp: numpy's, one call each; JAX: one jitted function of the same products),
next to the whole calls, and "once: elementwise work alone" the least elementwise work of that call as bare numpy
calls on arrays made beforehand.

    python benchmarks/products.py [--repeats 30] [--threads 2] [--dtypes float32 float64] [--reuse-freed-memory]
"""

import argparse
import os

import common
import numpy as np
from common import BATCH, WIDTHS

BLOCK_BATCHES = (8, 32, 256)
ONCE_PRODUCTS = "once: matrix products alone"
ONCE_ELEMENTWISE = "once: elementwise work alone"
K = 16  # directions in a block


def problem(dtype, seed=0):
    """The common problem, plus one direction v (P,) and a block V (P, 16)."""
    net, theta, X, y = common.problem(dtype, seed)
    rng = np.random.default_rng(seed + 1)
    v = rng.normal(size=net.num_params).astype(dtype)
    V = rng.normal(size=(net.num_params, K)).astype(dtype)
    return net, theta, X, y, v, V


def ours(dtype):
    import hvp

    net, theta, X, y, v, V = problem(dtype)
    loss = hvp.CrossEntropyLoss()
    pt = hvp.linearize(net, loss, theta, X, y)
    return {
        "gradient": lambda: hvp.loss_and_grad(net, loss, theta, X, y),
        "linearize": lambda: hvp.linearize(net, loss, theta, X, y),
        "linearize + hvp (once)": lambda: hvp.linearize(net, loss, theta, X, y).hvp(v),
        "hvp (repeated)": lambda: pt.hvp(v),
        "ggnvp (repeated)": lambda: pt.ggnvp(v),
    }


def once_products(dtype, seed=2):
    """The matrix products of ``linearize`` + one ``hvp`` on the MLP, each ``(M, K)·(K, N)`` on fresh operands:
    every layer's forward ``I W`` and tangent ``I Ẇ`` (B, m, n) and weight adjoint ``Iᵀ RDO`` (m, B, n); from the second
    layer on also ``İ W`` (B, m, n), ``İᵀ δ`` (m, B, n) and three input adjoints ``δ Wᵀ``, ``RDO Wᵀ``, ``δ Ẇᵀ``
    (B, n, m). Returns numpy's function, JAX's (None without JAX) and the shapes ``(M, K, N)``."""
    pairs = list(zip(WIDTHS[:-1], WIDTHS[1:]))
    shapes = [(BATCH, m, n) for m, n in pairs] * 2 + [(m, BATCH, n) for m, n in pairs]
    shapes += [(BATCH, m, n) for m, n in pairs[1:]] + [(m, BATCH, n) for m, n in pairs[1:]]
    shapes += [(BATCH, n, m) for m, n in pairs[1:]] * 3
    rng = np.random.default_rng(seed)
    ops = [(rng.normal(size=(M, K)).astype(dtype), rng.normal(size=(K, N)).astype(dtype)) for M, K, N in shapes]
    outs = [np.empty((M, N), dtype) for M, _, N in shapes]

    def numpy_products():
        for (a, b), c in zip(ops, outs):
            np.matmul(a, b, out=c)

    jax_fn = None
    try:
        import jax
        import jax.numpy as jnp
    except ImportError:
        pass
    else:
        jops = [(jnp.asarray(a), jnp.asarray(b)) for a, b in ops]
        products = jax.jit(lambda ops: [a @ b for a, b in ops])

        def jax_fn():
            return jax.block_until_ready(products(jops))

    return numpy_products, jax_fn, shapes


def once_elementwise(dtype, seed=3):
    """The least elementwise work of ``linearize`` + one ``hvp`` on the MLP, as bare numpy calls into arrays made
    beforehand: per hidden layer ``y = tanh(a)``, σ′ = 1 − y², σ″ = −2yσ′ and three products (tangent, cross term,
    backward), then the softmax and the finiteness checks of θ, X and v (hvp's own test, one BLAS dot each); no bias
    terms, no loss gradient."""
    from hvp._checks import all_finite

    rng = np.random.default_rng(seed)
    hidden = [rng.normal(size=(BATCH, n)).astype(dtype) for n in WIDTHS[1:-1]]
    scratch = [[np.empty_like(a) for _ in range(4)] for a in hidden]
    P = common.mlp().num_params
    theta, v = rng.normal(size=P).astype(dtype), rng.normal(size=P).astype(dtype)
    X, Z = rng.normal(size=(BATCH, WIDTHS[0])).astype(dtype), rng.normal(size=(BATCH, WIDTHS[-1])).astype(dtype)

    def elementwise():
        for a, (y, d1, d2, t) in zip(hidden, scratch):
            np.tanh(a, out=y)
            np.subtract(1, np.multiply(y, y, out=d1), out=d1)
            np.multiply(np.multiply(y, d1, out=d2), -2, out=d2)
            np.multiply(d1, a, out=t)
            np.multiply(np.multiply(d2, a, out=t), a, out=t)
            np.multiply(d1, a, out=t)
        e = np.exp(Z - Z.max(axis=1, keepdims=True))
        e /= e.sum(axis=1, keepdims=True)
        return all(all_finite(a) for a in (theta, X, v))

    return elementwise


def blocks(dtype):
    """(batch, what) -> at that batch one hvp ("one"), 16 hvps of V's columns one by one ("loop"), or one hvp
    of the block V (P, 16) ("block")."""
    import hvp

    net, theta, X, y, v, V = problem(dtype)
    columns = [np.ascontiguousarray(V[:, j]) for j in range(K)]
    fns = {}
    for B in BLOCK_BATCHES:
        pt = hvp.linearize(net, hvp.CrossEntropyLoss(), theta, X[:B], y[:B])
        fns[B, "one"] = lambda pt=pt: pt.hvp(v)
        fns[B, "loop"] = lambda pt=pt: [pt.hvp(c) for c in columns]
        fns[B, "block"] = lambda pt=pt: pt.hvp(V)
    return fns


def torch_products(dtype, threads):
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(threads)
    net, theta, X, y, v, _ = problem(dtype)
    tdtype = {np.float32: torch.float32, np.float64: torch.float64}[dtype]
    views = net.unflatten(theta)
    params = [torch.tensor(a, dtype=tdtype, requires_grad=True) for p in views for a in p.values()]
    vs = [torch.tensor(a, dtype=tdtype) for p in net.unflatten(v) for a in p.values()]
    Xt, yt = torch.tensor(X), torch.tensor(y)

    def loss_fn():
        h = Xt
        for i in range(0, len(params), 2):
            h = h @ params[i] + params[i + 1]
            if i + 2 < len(params):
                h = torch.tanh(h)
        return torch.nn.functional.cross_entropy(h, yt)

    def grad():
        return torch.autograd.grad(loss_fn(), params)

    def hvp_once():
        g = torch.autograd.grad(loss_fn(), params, create_graph=True)
        return torch.autograd.grad(g, params, vs)

    g = torch.autograd.grad(loss_fn(), params, create_graph=True)
    return {
        "gradient": grad,
        "linearize": lambda: torch.autograd.grad(loss_fn(), params, create_graph=True),
        "linearize + hvp (once)": hvp_once,
        "hvp (repeated)": lambda: torch.autograd.grad(g, params, vs, retain_graph=True),
    }


def jax_products(dtype):
    try:
        import jax
        import jax.numpy as jnp
    except ImportError:
        return None
    jax.config.update("jax_enable_x64", dtype == np.float64)
    net, theta, X, y, v, _ = problem(dtype)
    params = [tuple(jnp.asarray(a) for a in p.values()) for p in net.unflatten(theta) if p]
    vs = [tuple(jnp.asarray(a) for a in p.values()) for p in net.unflatten(v) if p]
    Xj, yj = jnp.asarray(X), jnp.asarray(y)

    def loss_fn(params):
        h = Xj
        for i, (W, b) in enumerate(params):
            h = h @ W + b
            if i + 1 < len(params):
                h = jnp.tanh(h)
        logp = jax.nn.log_softmax(h)
        return -jnp.mean(jnp.take_along_axis(logp, yj[:, None], axis=1))

    grad = jax.jit(jax.grad(loss_fn))
    hvp_once = jax.jit(lambda p, d: jax.jvp(jax.grad(loss_fn), (p,), (d,))[1])
    _, hvp_lin = jax.linearize(jax.grad(loss_fn), params)
    hvp_lin = jax.jit(hvp_lin)

    def block(fn):
        return lambda: jax.block_until_ready(fn())

    fns = {
        "gradient": block(lambda: grad(params)),
        "linearize + hvp (once)": block(lambda: hvp_once(params, vs)),
        "hvp (repeated)": block(lambda: hvp_lin(vs)),
    }
    peaks = {"gradient": common.jax_peak_bytes(grad, params),
             "linearize + hvp (once)": common.jax_peak_bytes(hvp_once, params, vs),
             "hvp (repeated)": common.jax_peak_bytes(hvp_lin, vs)}
    return fns, peaks


def blas_kernel():
    """The kernel OpenBLAS picked (OPENBLAS_CORETYPE overrides it), when threadpoolctl can tell."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "BLAS kernel unknown"
    blas = [info for info in threadpool_info() if info.get("user_api") == "blas"]
    if not blas:
        return "BLAS kernel unknown"
    return f"{blas[0].get('internal_api')} {blas[0].get('architecture')}, {blas[0].get('num_threads')} threads"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2, help="BLAS / torch threads (default 2)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    common.add_memory_option(parser)
    args = parser.parse_args()
    memory = common.apply_memory_option(args)
    print(f"machine: {common.cpu_name()}, {os.cpu_count()} cores; numpy {np.__version__} ({blas_kernel()}); {memory}; "
          f"MLP {'-'.join(map(str, WIDTHS))} tanh, batch {BATCH}, cross-entropy; medians of {args.repeats}")
    for name in args.dtypes:
        dtype = np.dtype(name).type
        jax_fns, jax_peaks = jax_products(dtype) or (None, {})
        providers = {"hvp": ours(dtype), "PyTorch": torch_products(dtype, args.threads), "JAX": jax_fns}
        fns = {(who, key): fn for who, table in providers.items() if table for key, fn in table.items()}
        numpy_products, jax_products_alone, shapes = once_products(dtype)
        fns["hvp", ONCE_PRODUCTS] = numpy_products
        fns["hvp", ONCE_ELEMENTWISE] = once_elementwise(dtype)
        if jax_products_alone is not None:
            fns["JAX", ONCE_PRODUCTS] = jax_products_alone
        fns.update({("blocks", key): fn for key, fn in blocks(dtype).items()})
        times = common.median_seconds(fns, args.repeats)
        ours_t = {key: t for (who, key), t in times.items() if who == "hvp"}
        peers = {who: {key: t for (w, key), t in times.items() if w == who}
                 for who, table in providers.items() if table and who != "hvp"}
        print(f"\n{name}")
        header = f"{'quantity':<28}{'hvp ms':>9}{'÷ grad':>8}"
        for peer in peers:
            header += f"{peer + ' ms':>13}{'hvp ÷ ' + peer:>14}"
        print(header)
        for key, t in ours_t.items():
            row = f"{key:<28}{1e3 * t:>9.2f}{t / ours_t['gradient']:>8.2f}"
            for peer in peers.values():
                row += f"{1e3 * peer[key]:>13.2f}{t / peer[key]:>14.2f}" if key in peer else f"{'':>27}"
            print(row)
        once = "linearize + hvp (once)"
        macs = sum(M * K * N for M, K, N in shapes)
        line = f"\nonce: {macs / 1e6:.0f} M multiply-adds in {len(shapes)} matrix products, numpy's alone take"
        line += f" {ours_t[ONCE_PRODUCTS] / ours_t[once]:.2f} of hvp's whole call"
        if once in peers.get("JAX", {}):
            line += f" and {ours_t[ONCE_PRODUCTS] / peers['JAX'][once]:.2f} of JAX's; parity would leave"
            line += f" {1e3 * (peers['JAX'][once] - ours_t[ONCE_PRODUCTS]):.2f} ms for the rest, whose elementwise"
            line += f" work alone takes {1e3 * ours_t[ONCE_ELEMENTWISE]:.2f} ms"
        print(line)
        print(f"\n{'batch':<8}{'one hvp ms':>12}{f'{K} columns one by one ms':>26}{f'(P, {K}) block ms':>19}"
              f"{'block ÷ columns':>17}{f'block ÷ ({K} × one)':>20}")
        for B in BLOCK_BATCHES:
            one, loop, block = (times["blocks", (B, what)] for what in ("one", "loop", "block"))
            print(f"{B:<8}{1e3 * one:>12.3f}{1e3 * loop:>26.2f}{1e3 * block:>19.2f}{block / loop:>17.2f}"
                  f"{block / one / K:>20.2f}")
        print(f"\npeak memory of one call, MB{'':<5}{'hvp':>8}{'PyTorch':>10}{'JAX':>8}")
        torch_fns = providers["PyTorch"] or {}
        for key, fn in providers["hvp"].items():
            row = f"{key:<32}{common.numpy_peak_bytes(fn) / 2**20:>8.1f}"
            row += f"{common.torch_peak_bytes(torch_fns[key]) / 2**20:>10.1f}" if key in torch_fns else f"{'':>10}"
            row += f"{jax_peaks[key] / 2**20:>8.1f}" if key in jax_peaks else ""
            print(row)


if __name__ == "__main__":
    main()
