"""What the benchmark scripts share: the MLP problem of DESIGN.md §3, the machine's name, the allocator switch."""

import platform
import time
import tracemalloc

import numpy as np

WIDTHS = (784, 512, 256, 10)
BATCH = 256


def mlp(widths=WIDTHS):
    """``Linear``/``Tanh`` layers of the given widths (no activation after the last layer)."""
    import hvp

    layers = []
    for i, (m, n) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(hvp.Linear(m, n))
        if i < len(widths) - 2:
            layers.append(hvp.Tanh())
    return hvp.Sequential(*layers)


def problem(dtype=np.float32, seed=0):
    """MLP 784-512-256-10 (tanh), θ, inputs X (256, 784) ~ N(0, 1) and labels y (256,), from one seed."""
    net = mlp()
    rng = np.random.default_rng(seed)
    theta = net.init(seed=seed, dtype=dtype)
    X = rng.normal(size=(BATCH, WIDTHS[0])).astype(dtype)
    y = rng.integers(0, WIDTHS[-1], size=BATCH)
    return net, theta, X, y


def torch_mlp(net, theta):
    """The same network and weights as a ``torch.nn.Sequential`` (a Linear weight is (out, in) there)."""
    import torch

    modules = []
    for p in net.unflatten(theta):
        if p:
            linear = torch.nn.Linear(*p["weight"].shape)
            with torch.no_grad():
                linear.weight.copy_(torch.from_numpy(p["weight"].T.copy()))
                linear.bias.copy_(torch.from_numpy(p["bias"].copy()))
            modules.append(linear)
        else:
            modules.append(torch.nn.Tanh())
    return torch.nn.Sequential(*modules)


def cpu_name():
    """The CPU's model name, from /proc/cpuinfo where there is one."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


SETTLE_SECONDS = 0.2  # longer than OpenBLAS's workers spin after a threaded call (2^28 cycles), and OpenMP's


def rounds(fns, repeats, burst=3, warm=True, clock=time.perf_counter, settle=SETTLE_SECONDS, seed=0):
    """Seconds per call of each function: ``{key: array (repeats,)}``, keys ``(library, name)`` (or plain names,
    one library).

    Calls come in bursts: one untimed call (``warm``), then ``burst`` timed ones in a row, as a function runs in
    real use (caches and its library's threads warm); slow functions can take ``burst=1, warm=False``. A round
    runs a burst of every function, library after library, the functions of a library in a fresh random order;
    before each library's turn the run pauses ``settle`` seconds, so that the worker threads of the library
    before it (OpenBLAS's spin about 0.1 s after a threaded call, OpenMP's alike) have gone to sleep instead of
    taking cores from it.
    """
    libraries = {}
    for key, fn in fns.items():
        libraries.setdefault(key[0] if isinstance(key, tuple) else None, {})[key] = fn
    rng = np.random.default_rng(seed)
    times = {key: [] for key in fns}
    for _ in range(-(-repeats // burst)):
        for table in libraries.values():
            time.sleep(settle)
            keys = list(table)
            for key in [keys[j] for j in rng.permutation(len(keys))]:
                if warm:
                    table[key]()
                for _ in range(burst):
                    start = clock()
                    table[key]()
                    times[key].append(clock() - start)
    return {key: np.array(t[:repeats]) for key, t in times.items()}


def median_seconds(fns, repeats, **options):
    """Median seconds per call of each function, timed by :func:`rounds` (``options`` as there)."""
    return {key: float(np.median(t)) for key, t in rounds(fns, repeats, **options).items()}


def torch_peak_bytes(fn):
    """Peak bytes allocated by torch during one call, from torch's profiler memory events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak


def numpy_peak_bytes(fn):
    """Peak bytes allocated (numpy arrays included) during one call, from tracemalloc; hvp's pool of free buffers is
    emptied first, so that every array the call needs is counted."""
    from hvp import memory

    memory.release_memory()
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def jax_peak_bytes(jitted, *args):
    """Temporary and output bytes of a jitted JAX function, from XLA's memory analysis of its compiled form."""
    stats = jitted.lower(*args).compile().memory_analysis()
    return stats.temp_size_in_bytes + stats.output_size_in_bytes


def add_memory_option(parser):
    parser.add_argument("--reuse-freed-memory", action="store_true",
                        help="call hvp.reuse_freed_memory() first (default: glibc's allocator as it is)")


def apply_memory_option(args):
    """Call ``hvp.reuse_freed_memory()`` if ``--reuse-freed-memory``; a phrase for the header line."""
    import hvp

    if args.reuse_freed_memory and hvp.reuse_freed_memory():
        return "freed memory reused (hvp.reuse_freed_memory)"
    return "default allocator"
