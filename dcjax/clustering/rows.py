"""Streaming over blocks of rows without copying the input.

Blocks are dynamic slices of the (r, ...) arrays rather than a padded reshape, so no padded copy
of the input is made. When ``chunk`` does not divide ``r``, the last block is shifted back to
end at row ``r``: its rows already seen are masked out of reductions (``fold_rows``) and
computed twice, with identical values, for per-row outputs (``map_rows``).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def fold_rows(
    step: Callable,
    init,
    arrays: tuple[jax.Array, ...],
    chunk: int,
    *,
    row_offset: jax.Array | int = 0,
    num_valid: int | None = None,
):
    """Folds ``carry = step(carry, valid, *tiles)`` over blocks of ``chunk`` rows of ``arrays``.

    Args:
      step: ``(carry, valid (chunk,) bool, *tiles (chunk, ...)) -> carry``.
      init: the initial carry (any pytree).
      arrays: arrays with the same number of rows r; ``1 <= chunk <= r``.
      chunk: rows per block.
      row_offset, num_valid: rows whose global index ``row_offset + i`` is ``>= num_valid``
        (padding) are also marked invalid; ``None`` keeps every row.
    """
    r = arrays[0].shape[0]
    num_chunks = -(-r // chunk)

    def body(i, carry):
        start = jnp.minimum(i * chunk, r - chunk)
        tiles = [jax.lax.dynamic_slice_in_dim(x, start, chunk) for x in arrays]
        local = start + jnp.arange(chunk)
        valid = local >= i * chunk
        if num_valid is not None:
            valid &= row_offset + local < num_valid
        return step(carry, valid, *tiles)

    return jax.lax.fori_loop(0, num_chunks, body, init)


def map_rows(fn: Callable, arrays: tuple[jax.Array, ...], chunk: int):
    """Per-row outputs of ``fn(*tiles)`` over blocks of ``chunk`` rows of ``arrays``.

    Args:
      fn: ``(*tiles (chunk, ...)) -> pytree of (chunk, ...) arrays``.
      arrays: arrays with the same number of rows r; ``1 <= chunk <= r``.
      chunk: rows per block.

    Returns:
      ``fn``'s pytree with (r, ...) leaves, as if applied to all rows at once.
    """
    r = arrays[0].shape[0]
    num_chunks = -(-r // chunk)
    if num_chunks == 1:
        return fn(*arrays)

    def block(i):
        start = jnp.minimum(i * chunk, r - chunk)
        return fn(*(jax.lax.dynamic_slice_in_dim(x, start, chunk) for x in arrays))

    out = jax.lax.map(block, jnp.arange(num_chunks))
    overlap = num_chunks * chunk - r
    return jax.tree.map(
        lambda o: jnp.concatenate([o[:-1].reshape(-1, *o.shape[2:]), o[-1, overlap:]]), out
    )
