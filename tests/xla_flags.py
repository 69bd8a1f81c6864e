"""The XLA flags of every test process: set before jax starts, so this module imports no jax.

The suite compiles far more than it runs, and on XLA:CPU much of a compile is LLVM optimising the
generated code. Tests check results, not speed: at LLVM level 0 tests/methods/
test_deepcluster_v2.py took 74 s instead of 111 s. The HLO passes (fusion, layout, sharding) are
those of the default level.
"""

from __future__ import annotations


def xla_flags(device_count: int, existing: str = "") -> str:
    """``existing`` (an XLA_FLAGS value) plus the test flags it does not already set:
    ``device_count`` simulated CPU devices and LLVM optimisation level 0."""
    flags = existing
    for name, value in (
        ("xla_force_host_platform_device_count", device_count),
        ("xla_backend_optimization_level", 0),
    ):
        if name not in flags:
            flags = f"{flags} --{name}={value}".strip()
    return flags
