"""Convolution and max-pooling in the forms that are fast on XLA:CPU, with the plain results.

Measured on the 2-core development CPU (``bench/README.md``, "Profiling the train step"):

- ``conv``: JAX's transpose rules write a convolution's gradients as convolutions with permuted
  dimension labels. Outside loops XLA:CPU rewrites those into plain layouts, but inside a
  ``lax.scan`` body (the fused epoch) it ran them in a generic slow path: LeNet-5's scanned
  step took 54 ms instead of 17 ms. ``conv`` computes the same gradients from explicit
  transposes, pads and kernel flips into NHWC / HWIO convolutions, fast in and out of loops.
  Its forward pass is the native one, except for a single input channel (LeNet-5's conv1, the
  digits CNN's), which runs as shifted multiply-adds: 2.3 ms against 19.7 ms at batch 512.
- ``max_pool``: the gradient of ``reduce_window`` (``nn.max_pool``) lowers to
  ``select_and_scatter``: 3.7 ms forward + gradient for a 2x2 / stride-2 pool of
  (128, 28, 28, 6), against 1.6 ms as reshape + max with an elementwise gradient.

Both give ``nn.Conv`` / ``nn.max_pool``'s results (to float32 summation order) and are used by
every backbone; on GPU/TPU they are the same dense work.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["conv", "max_pool"]

_NHWC = ("NHWC", "HWIO", "NHWC")
# Backends whose one-input-channel convolutions run as shifted multiply-adds (``_forward``); on
# GPU/TPU the native convolution handles them well (not measured here).
_ONE_CHANNEL_BACKENDS = ("cpu",)


def _conv(x, k, strides=(1, 1), pads="VALID", precision=None, rhs_dilation=None):
    return lax.conv_general_dilated(
        x, k, strides, pads, rhs_dilation=rhs_dilation, dimension_numbers=_NHWC, precision=precision
    )


def _pad_hw(x: jax.Array, pads) -> jax.Array:
    """(B, H, W, C) ``x`` zero-padded by ``pads`` = ((top, bottom), (left, right))."""
    (pt, pb), (pl, pr) = pads
    return lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0), (pt, pb, 0), (pl, pr, 0), (0, 0, 0)])


def _window_views(x: jax.Array, window_hw, strides, out_hw) -> list[jax.Array]:
    """The KH*KW strided (B, OH, OW, C) views of ``x`` that window tap (i, j) reads, row-major."""
    (kh, kw), (sh, sw), (oh, ow) = window_hw, strides, out_hw
    return [
        x[:, i : i + sh * (oh - 1) + 1 : sh, j : j + sw * (ow - 1) + 1 : sw]
        for i in range(kh)
        for j in range(kw)
    ]


def _one_channel_conv(x, k, strides, pads):
    """A (B, H, W, 1) input's convolution as a sum of KH*KW shifted, scaled copies.

    One elementwise fusion of KH*KW multiply-adds per output, where XLA:CPU's convolution of a
    single input channel is 8x slower (LeNet-5's conv1 at batch 512: 2.3 ms against 19.7 ms).
    """
    kh, kw, _, _ = k.shape
    sh, sw = strides
    x = _pad_hw(x, pads)
    oh, ow = (x.shape[1] - kh) // sh + 1, (x.shape[2] - kw) // sw + 1
    views = _window_views(x, (kh, kw), strides, (oh, ow))
    # (B, OH, OW, 1) * (O,) per tap.
    return functools.reduce(
        jnp.add, (view * k[tap // kw, tap % kw, 0] for tap, view in enumerate(views))
    )


def _forward(x, k, strides, pads, precision):
    if x.shape[-1] == 1 and jax.default_backend() in _ONE_CHANNEL_BACKENDS:
        return _one_channel_conv(x, k, strides, pads)
    return _conv(x, k, strides, pads, precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_explicit_grads(x, k, strides, pads, precision):
    return _forward(x, k, strides, pads, precision)


def _conv_fwd(x, k, strides, pads, precision):
    return _forward(x, k, strides, pads, precision), (x, k)


def _conv_bwd(strides, pads, precision, residuals, g):
    x, k = residuals
    kh, kw, _, _ = k.shape
    (pt, pb), (pl, pr) = pads
    zero = jnp.zeros((), x.dtype)
    xp = _pad_hw(x, pads)
    hp, wp = xp.shape[1:3]
    oh, ow = g.shape[1:3]
    sh, sw = strides
    # Kernel gradient as a plain NHWC convolution: the input's channels act as its batch and
    # the batch as its channels; g, stride-dilated, is the window.
    dk = _conv(
        jnp.transpose(xp, (3, 1, 2, 0)),  # (C, Hp, Wp, B)
        jnp.transpose(g, (1, 2, 0, 3)),  # (OH, OW, B, O)
        precision=precision,
        rhs_dilation=strides,
    )  # (C, >= KH, >= KW, O)
    dk = jnp.transpose(dk[:, :kh, :kw], (1, 2, 0, 3))
    # Input gradient: the stride-dilated g, padded to full size, correlated with the flipped
    # kernel (output and input channels swapped).
    gd = lax.pad(
        g,
        zero,
        [
            (0, 0, 0),
            (kh - 1, hp - sh * (oh - 1) - 1, sh - 1),
            (kw - 1, wp - sw * (ow - 1) - 1, sw - 1),
            (0, 0, 0),
        ],
    )
    dxp = _conv(gd, jnp.transpose(k[::-1, ::-1], (0, 1, 3, 2)), precision=precision)
    return dxp[:, pt : hp - pb, pl : wp - pr], dk


_conv_explicit_grads.defvjp(_conv_fwd, _conv_bwd)


def conv(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding,
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers=None,
    feature_group_count: int = 1,
    precision=None,
    **kwargs,
) -> jax.Array:
    """``lax.conv_general_dilated`` whose gradients are written as plain NHWC convolutions.

    For ``flax.linen.Conv(conv_general_dilated=conv)``. The forward pass is the native one (on
    CPU a single input channel runs as shifted multiply-adds, ``_one_channel_conv``). JAX's
    own transpose rules express the kernel and input gradients as convolutions with permuted
    dimension labels; inside a ``lax.scan`` body XLA:CPU leaves those in a generic slow path
    (LeNet-5's two kernel gradients took 28 ms of a 54 ms step, against 7 ms outside a loop).
    Here the same gradients are computed from explicit transposes, pads and kernel flips into
    NHWC / HWIO convolutions, which run at full speed in and out of loops. Results equal the
    native gradients up to float32 summation order. Dilated, grouped or non-NHWC convolutions
    go to ``lax.conv_general_dilated`` unchanged.

    Args:
      lhs: (B, H, W, C) input.
      rhs: (KH, KW, C, O) kernel.
      window_strides: (sh, sw).
      padding: ``"VALID"``, ``"SAME"`` or ((top, bottom), (left, right)).

    Returns:
      (B, OH, OW, O).
    """
    plain = (
        tuple(dimension_numbers or ())
        in (_NHWC, tuple(lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)))
        and feature_group_count == 1
        and all(d == 1 for d in (lhs_dilation or (1, 1)))
        and all(d == 1 for d in (rhs_dilation or (1, 1)))
        and not kwargs
        and lhs.ndim == 4
    )
    if not plain:
        return lax.conv_general_dilated(
            lhs,
            rhs,
            window_strides,
            padding,
            lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation,
            dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count,
            precision=precision,
            **kwargs,
        )
    strides = tuple(int(s) for s in window_strides)
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    return _conv_explicit_grads(lhs, rhs, strides, pads, precision)


def _pool_taps(x: jax.Array, window: int, stride: int) -> tuple[list[jax.Array], int, int]:
    """The window² (B, OH, OW, C) views of ``x`` that each tap of a valid pool reads, row-major,
    and (OH, OW)."""
    b, h, w, c = x.shape
    oh, ow = (h - window) // stride + 1, (w - window) // stride + 1
    if stride == window:
        x6 = x[:, : oh * window, : ow * window].reshape(b, oh, window, ow, window, c)
        taps = [x6[:, :, i, :, j] for i in range(window) for j in range(window)]
    else:
        taps = _window_views(x, (window, window), (stride, stride), (oh, ow))
    return taps, oh, ow


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _valid_max_pool(x: jax.Array, window: int, stride: int) -> jax.Array:
    b, h, w, c = x.shape
    oh, ow = (h - window) // stride + 1, (w - window) // stride + 1
    if stride == window:
        x = x[:, : oh * window, : ow * window]
        return x.reshape(b, oh, window, ow, window, c).max(axis=(2, 4))
    views = _window_views(x, (window, window), (stride, stride), (oh, ow))
    return functools.reduce(jnp.maximum, views)


def _valid_max_pool_fwd(x, window, stride):
    # The winning tap of each window is chosen here, from the values that give the max, and
    # kept as the residual. Comparing x with y again in the backward pass is not safe under
    # jit: XLA may recompute x there in another fusion whose rounding differs, and a window
    # with no tap equal to its max would lose its gradient (AlexNet's pool2: conv1/conv2
    # gradients off by 31-67 %, bench/results/parity_deepcluster_official.md).
    taps, _, _ = _pool_taps(x, window, stride)
    index_dtype = jnp.int8 if window * window <= 127 else jnp.int32
    y, winner = taps[0], jnp.zeros(taps[0].shape, index_dtype)
    for tap, view in enumerate(taps[1:], start=1):
        # Strictly greater: ties go to the first tap in row-major order, as select_and_scatter.
        better = view > y
        y = jnp.where(better, view, y)
        winner = jnp.where(better, jnp.asarray(tap, index_dtype), winner)
    return y, (winner, x.shape)


def _valid_max_pool_bwd(window, stride, residuals, g):
    winner, (b, h, w, c) = residuals
    oh, ow = g.shape[1:3]
    zero = jnp.zeros((), g.dtype)
    if stride == window:
        rank = (jnp.arange(window)[:, None] * window + jnp.arange(window)).astype(winner.dtype)
        rank = rank[None, None, :, None, :, None]  # (1, 1, win, 1, win, 1)
        dx6 = jnp.where(rank == winner[:, :, None, :, None], g[:, :, None, :, None], zero)
        dx = dx6.reshape(b, oh * window, ow * window, c)
        return (jnp.pad(dx, ((0, 0), (0, h - oh * window), (0, w - ow * window), (0, 0))),)
    dx = jnp.zeros((b, h, w, c), g.dtype)
    for tap in range(window * window):
        i, j = divmod(tap, window)
        place = [
            (0, 0, 0),
            (i, h - i - stride * (oh - 1) - 1, stride - 1),
            (j, w - j - stride * (ow - 1) - 1, stride - 1),
            (0, 0, 0),
        ]
        dx = dx + jax.lax.pad(jnp.where(winner == tap, g, zero), zero, place)
    return (dx,)


_valid_max_pool.defvjp(_valid_max_pool_fwd, _valid_max_pool_bwd)


def max_pool(
    x: jax.Array, window: int, stride: int, padding: str | Sequence[tuple[int, int]] = "VALID"
) -> jax.Array:
    """Max over ``window`` x ``window`` windows of (B, H, W, C) ``x`` at ``stride``.

    The same values and gradients as ``nn.max_pool(x, (window, window), (stride, stride),
    padding)``, ties included (a window's gradient goes to the first position in row-major order
    that holds its maximum). Without padding the forward pass is a reshape + max
    (non-overlapping windows) or a max over the window's strided views (overlapping ones), and
    the gradient elementwise selects and pads, instead of ``reduce_window`` and
    ``select_and_scatter``.

    Returns:
      (B, (H - window) // stride + 1, (W - window) // stride + 1, C), ``x``'s dtype.
    """
    if padding != "VALID":
        return nn.max_pool(x, (window, window), strides=(stride, stride), padding=padding)
    return _valid_max_pool(x, int(window), int(stride))
