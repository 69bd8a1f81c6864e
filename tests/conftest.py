"""Shared test set-up: eight simulated CPU devices, fast compiles and a fresh-random-input fixture.

XLA reads its flags once, at backend start, so they are set here before anything imports jax.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The suite compiles far more than it runs, and on XLA:CPU much of a compile is LLVM optimising
# the generated code. Tests check results, not speed: at LLVM level 0 tests/methods/
# test_deepcluster_v2.py took 74 s instead of 111 s. The HLO passes (fusion, layout, sharding)
# are those of the default level.
_TEST_XLA_FLAGS = {
    "xla_force_host_platform_device_count": "8",
    "xla_backend_optimization_level": "0",
}
for _flag, _value in _TEST_XLA_FLAGS.items():
    if _flag not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --{_flag}={_value}".strip()

import shutil  # noqa: E402
import tempfile  # noqa: E402

# Many tests rebuild the same run (resume, evaluate, 1 vs 8 devices, the kill-and-resume
# subprocesses); a compilation cache for the session lets a rebuilt jit reuse the executable
# instead of compiling it again. Set through the environment so subprocesses share it.
_CACHE_DIR = tempfile.mkdtemp(prefix="dcjax-test-xla-cache-")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE_DIR)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def pytest_unconfigure(config):
    shutil.rmtree(_CACHE_DIR, ignore_errors=True)


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A NumPy generator seeded from fresh OS entropy; the seed is printed on failure."""
    seed = int(np.random.SeedSequence().entropy % (2**32))
    request.node.user_properties.append(("seed", seed))
    print(f"rng seed: {seed}")
    return np.random.default_rng(seed)
