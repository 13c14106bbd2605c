"""2-D convolution whose train-mode forward and kernel gradient are dots where that is
faster than XLA's CPU convolution (a CPU speed-up).

A DenseNet layer's input is a wide concatenation (up to 252 channels in densenet_seed)
and its output narrow (18). XLA's CPU convolution handles that shape poorly in two
places, and `conv`'s custom VJP replaces each with one `lax.dot_general`:

- The forward: a convolution with a narrow output runs at less than half the speed of the
  same FLOPs with a wide output (BUILD_NOTES.md, models). So the
  input is multiplied by all KH * KW taps side by side, (N, H, W, C) x (C, KH KW F),
  a wide output, and the taps' shifted slices are summed (`_forward_dot_pays`).
- The kernel gradient: XLA computes it as another convolution that takes the input
  channels as its batch: it transposes the layer's input (N, H, W, C) to (C, H, W, N)
  first, recomputing the BatchNorm and ReLU that produced it inside that transpose,
  the "elementwise fusions with a transpose" of a train step's profile
  (benchmarks/README.md). `conv` instead transposes the narrow side: it writes the
  KH * KW shifted copies of the output gradient, transposed to (KH * KW * F, N * H * W),
  and contracts them with the input as it lies in memory, in one dot that XLA's CPU
  dot takes without another transpose (the input's window when it is the narrow side,
  e.g. the stem's 3 channels; `_dot_pays`).

The input gradient is autodiff's of XLA's convolution. Where neither dot pays, and on
any call it does not cover (other layouts, strides, dilations, groups, dtypes), `conv`
is lax.conv_general_dilated itself. Same result up to float rounding (tests/test_conv.py).
"""

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

_DIMS = ("NHWC", "HWIO", "NHWC")


def conv(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count: int = 1,
    precision=None,
    **kwargs,
) -> jax.Array:
    """lax.conv_general_dilated's signature and result, for `nn.Conv(conv_general_dilated=conv)`."""
    covered = (
        lhs.ndim == 4
        and tuple(window_strides) == (1, 1)
        and tuple(lhs_dilation or (1, 1)) == (1, 1)
        and tuple(rhs_dilation or (1, 1)) == (1, 1)
        and _is_nhwc(dimension_numbers)
        and feature_group_count == 1
        and precision is None
        and not kwargs
        and lhs.dtype == rhs.dtype == jnp.float32
    )
    if covered:
        kh, kw, c, f = rhs.shape
        if isinstance(padding, str):
            padding = lax.padtype_to_pads(lhs.shape[1:3], (kh, kw), (1, 1), padding)
        pads = tuple((int(lo), int(hi)) for lo, hi in padding)
        fits = all(0 <= p < k for (lo, hi), k in zip(pads, (kh, kw), strict=True) for p in (lo, hi))
        forward_dot = _forward_dot_pays(kh * kw, c, f)
        kernel_dot = _dot_pays(kh * kw, c, f)
        if fits and (forward_dot or kernel_dot):
            return conv_nhwc(lhs, rhs, pads, forward_dot, kernel_dot)
    return lax.conv_general_dilated(
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation,
        rhs_dilation,
        dimension_numbers,
        feature_group_count,
        precision=precision,
        **kwargs,
    )


def _dot_pays(taps: int, c: int, f: int) -> bool:
    # The dot writes `taps` copies of the narrow side; XLA's kernel-gradient convolution
    # transposes both sides once.
    return taps * min(c, f) <= max(c, f)


def _forward_dot_pays(taps: int, c: int, f: int) -> bool:
    # The forward dot writes `taps` times the output's width and reads it back to sum
    # the taps. The threshold was measured against others on both DenseNets' train
    # steps (benchmarks/README.md, "CPU changes tried").
    return 2 * c >= taps * f


def _is_nhwc(dimension_numbers) -> bool:
    if isinstance(dimension_numbers, lax.ConvDimensionNumbers):
        return tuple(dimension_numbers) == ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))
    return dimension_numbers is not None and tuple(dimension_numbers) == _DIMS


def _plain(x, w, pads):
    return lax.conv_general_dilated(x, w, (1, 1), pads, dimension_numbers=_DIMS)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv_nhwc(
    x: jax.Array,
    w: jax.Array,
    pads: tuple[tuple[int, int], ...],
    forward_dot: bool = True,
    kernel_dot: bool = True,
) -> jax.Array:
    """Stride-1 convolution of x (N, H, W, C) with w (KH, KW, C, F), zero padding `pads`
    ((top, bottom), (left, right)), each in [0, kernel size); its forward by
    `forward_as_dot` if `forward_dot`, its kernel gradient by `kernel_grad` if
    `kernel_dot`, each else XLA's convolution."""
    return _apply(x, w, pads, forward_dot)


def _apply(x, w, pads, forward_dot):
    return forward_as_dot(x, w, pads) if forward_dot else _plain(x, w, pads)


def _forward(x, w, pads, forward_dot, kernel_dot):
    del kernel_dot
    return _apply(x, w, pads, forward_dot), (x, w)


def _backward(pads, forward_dot, kernel_dot, residuals, g):
    del forward_dot
    x, w = residuals
    if not kernel_dot:
        return jax.vjp(lambda v, k: _plain(v, k, pads), x, w)[1](g)
    _, input_vjp = jax.vjp(lambda v: _plain(v, w, pads), x)
    return input_vjp(g)[0], kernel_grad(x, g, w.shape, pads)


conv_nhwc.defvjp(_forward, _backward)


def forward_as_dot(x: jax.Array, w: jax.Array, pads) -> jax.Array:
    """The convolution (N, Ho, Wo, F) of x (N, H, W, C) with w (KH, KW, C, F), zero
    padding `pads`, stride 1: one dot of x with the taps side by side, then the sum of
    each tap's shifted slice of it."""
    kh, kw, c, f = w.shape
    h, wd = x.shape[1:3]
    (top, bottom), (left, right) = pads
    ho, wo = h + top + bottom - kh + 1, wd + left + right - kw + 1
    # z[n, i, j, (a, b, f)] = sum over c of x[n, i, j, c] w[a, b, c, f]
    taps = jnp.transpose(w, (2, 0, 1, 3)).reshape(c, kh * kw * f)
    z = lax.dot_general(x, taps, (((3,), (0,)), ((), ())))
    z = jnp.pad(z, ((0, 0), (top, bottom), (left, right), (0, 0)))
    # y[n, i, j, f] = sum over a, b of z_padded[n, i + a, j + b, (a, b, f)]
    pieces = [
        z[:, a : a + ho, b : b + wo, (a * kw + b) * f : (a * kw + b + 1) * f]
        for a in range(kh)
        for b in range(kw)
    ]
    return functools.reduce(jnp.add, pieces)


def kernel_grad(x, g, kernel_shape, pads) -> jax.Array:
    """d(loss)/d(kernel) (KH, KW, C, F) of a stride-1 NHWC convolution with zero padding
    `pads`, from its input x (N, H, W, C) and output gradient g (N, Ho, Wo, F)."""
    kh, kw = kernel_shape[:2]
    n, h, w, c = x.shape
    ho, wo, f = g.shape[1:]
    (top, bottom), (left, right) = pads
    if c < f:
        # dW[a, b] = sum over n, i, j of x_pad[n, i + a, j + b] g[n, i, j]: the windows
        # of x, transposed to (C, N, Ho, Wo), against g as it lies in memory.
        x_t = jnp.pad(jnp.transpose(x, (3, 0, 1, 2)), ((0, 0), (0, 0), *pads))
        windows = [x_t[:, :, a : a + ho, b : b + wo] for a in range(kh) for b in range(kw)]
        lhs = jnp.stack(windows).reshape(kh * kw * c, n, ho, wo)
        d = lax.dot_general(lhs, g, (((1, 2, 3), (0, 1, 2)), ((), ())))
        return d.reshape(kh, kw, c, f)
    # dW[a, b] = sum over n, i, j of x[n, i, j] g[n, i + top - a, j + left - b] (g zero
    # outside its map): shifted copies of g, transposed, against x as it lies in memory.
    # First a dot with the identity (exact): XLA fuses g's producers (the BatchNorm
    # backward of every later layer) into each transposing consumer, recomputing them
    # there, but not into a dot. (It drops lax.optimization_barrier on CPU.)
    g = lax.dot_general(g, jnp.eye(f, dtype=g.dtype), (((3,), (0,)), ((), ())))
    g_t = jnp.transpose(g, (3, 0, 1, 2))
    if (kh, kw, ho, wo) == (1, 1, h, w):
        lhs = g_t
    else:
        g_t = jnp.pad(
            g_t,
            ((0, 0), (0, 0), (kh - 1 - top, kh - 1 - bottom), (kw - 1 - left, kw - 1 - right)),
        )
        shifted = [
            g_t[:, :, kh - 1 - a : kh - 1 - a + h, kw - 1 - b : kw - 1 - b + w]
            for a in range(kh)
            for b in range(kw)
        ]
        lhs = jnp.stack(shifted).reshape(kh * kw * f, n, h, w)
    d = lax.dot_general(lhs, x, (((1, 2, 3), (0, 1, 2)), ((), ())))
    return jnp.transpose(d.reshape(kh, kw, f, c), (0, 1, 3, 2))
