"""Time the curvature toolkit on the products MLP, and PyHessian on the identical problem.

MLP 784-512-256-10 with tanh, batch 256, softmax cross-entropy (mean), float32, synthetic
data from a fixed seed (as benchmarks/products.py). For hvp: one ``hvp`` product, the
``HessianOperator``'s matvec and block matmat (time per matvec), the top eigenvalue
(Lanczos and block power iteration), the trace (Hutchinson, 100 matvecs; Hutch++), and a
spectral density (SLQ, 10 probes × 80 steps), each with its matvec count. PyHessian
(``pip install --no-deps pyhessian``) runs its power iteration (maxIter=100, tol=1e-3, its
defaults) and Hutchinson trace (100 probes: tol=0 so that it never stops early) on the same
network, weights and batch; when the package cannot be imported, a minimal
reimplementation of those two documented algorithms in torch runs instead and is labelled
so. Medians of rounds, measured side by side in this one run (``common.rounds``).

    python benchmarks/curvature.py [--repeats 3] [--threads 2] [--pyhessian package|reimplemented|none]
        [--reuse-freed-memory]
"""

import argparse
import os
import sys
import warnings

import common
import numpy as np
from common import BATCH, WIDTHS


def median_seconds(fns, repeats, **options):
    """Median wall time (:func:`common.rounds`, ``options`` as there) and last result of each callable."""
    results = {}
    keep = {key: (lambda key=key, fn=fn: results.__setitem__(key, fn())) for key, fn in fns.items()}
    return common.median_seconds(keep, repeats, **options), results


# -- PyHessian ------------------------------------------------------------------------


def torch_model(net, theta, threads):
    """The same network and weights in torch (Linear weight is (out, in) there)."""
    import torch

    torch.set_num_threads(threads)
    return common.torch_mlp(net, theta)


class ReimplementedPyHessian:
    """PyHessian's documented power iteration and Hutchinson trace, rewritten minimally in torch.

    Used only when the package cannot be imported. As PyHessian: HVPs by double backward
    from gradients built once with create_graph; power iteration from a Gaussian vector,
    normalized by ``‖v‖ + 1e-6``, stopping when ``|λ − λ_prev|/(|λ_prev| + 1e-6) < tol``;
    Hutchinson with Rademacher probes and the same relative stopping rule on the mean.
    """

    def __init__(self, model, criterion, data):
        import torch

        self.torch = torch
        self.params = [p for p in model.parameters() if p.requires_grad]
        inputs, targets = data
        loss = criterion(model(inputs), targets)
        self.grads = torch.autograd.grad(loss, self.params, create_graph=True)

    def _hvp(self, v):
        return self.torch.autograd.grad(self.grads, self.params, grad_outputs=v, retain_graph=True)

    @staticmethod
    def _dot(xs, ys):
        return sum(float((x * y).sum()) for x, y in zip(xs, ys))

    def _normalize(self, v):
        norm = self._dot(v, v) ** 0.5
        return [x / (norm + 1e-6) for x in v]

    def eigenvalues(self, maxIter=100, tol=1e-3, top_n=1):  # noqa: N803 (PyHessian's names)
        assert top_n == 1
        v = self._normalize([self.torch.randn_like(p) for p in self.params])
        eigenvalue = None
        for _ in range(maxIter):
            Hv = self._hvp(v)
            new = self._dot(Hv, v)
            v = self._normalize(Hv)
            if eigenvalue is not None and abs(eigenvalue - new) / (abs(eigenvalue) + 1e-6) < tol:
                eigenvalue = new
                break
            eigenvalue = new
        return [eigenvalue], [v]

    def trace(self, maxIter=100, tol=1e-3):  # noqa: N803
        samples, estimate = [], 0.0
        for _ in range(maxIter):
            v = [self.torch.randint_like(p, high=2) * 2 - 1 for p in self.params]
            samples.append(self._dot(self._hvp(v), v))
            if abs(np.mean(samples) - estimate) / (estimate + 1e-6) < tol:
                return samples
            estimate = np.mean(samples)
        return samples


def pyhessian_runs(net, theta, X, y, threads, which):
    """(label, callables) for PyHessian's top eigenvalue and trace, each returning (value, matvecs)."""
    import torch

    model = torch_model(net, theta, threads)
    criterion = torch.nn.CrossEntropyLoss()
    data = (torch.from_numpy(X), torch.from_numpy(y))
    label = "PyHessian"
    counter = {"hvps": 0}
    if which == "package":
        try:
            import pyhessian  # noqa: F401
            module = sys.modules["pyhessian.hessian"]
            original = module.hessian_vector_product

            def counted(*args):
                counter["hvps"] += 1
                return original(*args)

            module.hessian_vector_product = counted
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                engine = module.hessian(model, criterion, data=data, cuda=False)
        except Exception as error:  # an unusable package: fall back, and say so
            print(f"PyHessian could not be used ({type(error).__name__}: {error}); "
                  "running the reimplementation of its algorithms instead")
            which = "reimplemented"
    if which == "reimplemented":
        label = "PyHessian algorithm (reimplemented)"
        engine = ReimplementedPyHessian(model, criterion, data)
        original_hvp = engine._hvp

        def counted_hvp(v):
            counter["hvps"] += 1
            return original_hvp(v)

        engine._hvp = counted_hvp

    def counted_run(fn):
        def run():
            counter["hvps"] = 0
            value = fn()
            return value, counter["hvps"]
        return run

    def setup():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if which == "package":
                return sys.modules["pyhessian.hessian"].hessian(model, criterion, data=data, cuda=False)
            return ReimplementedPyHessian(model, criterion, data)

    def hvp_once():
        v = [torch.ones_like(p) for p in engine.params]
        return torch.autograd.grad(engine.gradsH if which == "package" else engine.grads, engine.params,
                                   grad_outputs=v, retain_graph=True)

    torch.manual_seed(0)
    return label, {
        "setup (forward + backward, create_graph)": lambda: (setup(), 0),
        "one hvp (double backward)": lambda: (hvp_once(), 1),
        "top eigenvalue": counted_run(lambda: engine.eigenvalues(maxIter=100, tol=1e-3, top_n=1)[0][0]),
        "trace, Hutchinson 100": counted_run(lambda: float(np.mean(engine.trace(maxIter=100, tol=0.0)))),
    }, model


# -- hvp ---------------------------------------------------------------------------


def ours(net, theta, X, y):
    import hvp
    from hvp import curvature

    loss = hvp.CrossEntropyLoss()
    H = hvp.HessianOperator(net, loss, theta, (X, y))
    pt = hvp.linearize(net, loss, theta, X, y)
    rng = np.random.default_rng(1)
    v = rng.normal(size=net.num_params).astype(np.float32)
    V = rng.normal(size=(net.num_params, 16)).astype(np.float32)
    seeds = iter(range(10**6))  # a fresh seed per repeat: timings over different probes

    def top(tol, method="lanczos"):
        with warnings.catch_warnings():  # block power may stop at maxiter=100 short of tol
            warnings.simplefilter("ignore", RuntimeWarning)
            result = curvature.eigenvalues(H, k=1, tol=tol, method=method, seed=next(seeds), progress=False)
        return float(result.values[0]), result.num_matvecs

    def trace(method):
        result = curvature.trace(H, 100, method, seed=next(seeds), progress=False)
        return (result.estimate, result.stderr), result.num_matvecs

    def density(reorthogonalize):
        result = curvature.spectral_density(H, reorthogonalize=reorthogonalize, seed=next(seeds), progress=False)
        return f"largest node {result.nodes.max():.5g}, sigma {result.sigma:.2g}", result.num_matvecs

    return H, {
        "setup (HessianOperator: forward + backward)": lambda: (hvp.HessianOperator(net, loss, theta, (X, y)), 0),
        "one hvp (pt.hvp)": lambda: (pt.hvp(v), 1),
        "operator matvec (H @ v)": lambda: (H @ v, 1),
        "operator matmat, 16 columns": lambda: (H @ V, 16),
        "top eigenvalue, Lanczos tol 1e-2": lambda: top(1e-2),
        "top eigenvalue, Lanczos tol 1e-3": lambda: top(1e-3),
        "top eigenvalue, Lanczos tol 1e-6": lambda: top(1e-6),
        "top eigenvalue, block power (2) tol 1e-3": lambda: top(1e-3, "power"),
        "trace, Hutchinson 100": lambda: trace("hutchinson"),
        "trace, Hutch++ 100": lambda: trace("hutch++"),
    }, {
        "spectral density, SLQ 10 x 80": lambda: density(False),
        "spectral density, SLQ 10 x 80, full reorth.": lambda: density(True),
    }


def describe(value):
    if isinstance(value, str):
        return value
    if isinstance(value, tuple) and len(value) == 2 and all(isinstance(x, float) for x in value):
        return f"{value[0]:.5g} ± {value[1]:.2g}"
    if isinstance(value, float):
        return f"{value:.6g}"
    return ""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (numpy's BLAS uses its own setting)")
    parser.add_argument("--pyhessian", choices=("package", "reimplemented", "none"), default="package")
    common.add_memory_option(parser)
    args = parser.parse_args()
    memory = common.apply_memory_option(args)

    net, theta, X, y = common.problem()
    print(f"MLP {'-'.join(map(str, WIDTHS))} tanh, batch {BATCH}, float32, P = {net.num_params}; "
          f"{common.cpu_name()}, {os.cpu_count()} cores, {memory}, "
          f"medians of {args.repeats} rounds\n")
    H, fast, slow = ours(net, theta, X, y)
    fns = {("hvp", name): fn for name, fn in fast.items()}
    peer = None
    if args.pyhessian != "none":
        try:
            label, peer_fns, model = pyhessian_runs(net, theta, X, y, args.threads, args.pyhessian)
        except ImportError as error:
            print(f"torch is not installed ({error}): no PyHessian comparison")
        else:
            peer = label
            fns.update({(label, name): fn for name, fn in peer_fns.items()})
            print(f"same problem: ‖Hv(hvp) − Hv(torch)‖/‖Hv(torch)‖ = {check_same_problem(H, model, X, y):.1e}\n")
    times, results = median_seconds(fns, args.repeats)
    slow_times, slow_results = median_seconds({("hvp", name): fn for name, fn in slow.items()},
                                              max(1, args.repeats // 2), burst=1, warm=False)
    times.update(slow_times)
    results.update(slow_results)

    hvp_time = times[("hvp", "one hvp (pt.hvp)")]
    print(f"{'':44s} {'median':>10s} {'matvecs':>8s} {'per matvec':>11s} {'vs one hvp':>10s}  value")
    for library in ["hvp"] + ([peer] if peer else []):
        print(f"-- {library}")
        for (lib, name), seconds in times.items():
            if lib != library:
                continue
            value, matvecs = results[(lib, name)]
            per = f"{1e3 * seconds / matvecs:9.2f}ms" if matvecs else ""
            ratio = f"{seconds / matvecs / hvp_time:9.2f}x" if matvecs else ""
            print(f"   {name:41s} {1e3 * seconds:8.1f}ms {matvecs or '':>8} {per:>11s} {ratio:>10s}  {describe(value)}")
    if peer:
        reference = results[("hvp", "top eigenvalue, Lanczos tol 1e-6")][0]
        short = peer.split()[0]
        print(f"\nside by side (hvp vs {peer}); top eigenvalue to tol 1e-6 (Lanczos): {reference:.6g}")
        for ours_name, their_name in [("top eigenvalue, Lanczos tol 1e-2", "top eigenvalue"),
                                      ("top eigenvalue, Lanczos tol 1e-3", "top eigenvalue"),
                                      ("trace, Hutchinson 100", "trace, Hutchinson 100")]:
            (mine, n_mine), (theirs, n_theirs) = results[("hvp", ours_name)], results[(peer, their_name)]
            ratio = times[(peer, their_name)] / times[("hvp", ours_name)]
            if "eigenvalue" in ours_name:
                mine_text = f"{mine:.6g} (rel. error {abs(mine - reference) / reference:.1e})"
                theirs_text = f"{theirs:.6g} (rel. error {abs(theirs - reference) / reference:.1e})"
            else:
                mine_text, theirs_text = describe(mine), describe(theirs)
            print(f"   {ours_name:34s} {mine_text:>32s} {n_mine:4d} matvecs | {short} {theirs_text:>32s} "
                  f"{n_theirs:4d} hvps | time {short}/hvp {ratio:.2f}")


def check_same_problem(H, model, X, y):
    """Relative difference of one Hessian-vector product from each side: the problems are identical."""
    import torch

    params = list(model.parameters())
    v = np.random.default_rng(7).normal(size=H.shape[0]).astype(np.float32)
    vs = []
    for p in H.net.unflatten(v):
        if p:
            vs += [torch.from_numpy(p["weight"].T.copy()), torch.from_numpy(p["bias"].copy())]
    loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(X)), torch.from_numpy(y))
    grads = torch.autograd.grad(loss, params, create_graph=True)
    Hv_torch = torch.autograd.grad(grads, params, grad_outputs=vs)
    ours = H @ v
    theirs = np.empty_like(ours)
    views = H.net.unflatten(theirs)
    tensors = iter(Hv_torch)
    for p in views:
        if p:
            p["weight"][...] = next(tensors).numpy().T
            p["bias"][...] = next(tensors).numpy()
    return float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))


if __name__ == "__main__":
    main()
