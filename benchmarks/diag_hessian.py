"""Time hvp's exact Hessian diagonal against the gradient, and against BackPACK's DiagHessian on the identical problem.

MLP 784-512-256-10 with tanh (benchmarks/common.py, as products.py and per_example.py), batch
256, softmax cross-entropy (mean), float32, no L2 term. ``diag_hessian`` is timed together
with its linearization (``linearize`` + the diagonal: one forward and backward pass), as a
BackPACK extension is timed with its forward and backward pass; the GGN diagonal is timed
alongside for scale. Rounds are interleaved as in per_example.py (hvp's functions in a
random order, a pause, then BackPACK's). The table shows median times, ratios to the
gradient of the same library and our time over BackPACK's (medians over rounds of the ratio
within a round), and the peak memory allocated during one call. The last lines compare the
diagonals: hvp float32 and BackPACK float32 against hvp in float64, and hvp against BackPACK
both in float64.

    python benchmarks/diag_hessian.py [--repeats 15] [--threads 2] [--default-malloc]
"""

import argparse
import os
import warnings

import common
import numpy as np
from common import BATCH, WIDTHS
from per_example import backpack_as_ours, limit_blas_threads, numpy_peak_bytes, rounds, torch_peak_bytes

QUANTITIES = {"diag_ggn": ("DiagGGNExact", "diag_ggn_exact"), "diag_hessian": ("DiagHessian", "diag_h")}


def ours(net, theta, X, y):
    """Name -> function of no arguments, for hvp."""
    import hvp
    from hvp.diag_hessian import diag_hessian

    loss = hvp.CrossEntropyLoss()
    return {"gradient": lambda: hvp.loss_and_grad(net, loss, theta, X, y),
            "linearize": lambda: hvp.linearize(net, loss, theta, X, y),
            "diag_ggn": lambda: hvp.linearize(net, loss, theta, X, y).diag_ggn(),
            "diag_hessian": lambda: diag_hessian(hvp.linearize(net, loss, theta, X, y))}


def backpack_setup(net, theta, X, y, threads, dtype=None):
    """Name -> function of no arguments returning the model, for BackPACK; None if not installed."""
    try:
        import backpack
        import backpack.extensions as ext
        import torch
    except ImportError:
        return None
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", message="Full backward hook is firing")  # X needs no gradient
    model = common.torch_mlp(net, theta)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    if dtype is not None:
        model, Xt = model.to(dtype), Xt.to(dtype)
    model = backpack.extend(model)
    lossfunc = backpack.extend(torch.nn.CrossEntropyLoss())

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
    for name, (cls, _) in QUANTITIES.items():
        fns[name] = lambda cls=cls: run(getattr(ext, cls)())
    return fns


def agreement(net, theta, X, y, threads):
    """Max |a − b| / max |b| of Hessian diagonals: float32 results against hvp's float64 one, and f64 against f64."""
    import torch

    import hvp
    from hvp.diag_hessian import diag_hessian

    loss = hvp.CrossEntropyLoss()
    theta64, X64 = theta.astype(np.float64), X.astype(np.float64)
    ours64 = diag_hessian(hvp.linearize(net, loss, theta64, X64, y))
    ours32 = diag_hessian(hvp.linearize(net, loss, theta, X, y)).astype(np.float64)
    theirs32 = backpack_as_ours(backpack_setup(net, theta, X, y, threads)["diag_hessian"](), "diag_h")
    theirs64 = backpack_as_ours(backpack_setup(net, theta64, X64, y, threads, torch.float64)["diag_hessian"](),
                                "diag_h")

    def err(a, b):
        return float(np.abs(a.astype(np.float64) - b).max() / np.abs(b).max())

    return {"hvp f32 vs hvp f64": err(ours32, ours64), "BackPACK f32 vs hvp f64": err(theirs32, ours64),
            "hvp f32 vs BackPACK f32": err(ours32, theirs32.astype(np.float64)),
            "hvp f64 vs BackPACK f64": err(ours64, theirs64)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2, help="BLAS and torch threads (default 2)")
    common.add_memory_option(parser)
    args = parser.parse_args()
    memory = common.apply_memory_option(args)
    load_before = os.getloadavg()[0]
    blas_limited = limit_blas_threads(args.threads)
    net, theta, X, y = common.problem(dtype=np.float32)
    mine = ours(net, theta, X, y)
    theirs = backpack_setup(net, theta, X, y, args.threads) or {}
    t = rounds({"hvp": mine, "BackPACK": theirs}, args.repeats)
    mem = {k: numpy_peak_bytes(f) for k, f in mine.items()}
    their_mem = {k: torch_peak_bytes(f) for k, f in theirs.items()}

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
    header = f"{'linearize + quantity':<22}{'hvp ms':>9}{'÷ grad':>8}{'peak MB':>9}"
    if theirs:
        header += f"{'BackPACK ms':>13}{'÷ its grad':>11}{'peak MB':>9}{'hvp ÷ BackPACK':>16}"
    print(header)
    for key in mine:
        row = f"{key:<22}{ms(('hvp', key)):>9.2f}{ratio(('hvp', key), ('hvp', 'gradient')):>8.2f}"
        row += f"{mem[key] / 2**20:>9.1f}"
        if key in theirs:
            row += f"{ms(('BackPACK', key)):>13.2f}{ratio(('BackPACK', key), ('BackPACK', 'gradient')):>11.2f}"
            row += f"{their_mem[key] / 2**20:>9.1f}{ratio(('hvp', key), ('BackPACK', key)):>16.2f}"
        print(row)
    if theirs:
        print("agreement of the Hessian diagonals, max |a − b| / max |b|: "
              + ", ".join(f"{k} {v:.1e}" for k, v in agreement(net, theta, X, y, args.threads).items()))


if __name__ == "__main__":
    main()
