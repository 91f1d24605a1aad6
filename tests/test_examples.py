"""Smoke tests: every example runs end to end with tiny settings and prints what it promises."""

import runpy
import sys
from pathlib import Path

import pytest

from hvp import threads

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# (script, arguments, text the output must contain); scikit-learn examples need the digits data.
RUNS = {
    "quickstart": ("quickstart.py", [], "symmetric: True"),
    "train_digits": ("train_digits.py", ["--hidden", "16", "--seconds", "0.2", "--output", "digits.png"],
                     "Lowest training loss after 0.2 s"),
    "cnn_digits": ("cnn_digits.py", ["--seconds", "0.2", "--output", "cnn.png"], "top-5 eigenvalues"),
    "curves_autoencoder": ("curves_autoencoder.py", ["--n-train", "40", "--n-test", "20", "--budget", "0.3"],
                           "squared reconstruction error per example"),
    "sobolev_fit": ("sobolev_fit.py", ["--samples", "8", "--seeds", "1", "--max-iter", "5"], "RMSE"),
    "gradient_noise": ("gradient_noise.py", [], "B_simple"),
    "curvature_spectrum": ("curvature_spectrum.py", ["--out", "spectrum.png", "--checkpoints", "0", "3"],
                           "top-5 eigenvalues"),
    "distributed_newton_cg": ("distributed_newton_cg.py", ["--shards", "2", "--steps", "2"], "Newton-CG on 5000"),
}
NEEDS_SKLEARN = {"train_digits", "cnn_digits", "gradient_noise", "curvature_spectrum"}


@pytest.mark.parametrize("name", list(RUNS))
def test_example_runs(name, tmp_path, monkeypatch, capsys):
    script, args, expected = RUNS[name]
    if name in NEEDS_SKLEARN:
        pytest.importorskip("sklearn")
        pytest.importorskip("matplotlib")
    if name == "distributed_newton_cg":
        pytest.importorskip("distributed", reason="the example needs dask and distributed (in the test extra)")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.setattr(sys, "argv", [script, *args])
    blas_threads = threads.blas_threads()
    if name == "gradient_noise":
        namespace = runpy.run_path(str(EXAMPLES / script))
        namespace["main"](epochs=1)
    else:
        runpy.run_path(str(EXAMPLES / script), run_name="__main__")
    out = capsys.readouterr().out
    assert expected in out, out
    assert threads.blas_threads() == blas_threads  # an example's thread limit ends with it
