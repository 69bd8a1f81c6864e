"""Shared test set-up: eight simulated CPU devices, fast compiles and a fresh-random-input fixture.

XLA reads its flags once, at backend start, so they are set here before anything imports jax.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
from tests.xla_flags import xla_flags  # noqa: E402  (imports no jax)

os.environ["XLA_FLAGS"] = xla_flags(8, os.environ.get("XLA_FLAGS", ""))

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
