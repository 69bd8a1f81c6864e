"""Comparing the parameter updates of two runs of the same steps (1 device against 8)."""

from __future__ import annotations

import jax
import numpy as np

_EPS32 = float(np.finfo(np.float32).eps)


def assert_same_updates(before_one, after_one, before_eight, after_eight, *, rtol=1e-3):
    """Asserts that every parameter moved by the same update on both runs, relatively.

    Per leaf, with d1 = after_one - before_one and d8 = after_eight - before_eight:

    - a bias whose d1 is round-off (|d1| <= 1e-7) has no gradient (a batch norm follows its
      layer and removes any constant): it must not move on the other run either;
    - every other leaf must move by at least 100 times its float32 spacing
      (||d1|| >= 100 eps32 ||p||), so that a skipped, halved or sign-flipped update cannot
      hide under round-off; then ||d8 - d1|| <= ``rtol`` ||d1||.

    Returns:
      (the smallest ||d1|| / (eps32 ||p||), the largest ||d8 - d1|| / ||d1||) over the moving
      leaves, for the tests' comments.
    """
    leaves = zip(
        jax.tree_util.tree_leaves_with_path(before_one),
        jax.tree.leaves(after_one),
        jax.tree.leaves(before_eight),
        jax.tree.leaves(after_eight),
        strict=True,
    )
    floors, errors = [], []
    for (path, b1), a1, b8, a8 in leaves:
        name = jax.tree_util.keystr(path)
        b1, a1, b8, a8 = (np.asarray(x, np.float64) for x in (b1, a1, b8, a8))
        d1, d8 = a1 - b1, a8 - b8
        if name.endswith("['bias']") and np.max(np.abs(d1)) <= 1e-7:
            assert np.max(np.abs(d8)) <= 1e-7, f"{name}: moved by {np.max(np.abs(d8))} on one run"
            continue
        size = np.linalg.norm(d1)
        floor = _EPS32 * max(np.linalg.norm(b1), np.linalg.norm(a1))
        assert size >= 100 * floor, f"{name}: update {size:.3g} is under 100 x {floor:.3g}"
        error = np.linalg.norm(d8 - d1)
        assert error <= rtol * size, f"{name}: updates differ by {error / size:.3g} (relative)"
        floors.append(size / floor)
        errors.append(error / size)
    assert floors, "no parameter moved"
    return min(floors), max(errors)
