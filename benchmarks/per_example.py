"""Time hvp's per-example quantities against the gradient, and against BackPACK on the identical problem.

MLP 784-512-256-10 with tanh (benchmarks/common.py, as in products.py), batch 256, softmax
cross-entropy (mean), float32, no L2 term. Each quantity is timed together with its
linearization (``linearize`` + the quantity: one forward and backward pass), as a BackPACK
extension is timed with its forward and backward pass. Every round runs each timed function
once: hvp's in a random order, a pause, then BackPACK's. The table shows median times, ratios
to the gradient of the same library and our time over BackPACK's (each the median over rounds
of the ratio within a round, which a shared machine's drifting load skews least), and the peak
memory allocated during one call (tracemalloc for hvp, torch's profiler for BackPACK). A last
line checks that both libraries computed the same numbers.

    python benchmarks/per_example.py [--repeats 15] [--threads 2] [--reuse-freed-memory]
"""

import argparse
import os
import warnings

import common
import numpy as np
from common import BATCH, WIDTHS

QUANTITIES = ("sum_grad_squared", "variance", "batch_l2", "diag_ggn", "diag_ggn_mc", "diag_hessian", "batch_grad")
TARGETS = {"sum_grad_squared": 1.4, "variance": 1.4, "batch_l2": 1.1, "diag_ggn": 2.5}  # × gradient
BACKPACK_NAMES = {"sum_grad_squared": "SumGradSquared", "variance": "Variance", "batch_l2": "BatchL2Grad",
                  "batch_grad": "BatchGrad", "diag_ggn": "DiagGGNExact", "diag_ggn_mc": "DiagGGNMC",
                  "diag_hessian": "DiagHessian"}
BACKPACK_ATTRS = {"sum_grad_squared": "sum_grad_squared", "variance": "variance", "batch_l2": "batch_l2",
                  "batch_grad": "grad_batch", "diag_ggn": "diag_ggn_exact", "diag_ggn_mc": "diag_ggn_mc",
                  "diag_hessian": "diag_h"}


def ours(net, theta, X, y):
    """Name -> function of no arguments, for hvp."""
    import hvp

    loss = hvp.CrossEntropyLoss()
    fns = {"gradient": lambda: hvp.loss_and_grad(net, loss, theta, X, y),
           "linearize": lambda: hvp.linearize(net, loss, theta, X, y)}
    for name in QUANTITIES:
        fns[name] = lambda name=name: getattr(hvp.linearize(net, loss, theta, X, y), name)()
    fns["write B·P numbers"] = lambda: np.full((BATCH, net.num_params), 1.0, dtype=theta.dtype)
    return fns


def backpack_setup(net, theta, X, y, threads):
    """Name -> function of no arguments, for BackPACK on the same problem; None if not installed."""
    try:
        import backpack
        import backpack.extensions as ext
        import torch
    except ImportError:
        return None
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", message="Full backward hook is firing")  # X needs no gradient
    model = backpack.extend(common.torch_mlp(net, theta))
    lossfunc = backpack.extend(torch.nn.CrossEntropyLoss())
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)

    def run(extension=None):
        model.zero_grad(set_to_none=True)
        value = lossfunc(model(Xt), yt)
        if extension is None:
            value.backward()
        else:
            with backpack.backpack(extension):
                value.backward()
        return model

    fns = {"gradient": run}
    for name, cls in BACKPACK_NAMES.items():
        fns[name] = lambda cls=cls: run(getattr(ext, cls)())
    return fns


def limit_blas_threads(threads):
    """Limit numpy's BLAS to ``threads`` through threadpoolctl; returns whether it could."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return False
    threadpool_limits(threads, user_api="blas")
    return True


def backpack_as_ours(model, attr):
    """A BackPACK result laid out as ours: flat (P,), per-example rows (B, P), or (B,) for batch_l2."""
    parts = []
    for module in model:
        if hasattr(module, "weight"):
            W, b = getattr(module.weight, attr).numpy(), getattr(module.bias, attr).numpy()
            if attr == "batch_l2":  # (B,) per parameter tensor
                parts += [W + b]
            elif W.ndim == 3:  # (B, out, in)
                parts += [W.transpose(0, 2, 1).reshape(W.shape[0], -1), b]
            else:  # (out, in)
                parts += [W.T.ravel(), b]
    return sum(parts) if attr == "batch_l2" else np.concatenate(parts, axis=-1)


def agreement(net, theta, X, y, theirs):
    """Max |ours − theirs| / max |theirs| per quantity (Variance rescaled by B², see README)."""
    import hvp

    pt = hvp.linearize(net, hvp.CrossEntropyLoss(), theta, X, y)
    rows = {}
    for name in ("sum_grad_squared", "variance", "batch_l2", "batch_grad", "diag_ggn", "diag_hessian"):
        model = theirs[name]()
        ref = backpack_as_ours(model, BACKPACK_ATTRS[name]).astype(np.float64)
        if name == "variance":
            ref *= BATCH**2
        got = getattr(pt, name)().astype(np.float64)
        rows[name] = float(np.abs(got - ref).max() / np.abs(ref).max())
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2, help="BLAS and torch threads (default 2)")
    common.add_memory_option(parser)
    args = parser.parse_args()
    memory = common.apply_memory_option(args)
    load_before = os.getloadavg()[0]
    blas_limited = limit_blas_threads(args.threads)
    net, theta, X, y = common.problem()
    mine = ours(net, theta, X, y)
    theirs = backpack_setup(net, theta, X, y, args.threads)
    theirs = theirs or {}
    libraries = {"hvp": mine, "BackPACK": theirs}
    t = common.rounds({(lib, key): fn for lib, fns in libraries.items() for key, fn in fns.items()},
                      args.repeats)
    mem = {k: common.numpy_peak_bytes(f) for k, f in mine.items()}
    their_mem = {k: common.torch_peak_bytes(f) for k, f in theirs.items()}

    def ms(key):
        return 1e3 * float(np.median(t[key]))

    def ratio(a, b):  # the median over rounds of the ratio within a round
        return float(np.median(t[a] / t[b]))

    print(f"machine: {common.cpu_name()}, {os.cpu_count()} cores; numpy {np.__version__}; MLP "
          f"{'-'.join(map(str, WIDTHS))} tanh, batch {BATCH}, float32, cross-entropy (mean), "
          f"P = {net.num_params}; {memory}; {args.repeats} rounds; load average before/after "
          f"{load_before:.1f}/{os.getloadavg()[0]:.1f}")
    print(f"threads: {args.threads} for torch and {'for' if blas_limited else 'not set for'} numpy's BLAS; "
          "ms: median time; ratios: median over rounds of the ratio within a round")
    if not theirs:
        print("BackPACK is not installed: pip install --no-deps backpack-for-pytorch einops unfoldNd")
    header = f"{'linearize + quantity':<22}{'hvp ms':>9}{'÷ grad':>8}{'target':>8}{'peak MB':>9}"
    if theirs:
        header += f"{'BackPACK ms':>13}{'÷ its grad':>11}{'peak MB':>9}{'hvp ÷ BackPACK':>16}"
    print(header)
    for key in mine:
        target = TARGETS.get(key)
        if key == "batch_grad":
            target_text = "≤2×wr"
        else:
            target_text = f"≤{target:.1f}" if target else ""
        row = f"{key:<22}{ms(('hvp', key)):>9.2f}{ratio(('hvp', key), ('hvp', 'gradient')):>8.2f}{target_text:>8}"
        row += f"{mem[key] / 2**20:>9.1f}"
        if key in theirs:
            row += f"{ms(('BackPACK', key)):>13.2f}{ratio(('BackPACK', key), ('BackPACK', 'gradient')):>11.2f}"
            row += f"{their_mem[key] / 2**20:>9.1f}{ratio(('hvp', key), ('BackPACK', key)):>16.2f}"
        print(row)
    print(f"batch_grad ÷ writing B·P = {BATCH}·{net.num_params} numbers (np.full): "
          f"{ratio(('hvp', 'batch_grad'), ('hvp', 'write B·P numbers')):.2f}  (target ≤ 2)")
    if theirs:
        print("agreement with BackPACK, max |hvp − BackPACK| / max |BackPACK| (Variance × B²): "
              + ", ".join(f"{k} {v:.1e}" for k, v in agreement(net, theta, X, y, theirs).items()))


if __name__ == "__main__":
    main()
