"""reuse_freed_memory: glibc keeps freed blocks, so repeated large temporaries stop faulting pages in."""

import subprocess
import sys
import textwrap

import pytest

import hvp
from hvp import memory

FAULTS = textwrap.dedent("""
    import resource, sys
    import numpy as np
    import hvp
    if sys.argv[1] == "reuse":
        assert hvp.reuse_freed_memory()
    y = np.random.default_rng(0).random((1437, 128))
    for _ in range(5):  # warm-up
        1 - y * y
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(50):
        1 - y * y  # two 1.5 MB temporaries alive at once, then both freed
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


@pytest.mark.skipif(memory._glibc() is None, reason="the C library is not glibc")
def test_freed_temporaries_are_reused_without_page_faults():
    """Counted minor page faults, not time: 50 rounds of two 1.5 MB temporaries (360 pages each)."""
    def faults(mode):
        return int(subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True,
                                  check=True).stdout)
    default, reuse = faults("default"), faults("reuse")
    assert default > 50 * 360  # glibc's default returns both blocks every round
    assert reuse < 0.02 * default


@pytest.mark.parametrize("kwargs, error, match", [
    ({"max_block": 0}, ValueError, "max_block must lie in"),
    ({"max_block": 64 * 2**20}, ValueError, "max_block must lie in"),
    ({"max_block": 1.5e6}, TypeError, "max_block must be an int"),
    ({"keep": -1}, ValueError, "keep must lie in"),
    ({"keep": 2**31}, ValueError, "keep must lie in"),
    ({"keep": True}, TypeError, "keep must be an int"),
], ids=["block_zero", "block_above_glibc_ceiling", "block_float", "keep_negative", "keep_beyond_c_int",
        "keep_bool"])
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        hvp.reuse_freed_memory(**kwargs)


def test_reports_whether_applied():
    assert hvp.reuse_freed_memory() is (memory._glibc() is not None)
