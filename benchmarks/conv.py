"""Time hvp on two small convolutional networks against PyTorch and BackPACK on the identical problem.

LeNet-5-like on 1×28×28 (Conv2d(1,6,5,padding=2) ReLU MaxPool2d(2) Conv2d(6,16,5) ReLU
MaxPool2d(2) Flatten Linear 400-120-84-10 with ReLU) and a small ResNet-style net on 3×32×32
(Conv2d(3,16,3,padding=1) ReLU, two residual blocks x + conv(relu(conv(x))) each followed by
ReLU, AvgPool2d(8), Flatten, Linear(256,10)); batch 128, inputs ~ N(0, 1), random labels,
softmax cross-entropy (mean), float32. The torch models get the same parameters, and the run
stops unless outputs, loss and gradient agree. Timed side by side in one run, library by
library with a pause between them (``common.rounds``; medians):

- gradient: ``hvp.loss_and_grad``; PyTorch forward + backward.
- linearize + hvp (once): PyTorch's double backward, ``grad(loss, create_graph=True)`` then the grad of g·v.
- hvp (repeated): one ``pt.hvp(v)`` on an existing linearization; PyTorch: the second backward on a
  retained graph (the first gradient excluded).
- ggnvp (repeated): ``pt.ggnvp(v)``; PyTorch: ``Jᵀ(∇²ℓ (J v))`` on retained graphs, J v by the double-vjp trick.
- sum_grad_squared, batch_l2, variance, diag_ggn: ``linearize`` + the quantity; BackPACK's SumGradSquared,
  BatchL2Grad, Variance, DiagGGNExact: forward and backward with the extension (the residual net through
  ``backpack.extend(..., use_converter=True)``).
- diag_hessian (LeNet-5 only): ``linearize`` + the exact Hessian diagonal; BackPACK's DiagHessian. With ReLU
  (σ″ = 0) it equals diag_ggn, so this row times the walk itself, not the activations' curvature columns.

÷ grad is a time over our own gradient's, hvp ÷ peer our time over the peer's on the same row; peak MB is
what tracemalloc saw during one call of hvp's function. Goals are checked at the end. PyTorch and BackPACK
(``pip install --no-deps backpack-for-pytorch einops unfoldNd``) are optional.

    python benchmarks/conv.py [--batch 128] [--repeats 20] [--threads 2] [--reuse-freed-memory] [--quick]
"""

import argparse
import copy
import os
import warnings

import common
import numpy as np
from per_example import limit_blas_threads
from products import blas_kernel

import hvp

TOL = 1e-4  # relative agreement with torch required at the start (float32)
PER_EXAMPLE = {"sum_grad_squared": ("SumGradSquared", "sum_grad_squared"), "batch_l2": ("BatchL2Grad", "batch_l2"),
               "variance": ("Variance", "variance"), "diag_ggn": ("DiagGGNExact", "diag_ggn_exact")}
BACKPACK_ROWS = {**PER_EXAMPLE, "diag_hessian": ("DiagHessian", "diag_h")}  # name -> (extension, attribute)
PRODUCTS = ("linearize + hvp (once)", "hvp (repeated)", "ggnvp (repeated)")


def lenet():
    return hvp.Sequential(hvp.Conv2d(1, 6, 5, padding=2), hvp.ReLU(), hvp.MaxPool2d(2), hvp.Conv2d(6, 16, 5),
                          hvp.ReLU(), hvp.MaxPool2d(2), hvp.Flatten(), hvp.Linear(400, 120), hvp.ReLU(),
                          hvp.Linear(120, 84), hvp.ReLU(), hvp.Linear(84, 10))


def resnet():
    def block():
        return hvp.Residual(hvp.Conv2d(16, 16, 3, padding=1), hvp.ReLU(), hvp.Conv2d(16, 16, 3, padding=1))

    return hvp.Sequential(hvp.Conv2d(3, 16, 3, padding=1), hvp.ReLU(), block(), hvp.ReLU(), block(), hvp.ReLU(),
                          hvp.AvgPool2d(8), hvp.Flatten(), hvp.Linear(16 * 4 * 4, 10))


NETS = {"LeNet-5, 1×28×28": (lenet, (1, 28, 28), (*PER_EXAMPLE, "diag_hessian")),
        "ResNet-style, 3×32×32": (resnet, (3, 32, 32), tuple(PER_EXAMPLE))}  # net, input shape, rows against BackPACK


def problem(make, shape, batch, seed=0):
    """Network, θ, X (batch, *shape) ~ N(0, 1), labels y, a direction v ~ N(0, I), float32."""
    net = make()
    rng = np.random.default_rng(seed)
    theta = net.init(seed=seed, dtype=np.float32)
    X = rng.normal(size=(batch, *shape)).astype(np.float32)
    y = rng.integers(0, 10, size=batch)
    v = rng.normal(size=net.num_params).astype(np.float32)
    return net, theta, X, y, v


def ours(net, theta, X, y, v, rows):
    loss = hvp.CrossEntropyLoss()
    pt = hvp.linearize(net, loss, theta, X, y)
    fns = {"gradient": lambda: hvp.loss_and_grad(net, loss, theta, X, y),
           "linearize": lambda: hvp.linearize(net, loss, theta, X, y),
           "linearize + hvp (once)": lambda: hvp.linearize(net, loss, theta, X, y).hvp(v),
           "hvp (repeated)": lambda: pt.hvp(v),
           "ggnvp (repeated)": lambda: pt.ggnvp(v)}
    failed = {}
    for name in rows:
        try:
            getattr(pt, name)()
            fns[name] = lambda name=name: getattr(hvp.linearize(net, loss, theta, X, y), name)()
        except TypeError as error:  # a layer without the per-example rules
            failed[name] = str(error)
    return fns, pt, failed


def torch_model(net, theta):
    """The same layers and parameters as torch modules (Linear weights transposed; Residual as x + f(x))."""
    import torch
    from torch import nn

    class Skip(nn.Module):
        def __init__(self, *f):
            super().__init__()
            self.f = nn.Sequential(*f)

        def forward(self, x):
            return x + self.f(x)

    def convert(layers, params):
        modules = []
        for layer, p in zip(layers, params):
            if isinstance(layer, hvp.Residual):
                inner = [{k.split(".", 1)[1]: a for k, a in p.items() if k.split(".")[0] == str(j)}
                         for j in range(len(layer.layers))]
                modules.append(Skip(*convert(layer.layers, inner)))
                continue
            if isinstance(layer, hvp.Conv2d):
                m = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                              layer.dilation, layer.groups, bias=layer.bias)
            elif isinstance(layer, hvp.Linear):
                m = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias)
            else:
                m = {hvp.ReLU: nn.ReLU, hvp.Flatten: nn.Flatten, hvp.MaxPool2d: nn.MaxPool2d,
                     hvp.AvgPool2d: nn.AvgPool2d}[type(layer)]
                m = m(layer.kernel_size, layer.stride, layer.padding) if hasattr(layer, "kernel_size") else m()
            with torch.no_grad():
                for name, a in p.items():
                    getattr(m, name).copy_(torch.from_numpy((a.T if a.ndim == 2 else a).copy()))
            modules.append(m)
        return modules

    return nn.Sequential(*convert(net.layers, net.unflatten(theta)))


def flat(tensors):
    """Torch tensors in parameter order -> one flat array in θ's layout (2-D ones are Linear weights)."""
    return np.concatenate([(t.T if t.ndim == 2 else t).detach().numpy().ravel() for t in tensors])


def rel(a, b):
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(np.asarray(b, np.float64)).max())


def torch_setup(model, X, y, v):
    """Name -> function for PyTorch, and torch's (outputs, loss, gradient, hvp, ggnvp) for the check."""
    import torch
    from torch.nn.functional import cross_entropy

    params = list(model.parameters())
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    vs, start = [], 0
    for p in params:  # v in torch's layout
        a = v[start:start + p.numel()]
        vs.append(torch.from_numpy(a.reshape(p.shape[::-1]).T.copy() if p.ndim == 2 else a.reshape(p.shape)))
        start += p.numel()

    def grad():
        return torch.autograd.grad(cross_entropy(model(Xt), yt), params)

    def hvp_once():
        g = torch.autograd.grad(cross_entropy(model(Xt), yt), params, create_graph=True)
        return torch.autograd.grad(g, params, vs)

    z = model(Xt)
    loss = cross_entropy(z, yt)
    g = torch.autograd.grad(loss, params, create_graph=True)
    # Gauss-Newton: J v by the double-vjp trick (u -> Jᵀu is linear, and its vjp with v is J v), then the
    # loss's Hessian at the outputs (grad of ∂ℓ/∂z · Jv), then the vjp Jᵀ(·); every graph retained.
    u = torch.zeros_like(z, requires_grad=True)
    Ju = torch.autograd.grad(z, params, u, create_graph=True)
    gz = torch.autograd.grad(loss, z, create_graph=True)[0]

    def ggnvp():
        Jv = torch.autograd.grad(Ju, u, vs, retain_graph=True)[0]
        return torch.autograd.grad(z, params, torch.autograd.grad(gz, z, Jv, retain_graph=True)[0], retain_graph=True)

    fns = {"gradient": grad, "linearize + hvp (once)": hvp_once,
           "hvp (repeated)": lambda: torch.autograd.grad(g, params, vs, retain_graph=True),
           "ggnvp (repeated)": ggnvp}
    check = (z.detach().numpy(), loss.item(), flat(g), flat(fns["hvp (repeated)"]()), flat(ggnvp()))
    return fns, check


def backpack_setup(model, X, y, residual, rows):
    """Name -> function for BackPACK's extensions that run on this model, a name -> why for those that don't."""
    try:
        import backpack
        import backpack.extensions as ext
        import torch
    except ImportError as error:
        return {}, {name: f"not installed ({error.name})" for name in rows}
    warnings.filterwarnings("ignore", message="Full backward hook is firing")  # X needs no gradient
    try:
        model = backpack.extend(copy.deepcopy(model), use_converter=residual)
    except Exception as error:  # any failure of the converter means "n/a"
        return {}, {name: f"extend failed: {error}" for name in rows}
    params = list(model.parameters())
    lossfunc = backpack.extend(torch.nn.CrossEntropyLoss())
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)

    def run(cls):
        model.zero_grad(set_to_none=True)
        with backpack.backpack(getattr(ext, cls)()):
            lossfunc(model(Xt), yt).backward()
        return params

    fns, failed = {}, {}
    for name in rows:
        cls = BACKPACK_ROWS[name][0]
        try:
            run(cls)
            fns[name] = lambda cls=cls: run(cls)
        except Exception as error:
            failed[name] = f"{cls}: {type(error).__name__}: {str(error)[:100]}"
    return fns, failed


def backpack_agreement(fns, pt, batch):
    """max |hvp − BackPACK| / max |BackPACK| per quantity (Variance × B², batch_l2 summed over parameters)."""
    out = {}
    for name, fn in fns.items():
        tensors = [getattr(p, BACKPACK_ROWS[name][1]) for p in fn()]
        ref = sum(t.numpy() for t in tensors) if name == "batch_l2" else flat(tensors)
        out[name] = rel(getattr(pt, name)(), ref * (batch**2 if name == "variance" else 1))
    return out


def bench(label, make, shape, rows, args, have_torch):
    net, theta, X, y, v = problem(make, shape, args.batch)
    mine, pt, failed = ours(net, theta, X, y, v, rows)
    providers, failed = {"hvp": mine}, {("hvp", k): why for k, why in failed.items()}
    if have_torch:
        model = torch_model(net, theta)
        providers["PyTorch"], check = torch_setup(model, X, y, v)
        errors = {"outputs": rel(pt.outputs, check[0]), "loss": rel(pt.loss, check[1]),
                  "gradient": rel(pt.grad, check[2])}
        if max(errors.values()) > TOL:
            raise SystemExit(f"{label}: hvp and torch disagree beyond {TOL:g} (relative): {errors}")
        errors.update({"hvp": rel(pt.hvp(v), check[3]), "ggnvp": rel(pt.ggnvp(v), check[4])})
        residual = any(isinstance(layer, hvp.Residual) for layer in net.layers)
        providers["BackPACK"], why = backpack_setup(model, X, y, residual, rows)
        failed.update({("BackPACK", k): reason for k, reason in why.items()})
    fns = {(who, key): fn for who, table in providers.items() for key, fn in table.items()}
    times = common.median_seconds(fns, args.repeats)
    mem = {key: common.numpy_peak_bytes(fn) for key, fn in mine.items()}
    t = {who: {key: times[who, key] for key in table} for who, table in providers.items()}
    ours_t = t["hvp"]

    print(f"\n{label}: P = {net.num_params}")
    print(f"{'quantity':<24}{'hvp ms':>9}{'÷ grad':>8}{'peak MB':>9}{'PyTorch ms':>12}{'BackPACK ms':>13}"
          f"{'hvp ÷ peer':>12}")
    for key in ("gradient", "linearize", *PRODUCTS, *rows):
        peer = "BackPACK" if key in BACKPACK_ROWS else "PyTorch"
        time, theirs = ours_t.get(key), t.get(peer, {}).get(key)
        if time:
            row = f"{key:<24}{1e3 * time:>9.2f}{time / ours_t['gradient']:>8.2f}{mem[key] / 2**20:>9.1f}"
        else:
            row = f"{key:<24}{'n/a':>9}{'':>17}"
        row += f"{1e3 * theirs:>12.2f}{'':>13}" if peer == "PyTorch" and theirs else f"{'':>12}"
        if peer == "BackPACK":
            row += f"{1e3 * theirs:>13.2f}" if theirs else f"{'n/a' if have_torch else '':>13}"
        row += f"{time / theirs:>12.2f}" if time and theirs else ""
        print(row)
    for (who, why) in dict.fromkeys((who, why) for (who, _), why in failed.items()):
        print(f"{who} n/a for {', '.join(k for (w, k), r in failed.items() if (w, r) == (who, why))}: {why}")
    if have_torch:
        print("agreement with torch, max |hvp − torch| / max |torch|: "
              + ", ".join(f"{k} {e:.1e}" for k, e in errors.items()))
    both = {k: fn for k, fn in providers.get("BackPACK", {}).items() if k in mine}
    if both:
        print("agreement with BackPACK (Variance × B²): "
              + ", ".join(f"{k} {e:.1e}" for k, e in backpack_agreement(both, pt, args.batch).items()))
    return t


def goals(label, t):
    ours_t, bp = t["hvp"], t.get("BackPACK", {})
    r = ours_t["gradient"] / t["PyTorch"]["gradient"] if "PyTorch" in t else None
    grad = f"{'met' if r <= 1.5 else 'missed'} ({r:.2f}×)" if r else "not measured (no torch)"
    ratios = ", ".join(f"{k} {ours_t[k] / bp[k]:.2f}" if k in bp and k in ours_t
                       else f"{k} n/a ({'hvp' if k not in ours_t else 'BackPACK'})" for k in PER_EXAMPLE)
    met = all(k in bp and k in ours_t and ours_t[k] < bp[k] for k in PER_EXAMPLE)
    return [f"{label}: gradient within 1.5× of PyTorch's: {grad}",
            f"{label}: products ÷ our gradient (compare with the MLP of products.py): "
            + ", ".join(f"{key} {ours_t[key] / ours_t['gradient']:.2f}" for key in PRODUCTS),
            f"{label}: faster than BackPACK on every per-example quantity: "
            + (f"{'met' if met else 'missed'} (hvp ÷ BackPACK: {ratios})" if bp else "not measured (BackPACK n/a)")]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, help="examples per batch (default 128; 8 with --quick)")
    parser.add_argument("--repeats", type=int, help="timed calls of each function (default 20; 2 with --quick)")
    parser.add_argument("--threads", type=int, help="BLAS and torch threads (default 2; 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="smoke test: batch 8, 2 repeats, 1 thread")
    common.add_memory_option(parser)
    args = parser.parse_args()
    for name, full, quick in (("batch", 128, 8), ("repeats", 20, 2), ("threads", 2, 1)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    memory = common.apply_memory_option(args)
    load_before = os.getloadavg()[0]
    blas_limited = limit_blas_threads(args.threads)
    try:
        import torch

        torch.set_num_threads(args.threads)
        versions = f"; PyTorch {torch.__version__}"
    except ImportError:
        torch = None
        versions = ""
    print(f"machine: {common.cpu_name()}, {os.cpu_count()} cores; numpy {np.__version__} ({blas_kernel()}){versions}; "
          f"{memory}; float32, batch {args.batch}, cross-entropy (mean); medians of {args.repeats}; threads: "
          f"{args.threads} for torch and {'for' if blas_limited else 'not set for'} numpy's BLAS")
    if torch is None:
        print("PyTorch is not installed: timing hvp only (pip install torch backpack-for-pytorch for the peers)")
    summary = []
    for label, (make, shape, rows) in NETS.items():
        summary += goals(label, bench(label, make, shape, rows, args, torch is not None))
    print(f"\nload average before/after: {load_before:.1f}/{os.getloadavg()[0]:.1f}\ngoals:")
    print("\n".join(summary))


if __name__ == "__main__":
    main()
